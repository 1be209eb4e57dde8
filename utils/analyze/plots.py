"""Figures of the analysis commands, drawn with matplotlib's object API (no pyplot state, Agg canvas)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["erf_figure", "activation_figure", "save"]

PANEL_INCHES = 2.6
# the colour maps of the ERF and attention figures these tools reproduce
ERF_CMAP = "RdYlGn"
ACTIVATION_CMAP = "jet"


def save(fig: Figure, path: str) -> None:
    """Write `fig` as a PNG at `path` (the folder must exist)."""
    FigureCanvasAgg(fig)
    fig.savefig(Path(path), format="png", dpi=100)


def erf_figure(panels: Sequence[Tuple[str, np.ndarray, Sequence[Tuple[float, float]]]], stage: int) -> Figure:
    """One heat map per model: (label, log-scaled ERF (H, W) in [0, 1], [(threshold, area ratio), ...])."""
    fig = Figure(figsize=(PANEL_INCHES * len(panels) + 1.0, PANEL_INCHES + 0.9), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, scaled, ratios) in zip(axes, panels):
        image = ax.imshow(scaled, cmap=ERF_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        # two thresholds per line, so the numbers fit under a narrow panel
        text = [f"{t:.0%}: {r:.3f}" for t, r in ratios]
        ax.set_xlabel("\n".join("   ".join(text[k:k + 2]) for k in range(0, len(text), 2)), fontsize=7)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="log10(ERF + 1), scaled")
    fig.suptitle(f"effective receptive field of stage {stage}\n(area ratio at each threshold below)", fontsize=9)
    return fig


def activation_figure(image_rows: Sequence[Tuple[str, np.ndarray, np.ndarray, Sequence[Tuple[int, int]]]],
                      stage: int, block: int) -> Figure:
    """One row per model: its input picture, then one overlay per query.

    Each row is (label, picture (H, W, 3) uint8, maps (Q, h, w) in [0, 1], query tokens [(row, col), ...]);
    maps are upsampled to the picture by nearest neighbour (each token covers its own pixels) and the query
    token is marked with a white star."""
    queries = len(image_rows[0][2])
    fig = Figure(figsize=(PANEL_INCHES * (queries + 1), PANEL_INCHES * len(image_rows)), layout="constrained")
    axes = fig.subplots(len(image_rows), queries + 1, squeeze=False)
    for row_axes, (label, picture, maps, tokens) in zip(axes, image_rows):
        height, width = picture.shape[:2]
        pixels = (0, width, height, 0)   # picture and maps on the same pixel grid
        row_axes[0].imshow(picture, extent=pixels)
        row_axes[0].set_ylabel(label, fontsize=9)
        for q, (ax, response, (i, j)) in enumerate(zip(row_axes[1:], maps, tokens)):
            h, w = response.shape
            ax.imshow(picture, extent=pixels)
            # token (r, c) covers pixels [c * W / w, (c + 1) * W / w) x [r * H / h, (r + 1) * H / h)
            ax.imshow(response, cmap=ACTIVATION_CMAP, alpha=0.55, vmin=0.0, vmax=1.0, interpolation="nearest",
                      extent=pixels)
            ax.plot([(j + 0.5) * width / w], [(i + 0.5) * height / h], marker="*", color="white",
                    markeredgecolor="black", markersize=12)
            ax.set_title(f"query {q + 1}: token ({i}, {j})", fontsize=8)
        for ax in row_axes:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"activation maps of the token mixer of stage {stage}, block {block}", fontsize=9)
    return fig
