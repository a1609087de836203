"""Damaged checkpoints and disks that really fill up.

A checkpoint damaged on disk (bits overwritten, a file truncated or lost) is found by the
checksums written with it, before training continues on it. A full disk is a real one: a
tmpfs mounted for the test (as root; skipped with the reason where mounting is not
allowed), sized from a reference run so that the first checkpoint fits and a later write
does not; the libraries then fail their own way (safetensors' SafetensorError, torch's
zip writer's RuntimeError, TensorBoard's writer thread), not through our own hooks.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from engine_helpers import TINY, accelerate_cmd, max_weight_difference, metrics, python_cmd, run

pytestmark = pytest.mark.slow

COMMON = TINY + ["train.steps=6", "log.checkpoint_every=2"]


def pretrain(cwd: Path, shards: Path, *args: str, check: bool = True, processes: int = 1):
    cmd = python_cmd("pretrain/main.py") if processes == 1 else accelerate_cmd("pretrain/main.py", processes=processes)
    return run(cmd + COMMON + [f"data.shards={shards}", *args], cwd=cwd, check=check, timeout=240)


def refused(result) -> str:
    """The one-sentence error of a refused run (exit 2, no traceback); returns it."""
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def same_as_reference(run_dir: Path, reference: Path) -> None:
    """Every step logged once, with the losses and final weights of the uninterrupted run."""
    rows, expected = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for a, b in zip(rows, expected):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    assert max_weight_difference(run_dir, reference) < 1e-6


def corrupt(file: Path, size: int = 64 << 10) -> bytes:
    """Overwrite `size` bytes in the middle of `file` (same length, as bit rot would); returns them."""
    junk = random.Random(0).randbytes(size)
    with open(file, "r+b") as handle:
        handle.seek(max(0, file.stat().st_size // 2 - size // 2))
        handle.write(junk)
    return junk


def overwrite_weights(checkpoint: Path) -> str:
    corrupt(checkpoint / "model.safetensors")
    return "model.safetensors does not match the sha256 checksum"


def truncate_optimizer_state(checkpoint: Path) -> str:
    size = (checkpoint / "optimizer.bin").stat().st_size
    os.truncate(checkpoint / "optimizer.bin", size // 2)
    return f"optimizer.bin has {size // 2} bytes, but {size} were written"


def lose_random_state(checkpoint: Path) -> str:
    (checkpoint / "random_states_0.pkl").unlink()
    return "random_states_0.pkl is missing"


DAMAGE = {
    "weights overwritten": overwrite_weights,
    "optimizer state truncated": truncate_optimizer_state,
    "random state file lost": lose_random_state,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits16) -> Path:
    """The uninterrupted 6-step run every resumed one must equal."""
    cwd = tmp_path_factory.mktemp("reference")
    pretrain(cwd, digits16, "run.name=straight")
    return cwd / "runs" / "straight"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, digits16) -> Path:
    """A run stopped after step 5: checkpoints step-0000004 and step-0000005 (tests work on copies)."""
    cwd = tmp_path_factory.mktemp("stopped")
    pretrain(cwd, digits16, "run.name=stopped", "debug.stop_at_step=5")
    return cwd / "runs" / "stopped"


@pytest.fixture
def copy_of_stopped(stopped, tmp_path) -> Path:
    """A fresh copy of the stopped run under tmp_path/runs/stopped (commands run in tmp_path)."""
    shutil.copytree(stopped, tmp_path / "runs" / "stopped")
    return tmp_path / "runs" / "stopped"


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.fault("64 KiB of the newest checkpoint's weights overwritten", expect="survived", lost="none")
def test_damaged_newest_checkpoint_is_passed_over_and_the_run_equals_an_uninterrupted_one(
    copy_of_stopped, tmp_path, digits16, reference
):
    checkpoints = copy_of_stopped / "checkpoints"
    junk = corrupt(checkpoints / "step-0000005" / "model.safetensors")
    result = pretrain(tmp_path, digits16, "run.name=stopped", "--resume", "auto")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1, result.stderr
    assert "step-0000005 cannot be resumed (model.safetensors does not match the sha256 checksum" in warnings[0]
    assert "step-0000005.damaged" in warnings[0]
    assert "resumed from" in result.stdout and "step-0000004 at step 4" in result.stdout
    same_as_reference(copy_of_stopped, reference)
    # the damaged checkpoint is kept as it was, out of the way of the resumed run's saves and pruning
    kept = (checkpoints / "step-0000005.damaged" / "model.safetensors").read_bytes()
    assert junk in kept


@pytest.mark.fault("every checkpoint of a run damaged", expect="clear error", lost="none")
def test_resume_auto_refuses_when_no_checkpoint_is_intact(copy_of_stopped, tmp_path, digits16):
    checkpoints = copy_of_stopped / "checkpoints"
    corrupt(checkpoints / "step-0000005" / "model.safetensors")
    (checkpoints / "step-0000004" / "optimizer.bin").unlink()
    before = sorted(p.name for p in checkpoints.iterdir())
    error = refused(pretrain(tmp_path, digits16, "run.name=stopped", "--resume", "auto", check=False))
    assert f"No checkpoint in {Path('runs') / 'stopped' / 'checkpoints'} is intact" in error
    assert (
        "step-0000005: model.safetensors does not match" in error and "step-0000004: optimizer.bin is missing" in error
    )
    assert "--resume PATH" in error
    assert sorted(p.name for p in checkpoints.iterdir()) == before  # nothing set aside, nothing deleted


@pytest.mark.fault("a damaged checkpoint given to --resume PATH", expect="clear error", lost="none")
def test_damaged_checkpoint_given_by_path_is_refused(copy_of_stopped, tmp_path, digits16):
    target = copy_of_stopped / "checkpoints" / "step-0000005"
    problem = overwrite_weights(target)
    error = refused(pretrain(tmp_path, digits16, "run.name=stopped", "--resume", str(target), check=False))
    assert f"Checkpoint '{target}' is damaged ({problem}" in error and "'auto'" in error
    assert target.is_dir()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_kind_of_damage_is_found_by_path_and_passed_over_by_auto(copy_of_stopped, damage, capsys):
    """What `--resume` decides (the commands above show it end to end), for each kind of damage."""
    from vitmpp.common.errors import UserError
    from vitmpp.common.rundir import resolve_resume

    checkpoints = copy_of_stopped / "checkpoints"
    problem = DAMAGE[damage](checkpoints / "step-0000005")
    with pytest.raises(UserError, match=re.escape(f"is damaged ({problem}")):
        resolve_resume(copy_of_stopped, str(checkpoints / "step-0000005"))
    assert resolve_resume(copy_of_stopped, "auto") == checkpoints / "step-0000004"
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and f"step-0000005 cannot be resumed ({problem}" in warning
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000004", "step-0000005.damaged"]


@pytest.mark.fault("a checkpoint from before checksums resumed", expect="survived", lost="none")
def test_checkpoint_without_checksums_resumes_with_a_warning(copy_of_stopped, tmp_path, digits16, reference):
    state_file = copy_of_stopped / "checkpoints" / "step-0000005" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["files"]  # as written before checkpoints carried checksums
    state_file.write_text(json.dumps(state))
    result = pretrain(tmp_path, digits16, "run.name=stopped", "--resume", "auto")
    assert "step-0000005 was written without checksums" in result.stderr and "cannot be verified" in result.stderr
    assert "step-0000005 at step 5" in result.stdout
    same_as_reference(copy_of_stopped, reference)


@pytest.mark.fault(
    "a rank's random state file lost from the newest checkpoint (2 processes)", expect="survived", lost="none"
)
def test_two_processes_agree_on_passing_over_a_damaged_checkpoint(tmp_path, digits16):
    """The main process verifies and decides; the other rank follows (no hang, one warning)."""
    pretrain(tmp_path, digits16, "debug.stop_at_step=3", processes=2)
    checkpoints = tmp_path / "runs" / "default-mpp" / "checkpoints"
    (checkpoints / "step-0000003" / "random_states_1.pkl").unlink()
    result = pretrain(tmp_path, digits16, "--resume", "auto", processes=2)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "random_states_1.pkl is missing" in warnings[0], result.stderr
    assert "step-0000002 at step 2" in result.stdout
    assert [r["step"] for r in metrics(tmp_path / "runs" / "default-mpp")] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- a real full disk


def disk_usage(path: Path) -> int:
    """Bytes the files under `path` take on a tmpfs (whole pages)."""
    return sum(p.stat().st_blocks * 512 for p in Path(path).rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """`resize(bytes)`: a real tmpfs of that size at tmp_path/disk (mounted on the first call, remounted
    after); unmounted at the end. Skips, with the reason, where mounting is not allowed."""
    where = tmp_path / "disk"
    mounted = []

    def resize(size: int) -> Path:
        options = f"size={size // 1024 + 1}k"
        if mounted:
            cmd = ["mount", "-o", f"remount,{options}", str(where)]
        else:
            if os.geteuid() != 0:
                pytest.skip("mounting a small tmpfs needs root")
            where.mkdir()
            cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            if mounted:
                raise AssertionError(f"remount failed: {done.stderr}")
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
        mounted.append(where)
        return where

    yield resize
    if mounted:
        subprocess.run(["umount", "-l", str(where)], check=True)


def sizes(reference: Path) -> dict[str, int]:
    """What the reference run's files take: one checkpoint and its parts, the export, and the rest."""
    checkpoint = reference / "checkpoints" / "step-0000006"
    parts = {p.name: p.stat().st_blocks * 512 for p in checkpoint.iterdir()}
    export = disk_usage(reference) - disk_usage(reference / "checkpoints")
    export_files = sum((reference / n).stat().st_blocks * 512 for n in ("encoder.safetensors", "encoder.json"))
    # written after the encoder at the end of the run: the transformers folder and the model card
    later = disk_usage(reference / "transformers") + (reference / "README.md").stat().st_blocks * 512
    return {"checkpoint": sum(parts.values()), **parts, "encoder": export_files, "rest": export - export_files - later}


