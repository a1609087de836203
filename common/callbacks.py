"""The loop's public hooks (`Callback`): what fault injection (`vitmpp.common.faults`), benchmark
instrumentation and a user's own observers override; the loop (`vitmpp.common.loop`) calls them.
A file of its own so that the callbacks the loop builds (`fault_callbacks`) need not import the loop."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class Callback:
    """Public hooks into the loop; every default does nothing. Override what you need."""

    def on_loader_spec(self, spec):
        """The training loader's spec before each epoch's loader is opened; return it (or a changed copy)."""
        return spec

    def on_loader(self, loader, spec, epoch: int, start_batch: int):
        """Each epoch's loader; return it, or a stand-in that keeps the `vitmpp.datasets.Loader` contract."""
        return loader

    def on_batch(self, batch) -> None:
        """Each micro-batch as it leaves the loader (before it moves to the device)."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Each micro-batch's loss before backward, for optimizer step `step + 1`; return it (or another)."""
        return loss

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (1-based) and its logging."""

    def stop_reason(self, step: int) -> str | None:
        """A reason to stop cleanly after step `step` (checkpoint, exit 0), or None."""
        return None

    def before_checkpoint_commit(self, partial: Path, step: int) -> None:
        """Inside a checkpoint save: the state is written to `partial`, not yet marked complete."""

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        """The scalars of each logging interval, as written to TensorBoard."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Around each phase of the loop: `step` (forward, backward, optimizer), `log` (the interval's host
        sync), `stage` (Stage.after_step), `checkpoint`, `finish`; a stage may add its own (`pictures`)."""
        yield

    def on_end(self, run, model: torch.nn.Module, step: int) -> None:
        """After the stage finished (not after a stop request); `run`: the loop's `Run`."""
