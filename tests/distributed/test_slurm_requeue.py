"""launch.sh under `sbatch --requeue --signal=USR1@120`: SLURM's warning before the time limit makes
the ranks checkpoint and stop, the first node requeues the job (a fake `scontrol` on PATH records the
call), and the requeued job's `--resume auto` ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import stat

import pytest

from engine_helpers import (
    ROOT,
    TINY,
    last_logged_step,
    max_weight_difference,
    metrics,
    python_cmd,
    run,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = TINY + [f"train.steps={STEPS}", "log.checkpoint_every=100", "data.num_workers=1"]


def fake_scontrol(folder, exit_status: int):
    """A `scontrol` that appends its arguments to calls.log and exits with `exit_status`."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder / "calls.log"}"\nexit {exit_status}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def _losses(run_dir) -> list[float]:
    by_step = {row["step"]: row["loss"] for row in metrics(run_dir)}  # the last attempt's row of each step
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.fault("SIGUSR1 from SLURM before the time limit (launch.sh under sbatch --requeue)", expect="survived")
@pytest.mark.parametrize("node", [0, 1])
def test_usr1_checkpoints_requeues_from_the_first_node_and_the_requeued_job_matches(tmp_path, digits16, node):
    reference = tmp_path / "runs" / "reference"
    run(python_cmd("pretrain/main.py") + COMMON + [f"data.shards={digits16}", "run.name=reference"], cwd=tmp_path)
    bin_dir = fake_scontrol(tmp_path / "bin", 0)
    job = [str(ROOT / "launch.sh"), "pretrain", *COMMON, f"data.shards={digits16}", "run.name=job", "--resume", "auto"]
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NODEID": str(node),
        "SLURM_NNODES": "1",
        "VITMPP_GPUS_PER_NODE": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    proc = start(job + ["debug.step_delay_s=0.3"], cwd=tmp_path, **slurm)
    run_dir = tmp_path / "runs" / "job"
    wait_for(lambda: last_logged_step(run_dir) >= 2, 240, proc)
    proc.send_signal(signal.SIGUSR1)  # to launch.sh alone, as SLURM signals the job step
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGUSR1" in out and "Traceback" not in err
    stopped_at = int(out.split(" at step ")[1].split(";")[0])
    assert stopped_at < STEPS
    calls = (bin_dir / "calls.log").read_text().splitlines() if (bin_dir / "calls.log").exists() else []
    if node == 0:
        assert calls == ["requeue 4242"] and "requeued SLURM job 4242" in err
    else:
        assert calls == []  # one node requeues the job, not every node
    # the job as SLURM runs it again: the same command, which continues from the checkpoint
    again = run(job, cwd=tmp_path, **slurm)
    assert f"step-{stopped_at:07d} at step {stopped_at}" in again.stdout  # "resumed from ... at step N"
    assert _losses(run_dir) == pytest.approx(_losses(reference), abs=1e-6)
    assert max_weight_difference(run_dir, reference) < 1e-6


@pytest.mark.fault("SIGUSR1 from SLURM, and scontrol cannot requeue the job", expect="survived")
def test_a_failed_requeue_is_one_sentence_and_the_checkpoint_is_kept(tmp_path, digits16):
    bin_dir = fake_scontrol(tmp_path / "bin", 1)
    proc = start(
        [
            str(ROOT / "launch.sh"),
            "pretrain",
            *COMMON,
            "debug.step_delay_s=0.3",
            f"data.shards={digits16}",
            "run.name=job",
        ],
        cwd=tmp_path,
        SLURM_JOB_ID="77",
        VITMPP_GPUS_PER_NODE="0",
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    run_dir = tmp_path / "runs" / "job"
    wait_for(lambda: last_logged_step(run_dir) >= 2, 240, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 1
    assert "error: scontrol could not requeue SLURM job 77; the checkpoint is saved" in err
    assert "Traceback" not in err
    stopped_at = int(out.split(" at step ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / f"step-{stopped_at:07d}").is_dir()
