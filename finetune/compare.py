"""Compare encoders across evaluation protocols, label fractions and seeds, in one command.

    python -m vitmpp.finetune.compare --config configs/compare/digits.yaml [key=value ...] [--overwrite] [--jobs N]

Selection on validation, reporting on test: every cell chooses what it chooses on the
validation split and scores the test split (`finetune/engine.py`); the table reports a test
metric (`metric`: test top-1/top-5 at the last evaluation, the default, or at the evaluation
chosen on validation), and a cell without test scores (shards without a test split) stops the
comparison with one sentence. Choosing a recipe is the one use of validation scores: `metric:
val_last_top1` (or `val_best_top1`) makes the table a validation table, titled so, to pick
recipes on; report the chosen recipe with a test metric (configs/compare/mnist5k_tune.yaml).

Pretraining seeds: an encoder is one pretraining run (a folder), several (a list of folders),
or made here: `pretraining.recipes` (name -> configs/pretrain/*.yaml) x `pretraining.seeds`
are pretrained into `<output_dir>/pretrain/<name>-s<seed>` first (an interrupted one resumes).
A recipe entry may carry its own overrides after the file, "mpp_digits.yaml mpp.target=mean_color",
so variants of one recipe compare side by side without a file each.
The table's mean ± std is over every pretraining run x label-subset seed.

Compute: every row states the images it trained on: fine-tuning (`images_seen`) plus the
encoder's pretraining (`pretrain_images`). `compute_matched_scratch: true` adds a scratch row
trained for as many images as the most-pretrained encoder's pretraining plus fine-tuning, next
to the scratch row with the fine-tuning budget alone: the table then answers both "same
fine-tuning budget" and "same total compute".

Every cell (encoder [x pretraining run] x protocol x label fraction x seed) is one run of
`finetune/main.py` in its own process and run folder under `<output_dir>/cells/`; a
cell whose results.json exists is skipped, so an interrupted comparison continues
where it stopped. The output folder is locked while a comparison writes it (as a run
folder is: `vitmpp.common.rundir`), and each cell's folder by its own run; with
`--overwrite` an interrupted cell continues under the changed config (`--allow-changes`),
which its config history records. `scratch` does not depend on an encoder: it runs once
per label fraction and seed, with the architecture of the first encoder. An encoder named
`random` with path `random` is a randomly initialised copy of that architecture
(the floor for linear probes and kNN; it is not fine-tuned: that is `scratch`).

Writes `results.csv` (one row per cell), `results.md` (mean ± std over seeds, and the
share of the scratch -> supervised gap each self-supervised encoder closes),
`results.png` (grouped bars with error bars), `history.csv` (every evaluation of every
cell: step, epoch, images seen, top-1, top-5) and `curves.png` (top-1 against images seen,
mean over seeds, per encoder), and logs the table to TensorBoard.

SIGTERM or SIGUSR1 (preemption) stops the comparison as they stop a pretraining: the running
cells are passed the signal (they checkpoint and stop), nothing more starts, one line says how
many cells finished (they are kept) and to run the same command again, and the exit status is 0.

`--jobs N` runs N independent cells at once, each with its share of the CPU threads
(`OMP_NUM_THREADS`), its output in `<output_dir>/logs/<cell>.log`: on a CPU machine several
small cells side by side finish sooner than one after another.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from vitmpp.common.config import load_config, param, save_config, to_dict
from vitmpp.common.errors import ConfigError, UserError, cli_entry
from vitmpp.common.io import atomic_write
from vitmpp.common.rundir import check_location, lock_run_folder

from vitmpp.finetune.config import PROTOCOLS


METRICS = ("test_last_top1", "test_last_top5", "test_selected_top1", "test_selected_top5",
           "val_last_top1", "val_best_top1")


def metric_split(metric: str) -> str:
    """The split a table metric is scored on: 'test', or 'validation' (a table for choosing recipes)."""
    return "validation" if metric.startswith("val_") else "test"


@dataclass
class PretrainingPlan:
    """Pretraining runs the comparison makes itself (one per recipe and seed)."""

    recipes: dict[str, str] = param(default_factory=dict, help="encoder name -> pretraining recipe (configs/pretrain/*.yaml), relative to the compare config or the working directory, optionally followed by its own key=value overrides")
    seeds: list[int] = param(default_factory=lambda: [0], help="pretraining seeds: one run per recipe and seed")
    overrides: list[str] = param(default_factory=list, help="key=value overrides applied to every pretraining run")
    launcher: Optional[str] = param(None, help="command that runs a pretraining, e.g. 'accelerate launch -m vitmpp.pretrain.main'; default: python -m vitmpp.pretrain.main")


@dataclass
class CompareConfig:
    encoders: dict[str, Union[str, list[str]]] = param(default_factory=dict, help="name -> pretraining run folder (or encoder.safetensors), or a list of them (one per pretraining seed); 'random' for a random encoder")
    pretraining: PretrainingPlan = field(default_factory=PretrainingPlan)
    protocols: list[str] = param(default_factory=lambda: ["linear", "finetune", "scratch", "knn"])
    label_fractions: list[float] = param(default_factory=lambda: [0.1, 1.0])
    seeds: list[int] = param(default_factory=lambda: [0, 1, 2])
    recipes: dict[str, str] = param(default_factory=dict, help="protocol -> recipe file (configs/finetune/*.yaml); a relative path is looked up next to the compare config first, then in the working directory")
    overrides: list[str] = param(default_factory=list, help="key=value overrides applied to every cell")
    output_dir: str = param("runs/compare", help="where cells and results go")
    launcher: Optional[str] = param(None, help="command that runs a cell, e.g. 'accelerate launch --num_processes 8 -m vitmpp.finetune.main'; default: python -m vitmpp.finetune.main")
    metric: str = param("test_last_top1", choices=METRICS,
                        help="what the table reports: test top-1/top-5 at the last evaluation (test_last_*) or at "
                             "the evaluation chosen on validation (test_selected_*); nothing is chosen on test. "
                             "val_last_top1 / val_best_top1: a validation table, for choosing recipes")
    compute_matched_scratch: bool = param(False, help="add a scratch row trained on as many images as pretraining plus "
                                                      "fine-tuning of the most-pretrained encoder (needs train.steps in "
                                                      "the scratch recipe)")

    def check(self) -> None:
        if not self.encoders and not self.pretraining.recipes:
            raise ConfigError("Key 'encoders' (or 'pretraining.recipes') must name at least one encoder (name: run folder).")
        for name in self.pretraining.recipes:
            if name in self.encoders:
                raise ConfigError(f"Encoder '{name}' is named in both 'encoders' and 'pretraining.recipes'; keep one.")
        for section, entries in (("pretraining.recipes", self.pretraining.recipes), ("recipes", self.recipes)):
            for name, entry in entries.items():
                words = shlex.split(entry)
                if not words or any("=" not in word for word in words[1:]):
                    raise ConfigError(f"Key '{section}.{name}' must be a recipe file optionally followed by "
                                      f"key=value overrides, got '{entry}'.")
        for name, path in self.encoders.items():
            if isinstance(path, list) and (not path or "random" in path):
                raise ConfigError(f"Key 'encoders.{name}' must list one or more run folders ('random' stands alone).")
        if self.compute_matched_scratch and "scratch" not in self.protocols:
            raise ConfigError("Key 'compute_matched_scratch' adds a scratch row; add 'scratch' to 'protocols'.")
        for protocol in self.protocols:
            if protocol not in PROTOCOLS:
                raise ConfigError(f"Key 'protocols' holds '{protocol}'; allowed: {', '.join(PROTOCOLS)}.")
            if protocol not in self.recipes:
                raise ConfigError(f"Key 'recipes' has no recipe for protocol '{protocol}'; add recipes.{protocol}: configs/finetune/....yaml.")
        for fraction in self.label_fractions:
            if not 0 < fraction <= 1:
                raise ConfigError(f"Key 'label_fractions' must hold numbers in (0, 1], got {fraction}.")
        # a repeated value would name two cells alike (one result counted twice, or two runs in one folder)
        for key, values in (("seeds", self.seeds), ("label_fractions", self.label_fractions),
                            *([("pretraining.seeds", self.pretraining.seeds)] if self.pretraining.recipes else []),
                            ("protocols", self.protocols),
                            *((f"encoders.{name}", paths) for name, paths in self.encoders.items()
                              if isinstance(paths, list))):
            if not values:
                raise ConfigError(f"Key '{key}' is empty; give it at least one value.")
            repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
            if repeated:
                raise ConfigError(f"Key '{key}' repeats {', '.join(repeated)}; give each value once.")


SCRATCH, MATCHED = "-", "matched"  # the encoder names of the two scratch rows


@dataclass(frozen=True)
class Cell:
    encoder: str  # SCRATCH or MATCHED for the scratch rows
    protocol: str
    label_fraction: float
    seed: int
    run: int = 0  # which pretraining run of the encoder (its index in the encoder's list)
    tag: str = ""  # the run in the folder name: "p<seed>" for runs made by `pretraining`, "p<index>" in a list

    @property
    def name(self) -> str:
        """The cell's folder: `mpp-linear-f0.1-s0`, `mpp-p1-linear-f0.1-s0` (pretraining seed 1, or the second
        of a list), `scratch-f0.1-s0`, `scratch-matched-f0.1-s0` (never a leading dash, which shell tools read
        as an option). A pretraining seed keeps its name when seeds are added, so finished cells are reused."""
        if self.encoder == SCRATCH:
            what = self.protocol
        elif self.encoder == MATCHED:
            what = f"{self.protocol}-matched"
        else:
            what = f"{self.encoder}{f'-{self.tag}' if self.tag else ''}-{self.protocol}"
        return f"{what}-f{self.label_fraction:g}-s{self.seed}"


def encoder_runs(cfg: CompareConfig, out: Path) -> dict[str, list[str]]:
    """name -> its pretraining run folders (or 'random'), those made by `pretraining` included."""
    runs = {name: list(path) if isinstance(path, list) else [path] for name, path in cfg.encoders.items()}
    for name in cfg.pretraining.recipes:
        runs[name] = [str(out / "pretrain" / f"{name}-s{seed}") for seed in cfg.pretraining.seeds]
    return runs


def encoders_for(cfg: CompareConfig, protocol: str, runs: dict[str, list[str]]) -> list[str]:
    """The encoders a protocol is run on: scratch needs none (SCRATCH, and MATCHED with
    compute_matched_scratch); a random encoder is not fine-tuned, because fine-tuning random weights
    is what `scratch` measures (with its own recipe)."""
    if protocol == "scratch":
        return [SCRATCH, MATCHED] if cfg.compute_matched_scratch else [SCRATCH]
    if protocol == "finetune":
        return [name for name, paths in runs.items() if paths != ["random"]]
    return list(runs)


def cells(cfg: CompareConfig, runs: dict[str, list[str]]) -> list[Cell]:
    out = []
    for protocol in cfg.protocols:
        for encoder in encoders_for(cfg, protocol, runs):
            count = len(runs.get(encoder, [None]))
            for run in range(count):
                if encoder in cfg.pretraining.recipes:
                    tag = f"p{cfg.pretraining.seeds[run]}"
                else:
                    tag = f"p{run}" if count > 1 else ""
                for fraction in cfg.label_fractions:
                    for seed in cfg.seeds:
                        out.append(Cell(encoder, protocol, fraction, seed, run, tag))
    return out


def random_encoder(runs: dict[str, list[str]], out: Path) -> Path:
    """A randomly initialised encoder with the first real encoder's architecture (seed 0)."""
    import torch

    from vitmpp.models import create_encoder, read_encoder_info, save_encoder

    target = out / "random-encoder"
    if (target / "encoder.safetensors").is_file():
        return target
    reference = next((paths[0] for paths in runs.values() if paths != ["random"]), None)
    if reference is None:
        raise UserError("Encoder 'random' needs a real encoder in 'encoders' to copy its architecture from.")
    info = read_encoder_info(_encoder_file(reference))
    torch.manual_seed(0)
    encoder = create_encoder(info["name"], img_size=info["img_size"], **info.get("overrides", {}))
    save_encoder(encoder, target, objective="random", step=0, extra=info.get("extra"))
    return target


