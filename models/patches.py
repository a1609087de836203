"""Patch bookkeeping shared by the objectives: patchify/unpatchify and static-shape gathers.

Patch order is row-major over the grid, as timm's `PatchEmbed` (a strided conv
then `flatten(2)`) numbers its tokens; the values inside a patch are ordered
(row, column, channel), as MAE's and `transformers.ViTMAE`'s patchify.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor


def patchify(images: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] with N = (H/p)(W/p)."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x: Tensor, p: int, h: int | None = None, w: int | None = None, channels: int = 3) -> Tensor:
    """[B, N, p*p*C] -> [B, C, h, w]; `h`, `w` in pixels (default: a square image)."""
    n = x.shape[1]
    if h is None or w is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"unpatchify: {n} patches do not form a square grid; pass h and w")
        h = w = side * p
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h // p, w=w // p, p=p, q=p, c=channels)


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """tokens [B, N, ...], ids [B, K] (long) -> [B, K, ...]: per-image selection with a static shape."""
    index = ids.reshape(*ids.shape, *([1] * (tokens.dim() - 2))).expand(-1, -1, *tokens.shape[2:])
    return torch.gather(tokens, 1, index)
