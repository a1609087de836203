"""Rows that run the real pretraining stage (what `pretrain/main.py` runs): end to end against in-memory batches, and
1 against 2 processes.

Each run is a child process (`vitmpp.benchmarks.run_pretrain`) so thread settings,
Accelerate's process state and the data-loading workers are those of a real run;
throughput is the engine's own `system/pretrain/images_per_sec` per logging interval, the
first intervals (start-up, first epoch's worker start) left out, median of the rest.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vitmpp.common.tracking import scalar_tag

from .data import repeat_shards, shards_from_folder, synthetic_shards, write_photo_folder
from .harness import Row, Settings, median, verdict

SKIP_INTERVALS = 2
_RUN_IDS = itertools.count()


def child_env(threads: int) -> dict:
    env = {**os.environ, "VITMPP_NO_BAR": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def pretrain_overrides(
    settings: Settings, shards: Path, run_name: str, *, per_device_batch: int, processes: int, steps: int, workers: int
) -> list[str]:
    log_every = max(1, steps // 10)
    overrides = [
        "objective=mae",
        f"model.name={settings.e2e_encoder}",
        f"model.img_size={settings.e2e_img_size}",
        f"data.shards={shards}",
        f"data.num_workers={workers}",
        f"data.shuffle_buffer={4 * per_device_batch}",
        f"train.global_batch={per_device_batch * processes}",
        f"train.per_device_batch={per_device_batch}",
        f"train.steps={steps}",
        "optim.warmup_steps=2",
        f"log.log_every={log_every}",
        "log.image_every=0",
        "log.checkpoint_every=1000000",
        f"run.output_dir={Path(settings.scratch) / 'runs'}",
        f"run.name={run_name}",
    ]
    if settings.device == "cuda":  # the paper's decoder; on the CPU the recipe's light default
        overrides += [f"mae.{k}={v}" for k, v in settings.mae_decoder.items()]
    return overrides


def run_pretrain(
    settings: Settings,
    overrides: list[str],
    *,
    synthetic: bool,
    processes: int = 1,
    threads: int = 1,
    timeout: float = 1800,
) -> list[dict]:
    """Run pretrain/main.py (through `accelerate launch` when processes > 1); the interval scalars."""
    scratch = Path(settings.scratch)
    run_id = f"{os.getpid()}-{next(_RUN_IDS)}"
    perf = scratch / f"perf-{run_id}.jsonl"
    child = ["--perf-out", str(perf)]
    if synthetic:
        child += ["--synthetic", str(settings.e2e_img_size)]
    if processes > 1:
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
            "--multi_gpu",
            "--main_process_port",
            str(29500 + (os.getpid() + next(_RUN_IDS)) % 2000),
            "-m",
            "vitmpp.benchmarks.run_pretrain",
            *child,
            "--",
            *overrides,
        ]
    else:
        cmd = [sys.executable, "-m", "vitmpp.benchmarks.run_pretrain", *child, "--", *overrides]
    result = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    rows = [json.loads(line) for line in perf.read_text().splitlines() if line.strip()]
    perf.unlink()
    return rows


def steady_rate(intervals: list[dict], key: str = scalar_tag("pretrain", "images_per_sec")) -> float:
    """Median of an interval scalar, start-up intervals left out (all of them if that leaves none)."""
    values = [r[key] for r in intervals if key in r]
    kept = values[SKIP_INTERVALS:] or values
    return median(kept)


def _clean(settings: Settings, name: str) -> None:
    shutil.rmtree(Path(settings.scratch) / "runs" / name, ignore_errors=True)


def pretrain_shards(settings: Settings, steps: int) -> Path:
    """Shards for runs of `steps` steps: drawn synthetic images at small sizes; at 128 px and up,
    photo-like JPEGs of 341 x 256 (ImageNet after --max-size 256), made on every core and
    listed as often as one epoch of the run needs."""
    scratch = Path(settings.scratch)
    if settings.e2e_img_size < 128:
        count = max(settings.small_count, settings.e2e_batch * 4)
        return synthetic_shards(scratch / f"synthetic{settings.e2e_img_size}-{count}", count, settings.e2e_img_size)
    count = settings.photo_count
    photos = write_photo_folder(scratch / f"photos-341x256-{count}", count, (341, 256))
    shards = shards_from_folder(photos, scratch / f"photo-shards-341x256-{count}", maxcount=128)
    times = -(-steps * settings.e2e_batch // count)
    return repeat_shards(shards, scratch / f"photo-shards-341x256-{count}-x{times}", times) if times > 1 else shards


def end_to_end_rows(settings: Settings) -> list[Row]:
    """pretrain/main.py on shards / the same run on in-memory batches (goal >= 0.9)."""
    shards = pretrain_shards(settings, settings.e2e_steps)
    rates: dict[str, list[float]] = {"shards": [], "memory": []}
    waits: list[float] = []
    losses: list[float] = []
    threads = 1 if settings.device == "cpu" else settings.threads  # CPU: one core computes, the workers get the rest
    # a GPU run is short (one pair of runs fits the GPU check's time); on 2 shared cores two pairs
    rounds = 1 if settings.quick or settings.device == "cuda" else min(settings.rounds, 2)
    for r in range(rounds):
        for arm in ("shards", "memory") if r % 2 == 0 else ("memory", "shards"):
            name = f"e2e-{arm}-{os.getpid()}-{r}"
            overrides = pretrain_overrides(
                settings,
                shards,
                name,
                per_device_batch=settings.e2e_batch,
                processes=1,
                steps=settings.e2e_steps,
                workers=settings.e2e_workers,
            )
            intervals = run_pretrain(settings, overrides, synthetic=arm == "memory", threads=threads)
            _clean(settings, name)
            rates[arm].append(steady_rate(intervals))
            if arm == "shards":
                waits.append(steady_rate(intervals, scalar_tag("pretrain", "data_wait_fraction")))
                losses = [r_[scalar_tag("pretrain", "loss")] for r_ in intervals]
    ratio = median(rates["shards"]) / median(rates["memory"])
    per_round = [a / b for a, b in zip(rates["shards"], rates["memory"])]
    note = (
        f"mae {settings.e2e_encoder} @{settings.e2e_img_size}px, batch {settings.e2e_batch}, "
        f"{settings.e2e_steps} steps, {settings.e2e_workers} loader workers, {threads} compute thread(s); "
        f"shards {median(rates['shards']):.0f} img/s (data wait {median(waits):.0%}), in-memory "
        f"{median(rates['memory']):.0f} img/s; rounds {min(per_round):.2f}-{max(per_round):.2f}; {verdict(ratio, 0.9)}"
    )
    return [
        Row(
            "end to end",
            "pretrain/main.py: shards / in-memory batches",
            ratio,
            "x",
            note,
            {"rates": rates, "data_wait": waits, "losses": losses},
        )
    ]


def scaling_rows(settings: Settings) -> list[Row]:
    """1 vs 2 processes (DDP over gloo), same per-process batch, in-memory batches: efficiency."""
    if settings.device != "cpu" or settings.scaling_steps <= 0:
        return [
            Row(
                "scaling",
                "1 -> 2 processes",
                None,
                "of ideal",
                "runs on the CPU only (a single-GPU machine has "
                "no second device); the multi-GPU curve needs a multi-GPU machine",
            )
        ]
    shards = pretrain_shards(settings, settings.scaling_steps)
    rates: dict[int, list[float]] = {1: [], 2: []}
    rounds = 1 if settings.quick else min(settings.rounds, 2)
    for r in range(rounds):
        for procs in (1, 2) if r % 2 == 0 else (2, 1):
            name = f"scaling-{procs}-{os.getpid()}-{r}"
            overrides = pretrain_overrides(
                settings,
                shards,
                name,
                per_device_batch=settings.e2e_batch,
                processes=procs,
                steps=settings.scaling_steps,
                workers=0,
            )
            intervals = run_pretrain(settings, overrides, synthetic=True, processes=procs, threads=1)
            _clean(settings, name)
            rates[procs].append(steady_rate(intervals))
    efficiency = median(rates[2]) / (2 * median(rates[1]))
    per_round = [b / (2 * a) for a, b in zip(rates[1], rates[2])]
    note = (
        f"mae {settings.e2e_encoder} @{settings.e2e_img_size}px, {settings.e2e_batch} images per process, "
        f"1 thread per process, in-memory batches, gloo all-reduce; 1 process {median(rates[1]):.0f} img/s, "
        f"2 processes {median(rates[2]):.0f} img/s; rounds {min(per_round):.2f}-{max(per_round):.2f}; "
        f"{os.cpu_count()} cores shared with other work; {verdict(efficiency, 0.9)}"
    )
    return [Row("scaling", "1 -> 2 processes", efficiency, "of ideal", note, {"rates": rates})]
