"""Run the real `pretrain/main.py` and record its throughput (a child process of the benchmarks).

    python -m vitmpp.benchmarks.run_pretrain --perf-out perf.jsonl [--synthetic IMG_SIZE] -- key=value ...
    accelerate launch -m vitmpp.benchmarks.run_pretrain --perf-out perf.jsonl --synthetic 32 -- key=value ...

Everything is the entry point's own code (config, Accelerate, objective, StepRunner,
logging, checkpoints) with two additions:

* every logging interval's scalars (`perf/images_per_sec`, `perf/data_wait_fraction`,
  `perf/mfu`, the loss) are appended to `--perf-out` by rank 0;
* `--synthetic IMG_SIZE` replaces the shard loader with one that yields a single pre-made
  uint8 batch of the same shape again and again (in memory, no workers): the same
  run without any data loading, the denominator of the end-to-end ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


class InMemoryLoader:
    """What the engine needs of a loader: `len`, iteration over `Batch`es, `skipped_samples`."""

    def __init__(self, batch_size: int, img_size: int, batches: int, seed: int):
        import torch

        from vitmpp.datasets import Batch

        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (batch_size,), generator=generator)
        self.batch = Batch(images, labels, torch.arange(batch_size), torch.zeros((), dtype=torch.int64))
        self.batches = batches
        self.skipped_samples = 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            yield self.batch


def install(perf_out: str, synthetic_img_size: int | None) -> None:
    """Patch the engine module: record interval scalars; optionally swap in the in-memory loader."""
    from vitmpp.common import training
    from vitmpp.pretrain import engine

    rank = int(os.environ.get("RANK", "0"))
    original_flush = training.IntervalLog.flush

    def flush(self, extra=None):
        scalars = original_flush(self, extra)
        if scalars is not None and rank == 0:
            with open(perf_out, "a") as f:
                f.write(json.dumps({k: float(v) for k, v in scalars.items()}) + "\n")
        return scalars

    training.IntervalLog.flush = flush
    if synthetic_img_size:
        def build_loader(shards, *, batch_size, batches_per_epoch, start_batch=0, seed=0, **_):
            return InMemoryLoader(batch_size, synthetic_img_size, batches_per_epoch - start_batch, seed)

        engine.build_loader = build_loader


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vitmpp.benchmarks.run_pretrain")
    parser.add_argument("--perf-out", required=True, help="JSON lines file for the interval scalars (rank 0)")
    parser.add_argument("--synthetic", type=int, metavar="IMG_SIZE",
                        help="in-memory batches of IMG_SIZE px (model.img_size) instead of the shard loader")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then pretrain/main.py's arguments")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    install(args.perf_out, args.synthetic)
    from vitmpp.pretrain.main import main as pretrain_main

    pretrain_main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
