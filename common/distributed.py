"""Process-group helpers shared by the engines: making the Accelerator, agreeing
on flags across ranks, and turning preemption signals into a clean stop."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Sequence

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_mixed_precision(requested: str) -> str:
    """`auto` is bf16 on a GPU that supports it and full precision on the CPU."""
    if requested != "auto":
        return requested
    if cuda_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(
    *,
    mixed_precision: str = "auto",
    project_dir: str | os.PathLike | None = None,
    log_with: str | None = "tensorboard",
    gradient_accumulation_steps: int = 1,
):
    """An Accelerator that works the same on GPUs and on CPU-only machines.

    - `cpu=True` when CUDA is absent: without it, `accelerate launch --num_processes 2`
      on a CPU machine starts two processes that each believe they are alone.
    - Our webdataset loaders split data by rank themselves; they are never passed to
      `prepare`, and dispatching/splitting batches is switched off for any loader that is.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    precision = default_mixed_precision(mixed_precision)
    if precision in ("bf16", "fp16") and not cuda_available():
        # bf16 autocast on CPU is correct but slower than fp32 on most CPUs, and
        # fp16 needs a GPU GradScaler: on CPU honour only an explicit bf16.
        precision = "bf16" if precision == "bf16" else "no"
    project = ProjectConfiguration(project_dir=str(project_dir) if project_dir else None)
    return Accelerator(
        cpu=not cuda_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with if project_dir else None,
        project_config=project,
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        step_scheduler_with_optimizer=False,
    )


def all_ranks_min(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum over ranks (a device collective, no host sync)."""
    if accelerator.num_processes == 1:
        return values
    values = values.clone()
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MIN)
    return values


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (preemption, SLURM's `--signal`) and SIGINT (Ctrl-C) instead of dying.

    The loop checks `requested` at step boundaries, agrees with the other ranks via
    `ControlPlane.any`, saves one checkpoint and exits: 0 after SIGTERM/SIGUSR1, 130 (what
    a shell reports for Ctrl-C) after SIGINT, so that a script around the run stops too.
    The first signal puts back the default action of all three, so a second one (Ctrl-C
    again) ends the process at once, even in the middle of a long step that runs no
    Python; only the steps since the last checkpoint are lost.
    """

    SIGNALS: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        for other in self._previous:
            signal.signal(other, signal.SIG_DFL)
        if signum == signal.SIGINT and int(os.environ.get("RANK", "0")) == 0:
            # os.write: print() could be the very call this handler interrupted
            os.write(2, b"\ninterrupted: stopping with a checkpoint after this step; "
                        b"press Ctrl-C again to stop at once and lose the steps since the last checkpoint\n")

    @property
    def interrupted(self) -> bool:
        """The run was asked to stop by Ctrl-C (SIGINT) rather than by a scheduler."""
        return self.signal_name == "SIGINT"

    def install(self) -> "StopSignal":
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@contextmanager
def no_interrupts_in_children():
    """Block SIGINT while processes are started here (DataLoader workers): they inherit the mask and
    never see Ctrl-C, which a terminal sends to the whole process group and torch's elastic agent
    to the rank's group. A worker that died of it would turn this process's clean stop into a
    crash. A Ctrl-C that arrives meanwhile is delivered here when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def dead_worker_error(rank: int, detail: str):
    """The one sentence for a DataLoader worker of `rank` that died; `detail` in torch's words
    ("DataLoader worker (pid N) exited unexpectedly with exit code 1", "... is killed by signal: Killed")."""
    from .errors import UserError

    # SIGKILL is what the kernel's OOM killer sends; any other death means the worker's own
    # code failed, and its traceback (printed by the worker) names the cause.
    cause = ("this is usually the kernel's out-of-memory killer: lower data.num_workers or the batch size"
             if "signal: Killed" in detail else
             "the worker's own output above names the cause; fix it")
    return UserError(f"A data-loading worker of rank {rank} died ({detail}); {cause}, then rerun with --resume auto.")


def worker_exit_detail(pid: int, exitcode: int) -> str:
    """A dead worker's exit status in torch's words (see `dead_worker_error`)."""
    if exitcode < 0:
        return f"DataLoader worker (pid {pid}) is killed by signal: {signal.strsignal(-exitcode)}"
    return f"DataLoader worker (pid {pid}) exited unexpectedly with exit code {exitcode}"


def explain_failure(error: BaseException, rank: int):
    """A one-sentence UserError for failures whose torch messages are long and cryptic.

    - a DataLoader worker killed (torch raises this from its SIGCHLD handler, at any
      point of the step, not only while fetching a batch);
    - the process group losing a peer (another rank died first: its own message says why).
    """
    from .errors import UserError

    text = str(error)
    # torch words a dead worker two ways: "... is killed by signal: Killed." from its SIGCHLD
    # handler, "... exited unexpectedly ..." when the batch queue finds the worker gone.
    if "DataLoader worker" in text and ("exited unexpectedly" in text or "killed by signal" in text):
        return dead_worker_error(rank, text.split(". ")[0])
    if "Connection closed by peer" in text or "Connection reset by peer" in text or "NCCL communicator was aborted" in text:
        return UserError(f"Rank {rank} lost contact with another process of this run, which failed first; "
                         "its message above names the cause.")
    return None


class ControlPlane:
    """A CPU (gloo) process group for per-step host-side agreement.

    Collectives on it never wait for the GPU stream, so asking every step whether
    any rank received a stop signal costs a few tens of microseconds and no GPU sync.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.group = None
        if accelerator.num_processes > 1:
            backend = torch.distributed.get_backend()
            self.group = None if backend == "gloo" else torch.distributed.new_group(backend="gloo")

    def any(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(tensor.item())

    def all_equal(self, value: int) -> bool:
        if self.accelerator.num_processes == 1:
            return True
        tensor = torch.tensor([value, -value], dtype=torch.int64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(tensor[0]) == -int(tensor[1])
