"""MAE: masking, patchify, and equality with a peer implementation (transformers' ViTMAEForPreTraining)."""

from __future__ import annotations

import pytest
import torch

from vitmpp.common.errors import ConfigError
from vitmpp.models import create_encoder, create_objective, patchify, random_masking, unpatchify
from vitmpp.models.encoder import mae_sincos_pos_embed

from models_helpers import normalise, tiny_objective, uint8_images

transformers = pytest.importorskip("transformers")


def test_patchify_roundtrip_and_layout():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch 4 = grid row 1, column 1; inside a patch: row, column, channel
    assert torch.equal(patches[1, 4].reshape(4, 4, 3), images[1, :, 4:8, 4:8].permute(1, 2, 0))
    assert torch.equal(unpatchify(patches, 4, 8, 12), images)
    square = torch.randn(1, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(square, 2), 2), square)


def test_random_masking_follows_the_noise():
    x = torch.arange(8.0).view(1, 8, 1).expand(2, 8, 3)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
    visible, mask, ids_restore = random_masking(x, 0.75, noise)
    assert visible[0, :, 0].tolist() == [1.0, 5.0]  # the two smallest noises, in noise order
    assert visible[1, :, 0].tolist() == [0.0, 1.0]
    assert mask[0].tolist() == [1, 0, 1, 1, 1, 0, 1, 1] and mask.dtype == torch.float32
    shuffled = torch.gather(x, 1, torch.argsort(noise, dim=1)[..., None].expand(-1, -1, 3))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, 3)), x)


def test_encoder_sees_exactly_the_visible_patches_plus_class_token():
    objective = tiny_objective("mae", encoder="vit_pico_patch4_32")  # 64 patches
    lengths = []
    objective.encoder.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    objective(uint8_images(2, size=32))
    assert lengths == [int(64 * (1 - 0.75)) + 1] == [17]


def test_encoder_position_embedding_is_frozen_sincos():
    objective = tiny_objective("mae")
    pos = objective.encoder.pos_embed
    assert not pos.requires_grad
    assert torch.equal(pos.detach()[0], mae_sincos_pos_embed((4, 4), 64))
    assert not objective.decoder_pos_embed.requires_grad


def test_gradients_reach_the_decoder_mask_token_and_bf16_is_finite():
    objective = tiny_objective("mae")
    torch.manual_seed(0)
    images = uint8_images(4)
    out = objective(images)
    out.loss.backward()
    assert objective.mask_token.grad.abs().sum() > 0
    assert objective.encoder.cls_token.grad.abs().sum() > 0
    assert objective.encoder.pos_embed.grad is None  # frozen
    objective.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(images)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in objective.parameters() if p.grad is not None)


def test_config_checks():
    with pytest.raises(ConfigError, match="mask_ratio"):
        tiny_objective("mae", mask_ratio=0.0)
    with pytest.raises(ConfigError, match="divisible"):
        tiny_objective("mae", decoder_embed_dim=30, decoder_num_heads=4)


def test_visualization_and_no_weight_decay():
    objective = tiny_objective("mae")
    images = uint8_images(3)
    vis = objective.visualize(images, objective(images))
    assert vis.grid.shape == (3, 3 * 17 + 1, 4 * 17 + 1) and 0 <= vis.grid.min() and vis.grid.max() <= 1
    assert objective.no_weight_decay() == {"encoder.pos_embed", "encoder.cls_token", "mask_token", "decoder_pos_embed"}


def test_init_encoder_false_keeps_the_encoders_weights():
    torch.manual_seed(0)
    encoder = create_encoder("vit_pico_patch4_16")
    before = encoder.blocks[0].attn.qkv.weight.detach().clone()
    create_objective("mae", encoder, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, init_encoder=False)
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, before)


# ----------------------------------------------------------------------------- peer implementation


def _copy_block(ours, theirs, d):
    """timm Block -> transformers ViTMAELayer (timm fuses q, k, v into one projection)."""
    attention = theirs.attention
    for proj, weight, bias in zip(
        (attention.q_proj, attention.k_proj, attention.v_proj),
        ours.attn.qkv.weight.split(d),
        ours.attn.qkv.bias.split(d),
    ):
        proj.weight.copy_(weight)
        proj.bias.copy_(bias)
    for a, b in (
        (ours.attn.proj, attention.o_proj),
        (ours.norm1, theirs.layernorm_before),
        (ours.norm2, theirs.layernorm_after),
        (ours.mlp.fc1, theirs.mlp.fc1),
        (ours.mlp.fc2, theirs.mlp.fc2),
    ):
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias)


