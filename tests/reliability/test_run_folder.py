"""The run folder has one writer, keeps the history of its config, and stays where it was asked to be.

Each test runs the real commands in subprocesses: two runs started together, a run killed with
SIGKILL while its loader worker lives on, two-process runs, resumes under changed keys, and run
folders that would leave the output folder or run into a file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys

import pytest
import yaml

from engine_helpers import (
    ROOT,
    TINY,
    accelerate_cmd,
    descendants,
    error_lines,
    files_of,
    kill_tree,
    last_logged_step,
    metrics,
    python_cmd,
    run,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow

PRETRAIN = python_cmd("pretrain/main.py")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits16):
    """A finished 3-step run (global batch 32, lr 0.001) and the command line that made it."""
    root = tmp_path_factory.mktemp("finished")
    command = PRETRAIN + TINY + [f"data.shards={digits16}", "train.steps=3", "run.name=r"]
    run(command, cwd=root)
    return root / "runs" / "r", command


def copy_of(finished, tmp_path):
    run_dir, command = finished
    shutil.copytree(run_dir, tmp_path / "runs" / "r")
    return tmp_path / "runs" / "r", command


@pytest.mark.fault("two identical runs started at once on one run folder", expect="clear error")
def test_a_second_writer_is_refused_naming_the_holder(tmp_path, digits16):
    command = PRETRAIN + TINY + [f"data.shards={digits16}", "train.steps=3", "debug.step_delay_s=1.5", "run.name=same"]
    processes = [start(command, cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert sorted(p.returncode for p in processes) == [0, 2], outputs
    winner = 0 if processes[0].returncode == 0 else 1
    loser_err = outputs[1 - winner][1]
    assert error_lines(loser_err) == [line for line in loser_err.splitlines() if line.strip()], loser_err
    assert f"in use by process {processes[winner].pid} on host {socket.gethostname()}" in loser_err
    run_dir = tmp_path / "runs" / "same"
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]  # each step once: one writer
    writers = {p.name.split(".")[-2] for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    assert writers == {str(processes[winner].pid)}  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert "ended" in json.loads((run_dir / "lock").read_text())


@pytest.mark.fault(
    "run killed (SIGKILL; its loader worker lives on) holding its run folder, then --resume auto", expect="survived"
)
def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, digits16):
    command = (
        PRETRAIN
        + TINY
        + [
            f"data.shards={digits16}",
            "train.steps=6",
            "log.checkpoint_every=2",
            "data.num_workers=1",
            "run.name=killed",
        ]
    )
    run_dir = tmp_path / "runs" / "killed"
    proc = start(command + ["debug.step_delay_s=0.5"], cwd=tmp_path)
    wait_for(lambda: last_logged_step(run_dir) >= 3, 240, proc)
    orphans = descendants(proc.pid)  # the forked data-loading worker outlives its parent for a while
    os.kill(proc.pid, signal.SIGKILL)  # the main process alone, as the OOM killer does
    proc.communicate()
    try:
        resumed = run(command + ["--resume", "auto"], cwd=tmp_path)
    finally:
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert f"locked by process {proc.pid} on host {socket.gethostname()}" in resumed.stderr
    assert "died holding it; taken over" in resumed.stderr
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))
    assert json.loads((run_dir / "lock").read_text())["pid"] != proc.pid


@pytest.mark.fault("a 2-process run started on a folder another 2-process run writes", expect="clear error")
def test_rank_0_holds_the_lock_and_every_rank_of_a_second_run_stops(tmp_path, digits16):
    command = TINY + [f"data.shards={digits16}", "train.steps=200", "run.name=two"]
    run_dir = tmp_path / "runs" / "two"
    first = start(accelerate_cmd("pretrain/main.py", processes=2) + command + ["debug.step_delay_s=0.5"], cwd=tmp_path)
    try:
        wait_for(lambda: last_logged_step(run_dir) >= 1, 240, first)
        holder = json.loads((run_dir / "lock").read_text())
        assert holder["pid"] in descendants(first.pid)  # one of the ranks: the main process
        second_cmd = accelerate_cmd("pretrain/main.py", processes=2)
        port = second_cmd.index("--main_process_port") + 1
        second_cmd[port] = str(int(second_cmd[port]) + 1)  # the first run's rendezvous holds its port
        second = run(second_cmd + command, cwd=tmp_path, check=False, timeout=240)  # no rank may hang
        assert first.poll() is None, "the first run must still be running, holding the folder"
        os.kill(holder["pid"], signal.SIGUSR1)  # stop the first run cleanly (checkpoint, exit 0)
        out, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            kill_tree(first, signal.SIGKILL)
    assert second.returncode != 0
    # one sentence from the main process naming the holder, nothing from rank 1
    assert len(error_lines(second.stderr)) == 1, second.stderr
    assert f"error: Run folder 'runs/two' is in use by process {holder['pid']} on host" in second.stderr
    assert first.returncode == 0, err[-3000:]
    stopped = int(out.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, stopped + 1))


@pytest.mark.fault("--resume auto with optim.lr changed", expect="clear error")
def test_a_changed_learning_rate_needs_allow_changes_and_the_history_keeps_both(tmp_path, finished):
    run_dir, command = copy_of(finished, tmp_path)
    before = files_of(run_dir)
    refused = run(command + ["optim.lr=0.5", "train.steps=5", "--resume", "auto"], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert error_lines(refused.stderr) == [line for line in refused.stderr.splitlines() if line.strip()]
    assert "optim.lr (0.001 -> 0.5)" in refused.stderr and "--allow-changes" in refused.stderr
    assert files_of(run_dir) == before  # config.yaml, metrics, checkpoints: untouched

    run(command + ["optim.lr=0.5", "train.steps=5", "--resume", "auto", "--allow-changes"], cwd=tmp_path)
    history = sorted((run_dir / "config-history").iterdir())
    assert [p.name for p in history] == ["segment-001-from-step-0000000.yaml", "segment-002-from-step-0000003.yaml"]
    first, second = (yaml.safe_load(p.read_text()) for p in history)
    assert first["optim"]["lr"] == 0.001 and second["optim"]["lr"] == 0.5
    assert "changed keys: optim.lr, train.steps" in history[1].read_text()
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == second
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[:3] == [json.loads(line) for line in before["metrics.jsonl"].decode().splitlines()]


@pytest.mark.fault("--resume auto with train.global_batch changed", expect="clear error")
def test_another_global_batch_is_refused_even_with_allow_changes(tmp_path, finished):
    run_dir, command = copy_of(finished, tmp_path)
    before = files_of(run_dir)
    changed = command + ["train.global_batch=16", "train.steps=5", "--resume", "auto"]
    refused = run(changed, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "train.global_batch (32 -> 16)" in refused.stderr
    # allowed, the checkpoint's data position (96 images into epoch 0) is not where step 3 starts at batch 16
    moved = run(changed + ["--allow-changes"], cwd=tmp_path, check=False)
    assert moved.returncode == 2 and "Traceback" not in moved.stderr
    assert len(error_lines(moved.stderr)) == 1, moved.stderr
    assert "stopped 96 images into epoch 0 at global batch 32" in moved.stderr
    assert "resume with train.global_batch=32" in moved.stderr
    assert files_of(run_dir) == before
    # the same global batch in smaller pieces reads the data where the checkpoint stopped: allowed
    run(command + ["train.per_device_batch=16", "train.steps=5", "--resume", "auto", "--allow-changes"], cwd=tmp_path)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5]


@pytest.mark.fault("run.output_dir is a file, run.name is ../x or an absolute path", expect="clear error")
@pytest.mark.parametrize("where", ["output_dir is a file", "name ../x", "name /abs"])
def test_a_run_folder_through_a_file_or_outside_the_output_folder_is_refused(tmp_path, digits16, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("mine")
    key = {
        "output_dir is a file": "run.output_dir=afile",
        "name ../x": "run.name=../x",
        "name /abs": f"run.name={tmp_path / 'abs'}",
    }[where]
    result = run(PRETRAIN + TINY + [f"data.shards={digits16}", "train.steps=1", key], cwd=work, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [line for line in result.stderr.splitlines() if line.strip()]
    assert ("'afile' is a file" if where == "output_dir is a file" else "Key 'run.name'") in result.stderr
    assert sorted(tmp_path.rglob("*")) == [work, work / "afile"]  # nothing written anywhere
    assert (work / "afile").read_text() == "mine"


@pytest.mark.fault("two comparisons on one output folder; the first killed (SIGKILL)", expect="clear error")
def test_compare_locks_its_output_folder(tmp_path):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "encoder.safetensors").write_bytes(b"")  # never read: the cells' launcher does not run finetune
    out = tmp_path / "out"
    config = tmp_path / "compare.yaml"
    config.write_text(
        f"encoders: {{mpp: {encoder}}}\nprotocols: [knn]\nlabel_fractions: [1.0]\nseeds: [0]\n"
        f"recipes: {{knn: {ROOT / 'configs/finetune/knn_digits.yaml'}}}\noutput_dir: {out}\n"
    )
    compare = [sys.executable, "-m", "vitmpp.experiments.compare", "--config", str(config)]
    failing_cells = f"launcher={shutil.which('false')}"
    first = start(compare + [f"launcher={sys.executable} -c 'import time; time.sleep(600)'"], cwd=tmp_path)
    try:
        wait_for(lambda: (out / "compare.yaml").is_file(), 120, first)  # past its lock, in its first cell
        second = run(compare + [failing_cells], cwd=tmp_path, check=False)
    finally:
        kill_tree(first, signal.SIGKILL)  # the lock is left behind for the next comparison to take over
        first.communicate()
    assert second.returncode == 2 and error_lines(second.stderr) == second.stderr.strip().splitlines()
    assert f"Run folder '{out}' is in use by process {first.pid} on host" in second.stderr
    assert "choose another output_dir" in second.stderr
    third = run(compare + [failing_cells, "--overwrite"], cwd=tmp_path, check=False)
    assert f"locked by process {first.pid}" in third.stderr and "died holding it; taken over" in third.stderr
