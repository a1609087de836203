"""Attention weights, rollout and mean attention distance (vitmpp.analyze.attention)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analyze_helpers import random_images, tiny_vit, uniform_rows
from vitmpp.analyze import (
    attention_rollout,
    analyze_encoder,
    attention_weights,
    encoder_geometry,
    mean_attention_distance,
    patch_distances,
    record_attention,
    rollout_maps,
    supports_attention,
)
from vitmpp.common.errors import UserError

# ----------------------------------------------------------------------------- recomputed weights

ENCODER_KINDS = {
    "plain": {},
    "qk_norm_no_bias_layerscale": dict(qk_norm=True, qkv_bias=False, init_values=0.1),
    "registers_avg_pool": dict(class_token=False, reg_tokens=2, global_pool="avg"),
}


def _block_from_weights(block, block_input: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The block's output computed by hand from the recomputed attention weights (unfused path)."""
    attn = block.attn
    x = block.norm1(block_input)
    batch, tokens, _ = x.shape
    v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    mixed = (weights @ v).transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    attended = attn.proj(attn.norm(mixed))
    y = block_input + block.ls1(attended)
    return y + block.ls2(block.mlp(block.norm2(y)))


@pytest.mark.parametrize("kind", list(ENCODER_KINDS))
def test_recomputed_attention_times_v_reproduces_every_block_output(kind):
    encoder = tiny_vit(**ENCODER_KINDS[kind])
    assert all(block.attn.fused_attn for block in encoder.blocks), "timm's fused path is what we must match"
    inputs, outputs = {}, {}
    hooks = []
    for index, block in enumerate(encoder.blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=index: inputs.__setitem__(i, a[0])))
        hooks.append(block.register_forward_hook(lambda m, a, out, i=index: outputs.__setitem__(i, out)))
    with torch.no_grad(), record_attention(encoder) as recorder:
        encoder.forward_features(random_images(3))
    for hook in hooks:
        hook.remove()
    weights = recorder.stacked()
    tokens = encoder.num_prefix_tokens + 64
    assert weights.shape == (2, 3, 4, tokens, tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 4, tokens))
    with torch.no_grad():
        for index, block in enumerate(encoder.blocks):
            rebuilt = _block_from_weights(block, inputs[index], weights[index])
            torch.testing.assert_close(rebuilt, outputs[index], rtol=1e-5, atol=1e-5)


def test_recording_leaves_the_training_path_alone():
    encoder = tiny_vit()
    images = random_images(2)
    with torch.no_grad():
        before = encoder.forward_features(images)
        with record_attention(encoder):
            during = encoder.forward_features(images)
        after = encoder.forward_features(images)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all(block.attn.fused_attn for block in encoder.blocks)
    assert all(not block.attn._forward_pre_hooks for block in encoder.blocks)


def test_hooks_are_removed_after_an_error():
    encoder = tiny_vit()
    with pytest.raises(RuntimeError), record_attention(encoder):
        encoder.forward_features(torch.randn(1, 3, 32, 32))
        raise RuntimeError("boom")
    assert all(not block.attn._forward_pre_hooks for block in encoder.blocks)


def test_attention_weights_restores_training_mode_and_is_deterministic():
    encoder = tiny_vit(drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5).train()
    images = random_images(2)
    first = attention_weights(encoder, images)
    second = attention_weights(encoder, images)
    assert encoder.training
    assert torch.equal(first, second), "analysis runs in eval mode: no dropout"


def test_non_timm_attention_is_a_user_error():
    encoder = tiny_vit()
    encoder.blocks[1].attn = torch.nn.Identity()
    assert not supports_attention(encoder)
    with pytest.raises(UserError, match=r"blocks\[1\]\.attn"):
        attention_weights(encoder, random_images(1))


# ----------------------------------------------------------------------------- rollout


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    rollout = attention_rollout(torch.stack([eye, eye, eye]))
    torch.testing.assert_close(rollout, torch.eye(5).expand(2, 5, 5))


