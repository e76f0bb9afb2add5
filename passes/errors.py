"""The single error type convfx raises for models it cannot handle."""
from __future__ import annotations

__all__ = ["ConvfxError", "CORRUPT_FILE", "STATE_DICT_MISMATCH", "UNKNOWN_ARCH", "UNSAFE_PICKLE"]

# Kinds: stable names for the failures that callers act on, so that they need not match
# message text (which is written for people and may be reworded).

#: A saved model cannot be rebuilt by name: the file names no architecture, or one
#: that is not in the convfx registry (the caller can supply the model instead).
UNKNOWN_ARCH = "unknown_arch"
#: A file was refused because unpickling it would run code (``weights_only=True``).
UNSAFE_PICKLE = "unsafe_pickle"
#: A file is empty, truncated or corrupted (including a failed content digest).
CORRUPT_FILE = "corrupt_file"
#: A state dict does not fit the model: missing or unexpected keys, or other shapes.
STATE_DICT_MISMATCH = "state_dict_mismatch"


class ConvfxError(Exception):
    """A model, layer, checkpoint or input that convfx cannot handle.

    Carries the offending module/node name (``where``) so that callers can act on it,
    and formats it into the message so that users see it without digging. ``kind``
    (one of this module's kind constants, or None) names the failure for code that
    handles some failures differently.

    >>> raise ConvfxError("weights contain NaN", where="layer1.0.conv1")
    Traceback (most recent call last):
    ...
    passes.errors.ConvfxError: [layer1.0.conv1] weights contain NaN
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None,
                 kind: str | None = None) -> None:
        self.where = where
        self.reason = message
        self.hint = hint
        self.kind = kind
        text = f"[{where}] {message}" if where else message
        if hint:
            text = f"{text}\n  hint: {hint}"
        super().__init__(text)
