"""Pretraining from public weights (model.init): the weights are used, recorded in encoder.json and the
model card, resampled to the run's resolution, and a resumed run continues exactly without reading them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine_helpers import TINY, metrics, python_cmd, run


def public_checkpoint(path):
    """A timm ViT state dict at 32 px (an 8 x 8 grid): what a user downloads, here made with timm."""
    from timm.models import VisionTransformer

    torch.manual_seed(7)
    save_file(
        VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0).state_dict(),
        path,
    )
    return path


@pytest.mark.slow
def test_pretraining_from_a_checkpoint_records_it_and_resumes_exactly_without_it(tmp_path, digits16):
    (tmp_path / "public").mkdir()
    init = public_checkpoint(tmp_path / "public" / "vit_pico_32.safetensors")
    common = TINY + [f"data.shards={digits16}", "log.checkpoint_every=2", f"model.init={init}"]
    straight = run(python_cmd("pretrain/main.py") + common + ["train.steps=4", "run.name=straight"], cwd=tmp_path)
    assert f"model.init: encoder from {init} (timm, sha256 " in straight.stdout
    run(
        python_cmd("pretrain/main.py") + TINY + [f"data.shards={digits16}", "train.steps=4", "run.name=random"],
        cwd=tmp_path,
    )
    run(
        python_cmd("pretrain/main.py") + common + ["train.steps=4", "run.name=resumed", "debug.stop_at_step=2"],
        cwd=tmp_path,
    )
    init.rename(init.with_suffix(".moved"))  # a resumed run holds the weights: it never reads the init again
    second = run(
        python_cmd("pretrain/main.py") + common + ["train.steps=4", "run.name=resumed", "--resume", "auto"],
        cwd=tmp_path,
    )
    assert "model.init:" not in second.stdout

    runs = tmp_path / "runs"
    losses = {name: [r["loss"] for r in metrics(runs / name)] for name in ("straight", "resumed", "random")}
    assert losses["resumed"] == pytest.approx(losses["straight"], abs=1e-6)
    assert losses["random"][0] != pytest.approx(losses["straight"][0], abs=1e-4)  # the init changed the start
    for name in ("straight", "resumed"):
        recorded = json.loads((runs / name / "encoder.json").read_text())["extra"]["init"]
        assert recorded["path"] == str(init.resolve()) and recorded["format"] == "timm"
        assert recorded["parts"] == ["encoder"] and len(recorded["sha256"]) == 64
        assert "Pretraining started from" in (runs / name / "README.md").read_text()


def test_a_checkpoint_of_another_width_is_refused_naming_the_key_and_both_shapes(tmp_path, digits16):
    init = public_checkpoint(tmp_path / "vit_pico_32.safetensors")
    out = run(
        python_cmd("pretrain/main.py")
        + TINY
        + [
            f"data.shards={digits16}",
            "train.steps=1",
            "model.name=vit_nano_patch4_32",
            "model.img_size=16",
            f"model.init={init}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 2
    assert (
        "does not fit this run's encoder: 'cls_token' has shape (1, 1, 64), the encoder's is (1, 1, 128)"
        in out.stderr + out.stdout
    )


def test_the_position_table_is_resampled_to_the_runs_grid(tmp_path):
    from vitmpp.models import create_objective
    from vitmpp.models.encoder import create_encoder
    from vitmpp.models.importer import initialise_from

    init = public_checkpoint(tmp_path / "vit_pico_32.safetensors")
    objective = create_objective("mpp", create_encoder("vit_pico_patch4_16"))  # a 4 x 4 grid
    initialise_from(objective, init)
    assert objective.encoder.pos_embed.shape == (1, 1 + 16, 64)
    from timm.layers import resample_abs_pos_embed
    from safetensors.torch import load_file

    expected = resample_abs_pos_embed(load_file(str(init))["pos_embed"], new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(objective.encoder.pos_embed.detach(), expected, rtol=0, atol=1e-6)
