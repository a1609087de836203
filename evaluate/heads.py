"""Models the evaluation protocols train: a linear probe on a frozen encoder, and a
full classifier (a timm VisionTransformer with a new head)."""

from __future__ import annotations

import torch
from torch import nn


def pooled_features(encoder: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, 3, H, W] -> [B, D]: the class token after the final norm, or the mean of patch tokens."""
    tokens = encoder.forward_features(images)  # [B, prefix + N, D], final norm applied
    if pool == "token":
        return tokens[:, 0]
    return tokens[:, encoder.num_prefix_tokens :].mean(dim=1)


class LinearProbe(nn.Module):
    """MAE's linear protocol: frozen encoder -> BatchNorm1d(affine=False, eps=1e-6) -> Linear.

    The BatchNorm without affine parameters normalises the features so one
    learning rate suits every encoder (MAE, appendix A.3); it is equivalent to a
    linear layer after training. The encoder stays in eval mode and gets no
    gradients, whatever `train()` is called with.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "token"):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.pool = pool
        self.norm = nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # ViT paper: the new head starts at zero
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = pooled_features(self.encoder, images, self.pool)
        return self.head(self.norm(features.float()))


def make_classifier(encoder: nn.Module, num_classes: int, global_pool: str) -> nn.Module:
    """Turn a timm VisionTransformer encoder into a classifier with a zero-initialised head."""
    encoder.reset_classifier(num_classes, global_pool=global_pool)
    nn.init.zeros_(encoder.head.weight)
    nn.init.zeros_(encoder.head.bias)
    return encoder
