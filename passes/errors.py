"""The single error type convfx raises for models it cannot handle."""
from __future__ import annotations

__all__ = ["ConvfxError"]


class ConvfxError(Exception):
    """A model, layer, checkpoint or input that convfx cannot handle.

    Carries the offending module/node name (``where``) so that callers can act on it,
    and formats it into the message so that users see it without digging.

    >>> raise ConvfxError("weights contain NaN", where="layer1.0.conv1")
    Traceback (most recent call last):
    ...
    passes.errors.ConvfxError: [layer1.0.conv1] weights contain NaN
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.where = where
        self.reason = message
        self.hint = hint
        text = f"[{where}] {message}" if where else message
        if hint:
            text = f"{text}\n  hint: {hint}"
        super().__init__(text)
