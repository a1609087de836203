"""A stop signal to every process of a run at once, as `timeout`, `kill -- -PGID`, systemd
(KillMode=control-group) and SLURM (scancel, the time limit) send it: the data-loading workers
and torch's launcher get it too, and the run must still save its checkpoint and stop as it does
for a signal to its main process alone (README, "preemption"), then resume to the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time

import pytest
from torch.utils.data import IterableDataset

from engine_helpers import (
    ROOT,
    TINY,
    accelerate_cmd,
    descendants,
    last_logged_step,
    metrics,
    python_cmd,
    run,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow
STEPS = 8
# 2 loader workers per process; 0.3 s per step keeps the run going while the signal travels
COMMON = TINY + [f"train.steps={STEPS}", "log.checkpoint_every=3", "data.num_workers=2", "log.keep_checkpoints=5"]
SLOW = ["debug.step_delay_s=0.3"]
EXIT = {signal.SIGTERM: 0, signal.SIGUSR1: 0, signal.SIGINT: 130}


def port() -> str:
    return str(29800 + os.getpid() % 150)


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory, digits16):
    root = tmp_path_factory.mktemp("reference1")
    run(python_cmd("pretrain/main.py") + COMMON + [f"data.shards={digits16}", "run.name=ref"], cwd=root)
    return root / "runs" / "ref"


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory, digits16):
    root = tmp_path_factory.mktemp("reference2")
    run(
        accelerate_cmd("pretrain/main.py", processes=2) + COMMON + [f"data.shards={digits16}", "run.name=ref"], cwd=root
    )
    return root / "runs" / "ref"


def checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))


def signal_all(proc, sig, how: str) -> None:
    """`group`: the command's process group (what `kill -- -PGID`, `timeout` and a terminal do); `every`:
    each of its processes, whatever group it leads (systemd's control group, SLURM's job step)."""
    if how == "group":
        os.killpg(proc.pid, sig)
        return
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):  # (one that ended since it was listed)
            os.kill(pid, sig)


def stop_midway(proc, run_dir, sig, how: str, after_step: int = 3) -> tuple[str, str]:
    wait_for(lambda: last_logged_step(run_dir) >= after_step, 300, proc)
    signal_all(proc, sig, how)
    return proc.communicate(timeout=300)


def assert_checkpointed(out: str, err: str, run_dir, sig) -> int:
    """The run said it stopped on the signal at step N, checkpoint N is complete, and no worker died."""
    assert "died" not in err and "Traceback" not in err, err[-3000:]
    # (with several ranks, rank 0 may learn of the stop from another rank first, by one step)
    said = re.search(rf"stopped by (?:{signal.Signals(sig).name}|a signal to another rank) at step (\d+);", out)
    assert said, out[-3000:] + err[-3000:]
    stopped_at = int(said.group(1))
    assert 3 <= stopped_at < STEPS
    assert checkpoints(run_dir)[-1] == f"step-{stopped_at:07d}"
    assert not list((run_dir / "checkpoints").glob(".step-*.partial"))
    assert not (run_dir / "encoder.safetensors").exists()  # stopped, not finished
    return stopped_at


def assert_same_losses(run_dir, reference) -> None:
    ours, theirs = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1)), "each step logged exactly once"
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)


def world_size(run_dir) -> int:
    state = json.loads((run_dir / "checkpoints" / checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
    return state["world_size"]


@pytest.mark.fault(
    "SIGTERM/SIGUSR1/SIGINT to the process group of a run with 2 data-loading workers "
    "(timeout, kill -- -PGID, Ctrl-C), then --resume auto",
    expect="checkpoint and exit 0 (130 after SIGINT)",
)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_signal_to_the_group_with_loader_workers_checkpoints_and_resumes(
    tmp_path, digits16, one_process_reference, sig
):
    run_dir = tmp_path / "runs" / "group"
    proc = start(
        python_cmd("pretrain/main.py") + COMMON + SLOW + [f"data.shards={digits16}", "run.name=group"], cwd=tmp_path
    )
    wait_for(lambda: last_logged_step(run_dir) >= 3, 300, proc)
    workers = descendants(proc.pid)
    assert len(workers) >= 2, workers  # the loader's worker processes, which the signal reaches too
    signal_all(proc, sig, "group")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT[sig], err[-3000:]
    assert_checkpointed(out, err, run_dir, sig)
    run(
        python_cmd("pretrain/main.py") + COMMON + [f"data.shards={digits16}", "run.name=group", "--resume", "auto"],
        cwd=tmp_path,
    )
    assert_same_losses(run_dir, one_process_reference)


@pytest.mark.fault(
    "SIGTERM to the process group twice, the second during the stop's checkpoint (scancel and a launcher both signal)",
    expect="checkpoint and exit 0",
)
def test_a_second_sigterm_to_the_group_does_not_cut_the_checkpoint_short(tmp_path, digits16):
    """A stop of a whole run sends SIGTERM more than once (SLURM or systemd to every process, then a launcher
    forwarding its own); only Ctrl-C again, or the scheduler's SIGKILL, ends a run at once."""
    run_dir = tmp_path / "runs" / "twice"
    proc = start(
        python_cmd("pretrain/main.py")
        + COMMON
        + SLOW
        + ["debug.checkpoint_delay_s=3", f"data.shards={digits16}", "run.name=twice"],
        cwd=tmp_path,
    )
    wait_for(lambda: last_logged_step(run_dir) >= 4, 300, proc)
    workers = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    wait_for(lambda: any((run_dir / "checkpoints").glob(".step-*.partial")), 120, proc)  # the stop's checkpoint began
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert_checkpointed(out, err, run_dir, signal.SIGTERM)
    assert not [pid for pid in workers if _alive(pid)]  # the main process ended its workers


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.fault(
    "SIGTERM to the process group of `accelerate launch` with 2 processes (torch's agent forwards "
    "it to each rank's group, workers included), then --resume auto",
    expect="checkpoint on every rank",
)
def test_sigterm_to_accelerate_launch_group_checkpoints_every_rank(tmp_path, digits16, two_process_reference):
    run_dir = tmp_path / "runs" / "accelerate"
    proc = start(
        accelerate_cmd("pretrain/main.py", processes=2)
        + COMMON
        + SLOW
        + [f"data.shards={digits16}", "run.name=accelerate"],
        cwd=tmp_path,
        ACCELERATE_USE_CPU="1",
    )
    out, err = stop_midway(proc, run_dir, signal.SIGTERM, "group")
    # torch's agent got the signal itself: it passes it on to each rank's group, waits for the ranks and then
    # exits 128 + SIGTERM whatever they did (README, "Launchers and exit codes"); the ranks stop cleanly
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    ours = [block for block in err.split("Traceback (most recent call last):")[1:] if "SignalException" not in block]
    assert not ours and "died" not in err, err[-3000:]
    assert_checkpointed(out, err.split("Traceback")[0], run_dir, signal.SIGTERM)
    assert world_size(run_dir) == 2
    run(
        accelerate_cmd("pretrain/main.py", processes=2)
        + COMMON
        + [f"data.shards={digits16}", "run.name=accelerate", "--resume", "auto"],
        cwd=tmp_path,
        ACCELERATE_USE_CPU="1",
    )
    assert_same_losses(run_dir, two_process_reference)


