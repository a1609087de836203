"""Compare encoders across evaluation protocols, label fractions and seeds, in one command.

    python -m vitmpp.finetune.compare --config configs/compare/digits.yaml [key=value ...] [--overwrite]

Every cell (encoder x protocol x label fraction x seed) is one run of
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

`--jobs N` runs N independent cells at once, each with its share of the CPU threads
(`OMP_NUM_THREADS`), its output in `<output_dir>/logs/<cell>.log`: on a CPU machine several
small cells side by side finish sooner than one after another.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vitmpp.common.config import load_config, param, save_config, to_dict
from vitmpp.common.errors import ConfigError, UserError, cli_entry
from vitmpp.common.io import atomic_write
from vitmpp.common.rundir import check_location, lock_run_folder

from vitmpp.finetune.config import PROTOCOLS


@dataclass
class CompareConfig:
    encoders: dict[str, str] = param(default_factory=dict, help="name -> pretraining run folder (or encoder.safetensors); 'random' for a random encoder")
    protocols: list[str] = param(default_factory=lambda: ["linear", "finetune", "scratch", "knn"])
    label_fractions: list[float] = param(default_factory=lambda: [0.1, 1.0])
    seeds: list[int] = param(default_factory=lambda: [0, 1, 2])
    recipes: dict[str, str] = param(default_factory=dict, help="protocol -> recipe file (configs/finetune/*.yaml); a relative path is looked up next to the compare config first, then in the working directory")
    overrides: list[str] = param(default_factory=list, help="key=value overrides applied to every cell")
    output_dir: str = param("runs/compare", help="where cells and results go")
    launcher: Optional[str] = param(None, help="command that runs a cell, e.g. 'accelerate launch --num_processes 8 -m vitmpp.finetune.main'; default: python -m vitmpp.finetune.main")
    metric: str = param("last_top1", choices=("last_top1", "last_top5", "best_top1", "best_top5"),
                        help="what the table reports; best_* is chosen on the very split it reports (for model "
                             "selection on a validation split, never a result)")

    def check(self) -> None:
        if not self.encoders:
            raise ConfigError("Key 'encoders' must name at least one encoder (name: run folder).")
        for protocol in self.protocols:
            if protocol not in PROTOCOLS:
                raise ConfigError(f"Key 'protocols' holds '{protocol}'; allowed: {', '.join(PROTOCOLS)}.")
            if protocol not in self.recipes:
                raise ConfigError(f"Key 'recipes' has no recipe for protocol '{protocol}'; add recipes.{protocol}: configs/finetune/....yaml.")
        for fraction in self.label_fractions:
            if not 0 < fraction <= 1:
                raise ConfigError(f"Key 'label_fractions' must hold numbers in (0, 1], got {fraction}.")


@dataclass(frozen=True)
class Cell:
    encoder: str  # "-" for scratch
    protocol: str
    label_fraction: float
    seed: int

    @property
    def name(self) -> str:
        """The cell's folder: `mpp-linear-f0.1-s0`, `scratch-f0.1-s0` (never a leading dash, which shell
        tools read as an option)."""
        what = self.protocol if self.encoder == "-" else f"{self.encoder}-{self.protocol}"
        return f"{what}-f{self.label_fraction:g}-s{self.seed}"


def encoders_for(cfg: CompareConfig, protocol: str) -> list[str]:
    """The encoders a protocol is run on: scratch needs none ("-"); a random encoder is not
    fine-tuned, because fine-tuning random weights is what `scratch` measures (with its own recipe)."""
    if protocol == "scratch":
        return ["-"]
    if protocol == "finetune":
        return [name for name, path in cfg.encoders.items() if path != "random"]
    return list(cfg.encoders)


def cells(cfg: CompareConfig) -> list[Cell]:
    out = []
    for protocol in cfg.protocols:
        for encoder in encoders_for(cfg, protocol):
            for fraction in cfg.label_fractions:
                for seed in cfg.seeds:
                    out.append(Cell(encoder, protocol, fraction, seed))
    return out


def random_encoder(cfg: CompareConfig, out: Path) -> Path:
    """A randomly initialised encoder with the first real encoder's architecture (seed 0)."""
    import torch

    from vitmpp.models import create_encoder, read_encoder_info, save_encoder

    target = out / "random-encoder"
    if (target / "encoder.safetensors").is_file():
        return target
    reference = next((p for n, p in cfg.encoders.items() if p != "random"), None)
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


