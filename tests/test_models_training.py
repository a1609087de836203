"""The objectives train: overfitting a fixed batch, torch.compile, checkpointing, timm's optimizer factory."""

from __future__ import annotations

import pytest
import torch
from timm.optim import create_optimizer_v2

from vitmpp.models import create_encoder, create_objective

from models_helpers import TINY, TINY_MAE, blocky_images, tiny_objective, uint8_images


def test_mpp_overfits_a_small_fixed_batch_in_200_steps():
    objective = tiny_objective("mpp", seed=0)
    images = blocky_images(16, seed=1)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3, weight_decay=0.0)
    torch.manual_seed(0)
    losses = []
    for _ in range(200):
        loss = objective(images).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert start > 5.5  # chance level is ln(512) = 6.24
    assert end < 0.5 * start, (start, end)


@pytest.mark.parametrize("name", ["mpp", "mae", "supervised"])
def test_full_graph_compiles_without_breaks(name):
    objective = tiny_objective(name)
    images, labels = uint8_images(4), torch.randint(0, 10, (4,))
    torch.manual_seed(1)
    eager = objective(images, labels).loss
    # fullgraph=True fails on any graph break (host syncs, data-dependent shapes)
    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    out = compiled(images, labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager)
    assert all(torch.isfinite(p.grad).all() for p in objective.parameters() if p.grad is not None)


@pytest.mark.slow
def test_inductor_compiles_mpp():
    objective = tiny_objective("mpp")
    compiled = torch.compile(objective)
    out = compiled(uint8_images(4))
    out.loss.backward()
    assert torch.isfinite(out.loss) and objective.mask_token.grad is not None


@pytest.mark.parametrize("name", ["mpp", "mae"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name):
    plain = tiny_objective(name, seed=0)
    checkpointed = tiny_objective(name, seed=0)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.encoder.set_grad_checkpointing(True)
    images = uint8_images(4)
    for objective in (plain, checkpointed):
        torch.manual_seed(3)
        objective(images).loss.backward()
    for (key, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=key)


@pytest.mark.parametrize("name", ["mpp", "mae", "supervised"])
def test_timm_optimizer_groups(name):
    objective = tiny_objective(name)
    optimizer = create_optimizer_v2(objective, opt="adamw", lr=1e-3, weight_decay=0.05)
    by_id = {id(p): n for n, p in objective.named_parameters()}
    no_decay = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    assert no_decay | decay == trainable  # frozen sin-cos tables are left out
    assert objective.no_weight_decay() & trainable <= no_decay
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "encoder.blocks.0.attn.qkv.bias" in no_decay
    # layer-wise lr decay through the objective's group_matcher: stem lowest, heads/decoders at full lr
    layered = create_optimizer_v2(objective, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {by_id[id(p)]: g["lr_scale"] for g in layered.param_groups for p in g["params"]}
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(0.5**3)
    assert scale["encoder.blocks.1.attn.qkv.weight"] == pytest.approx(0.5)
    head = next(n for n in scale if n.startswith(("head", "decoder")))
    assert scale[head] == 1.0
    if name == "mpp":
        assert scale["mask_token"] == pytest.approx(0.5**3)  # an input embedding: with the stem
    if name == "mae":
        assert scale["mask_token"] == 1.0  # the decoder's


def test_objectives_share_the_encoder_they_are_given():
    encoder = create_encoder(TINY)
    objective = create_objective("mae", encoder, **TINY_MAE)
    assert objective.encoder is encoder
    keys = {k[len("encoder.") :] for k in objective.state_dict() if k.startswith("encoder.")}
    assert keys == set(encoder.state_dict())  # the engine's export strips "encoder." and loads these