def _encoder_file(path: str) -> Path:
    candidate = Path(path)
    file = candidate / "encoder.safetensors" if candidate.is_dir() else candidate
    if not file.is_file():
        raise UserError(f"Encoder '{path}' not found (no {file}); run its pretraining first (see README, 'Evaluate and compare').")
    return file


def pretraining_images(folder: str) -> int:
    """Images the encoder in `folder` was pretrained on (steps x global batch, from encoder.json); 0 if unknown."""
    from vitmpp.models import read_encoder_info

    info = read_encoder_info(_encoder_file(folder))
    return int(((info.get("extra") or {}).get("train") or {}).get("images_seen") or 0)


def _resolve(recipe: str, key: str, config_path: str | os.PathLike) -> str:
    """A recipe path next to the compare config file (so a config works from any working directory),
    else in the working directory; a missing recipe is one sentence naming `key`."""
    here = Path(config_path).resolve().parent
    candidates = [Path(recipe)] if Path(recipe).is_absolute() else [here / recipe, Path(recipe)]
    match = next((c for c in candidates if c.is_file()), None)
    if match is None:
        raise UserError(f"Recipe '{recipe}' (key {key} of {config_path}) is neither next to that file "
                        f"({here / recipe}) nor in the working directory; fix the path.")
    return str(match)


