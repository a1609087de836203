"""Running the real entry points in subprocesses, for the engine and reliability tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# A tiny, fast pretraining setup on 16 px digits (the default recipe uses 32 px and a larger ViT).
TINY = [
    "model.name=vit_pico_patch4_16",
    "model.img_size=16",
    "train.global_batch=32",
    "data.num_workers=0",
    "log.log_every=1",
    "log.image_every=0",
    "log.checkpoint_every=1000",
    "optim.warmup_steps=2",
]


def env(cache: Path | None = None, **extra: str) -> dict:
    out = {**os.environ, "VITMPP_NO_BAR": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # as in an activated virtual environment: `accelerate` and `python` are this interpreter's
    out["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), out.get("PATH", "")])
    if cache is not None:
        out["VITMPP_CACHE"] = str(cache)
    out.update(extra)
    return out


def python_cmd(script: str) -> list[str]:
    """`python pretrain/main.py` — the same script `accelerate launch` runs, without the launcher."""
    return [sys.executable, str(ROOT / script)]


def accelerate_cmd(script: str, processes: int = 1) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(processes),
    ]
    if processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(29500 + os.getpid() % 1000)]
    return cmd + [str(ROOT / script)]


def run(
    cmd: list[str], *, cwd: Path, cache: Path | None = None, timeout: float = 300, check: bool = True, **extra_env: str
) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(cache, **extra_env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def encoder_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "encoder.safetensors"))


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = encoder_weights(a), encoder_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def start(cmd: list[str], *, cwd: Path, cache: Path | None = None, **extra_env: str) -> subprocess.Popen:
    """Start a command in its own process group (so a test can signal or kill all of it), with SIGINT at
    its default, as a terminal's foreground job has it."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env(cache, **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )


def _sigint_as_in_a_terminal() -> None:
    # pytest started in the background by a non-interactive shell (`busy-tests.sh > log &`) inherits
    # SIGINT ignored, and so would every command it starts; bash cannot trap a signal that was ignored
    # when it started, so launch.sh would sleep through the test's Ctrl-C and finish with exit 0.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate, timeout: float, process: subprocess.Popen | None = None, interval: float = 0.05) -> None:
    """Poll until `predicate()`; fail if it takes longer or `process` ends first."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(
                f"process ended ({process.returncode}) before the condition:\n{out[-3000:]}\n{err[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        time.sleep(interval)


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except (ValueError, KeyError):
        return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        children = [int(p) for p in out]
        found += children
        frontier += children
    return found


def kill_tree(process: subprocess.Popen, sig) -> None:
    """Send `sig` to a process and all its descendants at once (SIGKILL: a node dying)."""
    import os

    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines a command printed."""
    return [line for line in stderr.splitlines() if line.startswith("error")]


def printed_lines(stderr: str) -> list[str]:
    """Every non-blank line (a refusal must be one sentence and nothing else)."""
    return [line for line in stderr.splitlines() if line.strip()]


def files_of(run_dir) -> dict[str, bytes]:
    """Every file in a run folder but the lock, with its bytes (to show a refused command changed nothing)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "lock"
    }
