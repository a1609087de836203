"""Kills, preemption and resumption with another process count, on two CPU processes."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import pytest

from engine_helpers import (
    ROOT,
    TINY,
    accelerate_cmd,
    descendants,
    kill_tree,
    last_logged_step,
    max_weight_difference,
    metrics,
    run,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow
STEPS = 10
COMMON = TINY + [f"train.steps={STEPS}", "log.checkpoint_every=3", "data.num_workers=1", "log.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits16):
    """The uninterrupted two-process run every interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    run(
        accelerate_cmd("pretrain/main.py", processes=2) + COMMON + [f"data.shards={digits16}", "run.name=ref"], cwd=root
    )
    return root / "runs" / "ref"


def assert_same_as_reference(run_dir, reference):
    ours, theirs = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1)), "each step must be logged exactly once"
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    assert max_weight_difference(run_dir, reference) < 1e-6
    # TensorBoard shows each step once, although the interrupted attempt logged steps after its checkpoint
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted(e.step for e in events.Scalars("pretrain/loss")) == list(range(1, STEPS + 1))


@pytest.mark.fault("SIGKILL to every process of a 2-process run, then --resume auto", expect="survived")
@pytest.mark.parametrize("when", ["early step", "late step", "during checkpoint save"])
def test_kill_9_anywhere_then_resume(tmp_path, digits16, reference, when):
    run_dir = tmp_path / "runs" / "killed"
    slow = ["debug.step_delay_s=0.3"] + (["debug.checkpoint_delay_s=3"] if when == "during checkpoint save" else [])
    proc = start(
        accelerate_cmd("pretrain/main.py", processes=2)
        + COMMON
        + slow
        + [f"data.shards={digits16}", "run.name=killed"],
        cwd=tmp_path,
    )
    try:
        if when == "during checkpoint save":
            partial = run_dir / "checkpoints" / ".step-0000006.partial"
            wait_for(lambda: partial.is_dir() and any(partial.iterdir()), 240, proc)
            time.sleep(0.5)
        else:
            target = random.Random(when).randint(2, 4) if when == "early step" else random.Random(when).randint(5, 9)
            wait_for(lambda: last_logged_step(run_dir) >= target, 240, proc)
    finally:
        kill_tree(proc, signal.SIGKILL)
        proc.communicate()
    assert not (run_dir / "encoder.safetensors").exists()
    resumed = run(
        accelerate_cmd("pretrain/main.py", processes=2)
        + COMMON
        + [f"data.shards={digits16}", "run.name=killed", "--resume", "auto"],
        cwd=tmp_path,
    )
    if when == "during checkpoint save":
        assert "step-0000003" in resumed.stdout  # the interrupted save of step 6 was ignored
    assert_same_as_reference(run_dir, reference)


@pytest.mark.fault("SIGTERM to launch.sh (preemption), then --resume auto", expect="survived")
def test_sigterm_to_the_launcher_checkpoints_and_exits_0(tmp_path, digits16, reference):
    run_dir = tmp_path / "runs" / "preempted"
    proc = start(
        [
            str(ROOT / "launch.sh"),
            "pretrain",
            *COMMON,
            "debug.step_delay_s=0.3",
            f"data.shards={digits16}",
            "run.name=preempted",
            "run.output_dir=" + str(tmp_path / "runs"),
        ],
        cwd=tmp_path,
        VITMPP_NUM_PROCESSES="2",
        VITMPP_GPUS_PER_NODE="0",
    )
    wait_for(lambda: last_logged_step(run_dir) >= 4, 240, proc)
    proc.send_signal(signal.SIGTERM)  # to launch.sh alone, as a scheduler's preemption would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    stopped_at = int(saved[-1].split("-")[1])
    assert 4 <= stopped_at < STEPS
    run(
        accelerate_cmd("pretrain/main.py", processes=2)
        + COMMON
        + [
            f"data.shards={digits16}",
            "run.name=preempted",
            "run.output_dir=" + str(tmp_path / "runs"),
            "--resume",
            "auto",
        ],
        cwd=tmp_path,
    )
    assert_same_as_reference(run_dir, reference)


@pytest.mark.fault("SIGUSR1 to one rank only (SLURM --signal)", expect="survived")
def test_signal_to_one_rank_stops_both(tmp_path, digits16):
    run_dir = tmp_path / "runs" / "one"
    proc = start(
        accelerate_cmd("pretrain/main.py", processes=2)
        + COMMON
        + ["debug.step_delay_s=0.3", f"data.shards={digits16}", "run.name=one", "data.num_workers=0"],
        cwd=tmp_path,
    )
    wait_for(lambda: last_logged_step(run_dir) >= 3, 240, proc)
    workers = descendants(proc.pid)
    ranks = {}
    for pid in workers:
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        rank = next((e.split(b"=")[1] for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = pid
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by a signal to another rank" in out  # rank 0 printed it: it agreed with rank 1
    assert not (run_dir / "encoder.safetensors").exists()
    assert any(p.name.startswith("step-") for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.fault("resume on a process count that does not divide the logical ranks (2 -> 3)", expect="clear error")
def test_resume_on_a_process_count_that_cannot_share_the_logical_ranks_is_refused(tmp_path, digits16):
    """2 logical ranks (the first start's 2 processes) resume on 1 or 2 processes, not on 3 (elastic
    resume: tests/distributed/test_elastic_resume.py)."""
    run(
        accelerate_cmd("pretrain/main.py", processes=2)
        + TINY
        + ["train.steps=4", "debug.stop_at_step=2", f"data.shards={digits16}"],
        cwd=tmp_path,
    )
    three = [
        sys.executable,
        "-m",
        "vitmpp.common.launcher",
        "--num_processes",
        "3",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
        str(ROOT / "pretrain" / "main.py"),
    ]  # the project's launcher: one sentence and exit 2 from 3 ranks
    result = run(
        three + TINY + ["train.steps=4", f"data.shards={digits16}", "--resume", "auto"], cwd=tmp_path, check=False
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        "was started with 2 logical ranks (train.logical_ranks), which 3 processes cannot share evenly; "
        "resume on 1 or 2 processes, or start runs that may grow with train.logical_ranks=6"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    state = json.loads(
        (tmp_path / "runs" / "default-mpp" / "checkpoints" / "step-0000002" / "trainer_state.json").read_text()
    )
    assert (state["world_size"], state["logical_ranks"]) == (2, 2)
