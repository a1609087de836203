"""How a user starts a run: errors are one sentence through every launcher README shows, the exit
codes are the documented ones, `--num_processes N` never silently means one process, and every
`--help` answers without importing torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import pytest

from engine_helpers import ROOT, TINY, env, last_logged_step, run, start, wait_for

TYPO = "optim.lrr=1"
SENTENCE = "error: Unknown key 'optim.lrr' in the override 'optim.lrr=1'; did you mean 'optim.lr'?"
PASSED = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def port() -> str:
    return str(29700 + os.getpid() % 200)


def plain_accelerate(*args: str) -> list[str]:
    """`accelerate launch ...` as a user types it (the console script of this environment)."""
    return [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", *args]


def test_an_error_through_accelerate_launch_quiet_is_one_sentence_and_exit_1(tmp_path):
    result = run(
        plain_accelerate("--quiet", *PASSED, "--num_processes", "1", str(ROOT / "pretrain/main.py"), TYPO),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1  # Accelerate's one-process launcher replaces any failure by 1 under --quiet
    assert result.stderr.strip() == SENTENCE  # and nothing else: no traceback, no "values not passed" warning


@pytest.mark.parametrize("processes", ["1", "2"])
def test_an_error_through_launch_sh_is_one_sentence_and_keeps_exit_2(tmp_path, processes):
    result = run(
        [str(ROOT / "launch.sh"), "pretrain", TYPO],
        cwd=tmp_path,
        check=False,
        VITMPP_NUM_PROCESSES=processes,
        VITMPP_GPUS_PER_NODE="0",
        MASTER_PORT=port(),
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "not passed" not in result.stderr
    assert result.stderr.strip() == SENTENCE  # once, though two ranks found it


def test_plain_accelerate_launch_with_two_processes_on_cpu_refuses_instead_of_running_alone(tmp_path):
    result = run(
        plain_accelerate(
            "--quiet",
            *PASSED,
            "--num_processes",
            "2",
            "--main_process_port",
            port(),
            str(ROOT / "pretrain/main.py"),
            *TINY,
            "train.steps=2",
        ),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1
    assert "`accelerate launch --num_processes 2` started 1 process" in result.stderr
    assert "--multi_gpu" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_our_launcher_with_two_processes_on_cpu_forms_a_world_of_two(tmp_path, digits16):
    result = run(
        [
            sys.executable,
            "-m",
            "vitmpp.common.launcher",
            *PASSED,
            "--num_processes",
            "2",
            "--main_process_port",
            port(),
            str(ROOT / "pretrain/main.py"),
            *TINY,
            "train.steps=2",
            f"data.shards={digits16}",
            "run.name=two",
        ],
        cwd=tmp_path,
    )
    assert "2 process(es) x 16 images" in result.stdout
    assert "not passed" not in result.stderr
    import json

    state = json.loads(next((tmp_path / "runs/two/checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["world_size"] == 2


def test_a_rank_killed_by_a_signal_is_named_in_one_line(tmp_path, digits16):
    proc = start(
        [
            str(ROOT / "launch.sh"),
            "pretrain",
            *TINY,
            "train.steps=200",
            "debug.step_delay_s=0.3",
            f"data.shards={digits16}",
            "run.name=killed",
            f"run.output_dir={tmp_path / 'runs'}",
        ],
        cwd=tmp_path,
        VITMPP_NUM_PROCESSES="2",
        VITMPP_GPUS_PER_NODE="0",
        MASTER_PORT=port(),
    )
    run_dir = tmp_path / "runs" / "killed"
    wait_for(lambda: last_logged_step(run_dir) >= 2, 240, proc)
    ranks = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-f", "-P", ",".join(_launcher_pids(proc.pid)), "pretrain/main.py"],
            capture_output=True,
            text=True,
        ).stdout.split()
    ]
    assert len(ranks) == 2, ranks
    rank1 = [p for p in ranks if "LOCAL_RANK=1" in _environ(p)][0]
    os.kill(rank1, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert "error: rank 1 was killed by SIGKILL" in err
    assert "Traceback" not in err, err[-3000:]


def _launcher_pids(root: int) -> list[str]:
    """launch.sh's child: the `python -m vitmpp.common.launcher` process."""
    out = subprocess.run(["pgrep", "-f", "-P", str(root), "vitmpp.common.launcher"], capture_output=True, text=True)
    pids = out.stdout.split()
    assert pids, "launcher not found"
    return pids


def _environ(pid: int) -> str:
    return (open(f"/proc/{pid}/environ", "rb").read().replace(b"\0", b"\n")).decode(errors="replace")


HELP_COMMANDS = [
    ["pretrain/main.py"],
    ["finetune/main.py"],
    ["-m", "vitmpp.experiments.compare"],
    ["-m", "vitmpp.analyze"],
    ["-m", "vitmpp.benchmarks"],
    ["-m", "vitmpp.datasets.make_shards"],
    ["-m", "vitmpp.models.export"],
]
# (`python -m vitmpp.common.launcher --help` is Accelerate's own parser, which imports torch: 1.2 s here)


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: c[-1])
def test_help_answers_without_importing_torch(command, tmp_path):
    """What makes `--help` fast (0.03-0.1 s here, against 2.5-18 s when torch loads first)."""
    if command[0] == "-m":
        target = f"runpy.run_module({command[1]!r}, run_name='__main__', alter_sys=True)"
    else:
        target = f"runpy.run_path({str(ROOT / command[0])!r}, run_name='__main__')"
    code = (
        "import runpy, sys\nsys.argv = ['prog', '--help']\ntry:\n    "
        + target
        + "\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert result.stdout.strip().endswith("NO-TORCH")


def test_launch_sh_dry_run_without_a_command_prints_its_usage_only():
    result = subprocess.run([str(ROOT / "launch.sh"), "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout.startswith("vitmpp launcher:") and "./launch.sh pretrain CONFIG" in result.stdout
    assert "set -euo" not in result.stdout and "#" not in result.stdout


def test_launch_sh_passes_every_value_accelerate_would_warn_about():
    result = subprocess.run(
        [str(ROOT / "launch.sh"), "--dry-run", "finetune"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "VITMPP_GPUS_PER_NODE": "0"},
        check=True,
    )
    words = result.stdout.split()
    for flag in ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend"):
        assert flag in words
    assert words[-1].endswith("finetune/main.py")  # no stray empty argument after the script
