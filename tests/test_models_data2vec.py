"""data2vec (Baevski et al. 2022, image setting): block-wise masks, the teacher's target, the loss,
the teacher outside the optimizer, the EMA update and its schedule, and the recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from vitmpp.common.config import from_dict
from vitmpp.common.errors import ConfigError
from vitmpp.common.optim import build_optimizer
from vitmpp.common.sections import OptimConfig
from vitmpp.models import create_encoder, create_objective
from vitmpp.models.objectives.data2vec import Data2VecConfig, blockwise_mask, ema_rate

from models_helpers import TINY, assert_randomness_is_resumable, uint8_images

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def tiny_data2vec(seed: int = 0, **cfg):
    """vit_pico_patch4_16: a 4x4 grid, 2 blocks of width 64; both blocks averaged, blocks of 2+ patches."""
    torch.manual_seed(seed)
    return create_objective("data2vec", create_encoder(TINY), **{"top_k_blocks": 2, "min_block_patches": 2, **cfg})


def trained_apart(objective, seed: int = 1):
    """The student moved away from the teacher (as after some steps), so the two differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in objective.encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return objective


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("grid, ratio, min_block", [(14, 0.6, 16), (4, 0.6, 2), (8, 0.4, 4)])
def test_block_masks_mask_at_most_the_ratio_and_close_to_it(grid, ratio, min_block):
    torch.manual_seed(0)
    target = round(ratio * grid * grid)
    mask = blockwise_mask(256, grid, grid, target, min_block)
    counts = mask.sum(dim=1)
    assert mask.dtype == torch.bool and mask.shape == (256, grid * grid)
    assert int(counts.max()) <= target
    assert counts.float().mean() >= 0.97 * target  # BEiT's rule stops short only when no block fits


def test_each_block_is_a_rectangle_smaller_than_the_grid_of_about_min_block_patches_or_more():
    """One attempt per image: nothing, or one filled rectangle (BEiT: area drawn from [16, to mask],
    aspect ratio from [0.3, 1/0.3], sides rounded, each side shorter than the grid's)."""
    torch.manual_seed(0)
    masks = blockwise_mask(512, 14, 14, 118, 16, attempts=1).view(512, 14, 14)
    shapes = []
    for mask in masks:
        if not mask.any():
            continue
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(mask.sum()) == h * w and h < 14 and w < 14  # filled, and strictly inside the grid
        shapes.append((h, w))
    assert len(shapes) > 256  # most first attempts fit
    assert min(h * w for h, w in shapes) >= 12  # area >= 16 before each side is rounded
    assert max(h * w for h, w in shapes) <= 118
    assert min(min(h, w) / max(h, w) for h, w in shapes) >= 0.3 * 0.6  # the aspect range, up to rounding


def test_masks_come_from_the_global_generator_and_draw_the_same_amount_every_batch():
    objective = tiny_data2vec()
    torch.manual_seed(5)
    first = objective.sample_mask(8)
    after_first = torch.rand(1)
    torch.manual_seed(5)
    again = objective.sample_mask(8)
    assert torch.equal(first, again) and torch.equal(torch.rand(1), after_first)
    torch.manual_seed(5)
    objective.sample_mask(8)
    state = torch.get_rng_state()
    objective.sample_mask(8)
    objective.sample_mask(8)
    drawn_twice = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.rand(2 * 8 * 4 * 50)  # two batches: 4 numbers per image and attempt, 50 attempts, whatever was accepted
    assert torch.equal(torch.get_rng_state(), drawn_twice)


def test_randomness_is_the_global_generators_so_a_resume_draws_the_same():
    assert_randomness_is_resumable(lambda: trained_apart(tiny_data2vec()), uint8_images(4))


# ----------------------------------------------------------------------------- target and loss


