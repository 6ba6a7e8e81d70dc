"""Heatmaps and bar charts of the similarity views, written atomically.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, no display),
so plotting works on headless cluster nodes and from several threads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .provenance import atomic_path

MAX_TICKS = 16


def _tick_step(n: int) -> int:
    return max(1, math.ceil(n / MAX_TICKS))


def _save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        # the temporary name ends in .tmp, so the format must be given explicitly
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")


def heatmap(matrix: np.ndarray, labels: Sequence[str], title: str, path: str | Path,
            groups: Sequence[Sequence[int]] | None = None, cmap: str = "viridis") -> None:
    """A labelled heatmap with a colorbar; `groups` (lists of block indices) are outlined in red.

    A group of blocks a..c is drawn over rows and columns a..c: the inputs of its blocks, whose
    similarity S[a, c] decided the merge.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    size = min(12.0, 4.0 + 0.2 * n)
    figure = Figure(figsize=(size + 1.5, size))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap=cmap, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = list(range(0, n, _tick_step(n)))
    if n - 1 not in ticks:
        ticks.append(n - 1)
    axes.set_xticks(ticks, [labels[i] for i in ticks], rotation=90)
    axes.set_yticks(ticks, [labels[i] for i in ticks])
    axes.set_title(title)
    for group in groups or []:
        if len(group) > 1:
            start, span = group[0] - 0.5, len(group)
            axes.add_patch(Rectangle((start, start), span, span, fill=False, edgecolor="red", linewidth=1.5))
    _save(figure, path)


def bar(values: Sequence[float], labels: Sequence[str], title: str, path: str | Path,
        xlabel: str | None = None, ylabel: str | None = None) -> None:
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    figure = Figure(figsize=(min(14.0, 4.0 + 0.25 * n), 4.0))
    axes = figure.add_subplot()
    axes.bar(np.arange(n), values, color="tab:blue")
    ticks = list(range(0, n, _tick_step(n)))
    axes.set_xticks(ticks, [labels[i] for i in ticks])
    axes.set_title(title)
    if xlabel:
        axes.set_xlabel(xlabel)
    if ylabel:
        axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)
    _save(figure, path)
