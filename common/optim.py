"""Optimisation: batch geometry, the schedule's length, timm's optimizers and LR schedule,
and the guard that skips non-finite steps.

    global batch = per-device batch x processes x accumulation
                 = per-device batch x logical ranks x accumulation   (train.logical_ranks, docs/distributed.md)
    steps per epoch = training samples // global batch; the LR is a function of the step alone
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .distributed import all_ranks_min
from .errors import UserError
from .sections import OptimConfig, TrainConfig

# ----------------------------------------------------------------------------- batch geometry


@dataclass(frozen=True)
class BatchGeometry:
    global_batch: int
    per_device_batch: int  # images per forward, of one logical rank
    accumulation: int  # forwards per optimizer step, of one logical rank
    processes: int
    logical_ranks: int = 0  # the run's data streams and random states (0: one per process)

    @property
    def ranks(self) -> int:
        return self.logical_ranks or self.processes

    @property
    def hosted(self) -> int:
        """Logical ranks per process: forwards per micro-step (1 when every process is its logical rank)."""
        return self.ranks // self.processes


def batch_geometry(train: TrainConfig, processes: int, logical_ranks: int | None = None) -> BatchGeometry:
    """global_batch = per_device_batch x logical ranks x accumulation, or a one-sentence error.

    Every logical rank reads per_device_batch images per forward; a process hosting k of them
    runs k forwards per micro-step. Without logical ranks (or as many as processes) this is
    global_batch = per_device_batch x processes x accumulation."""
    ranks = logical_ranks or processes
    if ranks % processes:
        raise UserError(
            f"train.logical_ranks={ranks} cannot be shared evenly by {processes} processes; "
            f"set it to a multiple of {processes}, or null for one per process."
        )
    what = f"{processes} processes" if ranks == processes else f"{ranks} logical ranks (train.logical_ranks)"
    per_device = train.per_device_batch
    if per_device is None:
        if train.global_batch % ranks:
            raise UserError(
                f"train.global_batch={train.global_batch} is not divisible by the {what}; "
                "choose a multiple or set train.per_device_batch."
            )
        per_device = train.global_batch // ranks
    if train.global_batch % (per_device * ranks):
        raise UserError(
            f"train.global_batch={train.global_batch} is not a multiple of train.per_device_batch={per_device} "
            f"x {what}; change one of them."
        )
    return BatchGeometry(train.global_batch, per_device, train.global_batch // (per_device * ranks), processes, ranks)


@dataclass(frozen=True)
class Schedule:
    """How long a run is, in optimizer steps, from the training samples and the global batch."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float

    @property
    def epochs(self) -> int:
        """Epochs started (the last one may be partial)."""
        return -(-self.total_steps // self.steps_per_epoch)


def make_schedule(train: TrainConfig, optim: OptimConfig, num_samples: int, global_batch: int) -> Schedule:
    """`train.steps`, or `train.epochs` of `num_samples`; a one-sentence error when one batch does not fit."""
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch < 1:
        raise UserError(
            f"The training data has {num_samples} samples, fewer than one global batch of {global_batch}; "
            "lower train.global_batch or add data."
        )
    total = train.steps if train.steps is not None else max(1, round(train.epochs * steps_per_epoch))
    return Schedule(steps_per_epoch, total, warmup_steps(optim, steps_per_epoch), peak_lr(optim, global_batch))


def peak_lr(optim: OptimConfig, global_batch: int) -> float:
    """The peak learning rate: given, or scaled linearly from base_lr (MAE, Goyal et al.)."""
    return optim.lr if optim.lr is not None else optim.base_lr * global_batch / optim.base_batch


def warmup_steps(optim: OptimConfig, steps_per_epoch: int) -> int:
    if optim.warmup_steps is not None:
        return optim.warmup_steps
    if optim.warmup_epochs is not None:
        return int(round(optim.warmup_epochs * steps_per_epoch))
    return 0


# ----------------------------------------------------------------------------- optimizer and schedule

_FUSED_CAPABLE = {"adam", "adamw"}


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory; weight decay skips biases, norms and `model.no_weight_decay()`.

    Adam/AdamW use the fused kernels: they are the fastest on GPU and take a device
    `found_inf` flag, which lets `NonFiniteGuard` skip a step without a host sync.
    """
    from timm.optim import create_optimizer_v2

    name = optim.name.lower()
    kwargs: dict[str, Any] = {}
    if name in ("adam", "adamw", "nadamw", "lamb", "adamp", "lambw"):
        kwargs["betas"] = tuple(optim.betas)
        kwargs["eps"] = optim.eps
    if name in ("sgd", "momentum", "lars", "nesterov"):
        kwargs["momentum"] = optim.momentum
    if name in _FUSED_CAPABLE:
        kwargs["fused"] = True
    return create_optimizer_v2(
        model,
        opt=name,
        lr=lr,
        weight_decay=optim.weight_decay,
        layer_decay=optim.layer_decay,
        filter_bias_and_bn=True,
        **kwargs,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int, warmup: int):
    """Linear warmup from 0, then a half-cycle cosine to min_lr, per optimizer step.

    `step_update(step)` sets the learning rate of that step: it is a pure function of
    the global step, so a resumed run (or a changed step count) needs no scheduler
    state. timm's scheduler honours each param group's `lr_scale` (layer decay).
    """
    from timm.scheduler import CosineLRScheduler

    warmup = min(warmup, max(total_steps - 1, 0))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup, 1),
        lr_min=optim.min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the group with the largest scale (the head, under layer decay)."""
    return max(group["lr"] for group in optimizer.param_groups)


# ----------------------------------------------------------------------------- non-finite steps


class NonFiniteGuard:
    """Skip an optimizer step on all ranks when the loss or gradient norm is not finite.

    Finiteness is agreed with one all-reduce (MIN) of a device flag, so every rank
    takes the same path. Fused Adam/AdamW read `found_inf` on the device and skip
    the update (the step counter included) without the host ever looking; other
    optimizers fall back to a host check. Counters stay on the device and are read
    at logging intervals (`read`).
    """

    def __init__(self, accelerator, optimizer, max_consecutive: int):
        self.accelerator = accelerator
        self.inner = getattr(optimizer, "optimizer", optimizer)  # unwrap AcceleratedOptimizer
        self.device_skip = bool(self.inner.defaults.get("fused")) and accelerator.scaler is None
        self.max_consecutive = max_consecutive
        device = accelerator.device
        self.streak = torch.zeros((), device=device)
        self.total = torch.zeros((), device=device)
        self.host_total = 0

    def agree(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Device flag 1.0 when the step may be applied on every rank, else 0.0."""
        finite = torch.isfinite(loss.detach().float()) & torch.isfinite(grad_norm.detach().float())
        finite = all_ranks_min(self.accelerator, finite.float().reshape(1)).reshape(())
        self.streak = (self.streak + 1.0) * (1.0 - finite)
        self.total = self.total + (1.0 - finite)
        return finite

    def step(self, optimizer, finite: torch.Tensor) -> None:
        """Apply the optimizer step unless `finite` is 0 (skipped everywhere)."""
        if self.device_skip:
            self.inner.found_inf = 1.0 - finite
            optimizer.step()
            del self.inner.found_inf
        elif bool(finite.item()):  # host sync: only for optimizers without a found_inf path
            optimizer.step()

    def read(self) -> tuple[int, int]:
        """(total skipped steps, current streak) — a host sync: call at log intervals."""
        values = torch.stack([self.total, self.streak]).tolist()
        return int(values[0]), int(values[1])

    def raise_if_exceeded(self, step: int, last_checkpoint: Path | None) -> int:
        total, streak = self.read()
        if streak >= self.max_consecutive:
            where = (
                f"the last good checkpoint {last_checkpoint} is intact"
                if last_checkpoint
                else "no checkpoint was written yet"
            )
            raise UserError(
                f"The loss or gradient was not finite for {streak} consecutive steps (up to step {step}), "
                f"so training stopped; {where}; lower optim.lr or enable optim.clip_grad, then --resume auto."
            )
        return total