def resolve_recipes(cfg: CompareConfig, config_path: str | os.PathLike) -> dict[str, str]:
    """protocol -> recipe path (see `_resolve`); the entry's own overrides are `recipe_overrides`'."""
    return {protocol: _resolve(shlex.split(recipe)[0], f"recipes.{protocol}", config_path)
            for protocol, recipe in cfg.recipes.items()}


def recipe_overrides(cfg: CompareConfig, protocol: str) -> list[str]:
    """The key=value overrides a `recipes` entry carries after its file ("knn.yaml train.epochs=null"),
    applied after the shared `overrides`."""
    return shlex.split(cfg.recipes.get(protocol, ""))[1:]


def cell_arguments(cfg: CompareConfig, cell: Cell, encoder_paths: dict[str, list[str]], cells_dir: Path,
                   recipe: str, matched_steps: int | None) -> list[str]:
    """The finetune command line of one cell (without --resume): recipe, cell keys, shared then own overrides."""
    args = ["--config", recipe, f"protocol={cell.protocol}", f"data.label_fraction={cell.label_fraction}",
            f"train.seed={cell.seed}", f"run.output_dir={cells_dir}", f"run.name={cell.name}", *cfg.overrides,
            *recipe_overrides(cfg, cell.protocol)]
    if cell.protocol == "scratch":  # the architecture of the first real encoder
        args.append(f"encoder={next(paths[0] for name, paths in encoder_paths.items() if name != 'random')}")
        if cell.encoder == MATCHED and matched_steps is not None:
            args.append(f"train.steps={matched_steps}")
    else:
        args.append(f"encoder={encoder_paths[cell.encoder][cell.run]}")
    return args


