"""Compare encoders across evaluation protocols, label fractions and seeds, in one command.

    python -m vitmpp.experiments.compare --config configs/compare/digits.yaml [key=value ...] [--overwrite] [--jobs N]

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

The command is this file; its grid, its runner and its report are `grid.py`, `runner.py` and
`report.py` beside it.

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
import signal
import sys
from pathlib import Path

from vitmpp.common.config import load_config, save_config, to_dict
from vitmpp.common.errors import UserError, cli_entry
from vitmpp.common.rundir import check_location, lock_run_folder

from .grid import (
    CompareConfig,
    cell_encoder,
    cells,
    check_cells,
    encoder_runs,
    matched_scratch_steps,
    only_grown,
    random_encoder,
    resolve_pretraining,
    resolve_recipes,
)
from .report import write_report
from .runner import Stopped, on_stop_signal, pretrain_encoders, run_cells, stopped_by


@cli_entry
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m vitmpp.experiments.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/compare/*.yaml")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="allow a different config in an output folder that holds results (interrupted cells continue under it)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells run at once, each with cores/jobs threads and its output in <output_dir>/logs/ "
        "(default 1: one after another, output here)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}.")
    for signum in (signal.SIGTERM, signal.SIGUSR1):  # preemption, as for pretraining: stop, keep, exit 0
        signal.signal(signum, on_stop_signal)
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
            print(
                f"[compare] only the grid changed ({', '.join(changed)}: cells added or reordered); the finished cells "
                "are kept",
                flush=True,
            )
        elif changed:
            raise UserError(
                f"Output folder '{out}' holds a comparison with a different config (keys {', '.join(changed)}); "
                "choose another output_dir or pass --overwrite."
            )
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)

    runs = encoder_runs(cfg, out)
    grid = cells(cfg, runs)
    # before any pretraining or cell runs (the encoder folders need not exist yet to check a config)
    check_cells(cfg, grid, runs, out / "cells", recipes, None)
    try:
        if cfg.pretraining.recipes:
            pretrain_encoders(cfg, out, resolve_pretraining(cfg, args.config), jobs=args.jobs)
        encoder_paths = {
            name: [str(random_encoder(runs, out))] if paths == ["random"] else [cell_encoder(p) for p in paths]
            for name, paths in runs.items()
        }
        matched_steps = None
        if cfg.compute_matched_scratch:
            matched_steps, pretrained = matched_scratch_steps(cfg, recipes["scratch"], encoder_paths)
            print(
                f"[compare] compute-matched scratch: {matched_steps} steps (its recipe's own plus {pretrained:,} "
                "pretraining images)",
                flush=True,
            )
        results = run_cells(
            cfg,
            grid,
            encoder_paths,
            out,
            jobs=args.jobs,
            allow_changes=args.overwrite,
            recipes=recipes,
            matched_steps=matched_steps,
        )
    except Stopped:
        finished = sum((out / "cells" / cell.name / "results.json").is_file() for cell in grid)
        print(
            f"[compare] stopped by {stopped_by()}: {finished} of {len(grid)} cells finished and are kept in "
            f"{out / 'cells'}; run the same command again to continue (finished cells are not run again)",
            file=sys.stderr,
            flush=True,
        )
        return out
    report = write_report(cfg, grid, results, runs, encoder_paths, out)
    print(report)
    print(
        f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'results.png'}, {out / 'history.csv'}, "
        f"{out / 'curves.png'}"
    )
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
