"""Fault injection for the reliability tests, driven by a config's `debug` section.

`fault_callbacks(cfg.debug)` turns each `debug.*` key that is set into a loop
`Callback`: the loop, the checkpointer and the loader carry no fault parameters;
faults enter through the same public hooks benchmarks use. Each reproduces what a
long run meets in practice: a preemption, a data-loading worker killed, a kill in
the middle of a checkpoint save, a non-finite loss on one rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from .callbacks import Callback


def fault_callbacks(debug) -> list[Callback]:
    """The callbacks that `debug` (a `DebugConfig`) asks for; none in a normal run."""
    callbacks: list[Callback] = []
    if debug.inject_nonfinite_steps:
        callbacks.append(NonFiniteLoss(debug.inject_nonfinite_steps, debug.inject_nonfinite_rank))
    if debug.stop_at_step is not None:
        callbacks.append(StopAtStep(debug.stop_at_step))
    if debug.step_delay_s:
        callbacks.append(SlowSteps(debug.step_delay_s))
    if debug.checkpoint_delay_s:
        callbacks.append(SlowCheckpoints(debug.checkpoint_delay_s))
    if debug.kill_worker_after_samples is not None:
        callbacks.append(KillWorker(debug.kill_worker_after_samples))
    if debug.record_samples:
        callbacks.append(RecordSamples())
    return callbacks


class NonFiniteLoss(Callback):
    """The loss of the given optimizer steps becomes NaN (on one rank, or every rank)."""

    def __init__(self, steps, rank: int | None):
        self.steps, self.rank = set(steps), rank

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step + 1 in self.steps and self.rank in (None, _rank()):
            return loss * float("nan")
        return loss


class StopAtStep(Callback):
    """Behave as if preempted after this step: checkpoint, say so, exit 0."""

    def __init__(self, step: int):
        self.step = step

    def stop_reason(self, step: int) -> str | None:
        return "debug.stop_at_step" if step == self.step else None


class SlowSteps(Callback):
    """Sleep after every step, so that signal tests can hit a run mid-flight."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def after_step(self, step: int) -> None:
        time.sleep(self.seconds)


class SlowCheckpoints(Callback):
    """A slow save, so that a test can kill the run in the middle of one. (A full disk is tested
    with a real small filesystem: tests/reliability/test_disk_and_checkpoints.py.)"""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def before_checkpoint_commit(self, partial: Path, step: int) -> None:
        time.sleep(self.delay_s)


class KillWorker(Callback):
    """Data-loading workers exit hard after transforming this many samples each."""

    def __init__(self, samples: int):
        self.samples = samples

    def on_loader_spec(self, spec):
        return dataclasses.replace(spec, transform=ExitAfterCalls(spec.transform, self.samples))


class RecordSamples(Callback):
    """Writes `debug-rank<r>.json`: the sample indices this rank read (`samples`, in order), the same per
    optimizer step and logical rank (`steps`: {step: {logical rank: indices in order}}, docs/distributed.md)
    and a checksum of its final weights."""

    def __init__(self):
        self.seen: list[int] = []
        self.pending: dict[int, list[int]] = {}
        self.steps: dict[str, dict[str, list[int]]] = {}

    def on_loader(self, loader, spec, epoch: int, start_batch: int):
        return RecordedLoader(loader, getattr(spec, "rank", 0), self.pending)

    def on_batch(self, batch) -> None:
        self.seen.extend(batch.indices.tolist())

    def after_step(self, step: int) -> None:
        self.steps[str(step)] = {str(rank): indices for rank, indices in sorted(self.pending.items())}
        self.pending.clear()

    def on_end(self, run, model, step: int) -> None:
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        record = {
            "rank": run.rank,
            "world_size": run.world,
            "logical_ranks": list(getattr(run, "hosted", [run.rank])),
            "samples": self.seen,
            "steps": self.steps,
            "weights_checksum": checksum,
        }
        (run.run_dir / f"debug-rank{run.rank}.json").write_text(json.dumps(record))


class RecordedLoader:
    """A loader whose batches' indices are noted under the logical rank `rank` as the loop takes them."""

    def __init__(self, loader, rank: int, pending: dict[int, list[int]]):
        self.loader, self.rank, self.pending = loader, rank, pending

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.pending.setdefault(self.rank, []).extend(batch.indices.tolist())
            yield batch

    def __getattr__(self, name):  # skipped_samples, retries, ...: the loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class ExitAfterCalls:
    """Wraps a per-sample transform; the worker process calling it exits hard after `calls` calls.

    `os._exit` skips every handler, as the kernel's OOM killer does."""

    def __init__(self, transform, calls: int):
        self.transform = transform
        self.calls = calls
        self.count = 0

    def __call__(self, image):
        self.count += 1
        if self.count > self.calls and os.environ.get("VITMPP_FAULT_IN_WORKER_ONLY", "1") == "1":
            from torch.utils.data import get_worker_info

            if get_worker_info() is not None:
                os._exit(1)
        return self.transform(image)

    def __getattr__(self, name):
        # the loader reads attributes such as `decode_min_side` from the transform
        if name == "transform":
            raise AttributeError(name)
        return getattr(self.transform, name)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
