"""Running the comparison's grid (`vitmpp.experiments.compare`): pretraining runs and cells, each in a
process of its own, `jobs` at a time, each with its share of the CPU threads.

Each pretraining is a subprocess of `python -m vitmpp.pretrain.main` and each cell one of `python -m
vitmpp.finetune.main` (or the config's `launcher`): a dependency on both stages, which the experiments
layer sits above (pyproject.toml's contracts) and reaches through their command lines only, never by
importing an entry point. A failure is one sentence naming the cell and its log; SIGTERM/SIGUSR1
(`on_stop_signal`) are passed to the running processes, nothing more starts, and `Stopped` is raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from vitmpp.common.errors import UserError

from .grid import MATCHED, Cell, CompareConfig, cell_arguments, encoder_file, metric_split

_SAY = threading.Lock()
_THREADS_NOTE: list[str] = []  # the thread choice of run_parallel, printed once by the first task that runs
_STOP = threading.Event()  # set by SIGTERM/SIGUSR1: the running cells are told, and nothing more starts
_STOPPED_BY: list[str] = []  # the signal's name
_RUNNING: set[subprocess.Popen] = set()  # the cells' (and pretrainings') processes now running


class Stopped(Exception):
    """The comparison was stopped (a signal to it, or a cell that a signal stopped before its results)."""


def on_stop_signal(signum: int, frame) -> None:
    """SIGTERM/SIGUSR1 (preemption): pass the signal to the running cells, start nothing more."""
    _STOPPED_BY.append(signal.Signals(signum).name)
    _STOP.set()
    for process in list(_RUNNING):  # (list(): one step under the GIL, while threads add and remove)
        with contextlib.suppress(OSError):
            process.send_signal(signum)


def stopped_by() -> str:
    """What stopped the comparison: the signal's name, or a signal that reached a running cell alone."""
    return _STOPPED_BY[0] if _STOPPED_BY else "a signal to a running cell"


def _say(line: str) -> None:
    """One whole line to stdout: cells running side by side (threads) never interleave their lines."""
    with _SAY:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _run_logged(what: str, command: list[str], done: Path, folder: Path, log: Path | None, threads: int | None) -> None:
    """Run one cell or pretraining, its output here or in `log`; a failure is one sentence."""
    env = {**os.environ, "VITMPP_NO_BAR": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if _STOP.is_set():
        raise Stopped
    with _SAY:
        note, _THREADS_NOTE[:] = _THREADS_NOTE[:], []
    if note:
        _say(note[0])
    _say(f"[compare] {what}" + (f" (log: {log})" if log else ""))
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") if log else contextlib.nullcontext() as stream:
        with subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT if stream else None) as process:
            _RUNNING.add(process)
            try:
                if _STOP.is_set():  # the signal came between the start and the line above: pass it on here
                    process.send_signal(signal.SIGTERM)
                returncode = process.wait()
            except BaseException:  # Ctrl-C: as subprocess.run does
                process.kill()
                raise
            finally:
                _RUNNING.discard(process)
    if returncode == 0 and done.is_file():
        return
    # a cell exits 0 without results only when a signal stopped it (it checkpointed); the signal may have
    # reached the cell alone (launch.sh passes one to compare's children)
    if _STOP.is_set() or returncode == 0:
        raise Stopped
    where = f"its log is {log}" if log else "its log is above"
    raise UserError(
        f"{what} failed (exit code {returncode}); {where}, its folder is {folder}; "
        "fix the cause and rerun the same command to continue."
    )


def pretrain_encoders(cfg: CompareConfig, out: Path, recipes: dict[str, tuple[str, list[str]]], *, jobs: int) -> None:
    """Make the encoders of `pretraining` that are not there yet (an interrupted one resumes).
    `recipes`: name -> (recipe file, that entry's own overrides, applied after the shared ones)."""
    launcher = (
        shlex.split(cfg.pretraining.launcher)
        if cfg.pretraining.launcher
        else [sys.executable, "-m", "vitmpp.pretrain.main"]
    )
    tasks = []
    for name, (recipe, own_overrides) in recipes.items():
        for seed in cfg.pretraining.seeds:
            run_name = f"{name}-s{seed}"
            folder = out / "pretrain" / run_name
            done = folder / "encoder.safetensors"
            if done.is_file():
                continue
            command = [
                *launcher,
                "--config",
                recipe,
                f"train.seed={seed}",
                f"run.output_dir={out / 'pretrain'}",
                f"run.name={run_name}",
                *cfg.pretraining.overrides,
                *own_overrides,
                "--resume",
                "auto",
            ]
            tasks.append((f"pretraining {run_name}", command, done, folder, f"pretrain-{run_name}"))
    run_parallel(
        [lambda log, threads, t=t: _run_logged(t[0], t[1], t[2], t[3], log, threads) for t in tasks],
        [t[4] for t in tasks],
        out,
        jobs=jobs,
    )


