"""Config sections every training stage shares (the loop reads them).

A stage's schema (`PretrainConfig`, `FinetuneConfig`) is a dataclass made of these
sections plus its own; the stage sets its defaults through the section factories,
so `--help-config` and a no-argument run show the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import param
from .errors import ConfigError

# Upper bounds of sizes and lengths: far above any recipe, below what overflows a library's arithmetic or
# asks for memory no machine has (each is what the value would cost, not a guess at taste).
SEED_MAX = 2**32 - 1  # numpy's seeds (np.random.seed, which accelerate's set_seed calls) are 32-bit
MAX_BATCH = 2**20  # images per step: 16x the largest published batch (65,536); each one is held in memory
MAX_STEPS = 10**9  # optimizer steps: ~1,000x the longest recipe (MAE's 1,600 ImageNet epochs: ~500k)
MAX_EPOCHS = 10**6  # epochs (x steps per epoch must stay a number the schedule can round)
# learning rates and weight decay: LARS' peaks reach ~2,560 (40 x 16,384 / 256); optimizers hold them in float32
MAX_LR = 1e4
MAX_WORKERS = 1024  # loader processes per training process: more exhausts any process table
MAX_SAMPLES = 10**9  # images an evaluation samples: ~700x ImageNet's training split
# sides of an image or patch in pixels: 4x the largest ViT inputs (SAM's 1024); a side's square of position
# embeddings (and its square of attention) is what a larger one asks memory for
MAX_IMAGE_SIDE = 4096
MAX_DELAY_S = 86_400.0  # fault-injection sleeps: a day; time.sleep overflows near 2**63 ns


@dataclass
class OptimConfig:
    __alternatives__ = (("lr", "base_lr"), ("warmup_steps", "warmup_epochs"))
    name: str = param("adamw", help="timm optimizer name (adam, adamw, lamb, lars, sgd, ...)")
    lr: float | None = param(
        None, gt=0, le=MAX_LR, help="absolute peak learning rate; when null, base_lr x global_batch / base_batch"
    )
    base_lr: float | None = param(
        1.5e-4, gt=0, le=MAX_LR, help="peak learning rate at a global batch of base_batch (linear scaling rule)"
    )
    base_batch: int = param(256, ge=1, le=MAX_BATCH, help="global batch that base_lr refers to")
    min_lr: float = param(0.0, ge=0, le=MAX_LR, help="learning rate at the end of the cosine decay")
    weight_decay: float = param(
        0.05, ge=0, le=MAX_LR, help="decoupled weight decay (not applied to biases, norms, position embeddings, tokens)"
    )
    betas: tuple[float, float] = param((0.9, 0.95), ge=0, lt=1, help="Adam betas (each in [0, 1), as torch requires)")
    eps: float = param(1e-8, gt=0, le=1, help="Adam's stabiliser of the update's denominator (recipes: 1e-8 to 1e-6)")
    momentum: float = param(0.9, ge=0, lt=1, help="momentum for sgd/lars")
    warmup_steps: int | None = param(None, ge=0, le=MAX_STEPS, help="linear warmup length in optimizer steps")
    warmup_epochs: float | None = param(
        None, ge=0, le=MAX_EPOCHS, help="linear warmup length in epochs (used when warmup_steps is null)"
    )
    clip_grad: float | None = param(None, gt=0, help="clip the global gradient norm to this value")
    layer_decay: float | None = param(None, gt=0, le=1, help="layer-wise lr decay (fine-tuning)")

    def check(self) -> None:
        import timm.optim

        known = timm.optim.list_optimizers()
        if self.name.lower() not in known:
            import difflib

            hint = difflib.get_close_matches(self.name.lower(), known, n=1)
            tail = f"; did you mean '{hint[0]}'?" if hint else "; see timm.optim.list_optimizers()."
            raise ConfigError(f"Key 'optim.name' must be one of timm's optimizers, got '{self.name}'{tail}")
        if (self.lr is None) == (self.base_lr is None):
            raise ConfigError(
                "Set exactly one of 'optim.lr' (absolute) and 'optim.base_lr' (scaled by the global batch)."
            )
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ConfigError("Keys 'optim.warmup_steps' and 'optim.warmup_epochs' are both set; set only one.")


@dataclass
class TrainConfig:
    __alternatives__ = (("steps", "epochs"),)
    global_batch: int = param(128, ge=1, le=MAX_BATCH, help="images per optimizer step over all processes")
    per_device_batch: int | None = param(
        None,
        ge=1,
        le=MAX_BATCH,
        help="images per process per forward; accumulation makes up the rest (null: global_batch / processes)",
    )
    steps: int | None = param(None, ge=1, le=MAX_STEPS, help="training length in optimizer steps (or give epochs)")
    epochs: float | None = param(None, gt=0, le=MAX_EPOCHS, help="training length in epochs of the training split")
    seed: int = param(0, ge=0, le=SEED_MAX, help="seeds every random generator (numpy's limit: 32 bits)")
    mixed_precision: str = param("auto", choices=("auto", "no", "bf16", "fp16"), help="auto: bf16 on GPU, fp32 on CPU")
    compile: bool = param(False, help="torch.compile the model")
    max_nonfinite_steps: int = param(
        5, ge=1, le=MAX_STEPS, help="stop after this many consecutive steps with a non-finite loss or gradient"
    )
    peak_tflops: float | None = param(
        None, gt=0, help="device peak (dense bf16 TFLOP/s) for MFU; null: looked up from the GPU name"
    )
    logical_ranks: int | None = param(
        None,
        ge=1,
        le=MAX_BATCH,
        help="data streams and random states of the run, fixed for its life (null: its first process count; "
        "docs/distributed.md)",
    )

    def check(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ConfigError("Set the training length with 'train.steps' or 'train.epochs'.")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("Keys 'train.steps' and 'train.epochs' are both set; set only one.")


@dataclass
class LogConfig:
    log_every: int = param(10, ge=1, help="steps between console lines, TensorBoard scalars and metrics.jsonl rows")
    checkpoint_every: int = param(500, ge=1, help="steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = param(2, ge=1, help="how many recent checkpoints to keep")


@dataclass
class RunConfig:
    output_dir: str = param("runs", help="parent folder of run directories")
    name: str | None = param(None, help="run directory name (default: the config file's stem)")


@dataclass
class DebugConfig:
    """Fault injection for the reliability tests; leave empty in real runs.

    Read by `vitmpp.common.faults.fault_callbacks`, which turns each key into a loop
    callback: the loop and its parts carry no fault parameters of their own."""

    inject_nonfinite_steps: list[int] = param(default_factory=list, help="optimizer steps whose loss is made NaN")
    inject_nonfinite_rank: int | None = param(None, ge=0, help="only on this rank (null: every rank)")
    checkpoint_delay_s: float = param(
        0.0, ge=0, le=MAX_DELAY_S, help="sleep inside checkpoint saves (to test kills during a save)"
    )
    step_delay_s: float = param(0.0, ge=0, le=MAX_DELAY_S, help="sleep after every step (to give signal tests time)")
    stop_at_step: int | None = param(None, ge=1, help="behave as if preempted after this step (checkpoint, exit 0)")
    record_samples: bool = param(
        False, help="write each rank's sample indices and final weight checksum to debug-rank<r>.json"
    )
    kill_worker_after_samples: int | None = param(
        None, ge=0, help="data-loading workers exit hard after transforming this many samples"
    )