@pytest.mark.fault(
    "SIGTERM to launch.sh's process group, or to every process of it (systemd control group, SLURM "
    "job step), with 2 processes and their workers, then --resume auto",
    expect="checkpoint and exit 0",
)
@pytest.mark.parametrize("how", ["group", "every"])
def test_sigterm_to_all_of_launch_sh_checkpoints_and_exits_0(tmp_path, digits16, two_process_reference, how):
    run_dir = tmp_path / "runs" / "launched"
    proc = start(
        [
            str(ROOT / "launch.sh"),
            "pretrain",
            *COMMON,
            *SLOW,
            f"data.shards={digits16}",
            "run.name=launched",
            "run.output_dir=" + str(tmp_path / "runs"),
        ],
        cwd=tmp_path,
        VITMPP_NUM_PROCESSES="2",
        VITMPP_GPUS_PER_NODE="0",
        MASTER_PORT=port(),
    )
    out, err = stop_midway(proc, run_dir, signal.SIGTERM, how)
    assert proc.returncode == 0, err[-3000:]
    assert_checkpointed(out, err, run_dir, signal.SIGTERM)
    assert world_size(run_dir) == 2
    run(
        [
            str(ROOT / "launch.sh"),
            "pretrain",
            *COMMON,
            f"data.shards={digits16}",
            "run.name=launched",
            "run.output_dir=" + str(tmp_path / "runs"),
            "--resume",
            "auto",
        ],
        cwd=tmp_path,
        VITMPP_NUM_PROCESSES="2",
        VITMPP_GPUS_PER_NODE="0",
        MASTER_PORT=port(),
    )
    assert_same_losses(run_dir, two_process_reference)


class _Counting(IterableDataset):
    def __iter__(self):
        for k in range(1000):
            time.sleep(0.01)
            yield k


@pytest.mark.fault(
    "SIGTERM/SIGINT/SIGUSR1 from another process to a data-loading worker; torch's terminate() of a worker",
    expect="survived (the parent's terminate still ends it)",
)
def test_a_worker_drops_stop_signals_but_ends_when_its_parent_terminates_it():
    """The worker ignores the stop signals of a group or control group (sent by someone else), but
    torch's `terminate()` (SIGTERM from the parent, for a worker that did not end when asked) still ends
    it, with exit 0 as torch's own handler has it: ignoring that too would make the parent's exit wait
    for the worker forever."""
    from torch.utils.data import DataLoader

    from vitmpp.common.distributed import leave_stop_signals_to_parent, no_interrupts_in_children

    from torch.utils.data._utils import signal_handling

    loader = DataLoader(_Counting(), batch_size=None, num_workers=1, worker_init_fn=leave_stop_signals_to_parent)
    with no_interrupts_in_children():
        batches = iter(loader)
    (worker,) = batches._workers
    try:
        assert next(batches) == 0
        for sig in ("TERM", "INT", "USR1", "TERM"):  # from another process, as `kill -- -PGID` or systemd send them
            subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
        time.sleep(0.5)
        assert worker.is_alive() and [next(batches) for _ in range(3)] == [1, 2, 3]
    finally:
        signal_handling._remove_worker_pids(id(batches))  # out of torch's SIGCHLD watch: the test reaps it
        batches._worker_pids_set = False
        worker.terminate()  # what torch's shutdown does to a worker that did not end when asked
        worker.join(timeout=30)
        batches._shutdown_workers()
    assert worker.exitcode == 0