def check_cells(cfg: CompareConfig, grid: list[Cell], encoder_paths: dict[str, list[str]], cells_dir: Path,
                recipes: dict[str, str], matched_steps: int | None) -> None:
    """Resolve and validate every cell's config before the first cell runs: a recipe that the shared
    overrides break is one sentence naming the cell and its recipe file, not a failure halfway."""
    from vitmpp.finetune.config import FinetuneConfig

    for cell in grid:
        args = cell_arguments(cfg, cell, encoder_paths, cells_dir, recipes[cell.protocol], matched_steps)
        try:
            load_config(FinetuneConfig, args[1], args[2:])
        except ConfigError as err:
            own = " or that entry's own overrides" if recipe_overrides(cfg, cell.protocol) else ""
            raise UserError(f"Cell {cell.name} (protocol {cell.protocol}, recipe {args[1]}) cannot run: "
                            f"{str(err).rstrip('.')}. Nothing has run; fix the recipe, compare's overrides{own}, or "
                            f"give that recipe its own, as in recipes: {{{cell.protocol}: \"{Path(args[1]).name} "
                            "key=value\"}.") from None


# keys whose lists only choose cells: a value added to one adds cells and changes none
_GRID_LISTS = ("seeds", "label_fractions", "protocols", "pretraining.seeds")


def only_grown(before: dict, after: dict, changed: list[str]) -> bool:
    """True when the `changed` keys (config.diff_keys of the saved config and this one) only add to
    (or reorder) the grid: values added to seeds, label_fractions, protocols or pretraining.seeds, or
    a new encoder or pretraining recipe, or compute_matched_scratch turned on or off (its row's cells
    alone). Then every finished cell is what it was, so no --overwrite is needed."""
    from vitmpp.common.config import flatten

    old, new = flatten(before), flatten(after)
    for key in changed:
        if key in _GRID_LISTS:
            if not set(map(str, old.get(key) or [])) <= set(map(str, new.get(key) or [])):
                return False
        elif key == "compute_matched_scratch":
            continue  # adds or drops the compute-matched row's own cells; no other cell changes
        elif not (key.startswith(("encoders.", "pretraining.recipes.")) and key not in old):
            return False
    return True


def resolve_pretraining(cfg: CompareConfig, config_path: str | os.PathLike) -> dict[str, tuple[str, list[str]]]:
    """encoder name -> (pretraining recipe path (see `_resolve`), that entry's own overrides)."""
    words = {name: shlex.split(entry) for name, entry in cfg.pretraining.recipes.items()}
    return {name: (_resolve(w[0], f"pretraining.recipes.{name}", config_path), w[1:]) for name, w in words.items()}


def matched_scratch_steps(cfg: CompareConfig, scratch_recipe: str, encoder_paths: dict[str, list[str]]) -> tuple[int, int]:
    """(steps, pretraining images) of the compute-matched scratch row: the scratch recipe's own steps
    plus as many steps as the most-pretrained encoder's pretraining images fill at its global batch."""
    from vitmpp.finetune.config import FinetuneConfig

    recipe = load_config(FinetuneConfig, scratch_recipe, [*cfg.overrides, *recipe_overrides(cfg, "scratch")])
    if recipe.train.steps is None:
        raise UserError(f"compute_matched_scratch needs train.steps in the scratch recipe {scratch_recipe} (it sets "
                        "train.epochs); set train.steps there.")
    pretrained = max((pretraining_images(p) for name, paths in encoder_paths.items() if name != "random" for p in paths),
                     default=0)
    return recipe.train.steps + math.ceil(pretrained / recipe.train.global_batch), pretrained