def _hf_sincos(grid: int, dim: int) -> torch.Tensor:
    """The table transformers' ViTMAE `initialize_weights` builds (its builder, then its rotation to MAE's layout)."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    table = build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True).float()
    return torch.cat([table[:, dim // 2 :], table[:, : dim // 2]], dim=1)


def _peer(objective, img_size, norm_pix_loss):
    """transformers' ViTMAEForPreTraining configured like `objective`, with its weights."""
    enc, cfg = objective.encoder, objective.config
    d = enc.embed_dim
    config = transformers.ViTMAEConfig(
        hidden_size=d,
        num_hidden_layers=len(enc.blocks),
        num_attention_heads=enc.blocks[0].attn.num_heads,
        intermediate_size=enc.blocks[0].mlp.fc1.out_features,
        image_size=img_size,
        patch_size=objective.patch_size,
        decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.decoder_mlp_ratio),
        layer_norm_eps=1e-6,
        norm_pix_loss=norm_pix_loss,
        mask_ratio=cfg.mask_ratio,
        qkv_bias=True,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    peer = transformers.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        emb = peer.vit.embeddings
        # the fixed sin-cos tables must be the ones transformers builds (MAE's layout). A freshly constructed
        # ViTMAEForPreTraining in transformers 5.x holds zeros there (its post-init zeroes them), so the
        # expected tables come from its builder, and ours are copied in.
        grid = img_size // objective.patch_size
        torch.testing.assert_close(enc.pos_embed[0], _hf_sincos(grid, d), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            objective.decoder_pos_embed[0], _hf_sincos(grid, cfg.decoder_embed_dim), rtol=0, atol=1e-6
        )
        emb.position_embeddings.copy_(enc.pos_embed)
        emb.cls_token.copy_(enc.cls_token)
        emb.patch_embeddings.projection.weight.copy_(enc.patch_embed.proj.weight)
        emb.patch_embeddings.projection.bias.copy_(enc.patch_embed.proj.bias)
        for ours, theirs in zip(enc.blocks, peer.vit.layers):
            _copy_block(ours, theirs, d)
        peer.vit.layernorm.weight.copy_(enc.norm.weight)
        peer.vit.layernorm.bias.copy_(enc.norm.bias)
        dec = peer.decoder
        dec.mask_token.copy_(objective.mask_token)
        dec.decoder_pos_embed.copy_(objective.decoder_pos_embed)
        dec.decoder_embed.weight.copy_(objective.decoder_embed.weight)
        dec.decoder_embed.bias.copy_(objective.decoder_embed.bias)
        for ours, theirs in zip(objective.decoder_blocks, dec.decoder_layers):
            _copy_block(ours, theirs, cfg.decoder_embed_dim)
        dec.decoder_norm.weight.copy_(objective.decoder_norm.weight)
        dec.decoder_norm.bias.copy_(objective.decoder_norm.bias)
        dec.decoder_pred.weight.copy_(objective.decoder_pred.weight)
        dec.decoder_pred.bias.copy_(objective.decoder_pred.bias)
    return peer


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_matches_transformers_vitmae(norm_pix_loss):
    torch.manual_seed(0)
    encoder = create_encoder("vit_pico_patch4_32", embed_dim=64, depth=2, num_heads=4)
    objective = create_objective(
        "mae", encoder, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, norm_pix_loss=norm_pix_loss
    ).eval()
    peer = _peer(objective, 32, norm_pix_loss)
    images = uint8_images(3, size=32, seed=1)
    noise = torch.rand(3, 64)
    with torch.no_grad():
        ours = objective(images, noise=noise)
        theirs = peer(pixel_values=normalise(images), noise=noise)
    assert torch.equal(ours.extras["mask"], theirs.mask)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.extras["prediction"], theirs.logits, rtol=0, atol=1e-4)