def test_rollout_two_layers_by_hand():
    # layer 1: head mean [[.5, .5], [0, 1]]; + I and row-normalised: [[.75, .25], [0, 1]]
    layer1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])[None]
    # layer 2: head mean [[0, 1], [1, 0]]; + I and row-normalised: [[.5, .5], [.5, .5]]
    layer2 = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])[None]
    # rollout = Â2 Â1 = [[.5*.75 + .5*0, .5*.25 + .5*1]] per row = [[.375, .625], [.375, .625]]
    expected = torch.tensor([[0.375, 0.625], [0.375, 0.625]])
    torch.testing.assert_close(attention_rollout([layer1, layer2])[0], expected)
    # the order matters: Â1 Â2 would give [[.5, .5], [.5, .5]]
    assert not torch.allclose(attention_rollout([layer2, layer1])[0], expected)
    # without the residual identity: the plain product of head means
    raw = torch.tensor([[0.0, 1.0], [1.0, 0.0]]) @ torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    torch.testing.assert_close(attention_rollout([layer1, layer2], residual=False)[0], raw)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_rollout_rows_are_distributions(layers, heads, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    attention = torch.rand(layers, 2, heads, tokens, tokens, generator=generator).softmax(-1)
    rollout = attention_rollout(attention)
    assert rollout.shape == (2, tokens, tokens)
    assert bool((rollout >= 0).all())
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, tokens))


def test_rollout_maps_take_the_class_token_row_or_the_patch_mean():
    grid = (2, 2)
    rollout = torch.zeros(1, 5, 5)
    rollout[0, 0] = torch.tensor([0.5, 0.3, 0.1, 0.1, 0.0])  # class token: half kept on itself
    rollout[0, 1:, 1:] = torch.eye(4) * 0.5
    rollout[0, 1:, 0] = 0.5
    with_cls = rollout_maps(rollout, grid, num_prefix_tokens=1, has_class_token=True)
    torch.testing.assert_close(with_cls[0], torch.tensor([[0.6, 0.2], [0.2, 0.0]]))
    # without a class token the prefix token is a register: mean of the patch rows
    without = rollout_maps(rollout, grid, num_prefix_tokens=1, has_class_token=False)
    torch.testing.assert_close(without[0], torch.full((2, 2), 0.25))


def test_rollout_maps_of_a_real_encoder():
    encoder = tiny_vit()
    geometry = encoder_geometry(encoder)
    maps = rollout_maps(
        attention_rollout(attention_weights(encoder, random_images(3))),
        geometry["grid_size"],
        geometry["num_prefix_tokens"],
        geometry["has_class_token"],
    )
    assert maps.shape == (3, 8, 8)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3))


# ----------------------------------------------------------------------------- mean attention distance


def test_attention_on_the_query_itself_has_distance_zero():
    tokens = 1 + 16
    attention = torch.eye(tokens).expand(3, 2, 2, tokens, tokens)  # [L, B, H, N, N]
    distance = mean_attention_distance(attention, (4, 4), 8, num_prefix_tokens=1)
    assert distance.shape == (3, 2)
    assert torch.equal(distance, torch.zeros(3, 2, dtype=torch.float64))


def test_uniform_attention_on_a_2x2_grid_matches_the_closed_form():
    # from any patch of a 2x2 grid: itself (0), two neighbours (p) and the diagonal (p√2)
    patch = 16
    attention = uniform_rows(2, 3, 1 + 4)[None]
    distance = mean_attention_distance(attention, (2, 2), patch, num_prefix_tokens=1)
    expected = patch * (2 + math.sqrt(2)) / 4
    torch.testing.assert_close(distance, torch.full((1, 3), expected, dtype=torch.float64))


@pytest.mark.parametrize("length", [1, 2, 5, 9])
def test_uniform_attention_on_a_row_of_patches_matches_the_closed_form(length):
    # mean |i - j| over i, j in 0..n-1 is (n² - 1) / (3n), in patches of pw pixels
    pw = 6
    attention = uniform_rows(1, 1, length)[None]
    distance = mean_attention_distance(attention, (1, length), (4, pw), num_prefix_tokens=0)
    assert distance.item() == pytest.approx(pw * (length**2 - 1) / (3 * length))


