"""What a run reports: TensorBoard (scalars, images, text), the per-interval summary line
with throughput and MFU, and the device peaks MFU is measured against.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import torch

from .io import reported_writes, write_failure
from .optim import NonFiniteGuard

# ----------------------------------------------------------------------------- TensorBoard

# Scalar tags. TensorBoard's SCALARS dashboard groups tags by what comes before the first
# "/", sorts groups and charts by name and opens the first two groups. So what a stage
# learns goes under the stage's own namespace (`pretrain/loss`, `pretrain/lr`, `linear/top1`:
# a probe's loss of ~70 and lr of ~10 never share an axis with pretraining's ~2 and 1e-3,
# and the loss is each group's first chart), and how the run runs (throughput, data, health)
# goes under `system/<stage>/...`, a group that sorts after every stage's. A stage may file a few
# scalars under a group of their own (`Tracker.scalars(..., group=)`): pretraining's online
# evaluation is `eval/fewshot_5shot`, `eval/knn_top1`, `eval/loss`, a group that sorts, and opens, first.
#
# TensorBoard opens on TIME SERIES, which sorts every tag (scalars and images together, by name,
# numbers in names compared as numbers), groups them by the first component and expands the first
# two groups only (tensorboard 2.21's webfiles: `slice(0,2)` over the sorted groups). Pictures
# therefore go under `<stage>_<kind>/...` (`pretrain_batch/mpp`, `pretrain_encoder/...`): those
# groups sort right after the stage's own and before `system`, so the two groups a user sees
# expanded are the curves (`eval` and `pretrain`, or `pretrain` and `system`), never the pictures.
SYSTEM_GROUP = "system"
SYSTEM_SCALARS = frozenset(
    {
        "grad_norm",
        "epoch",
        "images_per_sec",
        "data_wait_fraction",
        "mfu",
        "skipped_samples",
        "retries",
        "nonfinite_steps",
    }
)


def picture_tag(namespace: str, kind: str, name: str) -> str:
    """The TensorBoard tag of a picture of a stage: `pretrain_batch/mpp`, `pretrain_encoder/attention_distance`."""
    return f"{namespace}_{kind}/{name}"


def scalar_tag(namespace: str, name: str) -> str:
    """The TensorBoard tag of scalar `name` of a stage whose namespace is `namespace`:
    `pretrain/loss`, `linear/top1`; `system/pretrain/images_per_sec` for the SYSTEM_SCALARS."""
    return f"{SYSTEM_GROUP}/{namespace}/{name}" if name in SYSTEM_SCALARS else f"{namespace}/{name}"


class Tracker:
    """TensorBoard through Accelerate's tracker, on the main process only.

    Scalars are given by name (`loss`, `images_per_sec`) and written under the stage's
    tags (`scalar_tag`). The config goes into the run's own event file as the HPARAMS
    tab's session (not through `add_hparams`, which makes a timestamp-named sub-run).
    On resume, `purge_step` hides events an interrupted attempt wrote after the
    checkpoint, so TensorBoard never shows a step twice. A write the disk refuses
    stops the run with one sentence naming the events folder (TensorBoard's writer
    thread fails first and its error surfaces at our next call; the thread's own
    traceback is not printed, the sentence says it all).
    """

    ADVICE = "the checkpoints written so far are intact; free disk space and continue with --resume auto"

    def __init__(
        self, accelerator, project: str, config_flat: dict | None, resume_step: int | None, namespace: str = "train"
    ):
        self.accelerator = accelerator
        self.namespace = namespace
        self.where = Path(accelerator.logging_dir or ".") / project
        init_kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step is not None else {}
        with self._writing():
            accelerator.init_trackers(project, init_kwargs=init_kwargs)
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True) if accelerator.is_main_process else None
        _quiet_writer_threads()
        if config_flat and resume_step is None:
            self.hparams(config_flat)

    def _writing(self):
        return reported_writes(f"TensorBoard events in {self.where}", self.ADVICE, self.where)

    def tag(self, name: str) -> str:
        return scalar_tag(self.namespace, name)

    def picture_tag(self, kind: str, name: str) -> str:
        return picture_tag(self.namespace, kind, name)

    def hparams(self, config_flat: dict) -> None:
        """The config as the HPARAMS tab's session of this run, in the run's own event file.

        Only the session's start is written, no experiment summary: TensorBoard then
        builds the table's columns from every run's session (pretraining and evaluation
        runs have different keys) and its metric columns from the runs' scalars."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        _, session_start, _ = hparams({key: _hparam_value(value) for key, value in config_flat.items()}, {})
        with self._writing():
            self.writer.file_writer.add_summary(session_start)

    def scalars(self, values: dict[str, float], step: int, group: str | None = None) -> dict[str, float]:
        """Write `values` (by name: `loss`, `top1`, `images_per_sec`, ...) under this stage's tags, or as
        `<group>/<name>` when a `group` is given (a run's online evaluation: `eval/knn_top1`); returns them by tag."""
        tagged = {(f"{group}/{name}" if group else self.tag(name)): value for name, value in values.items()}
        with self._writing():
            self.accelerator.log(tagged, step=step)
        return tagged

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """`image`: float [3, H, W] in [0, 1]."""
        if self.writer is not None:
            with self._writing():
                self.writer.add_image(tag, image.detach().float().clamp(0, 1).cpu(), global_step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.flush()

    def close(self) -> None:
        with self._writing():
            self.accelerator.end_training()


def _hparam_value(value):
    """A config value as the HPARAMS tab takes it: numbers, strings and booleans as they are, anything else as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _quiet_writer_threads() -> None:
    """Keep TensorBoard's writer thread from printing a traceback for a refused write: it re-raises
    the error at the next call on the main thread, where it becomes one sentence."""
    previous = threading.excepthook
    if getattr(previous, "vitmpp_quiet", False):
        return

    def hook(args) -> None:
        if not (type(args.thread).__module__.startswith("tensorboard") and write_failure(args.exc_value) is not None):
            previous(args)

    hook.vitmpp_quiet = True
    threading.excepthook = hook


# ----------------------------------------------------------------------------- MFU

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity).
_PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "V100": 125.0,
}


def peak_flops(override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s (None on CPU or an unknown GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class IntervalLog:
    """Collects per-step values on the device; one host sync per logging interval.

    `flush` averages the losses over ranks, writes one `metrics.jsonl` row per step,
    TensorBoard scalars for the last step (under the tracker's stage tags), and one
    console line.
    """

    def __init__(
        self,
        accelerator,
        tracker: Tracker,
        console,
        guard: NonFiniteGuard,
        *,
        metrics=None,
        total_steps: int,
        steps_per_epoch: int,
        flops_per_image: float | None = None,
        peak: float | None = None,
        nonfinite_before: int = 0,
    ):
        self.accelerator = accelerator
        self.tracker = tracker
        self.console = console
        self.guard = guard
        self.metrics = metrics
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.flops = flops_per_image
        self.peak = peak
        self.nonfinite_before = nonfinite_before
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        self.meter = Throughput()
        self.last_checkpoint: Path | None = None

    def timed(self, batches, count: int):
        """The next `count` batches, counting the time spent waiting for them as data wait."""
        for _ in range(count):
            waited = time.perf_counter()
            batch = next(batches)
            self.meter.data_wait += time.perf_counter() - waited
            yield batch

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, images: int) -> None:
        self.pending.append((step, loss, grad_norm, lr))
        self.meter.images += images

    def nonfinite_steps(self) -> int:
        return self.guard.read()[0] + self.nonfinite_before

    def flush(self, extra: dict[str, float] | None = None) -> dict[str, float] | None:
        """`extra`: more scalars of the interval by name (the loop's `skipped_samples`). Returns the
        scalars as TensorBoard got them, by tag (None when nothing was pending)."""
        if not self.pending:
            return None
        acc, world = self.accelerator, self.accelerator.num_processes
        stacked = torch.stack([torch.stack([loss, norm]) for _, loss, norm, _ in self.pending])
        values = (acc.reduce(stacked, reduction="mean") if world > 1 else stacked).tolist()
        nonfinite = self.guard.raise_if_exceeded(self.pending[-1][0], self.last_checkpoint) + self.nonfinite_before
        images_per_sec, wait_fraction = self.meter.interval()
        images_per_sec *= world  # every rank reads its own share: global throughput
        step, (loss, norm), lr = self.pending[-1][0], values[-1], self.pending[-1][3]
        scalars = {
            "loss": loss,
            "grad_norm": norm,
            "lr": lr,
            "epoch": step / self.steps_per_epoch,
            "images_per_sec": images_per_sec,
            "data_wait_fraction": wait_fraction,
            "nonfinite_steps": nonfinite,
            **(extra or {}),
        }
        if self.flops and self.peak:
            scalars["mfu"] = self.flops * images_per_sec / world / self.peak
        written = self.tracker.scalars({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)
        if self.metrics is not None:
            self.metrics.append(
                [
                    {"step": s, "loss": _finite_or_none(loss), "grad_norm": _finite_or_none(norm), "lr": r}
                    for (s, _, _, r), (loss, norm) in zip(self.pending, values)
                ]
            )
        mfu = f" | mfu {scalars['mfu']:.1%}" if "mfu" in scalars else ""
        skipped = f" | skipped samples {int(scalars['skipped_samples'])}" if "skipped_samples" in scalars else ""
        self.console.print(
            f"step {step:>7d}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3g} | grad norm {norm:.3g} | "
            f"{images_per_sec:,.0f} img/s | data wait {wait_fraction:.0%}{mfu}{skipped} | nonfinite steps {nonfinite}"
        )
        self.console.update_bar(0, loss=f"{loss:.4f}", img_s=f"{images_per_sec:,.0f}")
        self.pending = []
        self.meter.reset()
        return written


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Throughput:
    """Images/s and the fraction of wall time spent waiting for data, per interval."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.images = 0

    def interval(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.images / elapsed, min(self.data_wait / elapsed, 1.0)
