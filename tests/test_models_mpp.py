"""Masked patch prediction as in the ViT paper, appendix B.1.2."""

from __future__ import annotations

import pytest
import torch

from vitmpp.common.errors import ConfigError, UserError
from vitmpp.models import create_encoder, create_objective, mean_color_target
from vitmpp.models.objectives.mpp import KEEP, MASK, RANDOM, downsampled_color_target, quantize_colors

from models_helpers import TINY, normalise, tiny_objective, uint8_images


# ----------------------------------------------------------------------------- targets


def _patch(rgb_planes):
    """A 4x4 patch from three 4x4 channel planes: [1, 3, 4, 4]."""
    return torch.stack([torch.as_tensor(p, dtype=torch.float32) for p in rgb_planes]).unsqueeze(0)


def test_pure_red_patch_is_class_448():
    red = _patch([torch.ones(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)])
    assert mean_color_target(red, 4).tolist() == [[7 * 64]]


def test_mixed_patch_class_computed_by_hand():
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2  # half ones: mean 0.5
    quarter = torch.zeros(4, 4)
    quarter[0] = 1  # a quarter ones: mean 0.25
    patch = _patch([checker, quarter, torch.ones(4, 4)])
    assert patch.mean(dim=(2, 3)).tolist() == [[0.5, 0.25, 1.0]]
    # r: floor(0.5*8)=4, g: floor(0.25*8)=2, b: 1.0 -> top level 7; class r*64 + g*8 + b
    assert mean_color_target(patch, 4).tolist() == [[4 * 64 + 2 * 8 + 7]]


def test_bin_edges():
    # level k holds [k/8, (k+1)/8): an edge belongs to the upper bin, 1.0 to the top one
    values = torch.tensor([0.0, 1 / 8, 1 / 8 - 1e-3, 3 / 8, 0.5 - 1e-3, 0.5, 7 / 8, 1.0])
    levels = (
        quantize_colors(torch.stack([values, torch.zeros_like(values), torch.zeros_like(values)], -1), bits=3) // 64
    )
    assert levels.tolist() == [0, 1, 0, 3, 3, 4, 7, 7]
    # one bit per channel: 2 levels, 8 classes
    grey = torch.tensor([[0.49, 0.5, 1.0]])
    assert quantize_colors(grey, bits=1).tolist() == [0 * 4 + 1 * 2 + 1]


def test_targets_in_row_major_patch_order():
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, :4, 4:] = 1  # top-right patch red
    image[0, 2, 4:, :4] = 1  # bottom-left patch blue
    assert mean_color_target(image, 4).tolist() == [[0, 448, 7, 0]]


def test_downsampled_target_by_hand():
    image = torch.zeros(1, 3, 8, 8)  # one 8x8 patch, 4x4 cells of 2x2 pixels
    image[0, 1, 0:2, 2:4] = 1  # cell (0, 1) green
    image[0, :, 6:8, 6:8] = 1  # cell (3, 3) white
    image[0, 0, 2:4, 0:1] = 1  # cell (1, 0) red at half: mean 0.5 -> level 4
    target = downsampled_color_target(image, 8)
    assert target.shape == (1, 1, 16)
    expected = [0] * 16
    expected[1] = 7 * 8
    expected[15] = 511
    expected[4] = 4 * 64
    assert target[0, 0].tolist() == expected


@pytest.mark.parametrize("target", ["mean_color", "downsampled"])
def test_colour_targets_come_from_the_pixels_whatever_the_normalisation(target):
    raw = uint8_images(8, seed=3)
    stats = [
        ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ]
    reference = None
    for mean, std in stats:
        objective = create_objective("mpp", create_encoder(TINY), mean=mean, std=std, target=target)
        got = objective.targets(raw, objective.normalize(raw))
        if reference is None:
            reference = got
            direct = mean_color_target(raw, 4) if target == "mean_color" else downsampled_color_target(raw, 4)
            assert torch.equal(got, direct)
        assert torch.equal(got, reference)


# ----------------------------------------------------------------------------- corruption


