"""Encoder variants, overrides, configs, sin-cos position embeddings."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import VisionTransformer

from vitmpp.common.config import from_dict
from vitmpp.common.errors import ConfigError, UserError
from vitmpp.models import (
    ENCODER_VARIANTS,
    EncoderConfig,
    create_encoder,
    encoder_from_config,
    encoder_spec,
    mae_sincos_pos_embed,
)
from vitmpp.models.encoder import encode_patch_tokens, standard_timm_name

from models_helpers import TINY


def test_every_variant_builds_at_its_nominal_size():
    for name, arch in ENCODER_VARIANTS.items():
        with torch.device("meta"):
            encoder = create_encoder(name)
            out = encoder.forward_features(torch.zeros(1, 3, arch["img_size"], arch["img_size"]))
        grid = arch["img_size"] // arch["patch_size"]
        assert out.shape == (1, grid * grid + 1, arch["embed_dim"]), name
        assert len(encoder.blocks) == arch["depth"]
        assert encoder.blocks[0].attn.num_heads == arch["num_heads"]
        assert encoder.blocks[0].mlp.fc1.out_features == 4 * arch["embed_dim"]
        assert isinstance(encoder.head, torch.nn.Identity) and encoder.num_classes == 0
        assert encoder.global_pool == "token" and encoder.has_class_token


@pytest.mark.parametrize(
    "name,paper_millions",
    [
        ("vit_base_patch16_224", 86),
        ("vit_large_patch16_224", 307),
        ("vit_huge_patch14_224", 632),
    ],
)
def test_parameter_counts_match_the_paper(name, paper_millions):
    with torch.device("meta"):
        encoder = create_encoder(name)
    # the paper's counts include an ImageNet classification head (1000 classes)
    count = sum(p.numel() for p in encoder.parameters()) + encoder.embed_dim * 1000 + 1000
    assert abs(count / 1e6 - paper_millions) / paper_millions < 0.02, count


def test_paper_widths_depths_heads_and_mlp():
    expected = {
        "vit_base_patch16_224": (768, 12, 12),
        "vit_large_patch16_224": (1024, 24, 16),
        "vit_huge_patch14_224": (1280, 32, 16),
    }
    for name, (width, depth, heads) in expected.items():
        arch = ENCODER_VARIANTS[name]
        assert (arch["embed_dim"], arch["depth"], arch["num_heads"]) == (width, depth, heads)
        assert arch["mlp_ratio"] * width == {768: 3072, 1024: 4096, 1280: 5120}[width]


def test_standard_variants_have_timms_architecture():
    for name, arch in ENCODER_VARIANTS.items():
        if arch["timm_name"] is None:
            continue
        with torch.device("meta"):
            ours = create_encoder(name)
            theirs = timm.create_model(arch["timm_name"], pretrained=False, num_classes=0)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()
        }, name


def test_unknown_name_lists_known_ones():
    with pytest.raises(UserError) as err:
        create_encoder("vit_bsae_patch16_224")
    assert "vit_base_patch16_224" in str(err.value) and "vit_pico_patch4_32" in str(err.value)


def test_overrides_reach_timm():
    encoder = create_encoder(
        TINY, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, drop_path_rate=0.1, global_pool="avg"
    )
    assert encoder.patch_embed.grid_size == (4, 4)
    assert encoder.embed_dim == 32 and len(encoder.blocks) == 2 and encoder.blocks[0].attn.num_heads == 4
    assert encoder.global_pool == "avg"
    assert encoder.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)  # timm's linear rule: last block gets it all
    spec = encoder_spec(encoder)
    # drop rates are training options, not architecture: not recorded
    assert spec["overrides"] == {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "global_pool": "avg"}
    with pytest.raises(UserError, match="not a timm VisionTransformer argument"):
        create_encoder(TINY, embed_dimm=32)
    with pytest.raises(UserError, match="must divide the image size"):
        create_encoder(TINY, img_size=18)


def test_config_checks_patch_divides_image():
    with pytest.raises(ConfigError) as err:
        from_dict(EncoderConfig, {"img_size": 30, "patch_size": 4})
    assert "model.patch_size" in str(err.value) and "model.img_size" in str(err.value)
    with pytest.raises(ConfigError, match="unknown encoder"):
        from_dict(EncoderConfig, {"name": "vit_nope"})
    cfg = from_dict(EncoderConfig, {"name": TINY, "img_size": 16, "pos_embed": "sincos", "grad_checkpointing": True})
    encoder = encoder_from_config(cfg)
    assert encoder.grad_checkpointing and not encoder.pos_embed.requires_grad


def test_state_dict_loads_into_plain_timm_vit():
    torch.manual_seed(0)
    ours = create_encoder(TINY, pos_embed="sincos").eval()
    plain = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0).eval()
    plain.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(x), ours(x), rtol=0, atol=0)


def test_standard_timm_name_only_for_unchanged_architecture():
    with torch.device("meta"):
        assert standard_timm_name(create_encoder("vit_tiny_patch16_224", img_size=32)) == "vit_tiny_patch16_224"
        assert standard_timm_name(create_encoder("vit_tiny_patch16_224", depth=2)) is None
        assert standard_timm_name(create_encoder(TINY)) is None


def test_sincos_layout_is_maes():
    # MAE (and transformers' ViTMAE): [sin(col) | cos(col) | sin(row) | cos(row)], zero row for the class token
    table = mae_sincos_pos_embed((3, 5), 8)
    assert table.shape == (1 + 15, 8) and torch.all(table[0] == 0)
    row, col = 1, 3
    token = table[1 + row * 5 + col]
    omega = 1.0 / 10000 ** (torch.arange(2) / 2.0)
    expected = torch.cat(
        [torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)]
    )
    torch.testing.assert_close(token, expected)


def test_grad_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    plain = create_encoder(TINY)
    checkpointed = create_encoder(TINY)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 16, 64)
    a = encode_patch_tokens(plain, x)
    b = encode_patch_tokens(checkpointed, x)
    torch.testing.assert_close(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    torch.testing.assert_close(plain.blocks[0].attn.qkv.weight.grad, checkpointed.blocks[0].attn.qkv.weight.grad)
