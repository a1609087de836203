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

class Tracker:
    """TensorBoard through Accelerate's tracker, on the main process only.

    On resume, `purge_step` hides events an interrupted attempt wrote after the
    checkpoint, so TensorBoard never shows a step twice. A write the disk refuses
    stops the run with one sentence naming the events folder (TensorBoard's writer
    thread fails first and its error surfaces at our next call; the thread's own
    traceback is not printed, the sentence says it all).
    """

    ADVICE = "the checkpoints written so far are intact; free disk space and continue with --resume auto"

    def __init__(self, accelerator, project: str, config_flat: dict | None, resume_step: int | None):
        self.accelerator = accelerator
        self.where = Path(accelerator.logging_dir or ".") / project
        init_kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step is not None else {}
        with self._writing():
            accelerator.init_trackers(project, config=config_flat if resume_step is None else None, init_kwargs=init_kwargs)
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True) if accelerator.is_main_process else None
        _quiet_writer_threads()

    def _writing(self):
        return reported_writes(f"TensorBoard events in {self.where}", self.ADVICE, self.where)

    def scalars(self, values: dict[str, float], step: int) -> None:
        with self._writing():
            self.accelerator.log(values, step=step)

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
    TensorBoard scalars for the last step, and one console line.
    """

    def __init__(self, accelerator, tracker: "Tracker", console, guard: NonFiniteGuard, *,
                 metrics=None, total_steps: int, steps_per_epoch: int, flops_per_image: float | None = None,
                 peak: float | None = None, nonfinite_before: int = 0):
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
            "train/loss": loss, "train/grad_norm": norm, "train/lr": lr, "train/epoch": step / self.steps_per_epoch,
            "perf/images_per_sec": images_per_sec, "perf/data_wait_fraction": wait_fraction,
            "train/nonfinite_steps": nonfinite, **(extra or {}),
        }
        if self.flops and self.peak:
            scalars["perf/mfu"] = self.flops * images_per_sec / world / self.peak
        self.tracker.scalars({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)
        if self.metrics is not None:
            self.metrics.append([
                {"step": s, "loss": _finite_or_none(l), "grad_norm": _finite_or_none(n), "lr": r}
                for (s, _, _, r), (l, n) in zip(self.pending, values)
            ])
        mfu = f" | mfu {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else ""
        skipped = f" | skipped samples {int(scalars['data/skipped_samples'])}" if "data/skipped_samples" in scalars else ""
        self.console.print(
            f"step {step:>7d}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3g} | grad norm {norm:.3g} | "
            f"{images_per_sec:,.0f} img/s | data wait {wait_fraction:.0%}{mfu}{skipped} | nonfinite steps {nonfinite}"
        )
        self.console.update_bar(0, loss=f"{loss:.4f}", img_s=f"{images_per_sec:,.0f}")
        self.pending = []
        self.meter.reset()
        return scalars


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
