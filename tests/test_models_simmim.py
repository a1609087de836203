"""SimMIM (Xie et al., CVPR 2022): masks, mask token, linear head, L1 on masked pixels, recipes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml

from vitmpp.common.config import from_dict
from vitmpp.common.errors import ConfigError
from vitmpp.models import create_encoder, create_objective, flops_per_image
from vitmpp.models.objective import objective_names, objective_summary
from vitmpp.models.objectives.simmim import SimMIMConfig, SimMIMObjective, masked_count, simmim_mask

from models_helpers import TINY, normalise, uint8_images

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def tiny_simmim(seed: int = 0, **cfg) -> SimMIMObjective:
    """vit_pico_patch4_16: 16 px, 4 px patches (a 4x4 grid); 8 px mask patches = 2x2 patches, 4 units, 3 masked."""
    torch.manual_seed(seed)
    return create_objective("simmim", create_encoder(TINY), **{"mask_patch_size": 8, **cfg})


def _pixels(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3], (row, column, channel) inside a patch, written without patchify."""
    b = images.shape[0]
    patches = images.unfold(2, p, p).unfold(3, p, p)  # [B, 3, gh, gw, p, p]
    return patches.permute(0, 2, 3, 4, 5, 1).reshape(b, -1, p * p * 3)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "grid_h, grid_w, s, ratio",
    [
        (14, 14, 2, 0.6),  # ViT-B/16 at 224 px, 32 px mask patches: 49 units, 30 masked
        (4, 4, 1, 0.6),  # the digits demo: 16 units, 10 masked
        (4, 4, 2, 0.6),  # 4 units, 3 masked
        (6, 4, 2, 0.6),  # a non-square grid: 3x2 units, 4 masked
        (12, 12, 3, 0.75),
    ],
)
def test_exact_count_is_ceil_of_ratio_times_mask_units(grid_h, grid_w, s, ratio):
    mask = simmim_mask(32, grid_h, grid_w, s, ratio, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (32, grid_h * grid_w)
    units = (grid_h // s) * (grid_w // s)
    k = math.ceil(ratio * units)
    assert masked_count(units, ratio) == k
    assert (mask.sum(dim=1) == k * s * s).all()  # every image: exactly k whole mask patches
    if (grid_h, grid_w, s) == (14, 14, 2):
        assert k == 30  # the official MaskGenerator's count for ViT-B/16 at 224 px


def test_count_is_the_official_expression_float_rounding_included():
    assert 100 * 0.55 == 55.00000000000001  # floating point; the official int(np.ceil(...)) sees this product
    assert masked_count(100, 0.55) == 56
    assert masked_count(36, 0.6) == 22  # Swin at 192 px: 6x6 units
    assert masked_count(1, 0.6) == 1


def test_masks_are_unions_of_whole_mask_patch_blocks():
    s, gh, gw = 3, 9, 6
    mask = simmim_mask(64, gh, gw, s, 0.5, torch.Generator().manual_seed(1))
    blocks = mask.reshape(64, gh // s, s, gw // s, s)  # [B, unit row, row in unit, unit col, col in unit]
    first = blocks[:, :, :1, :, :1]
    assert torch.equal(blocks, first.expand_as(blocks))  # all ViT patches of a block share its state


def test_row_major_layout_of_one_block():
    # with one of four units masked, the masked ViT patches form one 2x2 square of the 4x4 grid
    for seed in range(8):
        mask = simmim_mask(1, 4, 4, 2, 0.2, torch.Generator().manual_seed(seed)).reshape(4, 4)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert len(rows) == 4 and rows.min() % 2 == 0 and cols.min() % 2 == 0
        assert rows.max() - rows.min() == 1 and cols.max() - cols.min() == 1


def test_different_images_get_different_masks_and_a_generator_repeats_them():
    mask = simmim_mask(64, 14, 14, 2, 0.6, torch.Generator().manual_seed(2))
    assert len({tuple(row.tolist()) for row in mask}) == 64  # C(49, 30) possible masks
    again = simmim_mask(64, 14, 14, 2, 0.6, torch.Generator().manual_seed(2))
    assert torch.equal(mask, again)


def test_every_position_is_masked_equally_often():
    draws = 8000
    mask = simmim_mask(draws, 4, 4, 1, 0.6, torch.Generator().manual_seed(3)).float()
    freq = mask.mean(dim=0)  # 10 of 16 per image: each position expects 0.625
    sigma = math.sqrt(0.625 * 0.375 / draws)  # ~0.0054
    assert (freq - 0.625).abs().max() < 5 * sigma
    # blocks of 2x2: each of the 9 units of a 6x6 grid is masked ceil(5.4) = 6 times in 9
    blocks = simmim_mask(draws, 6, 6, 2, 0.6, torch.Generator().manual_seed(4)).float().mean(dim=0)
    assert (blocks - 6 / 9).abs().max() < 5 * math.sqrt((6 / 9) * (3 / 9) / draws)


def test_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="tile"):
        simmim_mask(2, 4, 4, 3, 0.6)
    with pytest.raises(ValueError, match="mask_ratio"):
        simmim_mask(2, 4, 4, 1, 1.0)


# ----------------------------------------------------------------------------- the model and the loss


def test_loss_equals_a_hand_computation():
    objective = tiny_simmim()
    enc = objective.encoder
    images = uint8_images(3)
    mask = objective.sample_mask(3, generator=torch.Generator().manual_seed(7))
    out = objective(images, mask=mask)
    with torch.no_grad():
        # the official VisionTransformerForSimMIM.forward, step by step
        x = enc.patch_embed(normalise(images))
        w = mask.unsqueeze(-1).float()
        x = x * (1 - w) + objective.mask_token * w
        x = torch.cat([enc.cls_token.expand(3, -1, -1), x], dim=1) + enc.pos_embed
        x = enc.norm(enc.blocks(x))[:, 1:]
        prediction = x @ objective.head.weight.T + objective.head.bias  # the linear head, [3, 16, 48]
        # the official loss: L1 per pixel and channel, pixel mask, / masked pixels / 3 channels
        recon = prediction.reshape(3, 4, 4, 4, 4, 3).permute(0, 5, 1, 3, 2, 4).reshape(3, 3, 16, 16)
        pixel_mask = mask.reshape(3, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
        official = ((normalise(images) - recon).abs() * pixel_mask).sum() / pixel_mask.sum() / 3
        # and as the mean over the masked patches' values
        masked = (prediction - _pixels(normalise(images), 4)).abs()[mask]
    assert masked.shape == (3 * 12, 48)  # 3 of 4 mask patches = 12 of 16 ViT patches per image
    torch.testing.assert_close(out.extras["prediction"], prediction)
    torch.testing.assert_close(out.loss, official, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, masked.mean(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.extras["mask"], mask)


def test_only_masked_pixels_enter_the_loss():
    objective = tiny_simmim()
    images = uint8_images(2)
    mask = objective.sample_mask(2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = objective(images, mask=mask)
        target = objective.targets(objective.normalize(images))
        # move the head's output at unmasked patches: the loss must not change
        shift = torch.where(mask.unsqueeze(-1), 0.0, 5.0)
        changed = (base.extras["prediction"] + shift - target).abs().mean(-1)
    assert torch.allclose((changed * mask).sum() / mask.sum(), base.loss)


def test_the_encoder_sees_the_mask_token_at_masked_positions_only():
    objective = tiny_simmim()
    enc = objective.encoder
    images = uint8_images(4)
    seen = {}
    enc.patch_embed.register_forward_pre_hook(lambda m, args: seen.setdefault("pixels", args[0].clone()))
    enc.blocks.register_forward_pre_hook(lambda m, args: seen.setdefault("tokens", args[0].clone()))
    mask = objective.sample_mask(4, generator=torch.Generator().manual_seed(3))
    objective(images, mask=mask)
    assert torch.equal(
        seen["pixels"], normalise(images)
    )  # the image itself is not corrupted: masking is in embedding space
    with torch.no_grad():
        clean = enc.patch_embed(normalise(images))
    pos = enc.pos_embed.detach()[:, 1:]
    tokens = seen["tokens"][:, 1:]
    token = objective.mask_token.detach()[0, 0]
    assert objective.mask_token.shape == (1, 1, enc.embed_dim)
    # masked: the mask token plus the position's embedding (added after the replacement)
    torch.testing.assert_close(tokens[mask], (token + pos.expand(4, -1, -1))[mask])
    # unmasked: the patch embedding untouched, plus its position
    torch.testing.assert_close(tokens[~mask], (clean + pos)[~mask])
    torch.testing.assert_close(
        seen["tokens"][:, 0], (enc.cls_token + enc.pos_embed[:, :1]).detach()[:, 0].expand(4, -1)
    )


def test_gradients_reach_the_mask_token_the_head_and_the_encoder():
    objective = tiny_simmim()
    out = objective(uint8_images(4))
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    out.loss.backward()
    assert objective.mask_token.grad is not None and objective.mask_token.grad.abs().sum() > 0
    assert objective.head.weight.grad.abs().sum() > 0 and objective.head.bias.grad.abs().sum() > 0
    assert objective.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_bf16_autocast_has_no_nans():
    objective = tiny_simmim()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(uint8_images(4))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(objective.mask_token.grad).all()


def test_mask_token_init_head_shape_and_parameter_groups():
    objective = tiny_simmim()
    assert objective.mask_token.abs().max() <= 0.02  # the official ViT init: N(0, 0.02) truncated at +-0.02
    assert objective.head.in_features == 64 and objective.head.out_features == 4 * 4 * 3
    assert objective.no_weight_decay() == {"mask_token", "encoder.pos_embed", "encoder.cls_token"}
    assert re.match(objective.group_matcher()["stem"], "mask_token")
    assert not any(k.startswith("encoder.") and "mask" in k for k in objective.state_dict())


def test_defaults_are_the_papers_and_the_demo_options_fit_the_demo_encoder():
    assert (SimMIMConfig().mask_ratio, SimMIMConfig().mask_patch_size) == (0.6, 32)
    assert SimMIMObjective.embedded_options == {"mask_patch_size": 8}
    demo = create_objective(
        "simmim", create_encoder("vit_nano_patch8_32", img_size=32), **SimMIMObjective.embedded_options
    )
    assert demo.num_mask_units == 16
    assert demo(uint8_images(2, size=32)).extras["mask"].sum(dim=1).tolist() == [10, 10]
    # the paper's 32 px mask patch at ViT-B/16, 224 px: 49 units of 2x2 patches
    with torch.device("meta"):
        paper = create_objective("simmim", create_encoder("vit_base_patch16_224"))
    assert paper.mask_patch_in_patches == 2 and paper.num_mask_units == 49


def test_flops_count_runs():
    assert flops_per_image(tiny_simmim()) > 0


# ----------------------------------------------------------------------------- errors, pictures, registry, export


def _one_sentence(message: str) -> bool:
    return message.endswith((".", "?")) and not re.search(r"[.;?]\s+[A-Z]", message)


@pytest.mark.parametrize(
    "options, pattern",
    [
        (dict(mask_patch_size=6), r"simmim\.mask_patch_size.*multiple of the encoder's patch size 4"),
        (dict(mask_patch_size=12), r"simmim\.mask_patch_size.*divide the image size 16x16"),
        (dict(mask_patch_size=0), r"mask_patch_size"),
        (dict(mask_ratio=1.0), r"mask_ratio"),
        (dict(mask_ratio=0.0), r"mask_ratio"),
        (dict(mask_size=8), r"Unknown key 'mask_size'"),
    ],
)
def test_config_errors_are_one_sentence_naming_the_key(options, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        create_objective("simmim", create_encoder(TINY), **options)
    assert _one_sentence(str(err.value)), str(err.value)


def test_visualization_grid():
    objective = tiny_simmim()
    images = uint8_images(3)
    out = objective(images)
    vis = objective.visualize(images, out, max_images=2)
    assert vis.grid.dim() == 3 and vis.grid.shape[0] == 3
    assert vis.grid.min() >= 0 and vis.grid.max() <= 1
    assert vis.grid.shape[1:] == (2 * 17 + 1, 3 * 17 + 1)  # 2 rows of 3 tiles of 16 px, 1 px padding
    assert "SimMIM" in vis.caption and "[mask]" in vis.caption and "3 of 4" in vis.caption
    # column 1 is the image, column 3 keeps it outside the masked patches
    tile = lambda r, c: vis.grid[:, 1 + 17 * r : 17 * (r + 1), 1 + 17 * c : 17 * (c + 1)]  # noqa: E731
    unmasked = ~out.extras["mask"][0].reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)
    torch.testing.assert_close(tile(0, 2)[:, unmasked], tile(0, 0)[:, unmasked])


def test_registered_with_help_text():
    assert "simmim" in objective_names()
    assert objective_summary("simmim").startswith("SimMIM")


def test_encoder_state_dict_loads_into_a_plain_timm_vit():
    objective = tiny_simmim()
    objective(uint8_images(2)).loss.backward()
    with torch.no_grad():  # make the weights differ from a fresh init
        for p in objective.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain = timm.models.VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    plain.load_state_dict(objective.encoder.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain.eval().forward_features(x), objective.encoder.eval().forward_features(x))


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["simmim_vit_b16.yaml", "simmim_digits.yaml"])
def test_recipe_section_is_simmim_config(name):
    data = yaml.safe_load((RECIPES / name).read_text())
    assert data["objective"] == "simmim"
    assert set(data["simmim"]) == {"mask_ratio", "mask_patch_size"} == set(SimMIMConfig.__dataclass_fields__)
    cfg = from_dict(SimMIMConfig, data["simmim"])
    with torch.device("meta"):  # the recipe's encoder accepts the recipe's mask patches
        encoder = create_encoder(data["model"]["name"], img_size=data["model"]["img_size"])
        create_objective("simmim", encoder, mask_ratio=cfg.mask_ratio, mask_patch_size=cfg.mask_patch_size)
    if name == "simmim_vit_b16.yaml":
        assert (cfg.mask_ratio, cfg.mask_patch_size) == (0.6, 32)
        assert data["data"]["crop_scale"] == [0.67, 1.0] and data["optim"]["betas"] == [0.9, 0.999]
        assert data["optim"]["weight_decay"] == 0.05 and data["train"]["global_batch"] == 2048
        assert data["train"]["epochs"] == 800
    else:
        assert cfg.mask_patch_size == 8 and data["model"]["name"] == "vit_nano_patch8_32"