def test_distances_follow_rows_and_columns_with_rectangular_patches():
    # every patch attends to its right neighbour (or to itself in the last column): distance pw
    gh, gw, ph, pw = 3, 4, 2, 5
    attention = torch.zeros(1, 1, gh * gw, gh * gw)
    for r in range(gh):
        for c in range(gw):
            attention[0, 0, r * gw + c, r * gw + min(c + 1, gw - 1)] = 1.0
    expected_right = pw * (gw - 1) / gw
    assert mean_attention_distance(attention, (gh, gw), (ph, pw), 0).item() == pytest.approx(expected_right)
    attention = torch.zeros(1, 1, gh * gw, gh * gw)
    for r in range(gh):
        for c in range(gw):
            attention[0, 0, r * gw + c, min(r + 1, gh - 1) * gw + c] = 1.0
    expected_down = ph * (gh - 1) / gh
    assert mean_attention_distance(attention, (gh, gw), (ph, pw), 0).item() == pytest.approx(expected_down)


def test_class_token_weight_is_left_out_and_the_rest_renormalised():
    # 1x2 grid of 10 px patches; every query gives 0.9 to the class token and 0.1 to the other patch
    attention = torch.tensor([[0.0, 0.5, 0.5], [0.9, 0.0, 0.1], [0.9, 0.1, 0.0]])[None, None]
    distance = mean_attention_distance(attention, (1, 2), 10, num_prefix_tokens=1)
    assert distance.item() == pytest.approx(10.0)


def test_patch_distances_are_pixel_distances_between_centres():
    distances = patch_distances((2, 3), (4, 4))
    assert distances.shape == (6, 6)
    assert distances[0, 5].item() == pytest.approx(math.hypot(4, 8))  # (0,0) -> (1,2)
    assert torch.equal(distances, distances.T)


def test_streamed_analysis_equals_the_whole_batch_computation():
    encoder = tiny_vit()
    images = random_images(5)
    geometry = encoder_geometry(encoder)
    attentions = attention_weights(encoder, images)
    whole = mean_attention_distance(
        attentions, geometry["grid_size"], geometry["patch_size"], geometry["num_prefix_tokens"]
    )
    maps = rollout_maps(
        attention_rollout(attentions), geometry["grid_size"], geometry["num_prefix_tokens"], geometry["has_class_token"]
    )
    # batches of 2 + 2 + 2, of which only 5 images are used; every image counts once
    batches = [(images[k : k + 2], images[k : k + 2].sigmoid()) for k in range(0, 5, 2)] + [(images, images)]
    analysis = analyze_encoder(encoder, iter(batches), num_images=5, num_rollout_images=3)
    assert analysis.num_images == 5
    torch.testing.assert_close(analysis.mean_distance, whole)
    torch.testing.assert_close(analysis.rollout_maps, maps[:3])
    torch.testing.assert_close(analysis.mean_rollout_map, maps.mean(0))
    torch.testing.assert_close(analysis.rollout_images01, images[:3].sigmoid())
    # a random tiny encoder attends almost uniformly: close to the uniform-attention value
    uniform = patch_distances((8, 8), 4).mean().item()
    assert whole.shape == (2, 4)
    assert torch.allclose(whole, torch.full_like(whole, uniform), rtol=0.1)


def test_rotary_attention_is_refused_rather_than_silently_wrong():
    from timm.layers import AttentionRope

    encoder = tiny_vit()
    encoder.blocks[0].attn = AttentionRope(64, num_heads=4)
    assert not supports_attention(encoder)
    with pytest.raises(UserError, match="AttentionRope"):
        attention_weights(encoder, random_images(1))


def test_a_rollout_overlay_keeps_the_heat_maps_colours_whatever_the_images_colours():
    # a warm photo (orange) and a grey image of the same brightness get the same overlay: the image
    # under the heat map is shown in grey, so the map's colours never mix with the image's own
    from vitmpp.analyze.render import rollout_overlays

    orange = torch.tensor([1.0, 0.5, 0.0])[None, :, None, None].expand(1, 3, 16, 16)
    luma = 0.299 * 1.0 + 0.587 * 0.5
    grey = torch.full((1, 3, 16, 16), luma)
    maps = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rollout_overlays(orange, maps), rollout_overlays(grey, maps), atol=1e-6)
