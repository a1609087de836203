"""Labelled matplotlib figures of the analysis (Agg canvas, no pyplot state).

Figures are built as `matplotlib.figure.Figure` objects drawn on an Agg canvas,
so nothing here depends on (or changes) the process's pyplot backend; they are
saved as PNG (`save_figure`) or turned into arrays for TensorBoard
(`figure_to_array`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from vitmpp.common.errors import UserError
from vitmpp.common.io import atomic_write

from .render import ROLLOUT_CMAP, SIMILARITY_CMAP, filter_tiles, rollout_pairs, similarity_tiles

# Font sizes (points at 100 dpi): TensorBoard shows a figure at its pixel size, and a card is
# ~350 px wide, so labels below 8 pt are unreadable there without zooming.
TITLE_FONT, LABEL_FONT, TICK_FONT = 10, 9, 8


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _label(ax, title: str, xlabel: str | None = None, ylabel: str | None = None) -> None:
    ax.set_title(title, fontsize=TITLE_FONT)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=LABEL_FONT)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=LABEL_FONT)
    ax.tick_params(labelsize=TICK_FONT)


def _as_hwc(image_chw: Tensor) -> np.ndarray:
    return image_chw.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def rollout_figure(images01: Tensor, maps: Tensor, columns: int = 4) -> Figure:
    """Attention rollout: each image [B, 3, H, W] in [0, 1] next to its overlay of the map [B, gh, gw],
    `columns` pairs a row."""
    image = rollout_pairs(images01, maps, columns=columns)
    height, width = image.shape[-2:]
    figure = _new_figure(min(12.0, width / 60 + 0.4), min(16.0, height / 60 + 0.6))
    ax = figure.subplots()
    ax.imshow(_as_hwc(image), interpolation="nearest")
    ax.set_axis_off()
    _label(ax, "Attention rollout (Abnar & Zuidema 2020): image | class-token map")
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), cmap=ROLLOUT_CMAP), ax=ax, shrink=0.6)
    bar.set_label("attention, share of the image's peak", fontsize=LABEL_FONT)
    bar.ax.tick_params(labelsize=TICK_FONT)
    return figure


def mean_distance_figure(distances: Tensor, image_size: int | None = None, uniform: float | None = None) -> Figure:
    """Mean attention distance [L, H] in pixels: one dot per head, network depth (layer) on the x-axis;
    `uniform` (pixels): the distance uniform attention over the grid gives, drawn as a dashed line (a
    head near it attends globally, one far below it locally, as in the ViT paper's Figure 7)."""
    values = distances.detach().double().cpu().numpy()
    layers, heads = values.shape
    figure = _new_figure(max(4.0, 0.45 * layers + 2.5), 3.6)
    ax = figure.subplots()
    colours = [f"C{h % 10}" for h in range(heads)]
    for h in range(heads):
        ax.scatter(
            np.arange(1, layers + 1),
            values[:, h],
            s=14,
            color=colours[h],
            label=f"head {h + 1}" if heads <= 16 else None,
        )
    _label(ax, "Mean attention distance per head", "network depth (layer)", "mean attention distance (pixels)")
    ax.set_xticks(np.arange(1, layers + 1))
    if uniform is not None:
        ax.axhline(uniform, color="0.4", linestyle="--", linewidth=1, label="uniform attention")
    top = max(float(np.nanmax(values)) if values.size else 1.0, uniform or 0.0)
    if image_size:
        top = max(top, 0.5 * image_size)  # keep the scale readable against the image size
    ax.set_ylim(0, 1.08 * top if top > 0 else 1.0)
    ax.grid(alpha=0.3)
    if heads <= 16 or uniform is not None:
        ax.legend(fontsize=TICK_FONT, ncol=2, loc="lower right", frameon=False)
    return figure


def position_similarity_figure(similarity: Tensor, grid_size: tuple[int, int]) -> Figure:
    """Cosine similarity of position embeddings [P, P] as a grid of heat maps laid out like the patches."""
    gh, gw = grid_size
    image = similarity_tiles(similarity, grid_size)
    figure = _new_figure(5.6, 5.0)
    ax = figure.subplots()
    ax.imshow(_as_hwc(image), interpolation="nearest")
    height, width = image.shape[-2:]
    # tick at the centre of each tile (make_grid puts `padding` pixels before every tile)
    tile_h, tile_w = (height - 2) / gh, (width - 2) / gw
    ax.set_xticks([2 + tile_w * (c + 0.5) - 1 for c in range(gw)], [str(c + 1) for c in range(gw)])
    ax.set_yticks([2 + tile_h * (r + 0.5) - 1 for r in range(gh)], [str(r + 1) for r in range(gh)])
    _label(ax, "Position embedding similarity", "input patch column", "input patch row")
    bar = figure.colorbar(ScalarMappable(Normalize(-1, 1), cmap=SIMILARITY_CMAP), ax=ax, shrink=0.8)
    bar.set_label("cosine similarity", fontsize=LABEL_FONT)
    bar.ax.tick_params(labelsize=TICK_FONT)
    return figure


def embedding_filters_figure(
    filters: Tensor, explained_variance_ratio: list[float] | None = None, columns: int = 7
) -> Figure:
    """Principal components of the patch-embedding filters [K, C, P, P], one tile each, labelled
    with its rank and share of the variance."""
    count = len(filters)
    columns = max(1, min(columns, count))
    # one tiled image with room above every tile for its label: a figure with one axes per
    # filter takes seconds to lay out
    tile = max(40, filters.shape[-1])
    label_room = 14
    image = filter_tiles(filters, nrow=columns, min_pixels=tile, padding=label_room)
    tile_h = (image.shape[-2] - label_room) / -(-count // columns)
    tile_w = (image.shape[-1] - label_room) / columns
    figure = _new_figure(1.1 * columns + 0.3, 1.15 * (-(-count // columns)) + 0.6)
    ax = figure.subplots()
    ax.imshow(_as_hwc(image), interpolation="nearest")
    ax.set_axis_off()
    for k in range(count):
        r, c = divmod(k, columns)
        label = f"PC{k + 1}"
        if explained_variance_ratio is not None:
            label += f" {100 * explained_variance_ratio[k]:.1f}%"
        ax.text(
            label_room + c * tile_w + (tile_w - label_room) / 2,
            r * tile_h + label_room * 0.55,
            label,
            ha="center",
            va="center",
            fontsize=TICK_FONT - 1,
        )
    _label(ax, "RGB embedding filters (principal components)")
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """The rendered figure: uint8 [H, W, 3]."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write the figure as PNG at `path`, atomically (`common.io.atomic_write`)."""
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    try:
        return atomic_write(path, png.getvalue())
    except OSError as err:
        raise UserError(
            f"Could not write {path}: {err.strerror or err}; check the folder is writable and has space."
        ) from None