def run_cell(
    cfg: CompareConfig,
    cell: Cell,
    encoder_paths: dict[str, list[str]],
    cells_dir: Path,
    allow_changes: bool = False,
    recipes: dict[str, str] | None = None,
    log: Path | None = None,
    threads: int | None = None,
    matched_steps: int | None = None,
) -> dict:
    """Run one cell (or read its results.json when it is done). `log`: write the cell's output there
    instead of this terminal (cells running side by side); `threads`: its OMP_NUM_THREADS."""
    folder = cells_dir / cell.name
    done = folder / "results.json"
    encoder = None if cell.protocol == "scratch" else encoder_paths[cell.encoder][cell.run]
    if done.is_file():
        finished = json.loads(done.read_text())
        # a cell is found by its folder name; one finished with another encoder (a reordered list) or, for
        # the compute-matched row, another step count (more pretraining) would be reported as this one
        if (
            encoder is not None
            and Path(encoder_file(encoder)).resolve() != Path(finished.get("encoder") or "").resolve()
        ):
            raise UserError(
                f"Cell {cell.name} in {folder} was run with encoder {finished.get('encoder')}, not "
                f"{encoder}; delete that folder to rerun it, or keep the encoder lists in their order."
            )
        if cell.encoder == MATCHED and matched_steps is not None:
            import yaml

            steps = ((yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("train") or {}).get("steps")
            if steps != matched_steps:
                raise UserError(
                    f"Cell {cell.name} in {folder} trained {steps} steps, but compute-matched scratch "
                    f"now needs {matched_steps}; delete that folder to rerun it."
                )
        return finished
    launcher = shlex.split(cfg.launcher) if cfg.launcher else [sys.executable, "-m", "vitmpp.finetune.main"]
    recipe = recipes[cell.protocol] if recipes else shlex.split(cfg.recipes[cell.protocol])[0]
    args = [
        *cell_arguments(cfg, cell, encoder_paths, cells_dir, recipe, matched_steps),
        "--resume",
        "auto",
        *(["--allow-changes"] if allow_changes else []),
    ]
    _run_logged(f"Cell {cell.name}", [*launcher, *args], done, folder, log, threads)
    results = json.loads(done.read_text())
    if results.get(cfg.metric) is None and metric_split(cfg.metric) == "test":
        raise UserError(
            f"Cell {cell.name} has no {cfg.metric}: its shards ({folder / 'config.yaml'}, key data.shards) "
            "have no test split, and the comparison reports only test numbers; rewrite them with "
            "make_shards, which writes one."
        )
    if log is not None:
        _say(f"[compare] {cell.name} done: {cfg.metric.replace('_', ' ')} {results[cfg.metric]:.2f}")
    return results


class _NotStarted(Exception):
    """A queued task that did not start because an earlier one failed or Ctrl-C came."""


def choose_threads(jobs: int, cores: int, load: float) -> int:
    """CPU threads per cell: the cores that other work leaves free (the 1-minute load average taken
    off), shared among `jobs` cells, at least one. Torch's default (every core) on a machine that is
    busy already oversubscribes it, and small cells then run many times slower (docs/benchmarks.md)."""
    free = max(1, round(cores - load))
    return max(1, min(cores, free) // max(1, jobs))


def run_parallel(tasks: list, names: list[str], out: Path, *, jobs: int) -> list:
    """Call every task(log, threads), `jobs` at a time (then each with its share of the cores and its output
    in <out>/logs/<name>.log), else one after another with output here. On a failure the tasks already
    running finish and the first failure is raised."""
    threads = choose_threads(jobs, os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    # said by the first cell or pretraining that really starts (finished ones are only read)
    _THREADS_NOTE[:] = [
        f"[compare] {min(jobs, len(tasks))} at a time, {threads} CPU thread(s) each (OMP_NUM_THREADS; "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0:.1f})"
    ]
    if jobs <= 1:
        return [task(None, threads) for task in tasks]
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()  # set by the first failure or Ctrl-C: no queued task starts after it

    def guarded(task, log):
        if stop.is_set():
            raise _NotStarted
        try:
            return task(log, threads)
        except BaseException:
            # set here, in the task's own thread, before the pool hands that thread the next task: the
            # main thread would learn of the failure (or Ctrl-C, which ends the running cells' processes
            # too) only after that next task had started
            stop.set()
            raise

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(guarded, task, out / "logs" / f"{name}.log") for task, name in zip(tasks, names)]
    failures = []
    try:
        for future in futures:
            try:
                future.result()
            except _NotStarted:
                continue
            except Exception as err:  # a failed cell (or an unreadable results.json)
                failures.append(err)
    except BaseException:  # Ctrl-C here: the running cells' processes stop with it; start nothing more
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if failures:  # a stop first: the cells it ended failed because of it
        raise next((f for f in failures if isinstance(f, Stopped)), failures[0])
    return [future.result() for future in futures]


def run_cells(
    cfg: CompareConfig,
    todo: list[Cell],
    encoder_paths: dict[str, list[str]],
    out: Path,
    *,
    jobs: int,
    allow_changes: bool,
    recipes: dict[str, str],
    matched_steps: int | None = None,
) -> list[dict]:
    """Every cell's results, in the order of `todo`; `jobs` cells at a time."""
    cells_dir = out / "cells"
    tasks = [
        lambda log, threads, cell=cell: run_cell(
            cfg, cell, encoder_paths, cells_dir, allow_changes, recipes, log, threads, matched_steps
        )
        for cell in todo
    ]
    return run_parallel(tasks, [cell.name for cell in todo], out, jobs=jobs)
