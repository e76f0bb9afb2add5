"""Accuracy-versus-cost plots (matplotlib's Agg canvas: no display needed).

Why a module: the trade-off between conv MACs and accuracy is the one picture that
tells whether a compression setting is worth it; the demo and the benchmarks draw it
the same way, with the MAC convention printed on the axis.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Point", "plot_accuracy_vs_macs"]

log = logging.getLogger(__name__)

MAC_AXIS_LABEL = "conv MACs per image, millions (1 multiply-add = 1, fvcore; GFLOPs = 2 x GMACs)"


@dataclass(frozen=True)
class Point:
    """One model on the plot: a label, its conv MACs per image and its top-1 (%).

    ``group`` joins points into a line (e.g. "Tucker + BN re-est."); ``reference``
    marks the uncompressed model, drawn as a star; ``offset`` moves its label (points)
    so that labels of close-by points of different groups do not overlap.
    """

    label: str
    macs: int
    top1: float
    group: str = ""
    reference: bool = False
    offset: tuple[int, int] = (6, 6)  # label position relative to the marker, in points (x < 0: left)


def plot_accuracy_vs_macs(points: Sequence[Point], path: str | os.PathLike[str], *,
                          title: str = "Top-1 accuracy vs conv MACs") -> Path:
    """Write a labelled scatter/line plot of ``points`` to ``path`` (PNG, 150 dpi); return it."""
    # A bare Figure renders with the Agg canvas: no display needed, and unlike
    # matplotlib.use("Agg") it leaves the caller's pyplot backend (e.g. a notebook's) alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("points: nothing to plot")
    fig = Figure(figsize=(7.5, 5.0), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    groups: dict[str, list[Point]] = {}
    for p in points:
        if not p.reference:
            groups.setdefault(p.group, []).append(p)
    markers = ["o", "s", "^", "D", "v"]
    for i, (group, pts) in enumerate(groups.items()):
        pts = sorted(pts, key=lambda p: p.macs)
        ax.plot([p.macs / 1e6 for p in pts], [p.top1 for p in pts], marker=markers[i % len(markers)],
                linestyle="-" if len(pts) > 1 else "none", label=group or None, markersize=7)
    for p in points:
        if p.reference:
            ax.plot([p.macs / 1e6], [p.top1], marker="*", markersize=16, color="black", linestyle="none",
                    label=p.label)
    for p in points:
        ax.annotate(f"{p.label}: {p.top1:.2f}%", (p.macs / 1e6, p.top1), textcoords="offset points",
                    xytext=p.offset, fontsize=8, ha="right" if p.offset[0] < 0 else "left")
    ax.set_xlabel(MAC_AXIS_LABEL, fontsize=9)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=11)
    xmax = max(p.macs for p in points) / 1e6
    ax.set_xlim(0, xmax * 1.22)
    lo = min(p.top1 for p in points)
    hi = max(p.top1 for p in points)
    ax.set_ylim(max(0.0, lo - 8), min(100.0, hi + 8))
    ax.grid(True, alpha=0.3)
    # Below the axes, so that it never hides a point or a label.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, out)
    log.info("wrote %s", out)
    return out
