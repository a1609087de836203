"""An optional training loader on NVIDIA DALI (`pip install -e '.[dali]'`, `data.loader=dali`).

    spec = LoaderSpec(..., transform=pretrain_transform(224), training=True, seed=s, rank=r, world_size=w)
    loader = open_dali_loader(spec, epoch=e, start_batch=k)   # a Loader (datasets/spec.py)
    for batch in loader:                                      # images uint8 [B, 3, H, W] on the GPU

For users who already run DALI. One DALI pipeline per epoch and rank reads the split's local tar
shards with `fn.readers.webdataset`, decodes with `fn.decoders.image(device="mixed")` (nvJPEG on the
GPU), makes the training transform's RandomResizedCrop (its scale, ratio, size and interpolation)
with `fn.random_resized_crop` and its flip with `fn.crop_mirror_normalize` (uint8, CHW) on the GPU.
Training loaders only: evaluation keeps the shard loader (vitmpp.datasets.loader), which sees every
sample exactly once.

What it keeps of the `Loader` contract (spec.py):

- `Batch`: uint8 images [B, 3, H, W] on `spec.device` (default: the current CUDA device), int64
  labels (the samples' `.cls`), int64 indices (the sample's index in the split, found from DALI's
  `source_info`, "tar:offset:member", and the member offsets of each tar, read once per process),
  `skipped` 0;
- `__len__` is `batches_per_epoch - start_batch` on every rank: the loop runs the pipeline exactly
  that often (DALI's reader wraps around its part when asked for more);
- the stream is a pure function of (seed, epoch, rank): the shard order is a seeded permutation of
  (seed, epoch), the same on every rank; rank r of w reads DALI's part r (`shard_id`/`num_shards`:
  contiguous, disjoint parts of that order) through a shuffle buffer of `spec.shuffle_buffer`
  samples; the reader, crop and flip are seeded from (seed, epoch, rank);
- exact resume: a loader opened at `start_batch=k` runs the same pipeline and discards its first k
  batches, so it yields exactly the batches of an uninterrupted epoch from k on (the skip costs k
  batches of reading, decoding and cropping: DALI cannot jump to a batch);
- iterating again replays the same epoch (a new pipeline with the same seeds).

What it does not keep: a sample DALI cannot decode stops the epoch with a UserError naming the
shard and member (DALI cannot replace it by a good one, as the shard loader does); http(s) and
`pipe:` shards are refused; `keep_indices` (label fractions), `views_per_image` > 1 and any transform
other than RandomResizedCrop + flip are refused; the crop draws and resampling are DALI's own, so
batches are not those of the shard loader (same samples per epoch budget, other boxes and order).

`dali_device="cpu"` runs the same pipeline on the CPU (`decoders.image(device="cpu")`, CPU crop):
for tests and CPU checks only; the public path (`dali_device="gpu"`) refuses without CUDA.
docs/dali.md says all this for users.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vitmpp.common.errors import UserError

from .device_augment import CropFlip
from .manifest import is_url
from .spec import Batch, LoaderSpec

INSTALL_HINT = "pip install -e '.[dali]'"
IMAGE_EXTENSIONS = "jpg;jpeg;png;webp"  # the image member of a sample (make_shards writes one of these)
_READER = "reader"
_INTERPOLATIONS = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR", "nearest": "INTERP_NN"}
# per tar (path, size, mtime): data offset of every member -> the sample's position in the tar
_POSITIONS: dict[tuple[str, int, int], tuple[dict[int, int], int]] = {}


def _dali():
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError:
        raise UserError(
            f"data.loader=dali needs NVIDIA DALI, which is not installed; run {INSTALL_HINT} "
            "(on a CUDA 13 machine) or set data.loader=shards."
        ) from None

    return fn, types, Pipeline


def _seed(*parts: int) -> int:
    """A DALI seed (31 bits) that is a pure function of `parts`."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def sample_positions(path: str) -> tuple[dict[int, int], int]:
    """({data offset of each member: its sample's position in the tar}, samples) of a local tar shard,
    grouping members into samples as webdataset does (a new key, or a suffix met again, starts the
    next sample); read once per process and file version."""
    from webdataset.tariterators import base_plus_ext

    st = os.stat(path)
    cache_key = (path, st.st_size, st.st_mtime_ns)
    if cache_key not in _POSITIONS:
        positions: dict[int, int] = {}
        position, key, suffixes = -1, None, set()
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    name = member.name
                    if "/" not in name and name.startswith("__") and name.endswith("__"):
                        continue
                    base, suffix = base_plus_ext(name)
                    if base is None:
                        continue
                    if base != key or suffix in suffixes:
                        position, key, suffixes = position + 1, base, set()
                    suffixes.add(suffix)
                    positions[member.offset_data] = position
        except (tarfile.TarError, OSError) as err:
            raise UserError(
                f"Shard '{path}' cannot be read as a tar file ({err}); rewrite it with make_shards "
                "or set data.loader=shards, which skips what it cannot read."
            ) from None
        _POSITIONS[cache_key] = positions, position + 1
    return _POSITIONS[cache_key]


