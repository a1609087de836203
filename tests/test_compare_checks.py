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
        f"overrides: [train.steps=5]\noutput_dir: {tmp_path / 'out'}\n")
    return path


def test_a_shared_override_that_breaks_a_recipe_is_refused_before_anything_runs(tmp_path):
    config = write_config(tmp_path, str(FINETUNE / "knn_digits.yaml"))
    result = subprocess.run([sys.executable, "-m", "vitmpp.experiments.compare", "--config", str(config)], cwd=tmp_path,
                            env=env(cache=tmp_path / "cache"), capture_output=True, text=True, timeout=300)
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