def test_target_is_the_mean_of_the_teachers_top_k_normalised_block_outputs():
    """Against an independent computation: timm's forward_intermediates for the block outputs,
    normalisation written out with mean and variance."""
    objective = trained_apart(tiny_data2vec(top_k_blocks=1), seed=3)
    images = objective.normalize(uint8_images(4))
    blocks = objective.teacher.forward_intermediates(
        images, indices=2, norm=False, output_fmt="NLC", intermediates_only=True
    )  # patch tokens of both blocks

    def instance(x):  # each channel over the tokens of one image, eps 1e-5 (torch's instance norm)
        return (x - x.mean(dim=1, keepdim=True)) / torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-5)

    def layer(x):
        return (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + 1e-5)

    for k, block_norm, norm in [(1, "instance", instance), (2, "instance", instance), (2, "layer", layer)]:
        objective.config.top_k_blocks, objective.config.block_norm = k, block_norm
        expected = layer(sum(norm(b) for b in blocks[-k:]) / k)
        assert torch.allclose(objective.targets(images), expected, atol=1e-5)
    objective.config.block_norm, objective.config.average_norm = "none", "none"
    assert torch.allclose(objective.targets(images), (blocks[0] + blocks[1]) / 2, atol=1e-5)
    # the teacher's target is not the student's: the student's blocks give another one
    student = objective.encoder.forward_intermediates(
        images, indices=2, norm=False, output_fmt="NLC", intermediates_only=True
    )
    assert not torch.allclose((student[0] + student[1]) / 2, (blocks[0] + blocks[1]) / 2, atol=1e-3)


def test_loss_is_smooth_l1_summed_over_channels_over_sqrt_dim_averaged_over_masked_patches():
    objective = trained_apart(tiny_data2vec())
    pixels = uint8_images(4)
    images = objective.normalize(pixels)
    torch.manual_seed(0)
    mask = objective.sample_mask(4)
    out = objective(pixels, mask=mask)
    prediction, target = objective.predict(images, mask).float(), objective.targets(images)
    d = prediction.shape[-1]
    diff = (prediction - target).abs()
    smooth = torch.where(diff < 2.0, 0.5 * diff**2 / 2.0, diff - 0.5 * 2.0)  # beta 2
    expected = (smooth.sum(-1) / math.sqrt(d))[mask].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    objective.config.loss_beta = 0.0  # L2
    l2 = ((prediction - target) ** 2).sum(-1)[mask].mean() / math.sqrt(d)
    assert objective(pixels, mask=mask).loss.item() == pytest.approx(l2.item(), rel=1e-5)


def test_masked_patches_reach_the_student_as_the_mask_token_and_the_teacher_sees_them_all():
    objective = tiny_data2vec()
    images = objective.normalize(uint8_images(2))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    other = images.clone()
    other[:, :, :4, :] = 0.0  # the first row of patches (masked) changed
    assert torch.allclose(objective.predict(images, mask), objective.predict(other, mask), atol=1e-6)
    assert not torch.allclose(objective.targets(images), objective.targets(other), atol=1e-3)


def test_teacher_gets_no_gradient_and_is_in_no_optimizer_group():
    objective = tiny_data2vec()
    objective(uint8_images(4)).loss.backward()
    teacher = {id(p) for p in objective.teacher.parameters()}
    assert all(p.grad is None and not p.requires_grad for p in objective.teacher.parameters())
    assert all(p.grad is not None for p in objective.encoder.parameters())
    for layer_decay in (None, 0.75):
        optimizer = build_optimizer(objective, OptimConfig(name="adamw", lr=1e-3, layer_decay=layer_decay), 1e-3)
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert optimized.isdisjoint(teacher)
        assert optimized == {id(p) for p in objective.parameters() if p.requires_grad}
    decayed = {n for n in objective.no_weight_decay()}
    assert "mask_token" in decayed and not any(n.startswith("teacher.") for n in decayed)


def test_teacher_starts_as_the_student_and_stays_in_eval_mode():
    objective = tiny_data2vec()
    for (name, s), (_, t) in zip(objective.encoder.state_dict().items(), objective.teacher.state_dict().items()):
        assert torch.equal(s, t), name
    objective.train()
    assert objective.encoder.training and not objective.teacher.training
    assert any(key.startswith("teacher.") for key in objective.state_dict())  # every checkpoint holds it