@dataclass(frozen=True)
class _Plan:
    """One epoch of one rank: everything a pipeline is built from."""

    paths: tuple[str, ...]  # the shards in this epoch's (seeded) order
    offsets: dict[str, int]  # shard path -> index of its first sample in the split
    positions: dict[str, dict[int, int]]
    batch_size: int
    shard_id: int
    num_shards: int
    shuffle_buffer: int
    threads: int
    seeds: tuple[int, int, int, int]  # pipeline, reader, crop, flip
    crop: CropFlip
    dali_device: str  # "gpu" or "cpu"
    device: torch.device


def _build(plan: _Plan, *, reader_only: bool = False):
    """The DALI pipeline of `plan` (built); `reader_only`: just the reader's (images' bytes, source info),
    in the very same order (the reader has its own seed), to find a sample that failed to decode."""
    fn, types, Pipeline = _dali()
    gpu = plan.dali_device == "gpu"
    pipe = Pipeline(
        batch_size=plan.batch_size,
        num_threads=plan.threads,
        device_id=plan.device.index if gpu else None,
        seed=plan.seeds[0],
    )
    with pipe:
        encoded, cls = fn.readers.webdataset(
            paths=list(plan.paths),
            ext=[IMAGE_EXTENSIONS, "cls"],
            missing_component_behavior="error",
            shard_id=plan.shard_id,
            num_shards=plan.num_shards,
            stick_to_shard=True,
            random_shuffle=plan.shuffle_buffer > 1,
            initial_fill=max(plan.shuffle_buffer, 1),
            seed=plan.seeds[1],
            name=_READER,
        )
        source = fn.get_property(encoded, key="source_info")
        if reader_only:
            pipe.set_outputs(encoded, source)
        else:
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            crop = plan.crop
            interp = str(getattr(crop.crop.interpolation, "value", crop.crop.interpolation))
            images = fn.random_resized_crop(
                images,
                size=list(crop.size),
                random_area=list(crop.crop.scale),
                random_aspect_ratio=list(crop.crop.ratio),
                antialias=True,
                interp_type=getattr(types, _INTERPOLATIONS.get(interp, "INTERP_CUBIC")),
                seed=plan.seeds[2],
            )
            mirror = fn.random.coin_flip(probability=crop.hflip, seed=plan.seeds[3]) if crop.hflip is not None else 0
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
            pipe.set_outputs(images, cls, source)
    pipe.build()
    return pipe


def _text(item) -> str:
    return bytes(np.asarray(item)).decode("utf-8", "replace")


def _where(source: str) -> tuple[str, int, str]:
    """(tar path, member data offset, member name) from DALI's source_info."""
    path, offset, member = source.rsplit(":", 2)
    return path, int(offset), member


