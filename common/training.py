"""Training plumbing shared by the pretraining and fine-tuning engines.

The engines (`vitmpp.pretrain.engine`, `vitmpp.finetune.engine`) keep their loops
short and readable by calling these pieces:

- `OptimConfig`, `RunConfig`, `TrainConfig`, `LogConfig`: config sections both stages use;
- `batch_geometry`: per-device batch and accumulation from the global batch;
- `build_optimizer` / `build_scheduler`: timm's optimizers and warmup + cosine schedule;
- `NonFiniteGuard`: skips an optimizer step on every rank when the loss or gradient
  is not finite, without a host synchronisation;
- `ControlPlane`: agrees on stop requests (SIGTERM/SIGUSR1) across ranks without
  touching the GPU stream;
- `Checkpointer`: atomic Accelerate checkpoints with our trainer state;
- `Tracker`: TensorBoard scalars, images and text on the main process;
- `peak_flops`: the dense bf16 peak used for MFU.
"""
from __future__ import annotations

import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from . import checkpoint as ckpt
from .config import param
from .distributed import all_ranks_min
from .errors import ConfigError, UserError


# ----------------------------------------------------------------------------- config sections

@dataclass
class OptimConfig:
    __alternatives__ = (("lr", "base_lr"), ("warmup_steps", "warmup_epochs"))
    name: str = param("adamw", help="timm optimizer name (adam, adamw, lamb, lars, sgd, ...)")
    lr: Optional[float] = param(None, gt=0, help="absolute peak learning rate; when null, base_lr x global_batch / base_batch")
    base_lr: Optional[float] = param(1.5e-4, gt=0, help="peak learning rate at a global batch of base_batch (linear scaling rule)")
    base_batch: int = param(256, ge=1, help="global batch that base_lr refers to")
    min_lr: float = param(0.0, ge=0, help="learning rate at the end of the cosine decay")
    weight_decay: float = param(0.05, ge=0, help="decoupled weight decay (not applied to biases, norms, position embeddings, tokens)")
    betas: tuple[float, float] = param((0.9, 0.95), help="Adam betas")
    eps: float = param(1e-8, gt=0)
    momentum: float = param(0.9, ge=0, lt=1, help="momentum for sgd/lars")
    warmup_steps: Optional[int] = param(None, ge=0, help="linear warmup length in optimizer steps")
    warmup_epochs: Optional[float] = param(None, ge=0, help="linear warmup length in epochs (used when warmup_steps is null)")
    clip_grad: Optional[float] = param(None, gt=0, help="clip the global gradient norm to this value")
    layer_decay: Optional[float] = param(None, gt=0, le=1, help="layer-wise lr decay (fine-tuning)")

    def check(self) -> None:
        import timm.optim

        known = timm.optim.list_optimizers()
        if self.name.lower() not in known:
            import difflib

            hint = difflib.get_close_matches(self.name.lower(), known, n=1)
            tail = f"; did you mean '{hint[0]}'?" if hint else "; see timm.optim.list_optimizers()."
            raise ConfigError(f"Key 'optim.name' must be one of timm's optimizers, got '{self.name}'{tail}")
        if (self.lr is None) == (self.base_lr is None):
            raise ConfigError("Set exactly one of 'optim.lr' (absolute) and 'optim.base_lr' (scaled by the global batch).")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ConfigError("Keys 'optim.warmup_steps' and 'optim.warmup_epochs' are both set; set only one.")


