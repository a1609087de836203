"""Pictures as tensors: float [3, H, W] images in [0, 1], ready for `SummaryWriter.add_image`.

These are cheap (no matplotlib figure is drawn: colour maps are lookup tables and
the tiling is torchvision's `make_grid`), so the pretraining engine can log them
often. `figures.py` puts the same tiles into labelled matplotlib figures.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

# Small tiles are enlarged (nearest neighbour) to at least this many pixels a side, so
# that a 4x4 filter or an 8x8 heat map is visible in TensorBoard without zooming.
MIN_TILE_PIXELS = 32
SIMILARITY_CMAP = "viridis"
ROLLOUT_CMAP = "inferno"


@functools.lru_cache(maxsize=8)
def _lookup_table(cmap: str) -> Tensor:
    import matplotlib

    colours = matplotlib.colormaps[cmap].resampled(256)(torch.linspace(0, 1, 256).numpy())[:, :3]
    return torch.from_numpy(colours).float()


def colorize(values: Tensor, cmap: str = SIMILARITY_CMAP, vmin: float = 0.0, vmax: float = 1.0) -> Tensor:
    """Map values [..., H, W] through a matplotlib colour map: [..., 3, H, W] float in [0, 1]."""
    table = _lookup_table(cmap).to(values.device)
    scaled = ((values.float() - vmin) / max(vmax - vmin, 1e-12)).clamp(0, 1)
    index = (scaled * 255).round().long()
    rgb = table[index]  # [..., H, W, 3]
    return rgb.movedim(-1, -3)


def _enlarge(tiles: Tensor, min_pixels: int = MIN_TILE_PIXELS) -> Tensor:
    """Nearest-neighbour enlargement of [K, C, h, w] tiles by an integer factor to >= min_pixels a side."""
    factor = max(1, -(-min_pixels // max(1, min(tiles.shape[-2:]))))
    return tiles if factor == 1 else F.interpolate(tiles, scale_factor=factor, mode="nearest")


def similarity_tiles(similarity: Tensor, grid_size: tuple[int, int], min_pixels: int = MIN_TILE_PIXELS) -> Tensor:
    """Position similarity [P, P] as one image: a heat map per patch (over the grid), laid out as the grid.

    Colour scale fixed to [-1, 1] (cosine similarity), so pictures from different
    steps compare. Returns [3, H, W] in [0, 1], white between the tiles.
    """
    gh, gw = grid_size
    maps = similarity.detach().float().cpu().reshape(gh * gw, 1, gh, gw)
    tiles = colorize(maps[:, 0], SIMILARITY_CMAP, -1.0, 1.0)
    tiles = _enlarge(tiles, min_pixels // 2)  # there are many tiles: half the usual size
    return make_grid(tiles, nrow=gw, padding=2, pad_value=1.0)


def filters_for_display(filters: Tensor) -> Tensor:
    """Filters [K, C, P, P] -> [K, 3, P, P] in [0, 1]: each scaled so that 0 is grey and its largest |value| is 0 or 1.

    C = 3 is shown as RGB; any other C as the mean over channels in grey.
    """
    filters = filters.detach().float().cpu()
    if filters.shape[1] != 3:
        filters = filters.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    peak = filters.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return 0.5 + 0.5 * filters / peak


def filter_tiles(filters: Tensor, nrow: int = 7, min_pixels: int = MIN_TILE_PIXELS, padding: int = 2) -> Tensor:
    """Filters [K, C, P, P] as one image [3, H, W] in [0, 1] (see `filters_for_display`), `nrow` a row,
    `padding` white pixels around every tile."""
    shown = filters_for_display(filters)
    return make_grid(_enlarge(shown, min_pixels), nrow=min(nrow, len(shown)), padding=padding, pad_value=1.0)


def images_for_display(images_normalised: Tensor) -> Tensor:
    """Normalised images [B, 3, H, W] stretched per image and channel to [0, 1] (when the mean/std are unknown).

    Normalisation is an affine map per channel, so this undoes it up to each
    channel's own contrast stretch: good enough to see what the model looked at.
    """
    x = images_normalised.detach().float()
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-6)


def rollout_overlays(images01: Tensor, maps: Tensor, alpha: float = 0.6) -> Tensor:
    """Heat maps [B, gh, gw] upsampled (bilinear) onto images [B, 3, H, W] in [0, 1]: [B, 3, H, W] in [0, 1].

    Each map is scaled to its own maximum: the picture shows where an image's
    attention goes, not how peaked it is. The image under it is shown in grey (luma,
    ITU-R BT.601 weights): the heat map's colours then never blend with an image's own
    warm colours, which made it unreadable on photos.
    """
    images01 = images01.detach().float().cpu().clamp(0, 1)
    maps = maps.detach().float().cpu()
    height, width = images01.shape[-2:]
    upsampled = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    peak = upsampled.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    heat = colorize(upsampled / peak, ROLLOUT_CMAP)
    grey = (0.299 * images01[:, 0:1] + 0.587 * images01[:, 1:2] + 0.114 * images01[:, 2:3]).expand_as(images01)
    # the grey image darkened where attention is low, plus the colour of the heat map
    weight = (upsampled / peak)[:, None]
    return ((1 - alpha) * grey * (0.35 + 0.65 * weight) + alpha * heat).clamp(0, 1)


def rollout_pairs(images01: Tensor, maps: Tensor, columns: int = 4, min_pixels: int = 64) -> Tensor:
    """Image and overlay side by side for each image, `columns` pairs a row: [3, H, W] in [0, 1]."""
    overlays = rollout_overlays(images01, maps)
    images01 = images01.detach().float().cpu().clamp(0, 1)
    pairs = torch.stack([images01, overlays], dim=1).flatten(0, 1)  # image, overlay, image, overlay, ...
    return make_grid(_enlarge(pairs, min_pixels), nrow=2 * min(columns, len(images01)), padding=2, pad_value=1.0)
