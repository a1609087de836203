"""Checkpoint folders are complete or ignored; run directories are never silently reused."""

import json
from dataclasses import dataclass

import pytest

from vitmpp.common import checkpoint as ckpt
from vitmpp.common import rundir
from vitmpp.common.config import param
from vitmpp.common.errors import UserError
from vitmpp.common.io import atomic_write_json


def make_checkpoint(root, step, complete=True):
    path = root / ckpt.checkpoint_name(step)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        atomic_write_json(path / ckpt.STATE_FILE, {"step": step})
    return path


def test_incomplete_and_partial_checkpoints_are_ignored(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, complete=False)  # crashed before the state file
    ckpt.partial_dir(tmp_path, 30).mkdir()  # crashed before the rename
    (ckpt.partial_dir(tmp_path, 30) / ckpt.STATE_FILE).write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000010"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000010"
    assert rundir.resolve_resume(tmp_path.parent / "nowhere", "auto") is None


def test_finalize_and_prune_keep_newest(tmp_path):
    for step in (1, 2, 3):
        partial = ckpt.partial_dir(tmp_path, step)
        partial.mkdir()
        atomic_write_json(partial / ckpt.STATE_FILE, {"step": step})
        ckpt.finalize(partial, tmp_path / ckpt.checkpoint_name(step))
        ckpt.prune(tmp_path, keep_last=2)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert not list(tmp_path.glob(".*partial"))


def test_finalize_replaces_same_step_only_when_new_is_complete(tmp_path):
    old = make_checkpoint(tmp_path, 5)
    partial = ckpt.partial_dir(tmp_path, 5)
    partial.mkdir()
    atomic_write_json(partial / ckpt.STATE_FILE, {"step": 5, "new": True})
    ckpt.finalize(partial, old)
    assert json.loads((old / ckpt.STATE_FILE).read_text())["new"] is True


def test_resume_path_must_be_complete(tmp_path):
    broken = make_checkpoint(tmp_path / "checkpoints", 7, complete=False)
    with pytest.raises(UserError, match="is incomplete"):
        rundir.resolve_resume(tmp_path, str(broken))
    with pytest.raises(UserError, match="does not exist"):
        rundir.resolve_resume(tmp_path, str(tmp_path / "missing"))


@dataclass
class Cfg:
    lr: float = param(0.1)
    steps: int = param(10)
    log_every: int = param(5)


def test_run_dir_reuse_is_refused_with_differing_keys(tmp_path):
    rundir.write_config(tmp_path, Cfg())
    with pytest.raises(UserError, match=r"different config \(keys lr\)"):
        rundir.check_reuse(tmp_path, Cfg(lr=0.2), resume=None)
    # same config but a run already happened: refused too
    make_checkpoint(tmp_path / "checkpoints", 3)
    with pytest.raises(UserError, match="already holds this run .*step 3.*--resume auto"):
        rundir.check_reuse(tmp_path, Cfg(), resume=None)
    # resuming reports changed keys, ignoring the allowed prefixes
    assert rundir.check_reuse(tmp_path, Cfg(lr=0.2, log_every=1), resume="auto", ignore=("log_every",)) == ["lr"]


def test_metrics_log_truncates_to_resume_step(tmp_path):
    log = rundir.MetricsLog(tmp_path, None)
    log.append([{"step": s, "loss": 1.0 / s} for s in range(1, 9)])
    rundir.MetricsLog(tmp_path, resume_step=5)
    assert [row["step"] for row in rundir.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
