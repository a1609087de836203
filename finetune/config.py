"""The evaluation recipe: one dataclass tree, loaded from `configs/finetune/*.yaml`.

Protocols (ARCHITECTURE §5, "Evaluation"):
- `linear`: MAE's linear probe, frozen encoder, BatchNorm1d(affine=False) + linear head, LARS, no weight decay;
- `finetune`: full fine-tuning, MAE/DeiT recipe (AdamW, layer decay, drop path, mixup/cutmix, label smoothing,
  RandAugment, random erasing, average pooling);
- `scratch`: `finetune` from random initialisation (the baseline self-supervision must beat);
- `knn`: k-nearest neighbours on frozen features (no training).
- `fewshot`: the ViT paper's few-shot linear evaluation on frozen features (closed form, no training).

The defaults are the embedded default: a linear probe of the default pretraining run's
encoder (`runs/default-mpp`) on the digits data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vitmpp.common.config import param
from vitmpp.common.errors import ConfigError
from vitmpp.common.sections import (
    MAX_BATCH,
    MAX_IMAGE_SIDE,
    DebugConfig,
    LogConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from vitmpp.datasets.config import DataConfig

PROTOCOLS = ("linear", "finetune", "scratch", "knn", "fewshot")


@dataclass
class FinetuneDataConfig(DataConfig):
    val_split: str = param(
        "validation", help="the split every choice is made on (the best evaluation, best.safetensors)"
    )
    test_split: str | None = param(
        "test", help="the split results are reported on, never chosen on (null: none, results report validation only)"
    )
    label_fraction: float = param(1.0, gt=0, le=1, help="fraction of training labels used (class-balanced, by seed)")
    mean: tuple[float, float, float] | None = param(
        None, help="normalisation mean; null: the encoder's (encoder.json), else ImageNet's"
    )
    std: tuple[float, float, float] | None = param(None, help="normalisation std; null: the encoder's, else ImageNet's")
    auto_augment: str | None = param(
        "rand-m9-mstd0.5-inc1", help="timm auto-augment policy (finetune/scratch); null: none"
    )
    eval_crop_pct: float = param(
        0.875, gt=0, le=1, help="evaluation: resize to img_size / crop_pct, centre crop img_size"
    )


@dataclass
class RegularizationConfig:
    """Fine-tuning regularisation (DeiT / MAE recipe); ignored by linear and knn."""

    mixup: float = param(0.8, ge=0, help="mixup alpha (0: off)")
    cutmix: float = param(1.0, ge=0, help="cutmix alpha (0: off)")
    mixup_prob: float = param(1.0, ge=0, le=1)
    mixup_switch_prob: float = param(0.5, ge=0, le=1)
    label_smoothing: float = param(0.1, ge=0, lt=1)
    reprob: float = param(0.25, ge=0, le=1, help="random erasing probability (on the device)")


@dataclass
class HeadModelConfig:
    name: str | None = param(None, help="architecture for scratch when no encoder is given (a vitmpp encoder name)")
    img_size: int | None = param(
        None, ge=8, le=MAX_IMAGE_SIDE, help="input size; null: the encoder's (larger interpolates position embeddings)"
    )
    drop_path_rate: float = param(0.1, ge=0, lt=1, help="stochastic depth (finetune/scratch)")
    global_pool: str = param(
        "avg", choices=("token", "avg"), help="finetune/scratch pooling (MAE: avg); linear and knn use linear_pool"
    )
    linear_pool: str = param(
        "token", choices=("token", "avg"), help="features for linear and knn (MAE linear probe: the class token)"
    )


@dataclass
class KNNConfig:
    k: int = param(20, ge=1, le=MAX_BATCH, help="neighbours (Wu et al. 2018, DINO: 20)")
    temperature: float = param(0.07, gt=0, help="votes weighted by exp(similarity / temperature)")
    batch_size: int = param(256, ge=1, le=MAX_BATCH)


@dataclass
class FewShotConfig:
    """The ViT paper's few-shot linear evaluation (§4.1; evaluate/fewshot.py): least squares to ±1 targets."""

    shots: list[int] = param([5, 10], ge=1, le=MAX_BATCH, help="training images per class; the first is the headline")
    seeds: list[int] = param(
        [0, 1, 2], ge=0, le=2**32 - 1, help="seeds of the per-class draws (results: mean over them)"
    )
    batch_size: int = param(256, ge=1, le=MAX_BATCH, help="feature extraction batch")

    def check(self) -> None:
        if not self.shots or not self.seeds:
            raise ConfigError("Keys 'fewshot.shots' and 'fewshot.seeds' need at least one value each.")


@dataclass
class FinetuneConfig:
    protocol: str = param("linear", choices=PROTOCOLS)
    encoder: str | None = param(None, help="pretraining run folder or encoder.safetensors; null: runs/default-mpp")
    model: HeadModelConfig = field(default_factory=HeadModelConfig)
    # The embedded default (no arguments) is configs/finetune/linear_digits.yaml's linear probe:
    # digits-sized crops without flips, and a LARS lr chosen on validation at batch 64 (that file
    # says how); the ImageNet recipes in configs/finetune/ set these keys themselves.
    data: FinetuneDataConfig = field(default_factory=lambda: FinetuneDataConfig(crop_scale=(0.5, 1.0), hflip=0.0))
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            name="lars",
            base_lr=40.0,
            base_batch=256,
            weight_decay=0.0,
            warmup_epochs=2,
            momentum=0.9,
        )
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(global_batch=64, epochs=20))  # or train.steps
    eval_every: int = param(1, ge=1, help="epochs between evaluations (the end of training is always evaluated)")
    eval_every_steps: int | None = param(
        None, ge=1, help="evaluate every this many steps instead of every eval_every epochs"
    )
    # a checkpoint follows every evaluation; checkpoint_every adds more between evaluations
    log: LogConfig = field(default_factory=lambda: LogConfig(log_every=10, checkpoint_every=10**9, keep_checkpoints=1))
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def check(self) -> None:
        if self.protocol == "fewshot" and self.data.label_fraction != 1:
            raise ConfigError(
                "protocol=fewshot draws fewshot.shots images per class from the whole training split; "
                "leave data.label_fraction at 1."
            )
        if self.protocol in ("finetune", "scratch") and (
            self.regularization.mixup > 0 or self.regularization.cutmix > 0
        ):
            if self.train.per_device_batch is not None and self.train.per_device_batch % 2:
                raise ConfigError(
                    "Mixup/cutmix need an even 'train.per_device_batch'; "
                    "change it or set regularization.mixup=0 and cutmix=0."
                )


# Keys (prefixes) that may change when a run is resumed: they do not alter what is trained (logging,
# fault injection, the run's place and length, workers, where the shards live, abort thresholds, how
# often and in what batches the validation split is evaluated). Any other change needs --allow-changes.
RESUMABLE_KEYS = (
    "log.",
    "debug.",
    "run.",
    "train.steps",
    "train.epochs",
    "train.max_nonfinite_steps",
    "train.logical_ranks",
    "train.peak_tflops",
    "data.num_workers",
    "data.shards",
    "data.max_skip_fraction",
    "knn.batch_size",
    "fewshot.batch_size",
    "eval_every",
    "eval_every_steps",
)
