"""The comparison's report (`vitmpp.experiments.compare`): results.csv (one row per cell), results.md
(mean ± std over pretraining runs x seeds, and the share of the scratch -> supervised gap each
self-supervised encoder closes), results.png (grouped bars), history.csv and curves.png (every
evaluation of every cell), and the table in TensorBoard.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from vitmpp.common.io import atomic_write

from .grid import MATCHED, SCRATCH, Cell, CompareConfig, encoders_for, metric_split, pretraining_images

HISTORY_COLUMNS = [
    "encoder",
    "pretrain_run",
    "protocol",
    "label_fraction",
    "seed",
    "step",
    "epoch",
    "images_seen",
    "val_top1",
    "val_top5",
]


def label(encoder: str) -> str:
    return {SCRATCH: "(random init)", MATCHED: "(random init, compute-matched)"}.get(encoder, encoder)


def history_rows(grid: list[Cell], results: list[dict]) -> list[dict]:
    """Every evaluation of every cell, on validation (the split curves may be looked at while choosing);
    images seen = epochs x the cell's training images."""
    rows = []
    for cell, result in zip(grid, results):
        for point in result.get("history") or []:
            rows.append(
                {
                    "encoder": cell.encoder,
                    "pretrain_run": cell.tag,
                    "protocol": cell.protocol,
                    "label_fraction": cell.label_fraction,
                    "seed": cell.seed,
                    "step": point.get("step"),
                    "epoch": point.get("epoch"),
                    "images_seen": round(float(point.get("epoch") or 0) * int(result.get("train_images") or 0)),
                    "val_top1": point.get("top1"),
                    "val_top5": point.get("top5"),
                }
            )
    return rows


def plot_curves(cfg: CompareConfig, rows: list[dict], path: Path) -> None:
    """Validation top-1 against images seen, one panel per (protocol, label fraction), a line per
    encoder (mean over seeds at each evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(
        {(r["protocol"], r["label_fraction"]) for r in rows},
        key=lambda g: (cfg.protocols.index(g[0]) if g[0] in cfg.protocols else 99, g[1]),
    )
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1) + 1.8, 3.6), squeeze=False)
    for ax, (protocol, fraction) in zip(axes[0], panels):
        points: dict[str, dict[int, list[tuple[float, float]]]] = {}
        for r in rows:
            if (r["protocol"], r["label_fraction"]) == (protocol, fraction):
                points.setdefault(r["encoder"], {}).setdefault(int(r["step"]), []).append(
                    (r["images_seen"], r["val_top1"])
                )
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
        summary.append(
            {
                "encoder": encoder,
                "protocol": protocol,
                "label_fraction": fraction,
                "mean": statistics.fmean(values),
                "std": std,
                "cells": len(values),
                "pretrain_runs": len({m["pretrain_run"] for m in members}),
                "pretrain_images": max(m["pretrain_images"] for m in members),
                "images_seen": max(m["images_seen"] for m in members),
            }
        )
    fractions = sorted({s["label_fraction"] for s in summary})
    many = max((len(paths) for paths in runs.values()), default=1)
    over = (
        f"{many} pretraining runs x seeds {', '.join(map(str, cfg.seeds))}"
        if many > 1
        else f"seeds {', '.join(map(str, cfg.seeds))}"
    )
    split = metric_split(cfg.metric)
    lines = [
        f"# Comparison ({cfg.metric.replace('_', ' ')} on the {split} split, %, mean ± std over {over})",
        "",
        (
            "Choices (best evaluation, recipes) are made on the validation split; the test split only reports. "
            if split == "test"
            else "A validation table: choose a recipe here, then report it on test (a test_* metric); these numbers "
            "are not results. "
        )
        + "Training images: pretraining + this protocol (steps x global batch; k-NN trains nothing).",
        "",
    ]
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
        lines += [
            "",
            "## Share of the scratch → supervised gap closed by fine-tuning",
            "",
            f"The share is left out (—) where scratch is within {MIN_GAP_POINTS:g} points of supervised: "
            "there it divides noise by noise.",
            "",
            "| encoder | " + " | ".join(labels_title(f) for f in fractions) + " |",
            "|" + "---|" * (1 + len(fractions)),
        ]
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

    groups = sorted(
        {(s["protocol"], s["label_fraction"]) for s in summary}, key=lambda g: (cfg.protocols.index(g[0]), g[1])
    )
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


RESULT_COLUMNS = [
    "encoder",
    "pretrain_run",
    "protocol",
    "label_fraction",
    "seed",
    "test_last_top1",
    "test_last_top5",
    "test_selected_top1",
    "test_selected_top5",
    "selected_step",
    "val_last_top1",
    "val_best_top1",
    "epochs",
    "train_images",
    "images_seen",
    "pretrain_images",
    "total_images",
    "wall_time_s",
    "encoder_path",
]


def write_csv(rows: list[dict], path: Path, columns: list[str] = RESULT_COLUMNS) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def write_report(
    cfg: CompareConfig,
    grid: list[Cell],
    results: list[dict],
    runs: dict[str, list[str]],
    encoder_paths: dict[str, list[str]],
    out: Path,
) -> str:
    """Write every file of the report into `out` from the cells' results (in the order of `grid`);
    returns the markdown table."""
    pretrained_on = {
        (name, i): (0 if name == "random" else pretraining_images(path))
        for name, paths in encoder_paths.items()
        for i, path in enumerate(paths)
    }
    rows = []
    for cell, result in zip(grid, results):
        pretrain_images = pretrained_on.get((cell.encoder, cell.run), 0)
        rows.append(
            {
                **{k: result[k] for k in result if not isinstance(result[k], (dict, list))},
                "encoder": cell.encoder,
                "pretrain_run": cell.tag,
                "protocol": cell.protocol,
                "label_fraction": cell.label_fraction,
                "seed": cell.seed,
                "encoder_path": encoder_paths[cell.encoder][cell.run] if cell.encoder in encoder_paths else "",
                "pretrain_images": pretrain_images,
                "total_images": pretrain_images + int(result.get("images_seen") or 0),
            }
        )
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
    return report
