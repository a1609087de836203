"""The loader's contract: what to read (`LoaderSpec`), what comes out (`Batch`), and how
every loader behaves (`Loader`). This is the one place the contract is written down.

    spec = LoaderSpec(shards="data/digits", manifest=read_manifest("data/digits"), split="train",
                      batch_size=64, transform=pretrain_transform(32), training=True,
                      seed=s, rank=r, world_size=w, batches_per_epoch=steps_per_epoch)
    for epoch in range(first_epoch, epochs):
        loader = open_loader(spec, epoch=epoch, start_batch=k if resuming else 0)   # a Loader
        for batch in loader: ...

A spec says everything about *what* is read and the geometry, and nothing about the
*position*: the epoch and the batch to start at are arguments of `open_loader`
(vitmpp.datasets.loader), so a training loop builds its spec once (reading the
manifest once) and opens one loader per epoch (the worker processes carry over from one
epoch's loader to the next). The spec lives apart from the loader's
implementation so that code which only needs the contract (an engine, a stand-in loader
in a benchmark) reads a short module.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from .manifest import Manifest, expand_shard_spec, names_all_shards, shard_name


class Batch(NamedTuple):
    """One batch of one rank (`Loader.__iter__`)."""

    images: torch.Tensor  # uint8 [B, 3, H, W]: normalise on the device (transforms.normalize_batch); already
    #                        on LoaderSpec.device with augment_on="device" (and decode_on="device")
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B], global sample index in the split, -1 for padding/fill
    skipped: torch.Tensor  # int64 scalar: samples this worker skipped since its previous batch


@runtime_checkable
class Loader(Protocol):
    """One epoch of one rank: what `open_loader` returns and what a training engine may rely on.

    `__iter__() -> Iterator[Batch]`: the epoch's batches from the start batch on, each of
    `batch_size` samples (`Batch`: uint8 images, labels, indices, skipped). Iterating
    again replays the same epoch from the same start batch (the same batches, bit for bit,
    augmentations included).

    `__len__()`: how many batches this rank yields in this epoch from the start batch,
    known before iterating. In training it is equal on every rank (so collectives never
    hang on a rank that ran dry) and equal to `batches_per_epoch - start_batch`; in
    evaluation every rank also yields the same count, the short ranks padded (index -1).

    `skipped_samples`: how many samples of this epoch failed to decode so far, counted from
    the start batch (samples of the batches before it are the previous run's to count),
    updated as batches are yielded; it is the sum of the yielded batches' `skipped`. A
    skipped sample never shortens a batch: its place is taken by a repeat of a good one
    of the same batch (index -1), so batch boundaries, and therefore exact resume, do not
    depend on which samples failed.

    Guarantees of the shard loader (`ShardLoader`, see vitmpp.datasets.loader): the order
    is a pure function of (seed, epoch, rank, worker); a loader opened at `start_batch=k`
    yields exactly the batches an uninterrupted epoch yields from k on; evaluation sees
    every real sample exactly once over all ranks; too many skipped samples
    (`max_skip_fraction`) stop the epoch with a UserError naming the shards.
    """

    skipped_samples: int

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...


def _shards_text(shards) -> str | tuple[str, ...]:
    if isinstance(shards, Manifest):
        raise TypeError(
            "LoaderSpec.shards names the shards (a folder, _info.json, pattern or list); "
            "pass the Manifest as `manifest=` and its folder (manifest.base) as `shards=`"
        )
    if isinstance(shards, (str, os.PathLike)):
        return os.fspath(shards)
    if isinstance(shards, Sequence):
        return tuple(os.fspath(s) for s in shards)
    raise TypeError(f"LoaderSpec.shards must be a str, a path or a list of shard names, not {type(shards).__name__}")


@dataclass(frozen=True, kw_only=True)
class LoaderSpec:
    """What one rank reads and the geometry, for every epoch of a run (module docstring).

    `shards`: the folder holding `_info.json`, the `_info.json` path, a brace pattern
    (`a-{000000..000009}.tar`, `::`-separated lists) or a list of shard paths/URLs of
    `split` (a list is kept as a tuple, its names taken literally); only those shards
    are read, their indices staying those of the split. `manifest`: the shards' manifest,
    already read (`read_manifest`), so opening a loader never reads it again.
    `batch_size` is per process. `training`: an endless shuffled stream cut to
    `batches_per_epoch` equal batches per rank (default: samples // (batch_size x
    world_size)); otherwise every sample exactly once over the ranks (default: as many
    batches as the largest rank needs). `keep_indices`: only these sample indices of the
    split (a tuple). `max_skip_fraction`: the fraction of samples that may fail to decode
    before the epoch stops with a UserError.

    `augment_on` (training only): "cpu" runs `transform` in the workers; "device" has the workers
    only decode and draw the crop boxes and flips (the very draws of `transform`, which must be
    RandomResizedCrop + flip alone, as `pretrain_transform` makes it) and makes the batch's crop
    and flip in one batched op on `device` (default the CPU) in the main process, so the
    batches' `images` are on `device` (datasets/device_augment.py).

    `decode_on` (with augment_on="device"): "worker" decodes every image in the workers; "device"
    leaves the JPEGs the device can decode (8-bit Huffman-coded YCbCr or grey, whole:
    `decoders.device_jpeg_size`) undecoded in the workers, which read only their headers' sizes and
    draw the same boxes and flips from them, and decodes each batch's JPEGs in one
    `torchvision.io.decode_jpeg` call on `device` in the main process (nvJPEG on CUDA, libjpeg-turbo
    on the CPU); other images (PNG, ...) are decoded in the workers and merged into the same batch.
    Any device works; `data.decode=gpu` asks for a CUDA one.

    `views_per_image` k (training only): every decoded image gives k consecutive samples of
    the batch, each with its own crop and flip (its own draws); `batch_size` (a multiple of k)
    counts the views, so a batch holds batch_size / k images. An epoch still counts samples:
    the default is samples / (batch_size x world_size) batches, i.e. the same steps as with
    k = 1, made from 1/k of the images (each k times), so k cuts the decoding per step k-fold
    at equal compute. `indices` and `labels` repeat per view; `skipped` and
    `skipped_samples` count images.

    Raises ValueError for an impossible geometry; problems of the data itself (a missing
    shard, too few samples) are UserErrors of `open_loader`.
    """

    shards: str | tuple[str, ...]
    manifest: Manifest
    batch_size: int
    transform: Callable
    training: bool
    split: str = "train"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2
    shuffle_buffer: int = 1000
    batches_per_epoch: int | None = None
    keep_indices: tuple[int, ...] | None = None
    pin_memory: bool = False
    max_skip_fraction: float = 0.1
    prefetch_factor: int = 2
    augment_on: str = "cpu"
    device: torch.device | str | None = None
    views_per_image: int = 1
    decode_on: str = "worker"

    def identity(self) -> dict:
        """What identifies the data this spec reads (`Manifest.identity` of the shards in play, and a
        digest of `keep_indices`): checkpoints carry it, so that a resume onto other data is told."""
        names = None
        if not names_all_shards(self.shards):
            names = [shard_name(name) for name in expand_shard_spec(self.shards)]
        identity = self.manifest.identity(self.split, names)
        if self.keep_indices is not None:
            kept = hashlib.sha256(json.dumps(list(self.keep_indices)).encode()).hexdigest()[:16]
            identity.update(kept=len(self.keep_indices), kept_digest=kept)
        return identity

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the inputs once, here
        set_(self, "shards", _shards_text(self.shards))
        if not isinstance(self.manifest, Manifest):
            raise TypeError(
                f"LoaderSpec.manifest must be a Manifest (read_manifest(...)), not {type(self.manifest).__name__}"
            )
        if self.keep_indices is not None:
            set_(self, "keep_indices", tuple(int(i) for i in self.keep_indices))
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size or self.num_workers < 0:
            raise ValueError(
                f"LoaderSpec: bad geometry batch_size={self.batch_size} rank={self.rank} "
                f"world_size={self.world_size} num_workers={self.num_workers}"
            )
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ValueError(
                f"LoaderSpec: batches_per_epoch must be at least 1 (or None), got {self.batches_per_epoch}"
            )
        if self.shuffle_buffer < 0 or self.prefetch_factor < 1:
            raise ValueError(
                f"LoaderSpec: shuffle_buffer={self.shuffle_buffer} must be >= 0 and "
                f"prefetch_factor={self.prefetch_factor} >= 1"
            )
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.views_per_image < 1 or self.batch_size % self.views_per_image:
            raise ValueError(
                f"LoaderSpec: batch_size={self.batch_size} must be a multiple of "
                f"views_per_image={self.views_per_image} (>= 1)"
            )
        if self.augment_on not in ("cpu", "device"):
            raise ValueError(f"LoaderSpec: augment_on must be 'cpu' or 'device', got {self.augment_on!r}")
        if self.decode_on not in ("worker", "device"):
            raise ValueError(f"LoaderSpec: decode_on must be 'worker' or 'device', got {self.decode_on!r}")
        if self.decode_on == "device" and self.augment_on != "device":
            raise ValueError(
                "LoaderSpec: decode_on='device' needs augment_on='device' (the crop and flip of JPEGs "
                "decoded on the device run there)"
            )
        if self.device is not None:
            set_(self, "device", torch.device(self.device))