def test_corruption_statistics_over_many_draws():
    objective = tiny_objective("mpp")
    torch.manual_seed(0)
    b, n, d = 128, 64, 64
    counts = torch.zeros(3)
    for _ in range(6):
        clean = torch.randn(b, n, d)
        corrupted, c = objective.corrupt(clean)
        k = round(0.5 * n)
        assert c.ids.shape == (b, k) and c.kind.shape == (b, k)
        assert all(len(set(row)) == k for row in c.ids.tolist())  # K distinct positions in every image
        counts += torch.bincount(c.kind.flatten(), minlength=3)
        own = c.ids + torch.arange(b)[:, None] * n
        assert not torch.any(c.source == own)  # never the patch itself
        assert torch.any(c.source // n != torch.arange(b)[:, None])  # drawn from the whole batch
        picked = torch.gather(corrupted, 1, c.ids[..., None].expand(-1, -1, d))
        original = torch.gather(clean, 1, c.ids[..., None].expand(-1, -1, d))
        keep, mask, rand = c.kind == KEEP, c.kind == MASK, c.kind == RANDOM
        assert torch.equal(picked[keep], original[keep])  # kept: bit for bit
        assert torch.equal(picked[mask], objective.mask_token.detach().expand(b, k, d)[mask])
        assert torch.equal(picked[rand], clean.reshape(b * n, d)[c.source][rand])
        untouched = torch.ones(b, n, dtype=torch.bool).scatter(1, c.ids, False)
        assert torch.equal(corrupted[untouched], clean[untouched])
    shares = counts / counts.sum()
    assert abs(shares[MASK] - 0.8) < 0.02 and abs(shares[RANDOM] - 0.1) < 0.02 and abs(shares[KEEP] - 0.1) < 0.02


def test_exact_count_rounds_ratio_times_patches():
    objective = tiny_objective("mpp", corrupt_ratio=0.15)
    for n in (16, 49, 196):
        _, c = objective.corrupt(torch.randn(2, n, 64))
        assert c.ids.shape[1] == round(0.15 * n)


def test_mask_token_lives_in_embedding_space_and_position_embeddings_are_added():
    objective = tiny_objective("mpp")
    encoder = objective.encoder
    # the [mask] embedding is a vector of the encoder's width, not a pixel patch
    assert objective.mask_token.shape == (1, 1, encoder.embed_dim) != (1, 1, 3 * 4 * 4)
    images = uint8_images(4)
    seen = {}
    encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.setdefault("pixels", args[0].clone()))
    encoder.blocks.register_forward_pre_hook(lambda m, args: seen.setdefault("tokens", args[0].clone()))
    torch.manual_seed(5)
    objective(images)
    assert torch.equal(seen["pixels"], normalise(images))  # pixels reach the patch projection uncorrupted
    torch.manual_seed(5)
    with torch.no_grad():
        _, corrupted, c = objective.embed(objective.normalize(images))
    tokens = seen["tokens"]
    pos = encoder.pos_embed.detach()
    assert torch.allclose(tokens[:, 1:], corrupted + pos[:, 1:])  # every patch, corrupted or not, gets its position
    assert torch.allclose(tokens[:, 0], (encoder.cls_token[0, 0] + pos[0, 0]).detach().expand(4, -1))
    b, k = torch.nonzero(c.kind == MASK)[0].tolist()
    i = c.ids[b, k]
    assert torch.allclose(tokens[b, 1 + i], objective.mask_token.detach()[0, 0] + pos[0, 1 + i])


# ----------------------------------------------------------------------------- loss, gradients, precision


def test_gradients_reach_the_mask_embedding_and_head():
    objective = tiny_objective("mpp")
    torch.manual_seed(0)
    out = objective(uint8_images(8))
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    out.loss.backward()
    assert objective.mask_token.grad is not None and objective.mask_token.grad.abs().sum() > 0
    assert objective.head.weight.grad.abs().sum() > 0
    assert objective.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_initial_loss_is_chance_level():
    objective = tiny_objective("mpp")
    torch.manual_seed(0)
    loss = objective(uint8_images(16)).loss.item()
    assert abs(loss - torch.log(torch.tensor(512.0)).item()) < 0.3


@pytest.mark.parametrize("target", ["mean_color", "downsampled", "pixels"])
def test_bf16_autocast_has_no_nans(target):
    objective = tiny_objective("mpp", target=target)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(uint8_images(4))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in objective.parameters() if p.grad is not None)
    assert torch.isfinite(objective.mask_token.grad).all()


def test_pixels_target_is_l2_on_the_normalised_patch():
    objective = tiny_objective("mpp", target="pixels")
    images = uint8_images(2)
    torch.manual_seed(1)
    out = objective(images)
    ids = out.extras["ids"]
    patches = normalise(images).unfold(2, 4, 4).unfold(3, 4, 4)  # [B, 3, 4, 4, p, p]
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(2, 16, 48)  # row, column, channel inside a patch
    target = torch.gather(patches, 1, ids[..., None].expand(-1, -1, 48))
    assert torch.allclose(out.extras["target"], target)
    assert torch.allclose(out.loss, ((out.extras["prediction"] - target) ** 2).mean())


def test_config_errors_are_one_sentence():
    with pytest.raises(ConfigError, match="must sum to 1"):
        tiny_objective("mpp", mask_prob=0.8, random_prob=0.2, keep_prob=0.1)
    with pytest.raises(ConfigError, match="corrupt_ratio"):
        tiny_objective("mpp", corrupt_ratio=1.0)
    with pytest.raises(ConfigError, match="target"):
        tiny_objective("mpp", target="colour")
    with pytest.raises(ConfigError, match="Unknown key"):
        tiny_objective("mpp", corrupt_rate=0.5)
    with pytest.raises(UserError, match="divisible by 4"):
        create_objective("mpp", create_encoder(TINY, patch_size=2), target="downsampled")


@pytest.mark.parametrize("target", ["mean_color", "downsampled", "pixels"])
def test_visualization_grid(target):
    objective = tiny_objective("mpp", target=target)
    images = uint8_images(3)
    out = objective(images)
    vis = objective.visualize(images, out, max_images=2)
    assert vis.grid.dim() == 3 and vis.grid.shape[0] == 3
    assert vis.grid.min() >= 0 and vis.grid.max() <= 1
    # 2 rows of 4 tiles of 16 px with 1 px padding
    assert vis.grid.shape[1:] == (2 * 17 + 1, 4 * 17 + 1)
    assert "MPP" in vis.caption and "[mask]" in vis.caption


def test_no_weight_decay_names():
    objective = tiny_objective("mpp")
    assert objective.no_weight_decay() == {"mask_token", "encoder.pos_embed", "encoder.cls_token"}
