"""compare checks every cell's config before anything runs (issue 27, item 4): a shared override that
breaks one recipe is one sentence naming that cell and recipe file, and nothing has run; an evaluation
recipe entry may carry its own overrides, as pretraining entries can."""

from __future__ import annotations

import subprocess
import sys

from engine_helpers import ROOT, env

FINETUNE = ROOT / "configs" / "finetune"


def write_config(tmp_path, knn_entry: str):
    path = tmp_path / "compare.yaml"
    path.write_text(
        "pretraining:\n  recipes:\n    mpp: " + str(ROOT / "configs" / "pretrain" / "mpp_digits.yaml") + "\n"
        "encoders: {random: random}\nprotocols: [linear, knn]\nlabel_fractions: [0.1]\nseeds: [0]\n"
        f"recipes:\n  linear: {FINETUNE / 'linear_digits.yaml'}\n  knn: '{knn_entry}'\n"
        f"overrides: [train.steps=5]\noutput_dir: {tmp_path / 'out'}\n"
    )
    return path


def test_a_shared_override_that_breaks_a_recipe_is_refused_before_anything_runs(tmp_path):
    config = write_config(tmp_path, str(FINETUNE / "knn_digits.yaml"))
    result = subprocess.run(
        [sys.executable, "-m", "vitmpp.experiments.compare", "--config", str(config)],
        cwd=tmp_path,
        env=env(cache=tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "knn_digits.yaml" in errors[0] and "train.epochs" in errors[0], result.stderr
    assert "Nothing has run" in errors[0] and "protocol knn" in errors[0]
    assert not (tmp_path / "out" / "pretrain").exists() and not (tmp_path / "out" / "cells").exists()


def test_an_evaluation_recipe_entry_carries_its_own_overrides(tmp_path):
    from vitmpp.common.config import load_config
    from vitmpp.experiments.grid import CompareConfig, cells, check_cells, encoder_runs, resolve_recipes

    config = write_config(tmp_path, f"{FINETUNE / 'knn_digits.yaml'} train.epochs=null")
    cfg = load_config(CompareConfig, config, [])
    runs = encoder_runs(cfg, tmp_path / "out")
    check_cells(cfg, cells(cfg, runs), runs, tmp_path / "out" / "cells", resolve_recipes(cfg, config), None)


def test_a_checkpoint_of_another_library_is_an_encoder_row(tmp_path):
    """compare's `encoders:` takes a checkpoint file or a timm/transformers folder as it is, and counts no
    pretraining of ours for it (compute-matched scratch adds nothing for it)."""
    import torch

    from vitmpp.experiments.grid import cell_encoder, pretraining_images

    public = tmp_path / "mae_pretrain_vit_pico.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}}, public)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text('{"architecture": "vit_pico_patch4_16"}')
    ours = tmp_path / "run"
    ours.mkdir()
    (ours / "encoder.safetensors").write_bytes(b"")
    assert cell_encoder(str(public)) == str(public) and cell_encoder(str(hub)) == str(hub)
    assert cell_encoder(str(ours)) == str(ours)
    assert pretraining_images(str(public)) == 0 and pretraining_images(str(hub)) == 0


def test_a_protocol_can_be_limited_to_some_encoders(tmp_path):
    """protocol_encoders: {finetune: [mae]} runs fine-tuning on mae alone, the other protocols on every
    encoder; a name that is no encoder, or a protocol not in the grid, is one sentence."""
    import pytest

    from vitmpp.common.config import load_config
    from vitmpp.common.errors import ConfigError
    from vitmpp.experiments.grid import CompareConfig, cells, encoder_runs

    config = tmp_path / "limited.yaml"
    config.write_text(
        "encoders: {mpp: runs/mpp, mae: runs/mae, random: random}\n"
        "protocols: [linear, finetune]\nlabel_fractions: [0.1]\nseeds: [0]\n"
        f"recipes: {{linear: {FINETUNE / 'linear_digits.yaml'}, finetune: {FINETUNE / 'finetune_digits.yaml'}}}\n"
        "protocol_encoders: {finetune: [mae]}\n"
    )
    cfg = load_config(CompareConfig, config, [])
    grid = cells(cfg, encoder_runs(cfg, tmp_path / "out"))
    assert sorted((c.protocol, c.encoder) for c in grid) == [
        ("finetune", "mae"),
        ("linear", "mae"),
        ("linear", "mpp"),
        ("linear", "random"),
    ]
    with pytest.raises(ConfigError, match=r"'protocol_encoders.finetune' names supervised; name encoders of"):
        load_config(CompareConfig, config, ["protocol_encoders={finetune: [supervised]}"])
    with pytest.raises(ConfigError, match=r"'protocol_encoders.knn' limits a protocol that is not run"):
        load_config(CompareConfig, config, ["protocol_encoders={knn: [mae]}"])
