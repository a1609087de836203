"""A run resumes only its own checkpoint, on its own data (issue 26, faults 2 and 3).

Real runs in subprocesses: another run's checkpoint copied into a run folder, `--resume PATH`
into another run's folder, and a resume onto a real second data set (the same data set with
fewer shards), against the same shards moved elsewhere, which must keep resuming exactly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from engine_helpers import TINY, files_of, metrics, printed_lines, python_cmd, run

pytestmark = pytest.mark.slow

PRETRAIN = python_cmd("pretrain/main.py")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, digits16):
    """Runs A (seed 0) and B (seed 1) of the same shapes, stopped at steps 2 and 3."""
    root = tmp_path_factory.mktemp("two_runs")
    command = PRETRAIN + TINY + [f"data.shards={digits16}", "train.steps=6", "log.checkpoint_every=1000"]
    run(command + ["run.name=a", "train.seed=0", "debug.stop_at_step=2"], cwd=root)
    run(command + ["run.name=b", "train.seed=1", "debug.stop_at_step=3"], cwd=root)
    return root, command


def copy_runs(two_runs, tmp_path):
    root, command = two_runs
    shutil.copytree(root / "runs", tmp_path / "runs")
    return tmp_path / "runs" / "a", tmp_path / "runs" / "b", command + ["run.name=a", "train.seed=0"]


@pytest.mark.fault("another run's checkpoint copied into the run folder, then --resume auto", expect="clear error")
def test_a_checkpoint_copied_from_another_run_is_refused_naming_both(tmp_path, two_runs):
    a, b, command = copy_runs(two_runs, tmp_path)
    shutil.copytree(b / "checkpoints" / "step-0000003", a / "checkpoints" / "step-0000003")
    before = files_of(a)
    refused = run(command + ["--resume", "auto"], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    lines = printed_lines(refused.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
    root = two_runs[0].resolve()
    assert f"written by another run (the run in {root / 'runs' / 'b'}, id " in lines[0], lines[0]
    assert "not by the run in runs/a (id " in lines[0], lines[0]
    assert "--allow-changes" in lines[0]
    assert files_of(a) == before  # nothing trained, nothing rewritten

    accepted = run(command + ["--resume", "auto", "--allow-changes"], cwd=tmp_path)
    assert "step-0000003" in accepted.stdout
    history = sorted((a / "config-history").iterdir())
    assert len(history) == 2 and "written by another run" in history[-1].read_text()
    assert [r["step"] for r in metrics(a)][-1] == 6
    # from now on its checkpoints are A's own: resuming again is not refused
    state = json.loads((a / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert state["run_id"] == json.loads((a / "run.json").read_text())["id"]


@pytest.mark.fault("--resume PATH naming a checkpoint in another run's folder", expect="clear error")
def test_resume_path_into_another_runs_folder_is_refused(tmp_path, two_runs):
    a, b, command = copy_runs(two_runs, tmp_path)
    before = files_of(a)
    refused = run(command + ["--resume", str(b / "checkpoints" / "step-0000003")], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    lines = printed_lines(refused.stderr)
    assert (
        len(lines) == 1 and f"written by another run (the run in {two_runs[0].resolve() / 'runs' / 'b'}" in lines[0]
    ), lines
    assert files_of(a) == before
    # its own checkpoint by path still resumes
    run(command + ["--resume", str(a / "checkpoints" / "step-0000002")], cwd=tmp_path)
    assert [r["step"] for r in metrics(a)] == [1, 2, 3, 4, 5, 6]


def fewer_shards(digits16, dest, keep: int):
    """A real second data set: the same digits with only the first `keep` training shards."""
    shutil.copytree(digits16, dest)
    manifest = json.loads((dest / "_info.json").read_text())
    train = manifest["splits"]["train"]
    for name in train["filenames"][keep:]:
        (dest / name).unlink()
    train["filenames"], train["shard_lengths"] = train["filenames"][:keep], train["shard_lengths"][:keep]
    train["shard_bytes"] = train["shard_bytes"][:keep]
    train["num_samples"] = sum(train["shard_lengths"])
    (dest / "_info.json").write_text(json.dumps(manifest))
    return dest


@pytest.mark.fault("--resume auto with data.shards naming other data (fewer shards)", expect="clear error")
def test_resuming_onto_other_data_is_refused_and_moved_shards_resume_exactly(tmp_path, digits16):
    small = fewer_shards(digits16, tmp_path / "small", keep=3)
    moved = tmp_path / "elsewhere" / "digits"
    shutil.copytree(digits16, moved)
    command = PRETRAIN + TINY + ["train.steps=5", "log.checkpoint_every=1000"]
    run(command + ["run.name=straight", f"data.shards={digits16}"], cwd=tmp_path)
    run(command + ["run.name=r", f"data.shards={digits16}", "debug.stop_at_step=2"], cwd=tmp_path)
    run_dir = tmp_path / "runs" / "r"
    before = files_of(run_dir)

    refused = run(command + ["run.name=r", f"data.shards={small}", "--resume", "auto"], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    lines = [line for line in printed_lines(refused.stderr) if line.startswith("error")]
    assert len(lines) == 1, refused.stderr
    total = json.loads((digits16 / "_info.json").read_text())["splits"]["train"]["num_samples"]
    fewer = json.loads((small / "_info.json").read_text())["splits"]["train"]["num_samples"]
    assert f"({total} samples in 5 shards" in lines[0] and f"({fewer} samples in 3 shards" in lines[0], lines[0]
    assert "data.shards" in lines[0]
    assert files_of(run_dir) == before

    # the same shards in another place: resumed, and the losses continue exactly
    run(command + ["run.name=r", f"data.shards={moved}", "--resume", "auto"], cwd=tmp_path)
    assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in metrics(tmp_path / "runs" / "straight")]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["shards"] == str(moved)