@dataclass
class TrainConfig:
    __alternatives__ = (("steps", "epochs"),)
    global_batch: int = param(128, ge=1, help="images per optimizer step over all processes")
    per_device_batch: Optional[int] = param(None, ge=1, help="images per process per forward; accumulation makes up the rest (null: global_batch / processes)")
    steps: Optional[int] = param(None, ge=1, help="training length in optimizer steps (or give epochs)")
    epochs: Optional[float] = param(None, gt=0, help="training length in epochs of the training split")
    seed: int = param(0, ge=0)
    mixed_precision: str = param("auto", choices=("auto", "no", "bf16", "fp16"), help="auto: bf16 on GPU, fp32 on CPU")
    compile: bool = param(False, help="torch.compile the model")
    max_nonfinite_steps: int = param(5, ge=1, help="stop after this many consecutive steps with a non-finite loss or gradient")
    peak_tflops: Optional[float] = param(None, gt=0, help="device peak (dense bf16 TFLOP/s) for MFU; null: looked up from the GPU name")

    def check(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ConfigError("Set the training length with 'train.steps' or 'train.epochs'.")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("Keys 'train.steps' and 'train.epochs' are both set; set only one.")


@dataclass
class LogConfig:
    log_every: int = param(10, ge=1, help="steps between console lines, TensorBoard scalars and metrics.jsonl rows")
    image_every: int = param(200, ge=0, help="steps between visualisation images (0: never)")
    analysis_every: int = param(0, ge=0, help="steps between analysis figures: position-embedding similarity, embedding filters, attention rollout (0: never)")
    checkpoint_every: int = param(500, ge=1, help="steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = param(2, ge=1, help="how many recent checkpoints to keep")


@dataclass
class RunConfig:
    output_dir: str = param("runs", help="parent folder of run directories")
    name: Optional[str] = param(None, help="run directory name (default: the config file's stem)")


@dataclass
class DebugConfig:
    """Fault injection for the reliability tests; leave empty in real runs."""

    inject_nonfinite_steps: list[int] = param(default_factory=list, help="optimizer steps whose loss is made NaN")
    inject_nonfinite_rank: Optional[int] = param(None, ge=0, help="only on this rank (null: every rank)")
    checkpoint_delay_s: float = param(0.0, ge=0, help="sleep inside checkpoint saves (to test kills during a save)")
    step_delay_s: float = param(0.0, ge=0, help="sleep after every step (to give signal tests time)")
    stop_at_step: Optional[int] = param(None, ge=1, help="behave as if preempted after this step (checkpoint, exit 0)")
    record_samples: bool = param(False, help="write each rank's sample indices and final weight checksum to debug-rank<r>.json")
    checkpoint_disk_full_at_step: Optional[int] = param(None, ge=1, help="the checkpoint save of this step fails with ENOSPC")
    kill_worker_after_samples: Optional[int] = param(None, ge=0, help="data-loading workers exit hard after transforming this many samples")


# ----------------------------------------------------------------------------- batch geometry

@dataclass(frozen=True)
class BatchGeometry:
    global_batch: int
    per_device_batch: int
    accumulation: int
    processes: int


def batch_geometry(train: TrainConfig, processes: int) -> BatchGeometry:
    """global_batch = per_device_batch x processes x accumulation, or a one-sentence error."""
    per_device = train.per_device_batch
    if per_device is None:
        if train.global_batch % processes:
            raise UserError(
                f"train.global_batch={train.global_batch} is not divisible by the {processes} processes; "
                "choose a multiple or set train.per_device_batch."
            )
        per_device = train.global_batch // processes
    if train.global_batch % (per_device * processes):
        raise UserError(
            f"train.global_batch={train.global_batch} is not a multiple of train.per_device_batch={per_device} "
            f"x {processes} processes; change one of them."
        )
    return BatchGeometry(train.global_batch, per_device, train.global_batch // (per_device * processes), processes)


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
            where = f"the last good checkpoint {last_checkpoint} is intact" if last_checkpoint else "no checkpoint was written yet"
            raise UserError(
                f"The loss or gradient was not finite for {streak} consecutive steps (up to step {step}), "
                f"so training stopped; {where}; lower optim.lr or enable optim.clip_grad, then --resume auto."
            )
        return total


# ----------------------------------------------------------------------------- stop requests

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


# ----------------------------------------------------------------------------- checkpoints

class Checkpointer:
    """Save and restore Accelerate state plus our trainer state, atomically.

    Accelerate writes model, optimizer, scaler and every process's RNG state. We do
    not register extra objects with it: its custom-object loader unpickles with
    `weights_only=False`, which would let a tampered checkpoint run code. Our own
    state (step, data position, counters) is JSON; the LR schedule is a function of
    the step and needs no state.
    """

    def __init__(self, accelerator, run_dir: Path, keep_last: int, control: ControlPlane, delay_s: float = 0.0,
                 disk_full_at_step: int | None = None):
        from .rundir import checkpoints_dir

        self.accelerator = accelerator
        self.root = checkpoints_dir(run_dir)
        self.keep_last = keep_last
        self.control = control
        self.delay_s = delay_s
        self.disk_full_at_step = disk_full_at_step
        self.last: Path | None = ckpt.latest_checkpoint(self.root)

    def save(self, step: int, state: dict) -> Path:
        acc = self.accelerator
        final = self.root / ckpt.checkpoint_name(step)
        partial = ckpt.partial_dir(self.root, step)
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        acc.wait_for_everyone()
        error: OSError | None = None
        try:
            acc.save_state(str(partial), safe_serialization=True)
            if self.delay_s:
                time.sleep(self.delay_s)
            if step == self.disk_full_at_step:
                from .faults import disk_full

                raise disk_full(partial / ckpt.STATE_FILE)
            if acc.is_main_process:
                ckpt.write_json_atomic(partial / ckpt.STATE_FILE, state)  # last: marks the save complete
        except OSError as err:
            error = err
        if self.control.any(error is not None):
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            reason = f" ({error.strerror or error})" if error is not None else " (on another rank)"
            kept = f"the previous checkpoint {self.last} is intact" if self.last else "no earlier checkpoint exists"
            raise UserError(
                f"Could not write checkpoint {final}{reason}; {kept}; free disk space and rerun with --resume auto."
            )
        if acc.is_main_process:
            ckpt.finalize(partial, final)
            ckpt.prune(self.root, self.keep_last)
        acc.wait_for_everyone()
        self.last = final
        return final

    def load(self, path: Path) -> dict:
        """Restore a checkpoint written by a run with the same number of processes."""
        acc = self.accelerator
        state = ckpt.read_state(path)
        saved_world = int(state.get("world_size", acc.num_processes))
        if saved_world != acc.num_processes:
            raise UserError(
                f"Checkpoint {path} was written by {saved_world} processes but this run has {acc.num_processes}; "
                f"resume with --num_processes {saved_world} (a different count would change the data order and batch)."
            )
        try:
            acc.load_state(str(path))
        except Exception as err:  # noqa: BLE001 - name the checkpoint, never run what it holds
            import pickle

            if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err) or "Unsupported global" in str(err):
                raise UserError(
                    f"Checkpoint {path} holds pickled objects other than tensors and plain data; refusing to load it "
                    "(loading is weights-only). Resume from a checkpoint this program wrote."
                ) from None
            raise UserError(f"Checkpoint {path} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                            "resume from an earlier one.") from None
        self._verify_rng(path)
        self.last = Path(path)
        return state

    def _verify_rng(self, path: Path) -> None:
        # Accelerate only logs a failure to restore RNG states; a resumed run
        # would then silently draw different masks. Check and refuse instead.
        from accelerate.utils import load as safe_load

        rng_file = Path(path) / f"random_states_{self.accelerator.process_index}.pkl"
        try:
            saved = safe_load(rng_file)
            ok = torch.equal(saved["torch_manual_seed"], torch.get_rng_state())
            if ok and torch.cuda.is_available() and "torch_cuda_manual_seed" in saved:
                ok = all(torch.equal(a, b) for a, b in zip(saved["torch_cuda_manual_seed"], torch.cuda.get_rng_state_all()))
        except Exception as err:  # noqa: BLE001 - any failure means the RNG was not restored
            raise UserError(f"Could not restore the random state from {rng_file} ({type(err).__name__}); the checkpoint is damaged.") from None
        if not ok:
            raise UserError(f"The random state in {rng_file} was not restored; the checkpoint is damaged or from another setup.")


@contextmanager
def guarded_loop(rank: int, console):
    """Around a training loop: stop signals are remembered (not fatal), torch's cryptic
    failures (a dead loader worker, a lost peer) become one-sentence errors, and the
    progress bar is closed whatever happens. Yields the `StopSignal` to poll."""
    from .distributed import StopSignal, explain_failure

    stop = StopSignal().install()
    try:
        yield stop
    except RuntimeError as err:
        explained = explain_failure(err, rank)
        if explained is None:
            raise
        raise explained from None
    finally:
        stop.uninstall()
        console.close_bar()


# ----------------------------------------------------------------------------- TensorBoard

class Tracker:
    """TensorBoard through Accelerate's tracker, on the main process only.

    On resume, `purge_step` hides events an interrupted attempt wrote after the
    checkpoint, so TensorBoard never shows a step twice.
    """

    def __init__(self, accelerator, project: str, config_flat: dict | None, resume_step: int | None):
        self.accelerator = accelerator
        init_kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step is not None else {}
        accelerator.init_trackers(project, config=config_flat if resume_step is None else None, init_kwargs=init_kwargs)
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True) if accelerator.is_main_process else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """`image`: float [3, H, W] in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image.detach().float().clamp(0, 1).cpu(), global_step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.accelerator.end_training()


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


class StepRunner:
    """One optimizer step from `accumulation` micro-batches, the same in every engine.

    Gradients are all-reduced only on the last micro-batch (`no_sync` before it);
    the loss is divided by the accumulation so the gradient is the mean over the
    global batch; the gradient norm is always computed (and clipped when asked);
    finiteness is agreed across ranks before the step; the learning rate of the
    step is set from the step number alone. Nothing here synchronises the host.
    """

    def __init__(self, accelerator, model, optimizer, scheduler, guard: NonFiniteGuard,
                 accumulation: int, clip_grad: float | None):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.guard = guard
        self.accumulation = accumulation
        self.clip = clip_grad if clip_grad is not None else float("inf")

    def run(self, step: int, forward, micro_batches, poison: bool = False):
        """`forward(micro_batch) -> (loss, output)`; returns (step loss, grad norm, last output).

        `poison` makes the loss NaN (fault injection for tests).
        """
        from contextlib import nullcontext

        acc = self.accelerator
        step_loss = torch.zeros((), device=acc.device)
        output = None
        for micro, batch in enumerate(micro_batches):
            syncing = micro == self.accumulation - 1
            with nullcontext() if syncing else acc.no_sync(self.model):
                with acc.autocast():
                    loss, output = forward(batch)
                loss = loss / self.accumulation
                if poison:
                    loss = loss * float("nan")
                acc.backward(loss)
            step_loss += loss.detach().float()
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.clip)
        if grad_norm is None:  # some backends return nothing; compute it the plain way
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        finite = self.guard.agree(step_loss, grad_norm)  # the same decision on every rank
        self.scheduler.step_update(step)  # the lr of this step is a function of the step alone
        self.guard.step(self.optimizer, finite)
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm.detach().float(), output


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


def config_fingerprint(cfg: Any) -> str:
    import hashlib
    import json

    from .config import to_dict

    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]