def resolve_recipes(cfg: CompareConfig, config_path: str | os.PathLike) -> dict[str, str]:
    """protocol -> recipe path: a relative path next to the compare config file (so a config works
    from any working directory), else in the working directory; a missing recipe is one sentence."""
    here = Path(config_path).resolve().parent
    found = {}
    for protocol, recipe in cfg.recipes.items():
        candidates = [Path(recipe)] if Path(recipe).is_absolute() else [here / recipe, Path(recipe)]
        match = next((c for c in candidates if c.is_file()), None)
        if match is None:
            raise UserError(f"Recipe '{recipe}' for protocol '{protocol}' (key recipes.{protocol} of {config_path}) "
                            f"is neither next to that file ({here / recipe}) nor in the working directory; "
                            "fix the path.")
        found[protocol] = str(match)
    return found


def run_cell(cfg: CompareConfig, cell: Cell, encoder_paths: dict[str, str], cells_dir: Path,
             allow_changes: bool = False, recipes: dict[str, str] | None = None, log: Path | None = None,
             threads: int | None = None) -> dict:
    """Run one cell (or read its results.json when it is done). `log`: write the cell's output there
    instead of this terminal (cells running side by side); `threads`: its OMP_NUM_THREADS."""
    folder = cells_dir / cell.name
    done = folder / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    launcher = shlex.split(cfg.launcher) if cfg.launcher else [sys.executable, "-m", "vitmpp.finetune.main"]
    args = ["--config", (recipes or cfg.recipes)[cell.protocol], f"protocol={cell.protocol}",
            f"data.label_fraction={cell.label_fraction}", f"train.seed={cell.seed}",
            f"run.output_dir={cells_dir}", f"run.name={cell.name}", *cfg.overrides, "--resume", "auto",
            *(["--allow-changes"] if allow_changes else [])]
    if cell.protocol == "scratch":
        args.append(f"encoder={encoder_paths[next(iter(encoder_paths))]}")
    else:
        args.append(f"encoder={encoder_paths[cell.encoder]}")
    env = {**os.environ, "VITMPP_NO_BAR": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    print(f"[compare] {cell.name}" + (f" (log: {log})" if log else ""), flush=True)
    if log is None:
        result = subprocess.run([*launcher, *args], env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as stream:
            result = subprocess.run([*launcher, *args], env=env, stdout=stream, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not done.is_file():
        where = f"its log is {log}" if log else "its log is above"
        raise UserError(f"Cell {cell.name} failed (exit code {result.returncode}); {where}, its folder is {folder}; "
                        "fix the cause and rerun the same command to continue.")
    results = json.loads(done.read_text())
    if log is not None:
        print(f"[compare] {cell.name} done: last top-1 {results['last_top1']:.2f}", flush=True)
    return results


def run_cells(cfg: CompareConfig, todo: list[Cell], encoder_paths: dict[str, str], out: Path, *, jobs: int,
              allow_changes: bool, recipes: dict[str, str]) -> list[dict]:
    """Every cell's results, in the order of `todo`; `jobs` cells at a time. On a failure the cells
    already running finish (each keeps its folder and log) and the failure is reported."""
    cells_dir = out / "cells"
    if jobs <= 1:
        return [run_cell(cfg, cell, encoder_paths, cells_dir, allow_changes, recipes) for cell in todo]
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_cell, cfg, cell, encoder_paths, cells_dir, allow_changes, recipes,
                               out / "logs" / f"{cell.name}.log", threads) for cell in todo]
        failures = []
        for future in futures:
            try:
                future.result()
            except UserError as err:
                failures.append(err)
                for other in futures:
                    other.cancel()  # the ones not started yet
        if failures:
            raise failures[0]
        return [future.result() for future in futures]


HISTORY_COLUMNS = ["encoder", "protocol", "label_fraction", "seed", "step", "epoch", "images_seen", "top1", "top5"]


def history_rows(grid: list[Cell], results: list[dict]) -> list[dict]:
    """Every evaluation of every cell; images seen = epochs x the cell's training images."""
    rows = []
    for cell, result in zip(grid, results):
        for point in result.get("history") or []:
            rows.append({"encoder": cell.encoder, "protocol": cell.protocol, "label_fraction": cell.label_fraction,
                         "seed": cell.seed, "step": point.get("step"), "epoch": point.get("epoch"),
                         "images_seen": round(float(point.get("epoch") or 0) * int(result.get("train_images") or 0)),
                         "top1": point.get("top1"), "top5": point.get("top5")})
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
                points.setdefault(r["encoder"], {}).setdefault(int(r["step"]), []).append((r["images_seen"], r["top1"]))
        for encoder, by_step in points.items():
            steps = sorted(by_step)
            xs = [statistics.fmean(x for x, _ in by_step[s]) for s in steps]
            ys = [statistics.fmean(y for _, y in by_step[s]) for s in steps]
            ax.plot(xs, ys, marker="o", markersize=3, label=encoder if encoder != "-" else "random init (scratch)")
        ax.set_title(f"{protocol}, {fraction:g} labels", fontsize=10)
        ax.set_xlabel("training images seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation top-1 (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, png.getvalue())


def summarize(cfg: CompareConfig, rows: list[dict]) -> tuple[list[dict], str]:
    """Mean ± std over seeds per (encoder, protocol, fraction), and the markdown report."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["encoder"], row["protocol"], row["label_fraction"]), []).append(row[cfg.metric])
    summary = []
    for (encoder, protocol, fraction), values in groups.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append({"encoder": encoder, "protocol": protocol, "label_fraction": fraction,
                        "mean": statistics.fmean(values), "std": std, "seeds": len(values)})
    fractions = sorted({s["label_fraction"] for s in summary})
    lines = [f"# Comparison ({cfg.metric.replace('_', ' ')}, %, mean ± std over seeds {', '.join(map(str, cfg.seeds))})", ""]
    header = "| encoder | protocol | " + " | ".join(f"{f:g} labels" for f in fractions) + " |"
    lines += [header, "|" + "---|" * (2 + len(fractions))]
    lookup = {(s["encoder"], s["protocol"], s["label_fraction"]): s for s in summary}
    for protocol in cfg.protocols:
        for encoder in encoders_for(cfg, protocol):
            cells_text = []
            for fraction in fractions:
                s = lookup.get((encoder, protocol, fraction))
                cells_text.append(f"{s['mean']:.2f} ± {s['std']:.2f}" if s else "")
            lines.append(f"| {encoder if encoder != '-' else '(random init)'} | {protocol} | " + " | ".join(cells_text) + " |")
    # share of the scratch -> supervised gap each SSL encoder closes (fine-tuning)
    ssl = [n for n in cfg.encoders if n not in ("supervised", "random")]
    if "supervised" in cfg.encoders and "scratch" in cfg.protocols and "finetune" in cfg.protocols and ssl:
        lines += ["", "## Share of the scratch → supervised gap closed by fine-tuning", "",
                  "| encoder | " + " | ".join(f"{f:g} labels" for f in fractions) + " |",
                  "|" + "---|" * (1 + len(fractions))]
        for name in ssl:
            shares = []
            for fraction in fractions:
                scratch = lookup.get(("-", "scratch", fraction))
                sup = lookup.get(("supervised", "finetune", fraction))
                mine = lookup.get((name, "finetune", fraction))
                if scratch and sup and mine and abs(sup["mean"] - scratch["mean"]) > 1e-9:
                    shares.append(f"{(mine['mean'] - scratch['mean']) / (sup['mean'] - scratch['mean']):.0%}")
                else:
                    shares.append("n/a")
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
        ax.bar(x + (i - (len(encoders) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=encoder if encoder != "-" else "random init (scratch)")
    ax.set_xticks(x, [f"{p}\n{f:g} labels" for p, f in groups])
    ax.set_ylabel(f"{cfg.metric.replace('_', ' ')} (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, png.getvalue())


RESULT_COLUMNS = ["encoder", "protocol", "label_fraction", "seed", "last_top1", "last_top5", "best_top1", "best_top5",
                  "epochs", "train_images", "wall_time_s"]


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

        changed = diff_keys(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
        if changed:
            raise UserError(f"Output folder '{out}' holds a comparison with a different config (keys {', '.join(changed)}); "
                            "choose another output_dir or pass --overwrite.")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)

    encoder_paths = {}
    for name, path in cfg.encoders.items():
        encoder_paths[name] = str(random_encoder(cfg, out)) if path == "random" else str(_encoder_file(path).parent)
    grid = cells(cfg)
    results = run_cells(cfg, grid, encoder_paths, out, jobs=args.jobs, allow_changes=args.overwrite, recipes=recipes)
    rows = [{**{k: result[k] for k in result if not isinstance(result[k], (dict, list))},
             "encoder": cell.encoder, "protocol": cell.protocol, "label_fraction": cell.label_fraction, "seed": cell.seed}
            for cell, result in zip(grid, results)]
    write_csv(rows, out / "results.csv")
    curve_rows = history_rows(grid, results)
    write_csv(curve_rows, out / "history.csv", columns=HISTORY_COLUMNS)
    plot_curves(cfg, curve_rows, out / "curves.png")
    summary, report = summarize(cfg, rows)
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
