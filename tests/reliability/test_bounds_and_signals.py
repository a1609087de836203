"""Hostile sizes (configs, manifests), Ctrl-C, and data-loading workers that die on a busy machine.

Each input is refused with one sentence before anything is walked or allocated; Ctrl-C stops
with a checkpoint (exit 130) and a second Ctrl-C stops at once; a dead worker is one sentence
whatever exception the race between its death and the main process surfaces first.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from timm.data.transforms import MaybePILToTensor

from datasets_helpers import spec_for, write_tiny_shards
from engine_helpers import (
    ROOT,
    TINY,
    accelerate_cmd,
    env,
    last_logged_step,
    max_weight_difference,
    metrics,
    python_cmd,
    run,
    start,
    wait_for,
)
from vitmpp.common.errors import UserError
from vitmpp.common.faults import ExitAfterCalls
from vitmpp.datasets import open_loader, read_manifest
from vitmpp.datasets.manifest import MANIFEST_NAME

IDENTITY = MaybePILToTensor()


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line of a refused command (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- configs


@pytest.mark.fault("config YAML of nested aliases ('billion laughs', 10^10 values)", expect="clear error")
def test_a_billion_laughs_config_is_refused_before_it_is_walked(tmp_path):
    lines = ["l0: &l0 {" + ", ".join(f"k{i}: lol" for i in range(10)) + "}"]
    for level in range(1, 11):
        lines.append(f"l{level}: &l{level} {{" + ", ".join(f"k{i}: *l{level - 1}" for i in range(10)) + "}")
    config = tmp_path / "laughs.yaml"
    config.write_text("\n".join(lines) + "\n")
    assert config.stat().st_size < 2000
    # the timeout only guards against the hang this test is about (the old code walked 10^10 values)
    result = run(
        python_cmd("pretrain/main.py") + ["--config", str(config), "--print-config"],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(config) in line and "more than 100,000 values once its aliases (*name) are expanded" in line


@pytest.mark.fault("config YAML nested 5,000 levels deep", expect="clear error")
def test_a_deeply_nested_config_is_one_sentence(tmp_path, capsys):
    from vitmpp.pretrain.main import main

    for name, text in {
        "flow.yaml": "train: " + "[" * 5000 + "]" * 5000 + "\n",
        "block.yaml": "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v\n",
        "cycle.yaml": "train: &t {seed: *t}\n",
    }.items():
        config = tmp_path / name
        config.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(config), "--print-config"])
        assert exit_info.value.code == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(config) in line and ("32 levels" in line or "contains it" in line), line


# ----------------------------------------------------------------------------- manifests


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "shards"
    write_tiny_shards(root, [16, 16])
    return root


def edit_manifest(root, edit) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    edit(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.mark.fault("_info.json is a FIFO (named pipe) with no writer", expect="clear error")
def test_a_fifo_manifest_is_refused_without_opening_it(tmp_path, shards):
    (shards / MANIFEST_NAME).unlink()
    os.mkfifo(shards / MANIFEST_NAME)
    # the timeout only guards against the hang this test is about (open() waits for a writer forever)
    result = run(
        python_cmd("pretrain/main.py") + TINY + ["train.steps=1", f"data.shards={shards}"],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(shards / MANIFEST_NAME) in line and "is a FIFO, not a regular file" in line


@pytest.mark.fault("_info.json nested 5,000 levels deep, or 1 TiB (sparse)", expect="clear error")
@pytest.mark.parametrize("kind", ["deep", "huge"])
def test_a_deep_or_huge_manifest_is_one_sentence(shards, kind):
    path = shards / MANIFEST_NAME
    if kind == "deep":  # an extra top-level key holding a list in a list ... 5,000 times
        text = path.read_text().rstrip()
        path.write_text(text[:-1] + ', "nested": ' + "[" * 5000 + "]" * 5000 + "}")
    else:
        with open(path, "r+b") as f:  # a sparse file: 1 TiB long, no blocks on disk
            f.truncate(1 << 40)
    with pytest.raises(UserError) as caught:
        read_manifest(shards)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert ("32 levels deep" if kind == "deep" else "1,099,511,627,776 bytes") in str(caught.value)


@pytest.mark.fault("manifest counts the shards cannot hold (samples, classes, sizes)", expect="clear error")
@pytest.mark.parametrize(
    "edit, message",
    [
        # 10^9 samples, consistent with each other, in two shards of a few kilobytes
        (
            lambda d: d["splits"]["train"].update(num_samples=10**9, shard_lengths=[10**9 - 16, 16]),
            "gives shard 'tiny-train-000000.tar' 999,999,984 samples, more than its",
        ),
        (lambda d: d.update(num_classes=1000), "'num_classes' is 1,000 but 'class_names' lists 5"),
        (
            lambda d: d["splits"]["train"].update(shard_bytes=["many", 1]),
            "shard_bytes is 'many', not a non-negative integer",
        ),
        (lambda d: d["splits"]["train"].update(num_samples=32.0), "num_samples is 32.0, not a non-negative integer"),
    ],
    ids=["samples beyond the bytes", "classes beyond the names", "sizes not integers", "count not an integer"],
)
def test_manifest_counts_are_checked_against_the_shards(shards, edit, message):
    edit_manifest(shards, edit)
    with pytest.raises(UserError, match=message) as caught:
        read_manifest(shards)
    assert str(shards / MANIFEST_NAME) in str(caught.value)


def _limit_memory():
    # 4 GiB of address space: torch and a tiny run fit; a 10^9-class head (256 GB) does not
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.fault("manifest with num_classes 10^9, objective=supervised", expect="clear error")
def test_a_billion_classes_are_refused_before_the_head_is_allocated(tmp_path, shards):
    edit_manifest(shards, lambda d: (d.update(num_classes=10**9), d.pop("class_names")))
    result = subprocess.run(
        python_cmd("pretrain/main.py") + TINY + ["objective=supervised", "train.steps=1", f"data.shards={shards}"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_memory,
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(shards / MANIFEST_NAME) in line and "'num_classes' is 1,000,000,000" in line


# ----------------------------------------------------------------------------- Ctrl-C

STEPS = 8
COMMON = TINY + [f"train.steps={STEPS}", "log.checkpoint_every=3", "data.num_workers=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits16):
    """The uninterrupted run an interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    run(python_cmd("pretrain/main.py") + COMMON + [f"data.shards={digits16}", "run.name=ref"], cwd=root)
    return root / "runs" / "ref"


def checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))


def interrupt(proc, run_dir, after_step: int, times: int = 1, gap: float = 0.5) -> tuple[str, str]:
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group, `times` times."""
    wait_for(lambda: last_logged_step(run_dir) >= after_step, 240, proc)
    for i in range(times):
        if i:
            time.sleep(gap)
        os.killpg(proc.pid, signal.SIGINT)
    return proc.communicate(timeout=180)


@pytest.mark.fault(
    "Ctrl-C (SIGINT to the process group, DataLoader workers included), then --resume auto", expect="survived"
)
def test_ctrl_c_checkpoints_exits_130_and_resumes_to_the_same_numbers(tmp_path, digits16, reference):
    run_dir = tmp_path / "runs" / "ctrl-c"
    proc = start(
        python_cmd("pretrain/main.py")
        + COMMON
        + ["debug.step_delay_s=0.3", f"data.shards={digits16}", "run.name=ctrl-c"],
        cwd=tmp_path,
    )
    out, err = interrupt(proc, run_dir, after_step=4)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGINT at step" in out
    stopped_at = int(out.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert 4 <= stopped_at < STEPS and checkpoints(run_dir)[-1] == f"step-{stopped_at:07d}"
    run(
        python_cmd("pretrain/main.py") + COMMON + [f"data.shards={digits16}", "run.name=ctrl-c", "--resume", "auto"],
        cwd=tmp_path,
    )
    ours, theirs = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    assert max_weight_difference(run_dir, reference) < 1e-6


@pytest.mark.fault(
    "Ctrl-C twice (the second during the stop's checkpoint)",
    expect="clear error",
    lost="the steps since the last checkpoint",
)
def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, digits16):
    run_dir = tmp_path / "runs" / "twice"
    # every checkpoint save takes 3 s: the second Ctrl-C lands before the stop's own checkpoint is complete
    proc = start(
        python_cmd("pretrain/main.py")
        + COMMON
        + ["debug.step_delay_s=0.3", "debug.checkpoint_delay_s=3", f"data.shards={digits16}", "run.name=twice"],
        cwd=tmp_path,
    )
    out, err = interrupt(proc, run_dir, after_step=4, times=2)
    assert proc.returncode == -signal.SIGINT, err[-3000:]  # ended by the signal itself: a shell reports 130
    assert "Traceback" not in err and "stopped by" not in out
    # the first Ctrl-C began the stop's checkpoint, the second ended the process in the middle of it
    assert [p.name for p in (run_dir / "checkpoints").glob(".step-*.partial")], err[-3000:]
    assert checkpoints(run_dir) == ["step-0000003"]  # lost: only the steps after the last checkpoint


@pytest.mark.fault("Ctrl-C to launch.sh with 2 processes (accelerate launch)", expect="survived")
def test_ctrl_c_to_launch_sh_with_two_processes_exits_130_without_a_traceback(tmp_path, digits16):
    run_dir = tmp_path / "runs" / "launched"
    # 1 s per step: the 5 steps left after step 3 outlast the signal's way through launch.sh, the launcher
    # and two ranks on a loaded machine (at 0.3 s the run could finish first: exit 0)
    proc = start(
        [
            str(ROOT / "launch.sh"),
            "pretrain",
            *COMMON,
            "data.num_workers=1",
            "debug.step_delay_s=1.0",
            f"data.shards={digits16}",
            "run.name=launched",
            "run.output_dir=" + str(tmp_path / "runs"),
        ],
        cwd=tmp_path,
        VITMPP_NUM_PROCESSES="2",
        VITMPP_GPUS_PER_NODE="0",
    )
    out, err = interrupt(proc, run_dir, after_step=3)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by" in out and "interrupted: stopping with a checkpoint" in err
    stopped_at = int(out.split(" at step ")[1].split(";")[0])
    assert checkpoints(run_dir)[-1] == f"step-{stopped_at:07d}"
    assert not (run_dir / "encoder.safetensors").exists()


@pytest.mark.fault(
    "Ctrl-C to `accelerate launch` with 2 processes (torch's agent forwards SIGINT to each rank's process group)",
    expect="survived",
)
def test_ctrl_c_forwarded_by_torchrun_stops_every_rank_with_a_checkpoint(tmp_path, digits16):
    run_dir = tmp_path / "runs" / "accelerate"
    proc = start(
        accelerate_cmd("pretrain/main.py", processes=2)
        + COMMON
        + ["data.num_workers=1", "debug.step_delay_s=0.3", f"data.shards={digits16}", "run.name=accelerate"],
        cwd=tmp_path,
    )
    out, err = interrupt(proc, run_dir, after_step=3)
    # the ranks and their data-loading workers: a clean stop; torch's agent then reports the signal it
    # received itself with a traceback of its own (SignalException), which nothing below it can prevent
    assert "stopped by SIGINT" in out and "died" not in err, err[-3000:]
    ours = [block for block in err.split("Traceback (most recent call last):")[1:] if "SignalException" not in block]
    assert not ours, err[-3000:]
    stopped_at = int(out.split(" at step ")[1].split(";")[0])
    assert checkpoints(run_dir)[-1] == f"step-{stopped_at:07d}"


@pytest.mark.fault("Ctrl-C to `compare --jobs 2` with queued runs", expect="survived")
def test_ctrl_c_to_a_parallel_compare_starts_nothing_more(tmp_path):
    """Ctrl-C (SIGINT to the process group) while two of four pretrainings run: the two stop and none of
    the queued ones starts (before, leaving the thread pool waited for every queued run to finish)."""
    recipes = {}
    for name in "abcd":
        (tmp_path / f"{name}.yaml").write_text("train:\n  steps: 3\n")
        recipes[name] = str(tmp_path / f"{name}.yaml")
    (tmp_path / "linear.yaml").write_text("train:\n  steps: 3\n")
    sleeper = f"{sys.executable} -c 'import time; time.sleep(30)'"  # a pretraining that takes its time
    config = tmp_path / "compare.yaml"
    config.write_text(
        f'pretraining:\n  recipes: {json.dumps(recipes)}\n  seeds: [0]\n  launcher: "{sleeper}"\n'
        f"protocols: [linear]\nrecipes: {{linear: {tmp_path / 'linear.yaml'}}}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    proc = start(
        [sys.executable, "-m", "vitmpp.experiments.compare"] + ["--config", str(config), "--jobs", "2"], cwd=tmp_path
    )
    wait_for(
        lambda: (
            len(list((tmp_path / "out" / "logs").glob("*.log"))) == 2 if (tmp_path / "out" / "logs").is_dir() else False
        ),
        120,
        proc,
    )
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)  # the queued two would sleep 2 x 30 s more
    assert proc.returncode == 130, err[-3000:]
    assert out.count("[compare] pretraining ") == 2, out
    assert sorted(p.name for p in (tmp_path / "out" / "logs").iterdir()) == ["pretrain-a-s0.log", "pretrain-b-s0.log"]


# ----------------------------------------------------------------------------- dead workers under load


@contextmanager
def busy_cpu(processes: int = 2):
    """Spinning processes beside the test, as on a shared machine or a loaded CI runner."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


