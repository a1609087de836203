"""python -m vitmpp.benchmarks [--device cpu|cuda] [--quick] [--out PATH] [--rows a,b,...]

Prints the results table and writes it as JSON (default `benchmarks/results-<device>.json`,
`results-<device>-quick.json` with --quick so a smoke run never replaces measured numbers).
Rows, in order (`--rows` picks some): objectives (step throughput, FLOPs, MFU on GPU), peer
(transformers ViTMAE), attention (fused vs unfused), memory, loader, end_to_end, scaling.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from vitmpp.common.errors import UserError, cli_entry
from vitmpp.common.io import atomic_write

if TYPE_CHECKING:
    from .harness import Row

ROWS = ("objectives", "peer", "attention", "memory", "loader", "end_to_end", "scaling")


def row_functions():
    from .loader import loader_rows
    from .memory import memory_rows
    from .objectives import attention_rows, objective_rows
    from .peer import peer_rows
    from .pretrain_runs import end_to_end_rows, scaling_rows

    return {
        "objectives": objective_rows,
        "peer": peer_rows,
        "attention": attention_rows,
        "memory": memory_rows,
        "loader": loader_rows,
        "end_to_end": end_to_end_rows,
        "scaling": scaling_rows,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m vitmpp.benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, every row once: a smoke test (numbers mean nothing)"
    )
    parser.add_argument("--out", help="JSON results file (default benchmarks/results-<device>[-quick].json)")
    parser.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument(
        "--threads", type=int, help="torch threads for the model rows (default: all cores; 1 with --quick)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="dense bf16 peak for MFU (default: looked up from the GPU name)"
    )
    parser.add_argument(
        "--scratch", help="folder for generated images, shards and runs (default: a temporary one, removed)"
    )
    return parser.parse_args(argv)


def format_value(row: Row) -> str:
    if row.value is None:
        return "n/a"
    v = row.value
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{text} {row.unit}"


def print_table(rows: list[Row], stream=sys.stdout) -> None:
    width = max([len(f"{r.section}: {r.name}") for r in rows] + [10])
    for row in rows:
        label = f"{row.section}: {row.name}"
        print(f"{label:<{width}}  {format_value(row):>18}  {row.note}", file=stream)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from .harness import Row, Settings, device_name, set_threads  # after --help: they import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but PyTorch sees no CUDA device; run with --device cpu.")
    wanted = ROWS if not args.rows else tuple(r.strip() for r in args.rows.split(",") if r.strip())
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        raise UserError(f"--rows names unknown row '{unknown[0]}'; choose from {', '.join(ROWS)}.")
    own_scratch = args.scratch is None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="vitmpp-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    settings = Settings.for_run(
        args.device, args.quick, str(scratch), threads=args.threads, peak_tflops=args.peak_tflops
    )
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).resolve().parent / (f"results-{args.device}{'-quick' if args.quick else ''}.json")
    )
    functions = row_functions()
    rows: list[Row] = []
    failures: list[str] = []
    started = time.time()
    header = (
        f"vitmpp benchmarks on {device_name(args.device)}; torch {torch.__version__}; "
        f"{'quick smoke run (tiny sizes, numbers mean nothing)' if args.quick else 'full run'}; "
        f"{settings.threads} torch threads for the model rows"
    )
    print(header, flush=True)

    def write(final: bool) -> None:
        # after every group of rows, so a run stopped by a time limit still leaves what it measured
        record = {
            "device": args.device,
            "device_name": device_name(args.device),
            "quick": args.quick,
            "torch": torch.__version__,
            "threads": settings.threads,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "settings": {k: v for k, v in vars(settings).items() if k != "scratch"},
            "complete": final,
            "seconds": round(time.time() - started, 1),
            "failed_rows": failures,
            "rows": [r.as_dict() for r in rows],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, json.dumps(record, indent=1, default=str))

    try:
        for name in wanted:
            t0 = time.time()
            set_threads(settings.threads)
            try:
                new = functions[name](settings)
            except Exception as err:  # noqa: BLE001 - one broken row must not hide the others
                traceback.print_exc()
                failures.append(name)
                new = [
                    Row(
                        name,
                        "FAILED",
                        None,
                        "",
                        f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                    )
                ]
            for row in new:
                row.extra["row_seconds"] = round(time.time() - t0, 1)
            print_table(new)
            sys.stdout.flush()
            rows += new
            write(final=False)
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n== results ({time.time() - started:.0f} s) ==")
    print_table(rows)
    write(final=True)
    print(f"written: {out}")
    if failures:
        print(f"error: rows failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
