"""Shared pieces for the models tests: tiny encoders and images with known statistics."""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitmpp.models import create_encoder, create_objective

TINY = "vit_pico_patch4_16"  # 16 px, patch 4 -> 16 patches, width 64, 2 blocks
TINY_MAE = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def normalise(images01: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """What the loader does: (x - mean) / std per channel."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images01 - m) / s


def uint8_images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random images on the 8-bit grid, in [0, 1]: [B, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float() / 255.0


def blocky_images(batch: int, size: int = 16, patch: int = 4, seed: int = 0) -> torch.Tensor:
    """Images made of flat-coloured patches (an easy, learnable MPP task), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    grid = size // patch
    colours = torch.rand(batch, 3, grid, grid, generator=g)
    return colours.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def tiny_objective(name: str, seed: int = 0, encoder: str = TINY, num_classes: int | None = 10, **cfg):
    torch.manual_seed(seed)
    if name == "mae":
        cfg = {**TINY_MAE, **cfg}
    return create_objective(name, create_encoder(encoder), num_classes=num_classes, **cfg)
