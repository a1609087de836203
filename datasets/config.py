"""The data config: what a stage reads and how it augments it for training (the data layer owns it).

A stage's data section (`PretrainDataConfig`, `FinetuneDataConfig`) extends `DataConfig`; a stage
turns it into its training loaders once, through `factory.LoaderFactory.for_run`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from vitmpp.common.config import param
from vitmpp.common.errors import ConfigError
from vitmpp.common.sections import MAX_BATCH, MAX_WORKERS

from .factory import LOADER_KINDS


@dataclass
class DataConfig:
    """What to read and how to augment it for training; the fields every stage shares."""

    shards: str | None = param(
        None,
        help="folder with _info.json, or a shard pattern; null: the embedded digits (written to the cache once)",
    )
    train_split: str = param("train")
    num_workers: int = param(2, ge=0, le=MAX_WORKERS, help="data-loading worker processes per training process")
    shuffle_buffer: int = param(
        1000, ge=1, le=MAX_BATCH, help="samples (held in memory, as a batch's are) in each worker's shuffle buffer"
    )
    crop_scale: tuple[float, float] = param((0.2, 1.0), help="RandomResizedCrop area range for training (MAE: 0.2-1.0)")
    hflip: float = param(0.5, ge=0, le=1, help="horizontal flip probability for training")
    interpolation: str = param("bicubic", choices=("bicubic", "bilinear", "nearest"))
    augment_on: str = param(
        "cpu",
        choices=("cpu", "device"),
        help="where the training crop + flip run: cpu (the loader workers) or device (docs/benchmarks.md)",
    )
    decode: str = param(
        "cpu",
        choices=("cpu", "gpu"),
        help="where training JPEGs are decoded: cpu (the loader workers) or gpu (nvJPEG; docs/benchmarks.md)",
    )
    views_per_image: int = param(
        1,
        ge=1,
        le=MAX_BATCH,
        help="training views (samples of the global batch) per decoded image (docs/benchmarks.md)",
    )
    max_skip_fraction: float = param(
        0.1, ge=0, le=1, help="abort when more than this fraction of samples fail to decode"
    )
    loader: str = param(
        "shards",
        help="the training loader, a registered kind (datasets/factory.py): shards, or dali (docs/dali.md)",
    )

    def check(self) -> None:
        if self.loader not in LOADER_KINDS:
            close = difflib.get_close_matches(self.loader, LOADER_KINDS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"Key 'data.loader' is '{self.loader}', not a registered loader kind; {hint}choose one of "
                f"{', '.join(LOADER_KINDS)} (datasets/factory.py registers more)."
            )
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(
                f"Key 'data.crop_scale' must be two numbers 0 < lo <= hi <= 1, got {list(self.crop_scale)}."
            )
        if self.decode == "gpu" and self.augment_on != "device":
            raise ConfigError(
                f"Key 'data.decode' is 'gpu', which needs data.augment_on=device (the crop and flip of "
                f"images decoded on the GPU run there), but data.augment_on is '{self.augment_on}'; "
                "set data.augment_on=device or data.decode=cpu."
            )
        if self.loader == "dali":
            if self.augment_on != "cpu" or self.decode != "cpu":
                raise ConfigError(
                    f"Key 'data.loader' is 'dali', which decodes, crops and flips in DALI's own GPU "
                    f"pipeline, but data.augment_on is '{self.augment_on}' and data.decode is "
                    f"'{self.decode}'; set both to cpu (their defaults) or data.loader=shards."
                )
            if self.views_per_image != 1:
                raise ConfigError(
                    f"Key 'data.loader' is 'dali', which makes one crop per decoded image, but "
                    f"data.views_per_image is {self.views_per_image}; set data.views_per_image=1 "
                    "or data.loader=shards."
                )
            if getattr(self, "label_fraction", 1.0) < 1:  # the fine-tuning stages' class-balanced subset
                raise ConfigError(
                    f"Key 'data.loader' is 'dali', which reads whole shards, but data.label_fraction "
                    f"is {self.label_fraction} (a subset of the samples); set data.label_fraction=1 "
                    "or data.loader=shards."
                )
        std = getattr(self, "std", None)  # each stage adds its mean/std (fixed, or null: the encoder's)
        if std is not None and any(s <= 0 for s in std):
            raise ConfigError(f"Key 'data.std' must be positive, got {list(std)}.")
