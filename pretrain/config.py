"""The pretraining recipe: one dataclass tree, loaded from `configs/pretrain/*.yaml`.

The defaults are the embedded default run: the ViT paper's masked patch prediction
on scikit-learn's digits with a tiny ViT, small enough for a 2-core CPU.

The objective's options are a section named after it (`mpp:`, `mae:`, ...), found
through the objective registry: only the chosen objective's section exists, so a
key no code reads cannot be set.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitmpp.common.config import from_dict, param
from vitmpp.common.errors import ConfigError
from vitmpp.common.sections import MAX_BATCH, MAX_SAMPLES, DebugConfig, LogConfig, OptimConfig, RunConfig, TrainConfig
from vitmpp.datasets.config import DataConfig
from vitmpp.models import EncoderConfig
from vitmpp.models.objective import objective_class, objective_names, objective_summary


@dataclass
class PretrainDataConfig(DataConfig):
    mean: tuple[float, float, float] = param(IMAGENET_DEFAULT_MEAN, help="normalisation mean (applied on the device)")
    std: tuple[float, float, float] = param(IMAGENET_DEFAULT_STD, help="normalisation std (applied on the device)")


@dataclass
class PretrainLogConfig(LogConfig):
    image_every: int = param(200, ge=0, help="steps between the objective's pictures in TensorBoard (0: never)")
    analysis_every: int = param(
        0,
        ge=0,
        help="steps between the analysis figures in TensorBoard "
        "(encoder/...): mean attention distance, position-embedding similarity, "
        "embedding filters, attention rollout (0: never)",
    )


@dataclass
class PretrainEvalConfig:
    """Online evaluation while pretraining runs (`eval/...` in TensorBoard and metrics.jsonl)."""

    every: int = param(
        0,
        ge=0,
        help="steps between online evaluations (0: never): kNN, few-shot and the validation loss, logged as "
        "eval/... with their cost (docs/training.md)",
    )
    knn_images: int = param(
        2000,
        ge=1,
        le=MAX_SAMPLES,
        help="training images in the kNN memory bank (a seeded random sample, the "
        "same at every evaluation; all when the split is smaller), and the cap on "
        "the validation images kNN classifies (likewise sampled)",
    )
    pool: str = param(
        "token",
        choices=("token", "avg"),
        help="kNN features: the class token (as protocol=knn and "
        "the linear probe by default) or the mean of the patch tokens",
    )
    k: int = param(20, ge=1, le=MAX_BATCH, help="kNN neighbours (Wu et al. 2018, DINO: 20), as protocol=knn")
    temperature: float = param(0.07, gt=0, help="kNN votes weighted by exp(cosine similarity / temperature)")
    fewshot_shots: list[int] = param(
        default_factory=lambda: [5],
        ge=1,
        le=MAX_BATCH,
        help="few-shot linear accuracy (ViT paper §4.1) on the kNN features for each "
        "shot count, as eval/fewshot_<k>shot ([]: none; docs/training.md)",
    )
    loss_images: int = param(
        0,
        ge=0,
        le=MAX_SAMPLES,
        help="validation images of eval/loss (a seeded random sample; 0: all); its "
        "masks are drawn from a fixed seed, the same at every evaluation",
    )


def _objective_help() -> str:
    names = "; ".join(f"{name}: {objective_summary(name)}" for name in objective_names())
    return f"pretraining objective ({names}); its options are the section of that name (--help-config objective=NAME)"


@dataclass
class PretrainConfig:
    objective: str = param("mpp", help=_objective_help())
    # The embedded default: 8 px patches and milder crops without flips, as in
    # configs/pretrain/mpp_digits.yaml (its comments say why).
    model: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="vit_nano_patch8_32", img_size=32))
    data: PretrainDataConfig = field(default_factory=lambda: PretrainDataConfig(crop_scale=(0.5, 1.0), hflip=0.0))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            name="adamw",
            base_lr=None,
            lr=1e-3,
            weight_decay=0.05,
            betas=(0.9, 0.95),
            warmup_steps=20,
        )
    )
    # 500 steps: long enough that the demo's kNN curve passes the initial encoder's after its dip
    # (the measured curve is in docs/training.md).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(global_batch=128, steps=500))
    log: PretrainLogConfig = field(
        default_factory=lambda: PretrainLogConfig(image_every=250, analysis_every=250, checkpoint_every=100)
    )
    # Every 100 steps on the whole bank and all validation images (its measured cost: docs/training.md).
    eval: PretrainEvalConfig = field(
        default_factory=lambda: PretrainEvalConfig(every=100, knn_images=2000, loss_images=0)
    )
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @classmethod
    def resolve_schema(cls, data: Mapping) -> type:
        """This schema plus a section for the chosen objective (its config class, the demo's options)."""
        name = data.get("objective", cls.objective)
        if name not in objective_names():
            # the registry is asked at load time, so an objective registered after this import is known
            hint = difflib.get_close_matches(str(name), objective_names(), n=1, cutoff=0.5)
            tail = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"Key 'objective' must be one of {', '.join(objective_names())}; got {name!r}{tail}.")
        for other in objective_names():
            if other != name and other in data:
                raise ConfigError(
                    f"Section '{other}' holds options of objective '{other}', but the objective is "
                    f"'{name}'; set objective={other} or remove the '{other}' section."
                )
        return _with_objective_section(name)

    def objective_config(self) -> Any:
        """The chosen objective's options: its config object, validated when the config was loaded."""
        return getattr(self, self.objective)


@cache
def _with_objective_section(name: str) -> type:
    objective = objective_class(name)
    section = objective.config_class

    def embedded() -> Any:
        return from_dict(section, objective.embedded_options, source=f"the embedded options of objective '{name}'")

    return dataclasses.make_dataclass(
        f"PretrainConfig[{name}]", [(name, section, field(default_factory=embedded))], bases=(PretrainConfig,)
    )


# Keys (prefixes) that may change when a run is resumed: they do not alter what is computed (logging,
# online evaluation (it draws from its own random state), fault injection, the run's place and length,
# workers, where the shards live, abort thresholds).
# Any other change needs --resume ... --allow-changes (see vitmpp.common.rundir).
RESUMABLE_KEYS = (
    "log.",
    "eval.",
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
)