# ----------------------------------------------------------------------------- EMA


def test_ema_update_is_tau_teacher_plus_one_minus_tau_student():
    objective = trained_apart(tiny_data2vec(ema_start=0.6, ema_end=0.9))
    objective.set_run_length(10)
    before = {n: p.clone() for n, p in objective.teacher.named_parameters()}
    student = dict(objective.encoder.named_parameters())
    objective.after_optimizer_step(5)
    tau = 0.6 + (0.9 - 0.6) * 5 / 10
    for name, p in objective.teacher.named_parameters():
        assert torch.allclose(p, tau * before[name] + (1 - tau) * student[name], atol=1e-6), name


def test_ema_rate_rises_linearly_over_the_annealed_part_of_the_run_then_stays():
    assert ema_rate(0, 100, 0.9, 0.99) == pytest.approx(0.9)
    assert ema_rate(50, 100, 0.9, 0.99) == pytest.approx(0.945)
    assert ema_rate(100, 100, 0.9, 0.99) == pytest.approx(0.99)
    assert ema_rate(20, 100, 0.9, 0.99, anneal_fraction=0.4) == pytest.approx(0.945)
    assert ema_rate(40, 100, 0.9, 0.99, anneal_fraction=0.4) == ema_rate(90, 100, 0.9, 0.99, 0.4) == 0.99
    objective = tiny_data2vec(ema_start=0.9998, ema_end=0.99999)
    objective.set_run_length(1000)
    rates = [objective.ema_rate(step) for step in range(1, 1001)]
    assert all(b > a for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(0.99999)
    objective.set_run_length(2000)  # a resume that extends train.steps anneals over the new length
    assert objective.ema_rate(1000) == pytest.approx((0.9998 + 0.99999) / 2)


def test_an_ema_update_without_the_run_length_is_refused():
    with pytest.raises(RuntimeError, match="run length"):
        tiny_data2vec().after_optimizer_step(1)


# ----------------------------------------------------------------------------- options and recipes


def test_options_that_cannot_work_are_refused_in_one_sentence():
    with pytest.raises(ConfigError, match="top_k_blocks.*2 blocks"):
        tiny_data2vec(top_k_blocks=3)
    with pytest.raises(ConfigError, match="ema_start"):
        tiny_data2vec(ema_start=0.999, ema_end=0.99)
    with pytest.raises(ConfigError, match="min_block_patches"):
        tiny_data2vec(min_block_patches=16)  # 10 patches to mask of 16


def test_visualize_draws_three_columns_per_image():
    objective = tiny_data2vec()
    pixels = uint8_images(3)
    picture = objective.visualize(pixels, objective(pixels), max_images=2)
    assert picture.grid.shape == (3, 2 * 17 + 1, 3 * 17 + 1) and len(picture.columns) == 3
    assert "teacher" in picture.caption


@pytest.mark.parametrize("recipe", ["data2vec_digits.yaml", "data2vec_vit_b16.yaml"])
def test_recipes_hold_valid_options(recipe):
    cfg = yaml.safe_load((RECIPES / recipe).read_text())
    assert cfg["objective"] == "data2vec"
    options = from_dict(Data2VecConfig, cfg["data2vec"], source=recipe)
    if recipe == "data2vec_vit_b16.yaml":  # the paper's ViT-B values
        assert (options.top_k_blocks, options.mask_ratio, options.min_block_patches) == (6, 0.6, 16)
        assert (options.ema_start, options.ema_end) == (0.9998, 0.99999)
        assert cfg["train"]["epochs"] == 800 and cfg["train"]["global_batch"] == 2048
    encoder = create_encoder(cfg["model"]["name"], img_size=cfg["model"]["img_size"])
    assert options.top_k_blocks <= len(encoder.blocks)
