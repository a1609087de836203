"""Tiny timm ViTs for the analysis tests."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A plain timm ViT: 32 px images, 4 px patches (8x8 grid), width 64, 2 blocks, 4 heads, no head."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs).eval()


def random_images(count: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)


def uniform_rows(batch: int, heads: int, tokens: int) -> torch.Tensor:
    """Attention [B, H, N, N] that spreads every query's weight evenly over all keys."""
    return torch.full((batch, heads, tokens, tokens), 1.0 / tokens)
