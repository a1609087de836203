"""Training FLOPs per image, counted by PyTorch's FlopCounterMode on the meta device."""

from __future__ import annotations

import pytest
import torch

import vitmpp.models.flops as flops_module
from vitmpp.models import create_encoder, create_objective, flops_per_image

from models_helpers import TINY, tiny_objective


def _forward_matmul_flops(tokens: int, dim: int, depth: int, patches: int, patch: int, head_out: int, head_rows: int):
    per_block = 2 * tokens * (3 * dim * dim + dim * dim + 8 * dim * dim) + 2 * 2 * tokens * tokens * dim
    patch_embed = 2 * patches * 3 * patch * patch * dim
    return depth * per_block, patch_embed, 2 * head_rows * dim * head_out


def test_supervised_count_matches_the_formula():
    objective = tiny_objective("supervised", num_classes=10)
    blocks, patch_embed, head = _forward_matmul_flops(17, 64, 2, 16, 4, 10, 1)
    # backward costs twice the forward, except that no gradient flows into the pixels
    assert flops_per_image(objective) == 3 * (blocks + head) + 2 * patch_embed


def test_mpp_count_matches_the_formula():
    objective = tiny_objective("mpp")
    blocks, patch_embed, head = _forward_matmul_flops(17, 64, 2, 16, 4, 512, 8)  # head on the 8 corrupted patches
    assert flops_per_image(objective) == 3 * (blocks + head) + 2 * patch_embed


def test_image_size_and_cache(monkeypatch):
    objective = tiny_objective("mpp")
    small = flops_per_image(objective)
    large = flops_per_image(objective, img_size=32)
    assert large > 4 * small  # 4x the tokens, attention grows faster
    monkeypatch.setattr(flops_module, "_count", lambda *a: pytest.fail("cached value was recounted"))
    assert flops_per_image(objective) == small and flops_per_image(objective, 32) == large
    # the same class and options on another architecture is another entry
    monkeypatch.undo()
    other = create_objective("mpp", create_encoder(TINY, depth=3))
    assert flops_per_image(other) > small


def test_mae_costs_about_half_of_mpp_for_vit_base():
    with torch.device("meta"):
        mpp = create_objective("mpp", create_encoder("vit_base_patch16_224"))
        mae = create_objective("mae", create_encoder("vit_base_patch16_224"))
    mpp_flops, mae_flops = flops_per_image(mpp), flops_per_image(mae)
    # ViT-B/16 forward is 17.6 GMACs = 35 GFLOPs; training is about 3x that
    assert 100e9 < mpp_flops < 110e9
    # MAE encodes 49 + 1 of 197 tokens and decodes all 197 with 8 narrow blocks
    assert 0.5 < mae_flops / mpp_flops < 0.6