class DaliLoader:
    """One epoch of one rank on DALI (module docstring); made by `open_dali_loader`."""

    skipped_samples = 0  # DALI never skips: a sample it cannot decode stops the epoch (UserError)

    def __init__(self, plan: _Plan, batches: int, start_batch: int):
        self.plan, self.batches, self.start_batch = plan, batches, start_batch

    def __len__(self) -> int:
        return self.batches - self.start_batch

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan
        pipe = self._run(lambda: _build(plan), None)
        try:
            for j in range(self.batches):
                images, cls, source = self._run(pipe.run, j)
                if j < self.start_batch:  # resume: the same batches, made and discarded
                    continue
                yield self._batch(images, cls, source)
        finally:
            del pipe

    def _run(self, call, batch: int | None):
        try:
            return call()
        except RuntimeError as err:
            raise self._explain(err, batch) from None

    def _batch(self, images, cls, source) -> Batch:
        plan = self.plan
        sources = [_where(_text(s)) for s in source]
        labels, indices = [], []
        for (path, offset, member), c in zip(sources, cls):
            text = _text(c).strip()
            try:
                labels.append(int(text))
            except ValueError:
                raise UserError(
                    f"Sample '{member}' of shard '{path}' has the label {text!r}, not an integer; "
                    "rewrite the shard with make_shards."
                ) from None
            position = plan.positions.get(path, {}).get(offset)
            indices.append(plan.offsets[path] + position if position is not None else -1)
        if plan.dali_device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = images.as_tensor()
            out = torch.empty(tuple(dense.shape()), dtype=torch.uint8, device=plan.device)
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(plan.device))
        else:
            out = torch.from_numpy(np.array(images.as_array(), copy=True))
            if plan.device.type != "cpu":
                out = out.to(plan.device)
        return Batch(
            out,
            torch.tensor(labels, dtype=torch.int64),
            torch.tensor(indices, dtype=torch.int64),
            torch.zeros((), dtype=torch.int64),
        )

    def _explain(self, err: RuntimeError, batch: int | None) -> UserError:
        """A UserError for a pipeline that failed at `batch`: the shard and member of the first sample of
        that batch (or the prefetched ones after it) PIL cannot decode, found by replaying the reader."""
        detail = _dali_reason(str(err))
        culprit = None
        if batch is not None:
            culprit = self._undecodable(batch)
        advice = (
            "the DALI loader cannot replace a damaged sample as the default loader does: set "
            "data.loader=shards (which skips and counts it) or rewrite the shard with make_shards"
        )
        if culprit is not None:
            path, member, why = culprit
            return UserError(
                f"DALI cannot decode sample '{member}' of shard '{path}' ({why}; DALI: {detail}); {advice}."
            )
        shards = ", ".join(f"'{p}'" for p in self.plan.paths[:3]) + (" ..." if len(self.plan.paths) > 3 else "")
        return UserError(f"DALI failed reading the shards {shards} ({detail}); {advice}.")

    def _undecodable(self, batch: int) -> tuple[str, str, str] | None:
        from PIL import Image

        try:
            pipe = _build(self.plan, reader_only=True)
            for j in range(batch + 3):  # the failing batch may be one of the two prefetched after it
                encoded, source = pipe.run()
                if j < batch:
                    continue
                for data, src in zip(encoded, source):
                    path, _, member = _where(_text(src))
                    try:
                        with Image.open(io.BytesIO(bytes(np.asarray(data)))) as image:
                            image.convert("RGB").load()
                    except Exception as why:  # noqa: BLE001 - any failure names this sample
                        return path, member, f"PIL: {type(why).__name__}"
        except RuntimeError:
            return None
        return None


def _dali_reason(message: str) -> str:
    """The informative part of a DALI pipeline error (after 'encountered:'), on one line."""
    tail = message.split("encountered:", 1)[-1]
    lines = [
        line.strip()
        for line in tail.splitlines()
        if line.strip() and "pipeline object is no longer valid" not in line and "Critical error" not in line
    ]
    return " ".join(lines)[:300] or "no detail"