@pytest.mark.fault(
    "disk full (ENOSPC) during a checkpoint save", expect="clear error", lost="steps since the last checkpoint"
)
def test_real_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, digits16, reference, small_disk):
    """The disk holds the step-2 checkpoint; at step 4 it fills while safetensors writes the weights."""
    size = sizes(reference)
    disk = small_disk(size["rest"] + size["checkpoint"] + size["model.safetensors"] // 2)
    args = ["run.name=full", f"run.output_dir={disk}", "log.keep_checkpoints=1"]
    error = refused(pretrain(tmp_path, digits16, *args, check=False))
    checkpoints = disk / "full" / "checkpoints"
    assert f"Could not write checkpoint {checkpoints / 'step-0000004'} (No space left on device)" in error
    assert f"the previous checkpoint {checkpoints / 'step-0000002'} is intact" in error and "--resume auto" in error
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002"]  # no .partial left
    # the steps after the last checkpoint are what was lost: the run continues from it once there is room
    small_disk(64 << 20)
    resumed = pretrain(tmp_path, digits16, *args, "--resume", "auto")
    assert "step-0000002 at step 2" in resumed.stdout and "warning" not in resumed.stderr
    same_as_reference(disk / "full", reference)


@pytest.mark.fault(
    "disk full (ENOSPC) during a checkpoint save", expect="clear error", lost="steps since the last checkpoint"
)
def test_full_disk_inside_torch_save_is_recognised_without_an_errno(tmp_path, small_disk):
    """torch.save's zip writer reports a full disk as "unexpected pos ..." with no errno: the weights
    fit, the optimizer state does not, and the save still ends in the one sentence."""
    import torch

    from vitmpp.common import checkpoint as ckpt
    from vitmpp.common.distributed import ControlPlane, make_accelerator
    from vitmpp.common.errors import UserError

    acc = make_accelerator(mixed_precision="no", log_with=None)
    layer = torch.nn.Linear(256, 256)
    model, optimizer = acc.prepare(layer, torch.optim.Adam(layer.parameters()))
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()

    def checkpointer(run_dir: Path) -> ckpt.Checkpointer:
        return ckpt.Checkpointer(acc, run_dir, keep_last=1, control=ControlPlane(acc))

    measured = checkpointer(tmp_path / "measure").save(1, {"step": 1})
    size = {p.name: p.stat().st_blocks * 512 for p in measured.iterdir()}
    disk = small_disk(sum(size.values()) + size["model.safetensors"] + size["optimizer.bin"] // 2)
    saver = checkpointer(disk)
    first = saver.save(1, {"step": 1})
    with pytest.raises(
        UserError,
        match=re.escape(
            f"Could not write checkpoint {disk / 'checkpoints' / 'step-0000002'} (No space left on device: "
        ),
    ) as caught:
        saver.save(2, {"step": 2})
    assert f"the previous checkpoint {first} is intact" in str(caught.value)
    assert ckpt.list_checkpoints(disk / "checkpoints") == [first] and ckpt.damage(first) is None
    assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["step-0000001"]


@pytest.mark.fault("disk full (ENOSPC) while exporting the encoder", expect="clear error", lost="none")
def test_real_full_disk_during_the_export_keeps_the_final_checkpoint(tmp_path, digits16, reference, small_disk):
    """The final checkpoint fits, the encoder export after it does not; a rerun exports from that checkpoint."""
    size = sizes(reference)
    disk = small_disk(size["rest"] + size["checkpoint"] + size["encoder"] // 2)
    args = ["run.name=export", f"run.output_dir={disk}", "log.checkpoint_every=1000"]  # one checkpoint: the final one
    error = refused(pretrain(tmp_path, digits16, *args, check=False))
    run_dir = disk / "export"
    assert (
        f"Could not write the encoder export in {run_dir} (No space left on device)" in error
        and "--resume auto" in error
    )
    assert sorted(p.name for p in run_dir.iterdir() if "encoder" in p.name) == []  # no temporary or half file
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000006"]
    small_disk(64 << 20)
    resumed = pretrain(tmp_path, digits16, *args, "--resume", "auto")
    assert "step-0000006 at step 6" in resumed.stdout
    same_as_reference(run_dir, reference)


def fill(disk: Path) -> Path:
    """Fill the filesystem at `disk` to the last byte, as another program would."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while handle.write(b"\0" * 4096):
                pass
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


@pytest.mark.parametrize("fault", ["full", "read-only"])
@pytest.mark.fault(
    "metrics.jsonl on a full or read-only disk", expect="clear error", lost="steps since the last checkpoint"
)
def test_metrics_log_on_a_refusing_disk_is_one_sentence_and_keeps_whole_lines(small_disk, fault):
    from vitmpp.common.errors import UserError
    from vitmpp.common.rundir import MetricsLog

    disk = small_disk(256 << 10)
    log = MetricsLog(disk, None)
    log.append([{"step": 1, "loss": 1.0}])
    before = log.path.read_bytes()
    if fault == "full":
        fill(disk)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    reason = {"full": "No space left on device", "read-only": "Read-only file system"}[fault]
    with pytest.raises(
        UserError, match=rf"Could not write .*metrics.jsonl \({reason}\); the checkpoints written so far are intact"
    ):
        log.append([{"step": s, "loss": 0.5, "note": "x" * 2000} for s in range(2, 200)])
    assert log.path.read_bytes() == before


@pytest.mark.fault("config.yaml on a full disk", expect="clear error", lost="none")
def test_config_on_a_full_disk_is_one_sentence(small_disk):
    from vitmpp.common.errors import UserError
    from vitmpp.common.rundir import CONFIG_FILE, write_config

    disk = small_disk(64 << 10)
    (disk / CONFIG_FILE).write_text("seed: 1\n")
    fill(disk)
    with pytest.raises(UserError, match=rf"Could not write {disk / CONFIG_FILE} \(No space left on device\)"):
        write_config(disk, {"seed": 2, "notes": "x" * 8192})
    assert (disk / CONFIG_FILE).read_text() == "seed: 1\n"


@pytest.mark.filterwarnings(
    "error::pytest.PytestUnhandledThreadExceptionWarning"
)  # pytest's word for a thread's traceback
@pytest.mark.fault("TensorBoard events on a full disk", expect="clear error", lost="steps since the last checkpoint")
def test_tensorboard_on_a_full_disk_is_one_sentence_without_the_writer_threads_traceback(small_disk, capfd):
    from vitmpp.common.distributed import make_accelerator
    from vitmpp.common.errors import UserError
    from vitmpp.common.tracking import Tracker

    disk = small_disk(256 << 10)
    tracker = Tracker(make_accelerator(mixed_precision="no", project_dir=disk), "tensorboard", {"seed": 1}, None)
    fill(disk)
    with pytest.raises(
        UserError,
        match=rf"Could not write TensorBoard events in {disk / 'tensorboard'} "
        r"\(No space left on device\)",
    ):
        for step in range(1, 100):
            tracker.text("notes", "x" * 4096, step)
            tracker.flush()
    assert "Traceback" not in capfd.readouterr().err
