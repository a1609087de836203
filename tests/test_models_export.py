"""encoder.safetensors + encoder.json: round trips, timm's factory, resampling, bad files."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitmpp.common.errors import UserError
from vitmpp.models import create_encoder, load_encoder, read_encoder_info, save_encoder
from vitmpp.models.weights import INFO_NAME, WEIGHTS_NAME

from models_helpers import TINY, tiny_objective


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # nothing here may reach a hub: timm must take the file it is given
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_roundtrip_gives_identical_outputs(tmp_path):
    objective = tiny_objective("mae")  # sin-cos position embeddings, MAE init
    encoder = objective.encoder.eval()
    path = save_encoder(
        encoder, tmp_path / "run", objective="mae", step=123, extra={"mean": [0.5] * 3, "std": [0.5] * 3}
    )
    assert path == tmp_path / "run" / WEIGHTS_NAME and (tmp_path / "run" / INFO_NAME).is_file()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary files left
    info = read_encoder_info(tmp_path / "run")
    assert info["name"] == TINY and info["img_size"] == 16 and info["patch_size"] == 4
    assert info["objective"] == "mae" and info["step"] == 123 and info["pos_embed"] == "sincos"
    assert info["extra"]["mean"] == [0.5] * 3 and info["timm_name"] is None
    loaded = load_encoder(tmp_path / "run").eval()
    assert loaded.pos_embed.requires_grad  # comes back learnable, as MAE fine-tunes it
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.forward_features(x), encoder.forward_features(x), rtol=0, atol=0)
    # the file alone describes itself (metadata), e.g. when copied without encoder.json
    (tmp_path / "run" / INFO_NAME).unlink()
    assert read_encoder_info(path)["name"] == TINY


def test_overrides_and_resampling_16_to_32(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder(TINY)
    save_encoder(encoder, tmp_path)
    bigger = load_encoder(tmp_path / WEIGHTS_NAME, img_size=32, drop_path_rate=0.1, global_pool="avg")
    assert bigger.pos_embed.shape == (1, 1 + 8 * 8, 64) and bigger.patch_embed.img_size == (32, 32)
    assert bigger.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 65, 64)
    assert bigger.global_pool == "avg" and bigger.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    # 2D resampling: the class token's row is kept, the 4x4 grid is interpolated to 8x8 (corners stay close)
    torch.testing.assert_close(bigger.pos_embed[0, 0], encoder.pos_embed[0, 0])
    grid_old = encoder.pos_embed[0, 1:].reshape(4, 4, 64)
    grid_new = bigger.pos_embed[0, 1:].reshape(8, 8, 64)
    expected = torch.nn.functional.interpolate(
        grid_old.permute(2, 0, 1)[None], size=(8, 8), mode="bicubic", antialias=True
    )[0].permute(1, 2, 0)
    torch.testing.assert_close(grid_new, expected, rtol=1e-5, atol=1e-5)
    # the trained final norm is kept with average pooling, and the result exports and loads again
    assert not isinstance(bigger.norm, torch.nn.Identity)
    torch.testing.assert_close(bigger.norm.weight, encoder.norm.weight)
    again = load_encoder(save_encoder(bigger, tmp_path / "again"))
    assert again.global_pool == "avg" and again.pos_embed.shape == (1, 65, 64)
    with pytest.raises(UserError, match="patch size"):
        load_encoder(tmp_path, img_size=30)
    with pytest.raises(UserError, match="do not fit"):
        load_encoder(tmp_path, embed_dim=32)


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_loads_into_timm_create_model_for_a_standard_variant(tmp_path, num_classes):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16_224").eval()
    path = save_encoder(encoder, tmp_path, objective="mpp", step=1)
    info = read_encoder_info(path)
    assert info["timm_name"] == "vit_tiny_patch16_224"
    model = timm.create_model(
        info["timm_name"],
        pretrained=True,
        num_classes=num_classes,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=0),
    ).eval()
    missing = set(model.state_dict()) - set(encoder.state_dict())
    assert missing == {"head.weight", "head.bias"}  # every encoder key arrived; only the new head is fresh
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model.forward_features(x), encoder.forward_features(x), rtol=0, atol=0)
    assert model(x).shape == (1, num_classes)


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="No encoder"):
        load_encoder(tmp_path / "nowhere")
    pickle = tmp_path / "encoder.pth"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(UserError, match="safetensors"):
        load_encoder(pickle)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="no encoder.json|not a readable"):
        read_encoder_info(broken)
    (broken / INFO_NAME).write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        read_encoder_info(broken)
    (broken / INFO_NAME).write_text(json.dumps({"name": TINY, "img_size": 16, "overrides": {}}))
    with pytest.raises(UserError, match="not a readable"):
        load_encoder(broken)
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    save_file({"pos_embed": torch.zeros(1, 17, 64)}, str(mismatched / WEIGHTS_NAME))
    (mismatched / INFO_NAME).write_text(json.dumps({"name": TINY, "img_size": 16}))
    with pytest.raises(UserError, match="do not match"):
        load_encoder(mismatched)


def test_export_overwrites_atomically(tmp_path):
    first = create_encoder(TINY)
    second = create_encoder(TINY)
    save_encoder(first, tmp_path, step=1)
    save_encoder(second, tmp_path, step=2)
    assert read_encoder_info(tmp_path)["step"] == 2
    loaded = load_encoder(tmp_path)
    torch.testing.assert_close(loaded.pos_embed, second.pos_embed)