def open_dali_loader(
    spec: LoaderSpec,
    *,
    epoch: int = 0,
    start_batch: int = 0,
    max_worker_processes: int | None = None,
    dali_device: str = "gpu",
) -> DaliLoader:
    """The DALI `Loader` over epoch `epoch` of the training `spec`, from batch `start_batch` on.

    `max_worker_processes` is accepted for the loop's sake and ignored (DALI runs `spec.num_workers`
    threads, at least one, in this process). `dali_device`: "gpu" (the public path: mixed decode and
    crop on the GPU; refused without CUDA) or "cpu" (the same pipeline on the CPU, for tests and CPU
    checks only). Raises UserError for what this backend cannot do (module docstring) and, like
    `open_loader`, for missing shards or a split too small for one batch of every rank.
    """
    del max_worker_processes
    if epoch < 0 or start_batch < 0:
        raise ValueError(f"open_dali_loader: epoch={epoch} and start_batch={start_batch} must not be negative")
    if not spec.training:
        raise ValueError("open_dali_loader makes training loaders only; evaluation uses the shard loader (open_loader)")
    if dali_device not in ("gpu", "cpu"):
        raise ValueError(f"dali_device must be 'gpu' or 'cpu', got {dali_device!r}")
    _dali()
    if dali_device == "gpu" and (
        not torch.cuda.is_available() or spec.device is not None and torch.device(spec.device).type != "cuda"
    ):
        where = f"device {spec.device}" if spec.device is not None else "no CUDA device"
        raise UserError(
            f"Key 'data.loader' is 'dali', which decodes and crops on a CUDA GPU, but this run has "
            f"none ({where}); set data.loader=shards."
        )
    if spec.keep_indices is not None:
        raise UserError(
            "data.loader=dali reads whole shards and cannot keep a subset of the samples "
            "(data.label_fraction < 1); set data.loader=shards."
        )
    if spec.views_per_image != 1 or spec.decode_on != "worker":
        raise UserError(
            "data.loader=dali makes one crop per decoded image in its own pipeline; set "
            "data.views_per_image=1, data.decode=cpu and data.augment_on=cpu, or data.loader=shards."
        )
    crop = CropFlip.of(spec.transform)
    if crop is None:
        from .strategies import describe_transform

        raise UserError(
            f"data.loader=dali runs only RandomResizedCrop + flip (it is "
            f"{describe_transform(spec.transform)}); set data.loader=shards for this stage."
        )

    from .order import select_shards

    man, split = spec.manifest, spec.split
    urls, lengths, offsets = select_shards(man, split, spec.shards)
    remote = [u for u in urls if is_url(u)]
    if remote:
        raise UserError(
            f"data.loader=dali reads local shards only, and '{remote[0]}' is streamed; "
            "copy the shards to a local folder or set data.loader=shards."
        )
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise UserError(
            f"Shard '{missing[0]}' listed in '{man.source}' does not exist or is not a regular file; "
            "restore it or rewrite the shards with make_shards."
        )
    kept = [k for k, n in enumerate(lengths) if n > 0]
    urls = [os.path.abspath(urls[k]) for k in kept]
    lengths = [lengths[k] for k in kept]
    offsets = [offsets[k] for k in kept]
    num_samples = int(sum(lengths))
    batch_size, world = spec.batch_size, spec.world_size
    bpe = spec.batches_per_epoch if spec.batches_per_epoch is not None else num_samples // (batch_size * world)
    if bpe < 1 or num_samples < world:
        raise UserError(
            f"Split '{split}' of '{man.source}' has {num_samples} samples, fewer than one global "
            f"batch of {batch_size} x {world} processes; lower the batch size or add data."
        )
    if not 0 <= start_batch <= bpe:
        raise ValueError(f"start_batch={start_batch} is outside the epoch's {bpe} batches")

    positions = {}
    for url, n in zip(urls, lengths):
        found, count = sample_positions(url)
        if count != n:
            raise UserError(
                f"Shard '{url}' holds {count} samples, but '{man.source}' says {n}; rewrite the "
                "shards with make_shards or set data.loader=shards."
            )
        positions[url] = found
    order = np.random.default_rng(_seed(spec.seed, epoch, 0xDA11)).permutation(len(urls))
    if spec.device is not None:
        device = torch.device(spec.device)
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if dali_device == "gpu" else torch.device("cpu")
    if dali_device == "gpu" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = _Plan(
        paths=tuple(urls[k] for k in order),
        offsets=dict(zip(urls, offsets)),
        positions=positions,
        batch_size=batch_size,
        shard_id=spec.rank,
        num_shards=world,
        shuffle_buffer=spec.shuffle_buffer,
        threads=max(1, spec.num_workers),
        seeds=tuple(_seed(spec.seed, epoch, spec.rank, part) for part in range(4)),
        crop=crop,
        dali_device=dali_device,
        device=device,
    )
    return DaliLoader(plan, bpe, start_batch)