_SAY = threading.Lock()
_THREADS_NOTE: list[str] = []  # the thread choice of run_parallel, printed once by the first task that runs
_STOP = threading.Event()  # set by SIGTERM/SIGUSR1: the running cells are told, and nothing more starts
_STOPPED_BY: list[str] = []  # the signal's name
_RUNNING: set[subprocess.Popen] = set()  # the cells' (and pretrainings') processes now running


class _Stopped(Exception):
    """The comparison was stopped (a signal to it, or a cell that a signal stopped before its results)."""


def _on_stop_signal(signum: int, frame) -> None:
    _STOPPED_BY.append(signal.Signals(signum).name)
    _STOP.set()
    for process in list(_RUNNING):  # (list(): one step under the GIL, while threads add and remove)
        with contextlib.suppress(OSError):
            process.send_signal(signum)


def _say(line: str) -> None:
    """One whole line to stdout: cells running side by side (threads) never interleave their lines."""
    with _SAY:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _run_logged(what: str, command: list[str], done: Path, folder: Path, log: Path | None,
                threads: int | None) -> None:
    """Run one cell or pretraining, its output here or in `log`; a failure is one sentence."""
    env = {**os.environ, "VITMPP_NO_BAR": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if _STOP.is_set():
        raise _Stopped
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
        raise _Stopped
    where = f"its log is {log}" if log else "its log is above"
    raise UserError(f"{what} failed (exit code {returncode}); {where}, its folder is {folder}; "
                    "fix the cause and rerun the same command to continue.")


def pretrain(cfg: CompareConfig, out: Path, recipes: dict[str, tuple[str, list[str]]], *, jobs: int) -> None:
    """Make the encoders of `pretraining` that are not there yet (an interrupted one resumes).
    `recipes`: name -> (recipe file, that entry's own overrides, applied after the shared ones)."""
    launcher = (shlex.split(cfg.pretraining.launcher) if cfg.pretraining.launcher
                else [sys.executable, "-m", "vitmpp.pretrain.main"])
    tasks = []
    for name, (recipe, own_overrides) in recipes.items():
        for seed in cfg.pretraining.seeds:
            run_name = f"{name}-s{seed}"
            folder = out / "pretrain" / run_name
            done = folder / "encoder.safetensors"
            if done.is_file():
                continue
            command = [*launcher, "--config", recipe, f"train.seed={seed}", f"run.output_dir={out / 'pretrain'}",
                       f"run.name={run_name}", *cfg.pretraining.overrides, *own_overrides, "--resume", "auto"]
            tasks.append((f"pretraining {run_name}", command, done, folder, f"pretrain-{run_name}"))
    run_parallel([lambda log, threads, t=t: _run_logged(t[0], t[1], t[2], t[3], log, threads) for t in tasks],
                 [t[4] for t in tasks], out, jobs=jobs)


def run_cell(cfg: CompareConfig, cell: Cell, encoder_paths: dict[str, list[str]], cells_dir: Path,
             allow_changes: bool = False, recipes: dict[str, str] | None = None, log: Path | None = None,
             threads: int | None = None, matched_steps: int | None = None) -> dict:
    """Run one cell (or read its results.json when it is done). `log`: write the cell's output there
    instead of this terminal (cells running side by side); `threads`: its OMP_NUM_THREADS."""
    folder = cells_dir / cell.name
    done = folder / "results.json"
    encoder = None if cell.protocol == "scratch" else encoder_paths[cell.encoder][cell.run]
    if done.is_file():
        finished = json.loads(done.read_text())
        # a cell is found by its folder name; one finished with another encoder (a reordered list) or, for
        # the compute-matched row, another step count (more pretraining) would be reported as this one
        if encoder is not None and Path(_encoder_file(encoder)).resolve() != Path(finished.get("encoder") or "").resolve():
            raise UserError(f"Cell {cell.name} in {folder} was run with encoder {finished.get('encoder')}, not "
                            f"{encoder}; delete that folder to rerun it, or keep the encoder lists in their order.")
        if cell.encoder == MATCHED and matched_steps is not None:
            import yaml

            steps = ((yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("train") or {}).get("steps")
            if steps != matched_steps:
                raise UserError(f"Cell {cell.name} in {folder} trained {steps} steps, but compute-matched scratch "
                                f"now needs {matched_steps}; delete that folder to rerun it.")
        return finished
    launcher = shlex.split(cfg.launcher) if cfg.launcher else [sys.executable, "-m", "vitmpp.finetune.main"]
    recipe = recipes[cell.protocol] if recipes else shlex.split(cfg.recipes[cell.protocol])[0]
    args = [*cell_arguments(cfg, cell, encoder_paths, cells_dir, recipe, matched_steps), "--resume", "auto",
            *(["--allow-changes"] if allow_changes else [])]
    _run_logged(f"Cell {cell.name}", [*launcher, *args], done, folder, log, threads)
    results = json.loads(done.read_text())
    if results.get(cfg.metric) is None and metric_split(cfg.metric) == "test":
        raise UserError(f"Cell {cell.name} has no {cfg.metric}: its shards ({folder / 'config.yaml'}, key data.shards) "
                        "have no test split, and the comparison reports only test numbers; rewrite them with "
                        "make_shards, which writes one.")
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
    _THREADS_NOTE[:] = [f"[compare] {min(jobs, len(tasks))} at a time, {threads} CPU thread(s) each (OMP_NUM_THREADS; "
                        f"{os.cpu_count()} cores, load {os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0:.1f})"]
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
        raise next((f for f in failures if isinstance(f, _Stopped)), failures[0])
    return [future.result() for future in futures]


def run_cells(cfg: CompareConfig, todo: list[Cell], encoder_paths: dict[str, list[str]], out: Path, *, jobs: int,
              allow_changes: bool, recipes: dict[str, str], matched_steps: int | None = None) -> list[dict]:
    """Every cell's results, in the order of `todo`; `jobs` cells at a time."""
    cells_dir = out / "cells"
    tasks = [lambda log, threads, cell=cell: run_cell(cfg, cell, encoder_paths, cells_dir, allow_changes, recipes,
                                                      log, threads, matched_steps) for cell in todo]
    return run_parallel(tasks, [cell.name for cell in todo], out, jobs=jobs)


HISTORY_COLUMNS = ["encoder", "pretrain_run", "protocol", "label_fraction", "seed", "step", "epoch", "images_seen",
                   "val_top1", "val_top5"]


def label(encoder: str) -> str:
    return {SCRATCH: "(random init)", MATCHED: "(random init, compute-matched)"}.get(encoder, encoder)


def history_rows(grid: list[Cell], results: list[dict]) -> list[dict]:
    """Every evaluation of every cell, on validation (the split curves may be looked at while choosing);
    images seen = epochs x the cell's training images."""
    rows = []
    for cell, result in zip(grid, results):
        for point in result.get("history") or []:
            rows.append({"encoder": cell.encoder, "pretrain_run": cell.tag, "protocol": cell.protocol,
                         "label_fraction": cell.label_fraction, "seed": cell.seed, "step": point.get("step"),
                         "epoch": point.get("epoch"),
                         "images_seen": round(float(point.get("epoch") or 0) * int(result.get("train_images") or 0)),
                         "val_top1": point.get("top1"), "val_top5": point.get("top5")})
    return rows


def plot_curves(cfg: CompareConfig, rows: list[dict], path: Path) -> None:
    """Validation top-1 against images seen, one panel per (protocol, label fraction), a line per
    encoder (mean over seeds at each evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["protocol"], r["label_fraction"]) for r in rows},
                    key=lambda g: (cfg.protocols.index(g[0]) if g[0] in cfg.protocols else 99, g[1]))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1) + 1.8, 3.6), squeeze=False)
    for ax, (protocol, fraction) in zip(axes[0], panels):
        points: dict[str, dict[int, list[tuple[float, float]]]] = {}
        for r in rows:
            if (r["protocol"], r["label_fraction"]) == (protocol, fraction):
                points.setdefault(r["encoder"], {}).setdefault(int(r["step"]), []).append((r["images_seen"], r["val_top1"]))
        for encoder, by_step in points.items():
            steps = sorted(by_step)
            xs = [statistics.fmean(x for x, _ in by_step[s]) for s in steps]
            ys = [statistics.fmean(y for _, y in by_step[s]) for s in steps]
            ax.plot(xs, ys, marker="o", markersize=3, label=label(encoder))
        ax.set_title(f"{protocol}, {labels_title(fraction)}", fontsize=10)
        ax.set_xlabel("training images seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation top-1 (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, png.getvalue())


def labels_title(fraction: float) -> str:
    """A column title for a label fraction: '10% labels', 'all labels'."""
    return "all labels" if fraction >= 1 else f"{fraction:.0%} labels" if fraction >= 0.01 else f"{fraction:.2%} labels"


def mean_text(s: dict) -> str:
    """A table cell: mean ± std (n) over its cells; a single cell has no spread to show."""
    if s["cells"] == 1:
        return f"{s['mean']:.2f} (n=1)"
    return f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['cells']})"


# Below this scratch -> supervised gap (percentage points) the share of it an encoder closes is
# noise divided by noise (a 1.5-point gap made one encoder's share -440%): it is not printed.
MIN_GAP_POINTS = 3.0


def summarize(cfg: CompareConfig, rows: list[dict], runs: dict[str, list[str]]) -> tuple[list[dict], str]:
    """Mean ± std over pretraining runs x seeds per (encoder, protocol, fraction), and the markdown report."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["encoder"], row["protocol"], row["label_fraction"]), []).append(row)
    summary = []
    for (encoder, protocol, fraction), members in groups.items():
        values = [m[cfg.metric] for m in members]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append({"encoder": encoder, "protocol": protocol, "label_fraction": fraction,
                        "mean": statistics.fmean(values), "std": std, "cells": len(values),
                        "pretrain_runs": len({m["pretrain_run"] for m in members}),
                        "pretrain_images": max(m["pretrain_images"] for m in members),
                        "images_seen": max(m["images_seen"] for m in members)})
    fractions = sorted({s["label_fraction"] for s in summary})
    many = max((len(paths) for paths in runs.values()), default=1)
    over = (f"{many} pretraining runs x seeds {', '.join(map(str, cfg.seeds))}" if many > 1
            else f"seeds {', '.join(map(str, cfg.seeds))}")
    split = metric_split(cfg.metric)
    lines = [f"# Comparison ({cfg.metric.replace('_', ' ')} on the {split} split, %, mean ± std over {over})", "",
             ("Choices (best evaluation, recipes) are made on the validation split; the test split only reports. "
              if split == "test" else
              "A validation table: choose a recipe here, then report it on test (a test_* metric); these numbers "
              "are not results. ") +
             "Training images: pretraining + this protocol (steps x global batch; k-NN trains nothing).", ""]
    header = "| encoder | protocol | " + " | ".join(labels_title(f) for f in fractions) + " | training images |"
    lines += [header, "|" + "---|" * (3 + len(fractions))]
    lookup = {(s["encoder"], s["protocol"], s["label_fraction"]): s for s in summary}
    for protocol in cfg.protocols:
        for encoder in encoders_for(cfg, protocol, runs):
            cells_text, images = [], ""
            for fraction in fractions:
                s = lookup.get((encoder, protocol, fraction))
                cells_text.append(mean_text(s) if s else "")
                if s:
                    images = f"{s['pretrain_images']:,} + {s['images_seen']:,}"
            lines.append(f"| {label(encoder)} | {protocol} | " + " | ".join(cells_text) + f" | {images} |")
    # share of the scratch -> supervised gap each SSL encoder closes (fine-tuning)
    ssl = [n for n in runs if n not in ("supervised", "random")]
    if "supervised" in runs and "scratch" in cfg.protocols and "finetune" in cfg.protocols and ssl:
        lines += ["", "## Share of the scratch → supervised gap closed by fine-tuning", "",
                  f"The share is left out (—) where scratch is within {MIN_GAP_POINTS:g} points of supervised: "
                  "there it divides noise by noise.", "",
                  "| encoder | " + " | ".join(labels_title(f) for f in fractions) + " |",
                  "|" + "---|" * (1 + len(fractions))]
        for name in ssl:
            shares = []
            for fraction in fractions:
                scratch = lookup.get((SCRATCH, "scratch", fraction))
                sup = lookup.get(("supervised", "finetune", fraction))
                mine = lookup.get((name, "finetune", fraction))
                if not (scratch and sup and mine):
                    shares.append("n/a")
                elif abs(sup["mean"] - scratch["mean"]) < MIN_GAP_POINTS:
                    shares.append(f"— (gap {sup['mean'] - scratch['mean']:+.1f})")
                else:
                    shares.append(f"{(mine['mean'] - scratch['mean']) / (sup['mean'] - scratch['mean']):.0%}")
            lines.append(f"| {name} | " + " | ".join(shares) + " |")
    return summary, "\n".join(lines) + "\n"


def plot(cfg: CompareConfig, summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = sorted({(s["protocol"], s["label_fraction"]) for s in summary}, key=lambda g: (cfg.protocols.index(g[0]), g[1]))
    encoders = list(dict.fromkeys(s["encoder"] for s in summary))
    lookup = {(s["encoder"], s["protocol"], s["label_fraction"]): s for s in summary}
    width = 0.8 / max(len(encoders), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)) + 1.8, 4))
    x = np.arange(len(groups))
    for i, encoder in enumerate(encoders):
        means = [lookup[(encoder, *g)]["mean"] if (encoder, *g) in lookup else np.nan for g in groups]
        stds = [lookup[(encoder, *g)]["std"] if (encoder, *g) in lookup else 0 for g in groups]
        ax.bar(x + (i - (len(encoders) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=label(encoder))
    ax.set_xticks(x, [f"{p}\n{labels_title(f)}" for p, f in groups])
    ax.set_ylabel(f"{cfg.metric.replace('_', ' ')} (%, {metric_split(cfg.metric)} split)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, png.getvalue())


RESULT_COLUMNS = ["encoder", "pretrain_run", "protocol", "label_fraction", "seed", "test_last_top1", "test_last_top5",
                  "test_selected_top1", "test_selected_top5", "selected_step", "val_last_top1", "val_best_top1",
                  "epochs", "train_images", "images_seen", "pretrain_images", "total_images", "wall_time_s", "encoder_path"]


def write_csv(rows: list[dict], path: Path, columns: list[str] = RESULT_COLUMNS) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


@cli_entry
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m vitmpp.finetune.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/compare/*.yaml")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow a different config in an output folder that holds results (interrupted cells "
                             "continue under it)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once, each with cores/jobs threads and its output in <output_dir>/logs/ "
                             "(default 1: one after another, output here)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}.")
    for signum in (signal.SIGTERM, signal.SIGUSR1):  # preemption, as for pretraining: stop, keep, exit 0
        signal.signal(signum, _on_stop_signal)
    cfg = load_config(CompareConfig, args.config, args.overrides)
    recipes = resolve_recipes(cfg, args.config)
    out = Path(cfg.output_dir)
    check_location(out, output_key="output_dir")
    # held until this process ends; each cell's run locks its own folder
    taken_over = lock_run_folder(out, output_key="output_dir", name_key="output_dir")
    if taken_over:
        print(f"warning: {taken_over}", file=sys.stderr, flush=True)
    saved = out / "compare.yaml"
    if saved.is_file() and not args.overwrite:
        import yaml

        from vitmpp.common.config import diff_keys

        before = yaml.safe_load(saved.read_text()) or {}
        changed = diff_keys(before, to_dict(cfg))
        if changed and only_grown(before, to_dict(cfg), changed):
            print(f"[compare] only the grid changed ({', '.join(changed)}: cells added or reordered); the finished cells "
                  "are kept", flush=True)
        elif changed:
            raise UserError(f"Output folder '{out}' holds a comparison with a different config (keys {', '.join(changed)}); "
                            "choose another output_dir or pass --overwrite.")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)

    runs = encoder_runs(cfg, out)
    grid = cells(cfg, runs)
    # before any pretraining or cell runs (the encoder folders need not exist yet to check a config)
    check_cells(cfg, grid, runs, out / "cells", recipes, None)
    try:
        if cfg.pretraining.recipes:
            pretrain(cfg, out, resolve_pretraining(cfg, args.config), jobs=args.jobs)
        encoder_paths = {name: [str(random_encoder(runs, out))] if paths == ["random"]
                         else [str(_encoder_file(p).parent) for p in paths] for name, paths in runs.items()}
        matched_steps = None
        if cfg.compute_matched_scratch:
            matched_steps, pretrained = matched_scratch_steps(cfg, recipes["scratch"], encoder_paths)
            print(f"[compare] compute-matched scratch: {matched_steps} steps (its recipe's own plus {pretrained:,} "
                  "pretraining images)", flush=True)
        results = run_cells(cfg, grid, encoder_paths, out, jobs=args.jobs, allow_changes=args.overwrite,
                            recipes=recipes, matched_steps=matched_steps)
    except _Stopped:
        finished = sum((out / "cells" / cell.name / "results.json").is_file() for cell in grid)
        by = _STOPPED_BY[0] if _STOPPED_BY else "a signal to a running cell"
        print(f"[compare] stopped by {by}: {finished} of {len(grid)} cells finished and are kept in {out / 'cells'}; "
              "run the same command again to continue (finished cells are not run again)", file=sys.stderr, flush=True)
        return out
    pretrained_on = {(name, i): (0 if name == "random" else pretraining_images(path))
                     for name, paths in encoder_paths.items() for i, path in enumerate(paths)}
    rows = []
    for cell, result in zip(grid, results):
        pretrain_images = pretrained_on.get((cell.encoder, cell.run), 0)
        rows.append({**{k: result[k] for k in result if not isinstance(result[k], (dict, list))},
                     "encoder": cell.encoder, "pretrain_run": cell.tag, "protocol": cell.protocol,
                     "label_fraction": cell.label_fraction, "seed": cell.seed,
                     "encoder_path": encoder_paths[cell.encoder][cell.run] if cell.encoder in encoder_paths else "",
                     "pretrain_images": pretrain_images,
                     "total_images": pretrain_images + int(result.get("images_seen") or 0)})
    write_csv(rows, out / "results.csv")
    curve_rows = history_rows(grid, results)
    write_csv(curve_rows, out / "history.csv", columns=HISTORY_COLUMNS)
    plot_curves(cfg, curve_rows, out / "curves.png")
    summary, report = summarize(cfg, rows, runs)
    atomic_write(out / "results.md", report)
    plot(cfg, summary, out / "results.png")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as writer:
        writer.add_text("compare/results", report, 0)
        for s in summary:
            writer.add_scalar(f"compare/{s['protocol']}/f{s['label_fraction']:g}/{s['encoder']}", s["mean"], 0)
    print(report)
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'results.png'}, {out / 'history.csv'}, "
          f"{out / 'curves.png'}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
