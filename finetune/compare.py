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
share of the scratch -> supervised gap each self-supervised encoder closes) and
`results.png` (grouped bars with error bars), and logs the table to TensorBoard.
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
    recipes: dict[str, str] = param(default_factory=dict, help="protocol -> configs/finetune/*.yaml recipe")
    overrides: list[str] = param(default_factory=list, help="key=value overrides applied to every cell")
    output_dir: str = param("runs/compare", help="where cells and results go")
    launcher: Optional[str] = param(None, help="command that runs a cell, e.g. 'accelerate launch --num_processes 8 -m vitmpp.finetune.main'; default: python -m vitmpp.finetune.main")
    metric: str = param("best_top1", choices=("best_top1", "last_top1", "best_top5", "last_top5"))

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
        return f"{self.encoder}-{self.protocol}-f{self.label_fraction:g}-s{self.seed}"


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


def run_cell(cfg: CompareConfig, cell: Cell, encoder_paths: dict[str, str], cells_dir: Path,
             allow_changes: bool = False) -> dict:
    folder = cells_dir / cell.name
    done = folder / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    launcher = shlex.split(cfg.launcher) if cfg.launcher else [sys.executable, "-m", "vitmpp.finetune.main"]
    args = ["--config", cfg.recipes[cell.protocol], f"protocol={cell.protocol}",
            f"data.label_fraction={cell.label_fraction}", f"train.seed={cell.seed}",
            f"run.output_dir={cells_dir}", f"run.name={cell.name}", *cfg.overrides, "--resume", "auto",
            *(["--allow-changes"] if allow_changes else [])]
    if cell.protocol == "scratch":
        args.append(f"encoder={encoder_paths[next(iter(encoder_paths))]}")
    else:
        args.append(f"encoder={encoder_paths[cell.encoder]}")
    print(f"[compare] {cell.name}", flush=True)
    result = subprocess.run([*launcher, *args], env={**os.environ, "VITMPP_NO_BAR": "1"})
    if result.returncode != 0 or not done.is_file():
        raise UserError(f"Cell {cell.name} failed (exit code {result.returncode}); its log is above, its folder is {folder}; "
                        "fix the cause and rerun the same command to continue.")
    return json.loads(done.read_text())


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


def write_csv(rows: list[dict], path: Path) -> None:
    columns = ["encoder", "protocol", "label_fraction", "seed", "best_top1", "best_top5", "last_top1", "last_top5",
               "epochs", "train_images", "wall_time_s"]
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
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(CompareConfig, args.config, args.overrides)
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
    rows = []
    for cell in cells(cfg):
        result = run_cell(cfg, cell, encoder_paths, out / "cells", allow_changes=args.overwrite)
        rows.append({**{k: result[k] for k in result if not isinstance(result[k], (dict, list))},
                     "encoder": cell.encoder, "protocol": cell.protocol, "label_fraction": cell.label_fraction,
                     "seed": cell.seed})
    write_csv(rows, out / "results.csv")
    summary, report = summarize(cfg, rows)
    atomic_write(out / "results.md", report)
    plot(cfg, summary, out / "results.png")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as writer:
        writer.add_text("compare/results", report, 0)
        for s in summary:
            writer.add_scalar(f"compare/{s['protocol']}/f{s['label_fraction']:g}/{s['encoder']}", s["mean"], 0)
    print(report)
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'results.png'}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
