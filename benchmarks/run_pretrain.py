"""Run the real pretraining stage and record its throughput (a child process of the benchmarks).

    python -m vitmpp.benchmarks.run_pretrain --perf-out perf.jsonl [--synthetic IMG_SIZE] -- key=value ...
    accelerate launch -m vitmpp.benchmarks.run_pretrain --perf-out perf.jsonl --synthetic 32 -- key=value ...

The arguments after `--` are pretrain/main.py's (`[--config FILE] [key=value ...] [--resume
auto|PATH]`), and the run is the stage's own code (config, Accelerate, objective, the loop,
logging, checkpoints) through `vitmpp.pretrain.engine.pretrain`, with one loop callback
(`PerfRecorder`, public hooks of `vitmpp.common.loop.Callback`) adding:

* every logging interval's scalars, by TensorBoard tag (`system/pretrain/images_per_sec`,
  `system/pretrain/data_wait_fraction`, `system/pretrain/mfu`, `pretrain/loss`, ...),
  appended to `--perf-out` as JSON lines by rank 0 (`on_log`);
* with `--synthetic IMG_SIZE`, each epoch's shard loader replaced by one that yields a
  single pre-made uint8 batch of the same shape again and again (in memory, no workers;
  `on_loader`): the same run without any data loading, the denominator of the end-to-end
  ratio.
"""

from __future__ import annotations

import argparse
import json
import sys

from vitmpp.common.errors import cli_entry
from vitmpp.common.loop import Callback


class InMemoryLoader:
    """A `vitmpp.datasets.Loader` of one pre-made batch: `len`, iteration over `Batch`es, `skipped_samples`."""

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


class PerfRecorder(Callback):
    """Records the interval scalars (rank 0) and, for `synthetic_img_size`, swaps in the in-memory loader."""

    def __init__(self, perf_out: str, synthetic_img_size: int | None = None):
        self.perf_out = perf_out
        self.synthetic_img_size = synthetic_img_size
        self.rank = 0

    def on_loader_spec(self, spec):
        self.rank = spec.rank  # called before the first step, so before any interval is logged
        return spec

    def on_loader(self, loader, spec, epoch: int, start_batch: int):
        if not self.synthetic_img_size:
            return loader
        return InMemoryLoader(spec.batch_size, self.synthetic_img_size, spec.batches_per_epoch - start_batch, spec.seed)

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        if self.rank == 0:
            with open(self.perf_out, "a") as f:
                f.write(json.dumps({k: float(v) for k, v in scalars.items()}) + "\n")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vitmpp.benchmarks.run_pretrain")
    parser.add_argument("--perf-out", required=True, help="JSON lines file for the interval scalars (rank 0)")
    parser.add_argument(
        "--synthetic",
        type=int,
        metavar="IMG_SIZE",
        help="in-memory batches of IMG_SIZE px (model.img_size) instead of the shard loader",
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then pretrain/main.py's arguments")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest

    from vitmpp.common.cli import parse_stage_command
    from vitmpp.pretrain.config import PretrainConfig
    from vitmpp.pretrain.engine import pretrain, run_dir_for

    cfg, stage_args = parse_stage_command(PretrainConfig, rest, prog="python -m vitmpp.benchmarks.run_pretrain --")
    pretrain(
        cfg,
        run_dir_for(cfg, stage_args.config),
        resume=stage_args.resume,
        callbacks=[PerfRecorder(args.perf_out, args.synthetic)],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
