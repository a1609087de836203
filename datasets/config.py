"""The data config: what a stage reads and how it augments it for training (the data layer owns it).

A stage's data section (`PretrainDataConfig`, `FinetuneDataConfig`) extends `DataConfig`; a stage
turns it into its training loaders once, through `factory.LoaderFactory.for_run`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

from vitmpp.common.config import param
from vitmpp.common.errors import ConfigError
from vitmpp.common.sections import MAX_BATCH, MAX_WORKERS

from .factory import LOADER_KINDS


@dataclass
class DataConfig:
    """What to read and how to augment it for training; the fields every stage shares."""

    shards: Optional[str] = param(None, help="folder with _info.json, or a shard pattern; null: the embedded digits data (written to the cache on first use)")
    train_split: str = param("train")
    num_workers: int = param(2, ge=0, le=MAX_WORKERS, help="data-loading worker processes per training process")
    shuffle_buffer: int = param(1000, ge=1, le=MAX_BATCH, help="samples (held in memory, as a batch's are) in each worker's shuffle buffer")
    crop_scale: tuple[float, float] = param((0.2, 1.0), help="RandomResizedCrop area range for training (MAE: 0.2-1.0)")
    hflip: float = param(0.5, ge=0, le=1, help="horizontal flip probability for training")
    interpolation: str = param("bicubic", choices=("bicubic", "bilinear", "nearest"))
    augment_on: str = param("cpu", choices=("cpu", "device"), help="where the training crop + flip run: cpu (each loader worker, PIL, data.interpolation) or device (workers only decode and draw the same boxes; one batched area-averaging bilinear crop + flip on the training device, datasets/device_augment.py); device needs MAE's RandomResizedCrop + flip transform (pretraining, linear probing)")
    decode: str = param("cpu", choices=("cpu", "gpu"), help="where training JPEGs are decoded: cpu (the loader workers) or gpu (needs augment_on=device and a CUDA device: the workers read only the headers of 8-bit YCbCr/grey JPEGs and draw the same crop boxes and flips from their sizes, so batches and resume stay exact; each batch's JPEGs are decoded in one nvJPEG call, torchvision.io.decode_jpeg, on the training device, and one it cannot decode is skipped and counted as a damaged sample; other images, e.g. PNG or CMYK JPEGs, are decoded in the workers as with cpu; docs/benchmarks.md)")
    views_per_image: int = param(1, ge=1, le=MAX_BATCH, help="training crops (and, for masked objectives, masks) per decoded image, each one sample of the global batch: a step decodes global_batch / k images; epochs and the learning-rate scaling (base_lr x global_batch / base_batch) count samples, i.e. views, so k changes neither the steps nor the lr, only how many distinct images an epoch decodes (1/k)")
    max_skip_fraction: float = param(0.1, ge=0, le=1, help="abort when more than this fraction of samples fail to decode")
    loader: str = param("shards", help="the training loader, a registered kind (datasets/factory.py): shards (the default: every guarantee of datasets/loader.py) or dali (optional extra, pip install -e '.[dali]', a CUDA GPU: NVIDIA DALI's webdataset reader, nvJPEG decode and RandomResizedCrop + flip on the GPU; the order stays a pure function of (seed, epoch, rank) and resume stays exact by replaying the epoch's first batches, but a damaged sample stops the run instead of being skipped, shards must be local, and the crops differ from the shard loader's; evaluation always uses the shard loader; docs/dali.md)")

    def check(self) -> None:
        if self.loader not in LOADER_KINDS:
            close = difflib.get_close_matches(self.loader, LOADER_KINDS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"Key 'data.loader' is '{self.loader}', not a registered loader kind; {hint}choose one of "
                              f"{', '.join(LOADER_KINDS)} (datasets/factory.py registers more).")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"Key 'data.crop_scale' must be two numbers 0 < lo <= hi <= 1, got {list(self.crop_scale)}.")
        if self.decode == "gpu" and self.augment_on != "device":
            raise ConfigError(f"Key 'data.decode' is 'gpu', which needs data.augment_on=device (the crop and flip of "
                              f"images decoded on the GPU run there), but data.augment_on is '{self.augment_on}'; "
                              "set data.augment_on=device or data.decode=cpu.")
        if self.loader == "dali":
            if self.augment_on != "cpu" or self.decode != "cpu":
                raise ConfigError(f"Key 'data.loader' is 'dali', which decodes, crops and flips in DALI's own GPU "
                                  f"pipeline, but data.augment_on is '{self.augment_on}' and data.decode is "
                                  f"'{self.decode}'; set both to cpu (their defaults) or data.loader=shards.")
            if self.views_per_image != 1:
                raise ConfigError(f"Key 'data.loader' is 'dali', which makes one crop per decoded image, but "
                                  f"data.views_per_image is {self.views_per_image}; set data.views_per_image=1 "
                                  "or data.loader=shards.")
            if getattr(self, "label_fraction", 1.0) < 1:  # the fine-tuning stages' class-balanced subset
                raise ConfigError(f"Key 'data.loader' is 'dali', which reads whole shards, but data.label_fraction "
                                  f"is {self.label_fraction} (a subset of the samples); set data.label_fraction=1 "
                                  "or data.loader=shards.")
        std = getattr(self, "std", None)  # each stage adds its mean/std (fixed, or null: the encoder's)
        if std is not None and any(s <= 0 for s in std):
            raise ConfigError(f"Key 'data.std' must be positive, got {list(std)}.")