class KilledAfterCalls(ExitAfterCalls):
    """As ExitAfterCalls, but the worker is SIGKILLed (what the kernel's OOM killer does)."""

    def __call__(self, image):
        from torch.utils.data import get_worker_info

        self.count += 1
        if self.count > self.calls and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.transform(image)


def kept_worker_pids() -> list[set[int]]:
    """The worker pids of every idle pool the loader keeps for a later pass."""
    from vitmpp.datasets.pool import kept_worker_pids

    return kept_worker_pids()


@pytest.mark.fault(
    "a kept (idle) data-loading worker SIGKILLed while the main process does other work", expect="survived"
)
def test_a_kept_worker_killed_while_idle_is_replaced_not_a_traceback_at_a_random_line(tmp_path):
    """Torch raises from its SIGCHLD handler, in whatever the main thread is doing, when a watched worker
    dies: an idle pool is not watched, and taking it again finds the death and starts fresh workers,
    which give the same batches."""
    import torch

    from vitmpp.datasets.loader import close_idle_workers

    write_tiny_shards(tmp_path, [10, 10], extra_splits={"validation": [9, 4]})
    close_idle_workers()
    spec = spec_for(tmp_path, split="validation", batch_size=3, transform=IDENTITY, training=False, num_workers=2)
    try:
        first = [b.indices for b in open_loader(spec)]
        (pids,) = kept_worker_pids()
        os.kill(min(pids), signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the main process at work; another child's SIGCHLD on the way
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            sum(range(100_000))
        again = [b.indices for b in open_loader(spec)]
        assert len(again) == len(first) and all(torch.equal(a, b) for a, b in zip(first, again))
        (replaced,) = kept_worker_pids()
        assert not replaced & pids  # fresh workers
    finally:
        close_idle_workers()


def _sleep_forever():
    time.sleep(600)


@pytest.mark.fault("a killed worker's exit status is reaped before the loader asks for it", expect="clear error")
def test_a_dead_worker_whose_status_was_reaped_elsewhere_is_still_one_sentence():
    """Seen once under busy-tests.sh: torch's SIGCHLD handler raised inside the loader's join of a killed
    worker after waitpid had taken its status, so the retried join found exitcode None. Here the worker
    is really SIGKILLed and really reaped behind multiprocessing's back; the sentence then comes from
    torch's words for the death (its handler's RuntimeError), or names the pid when there are none."""
    import multiprocessing
    from types import SimpleNamespace

    from vitmpp.datasets.pool import dead_worker

    for torch_error, expected in (
        (RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed. "), "out-of-memory killer"),
        (ConnectionResetError(104, "Connection reset by peer"), "exit status lost to a signal handler"),
    ):
        worker = multiprocessing.get_context("fork").Process(target=_sleep_forever, daemon=True)
        worker.start()
        os.kill(worker.pid, signal.SIGKILL)
        os.waitpid(worker.pid, 0)  # the status taken, as the racing handler took it
        found = dead_worker(SimpleNamespace(_workers=[worker]), 0, torch_error)
        assert worker.exitcode is None and isinstance(found, UserError)
        text = str(found)
        assert text.startswith("A data-loading worker of rank 0 died (DataLoader worker (pid") and expected in text
        assert "\n" not in text


@pytest.mark.fault("a data-loading worker dies on a busy CPU (10 tries each: exit 1, SIGKILL)", expect="clear error")
@pytest.mark.parametrize("death, advice", [(ExitAfterCalls, "own output above"), (KilledAfterCalls, "out-of-memory")])
def test_a_dead_worker_is_one_sentence_on_a_busy_cpu(tmp_path, death, advice):
    write_tiny_shards(tmp_path, [12, 12, 12, 12])
    with busy_cpu():
        for attempt in range(10):
            spec = spec_for(
                tmp_path,
                split="train",
                batch_size=2,
                transform=death(IDENTITY, 1 + attempt % 4),
                training=attempt % 2 == 0,
                num_workers=2,
                shuffle_buffer=0,
            )
            with pytest.raises(UserError) as caught:
                list(open_loader(spec))
            text = str(caught.value)
            assert text.startswith("A data-loading worker of rank 0 died (DataLoader worker (pid"), (attempt, text)
            assert advice in text and "\n" not in text, (attempt, text)
