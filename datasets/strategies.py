"""One batch-making strategy per mode, chosen once when a loader opens (`batch_maker`).

A `BatchMaker` says how a batch is made on both sides of the worker boundary: `decode` and
`make` run in the workers (stream.py), `finish` in the main process (loader.py). The three modes:

- `CpuTransform` (augment_on="cpu"): the workers decode with PIL and run the spec's transform;
  the batch arrives made;
- `DeviceCrop` (augment_on="device"): the workers decode to arrays and draw the crop boxes and
  flips exactly as the transform would (device_augment.CropFlip), sending only the pixels the
  boxes need; the main process crops, resizes and flips the batch in one op on the device;
- `DeviceDecode` (decode_on="device" as well): the workers leave the JPEGs the device can decode
  encoded, drawing the same boxes from their headers' sizes; the main process decodes each batch's
  JPEGs in one call on the device, then crops as `DeviceCrop` does. A JPEG the device cannot
  decode is skipped there, its samples repeats of good ones (index -1), counted and noted as a
  worker's would be.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from vitmpp.common.errors import UserError

from . import decoders
from .device_augment import CropFlip, crop_flip_batch, decode_regions, encode_regions, pack_regions
from .order import Plan, fill_sources
from .spec import LoaderSpec
from .stream import WorkerBatch, first_decodable


@dataclass
class CpuTransform:
    """augment_on="cpu": PIL decode and the spec's transform in the workers."""

    transform: Callable
    draft_side: int | None  # decode JPEGs at a reduced scale when the transform allows it

    def key(self) -> tuple:
        """What a worker pool serving this maker must share with it (the transform by identity)."""
        return type(self).__name__, id(self.transform), self.draft_side

    def decode(self, raw, num_classes: int):
        return decoders.decode_sample(raw, num_classes, self.draft_side)

    def make(self, filled: list) -> tuple[torch.Tensor, torch.Tensor, None]:
        images = [self._to_tensor(image) for image, _ in filled]
        try:
            stacked = torch.stack(images)
        except RuntimeError:
            shapes = sorted({tuple(t.shape) for t in images})
            raise TypeError(
                f"the loader's transform returned images of different shapes {shapes}; it must "
                "produce a fixed size (crop or resize to img_size)"
            ) from None
        return stacked, torch.tensor([label for _, label in filled], dtype=torch.int64), None

    def _to_tensor(self, image) -> torch.Tensor:
        out = self.transform(image)
        if isinstance(out, np.ndarray):  # timm's ToNumpy gives CHW uint8 arrays
            out = torch.from_numpy(out)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.dim() != 3:
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(
                f"the loader's transform must return a uint8 CHW tensor, got {got} "
                "(use the transforms of vitmpp.datasets.transforms)"
            )
        return out

    def finish(self, batch: WorkerBatch, plan: Plan) -> WorkerBatch:
        return batch


@dataclass
class DeviceCrop:
    """augment_on="device": array decode and the transform's draws in the workers, crop + flip on `device`."""

    crop_flip: CropFlip
    draft_side: int | None
    device: torch.device

    def key(self) -> tuple:
        return type(self).__name__, self.crop_flip, self.draft_side

    def decode(self, raw, num_classes: int):
        return decoders.decode_array(raw, num_classes, self.draft_side)

    def _draws(self, filled: list):
        """The boxes and flips drawn as the transform draws them, in the same order."""
        boxes, flips = [], []
        for image, _ in filled:
            i, j, h, w, flip = self.crop_flip.draw(image.shape[1], image.shape[0])
            boxes.append((i, j, h, w))
            flips.append(flip)
        labels = torch.tensor([label for _, label in filled], dtype=torch.int64)
        return [image for image, _ in filled], boxes, labels, torch.tensor(flips, dtype=torch.bool)

    def make(self, filled: list):
        images, boxes, labels, flips = self._draws(filled)
        regions, rois = pack_regions(images, boxes)
        return torch.from_numpy(regions), labels, (torch.from_numpy(rois), flips)

    def finish(self, batch: WorkerBatch, plan: Plan) -> WorkerBatch:
        rois, flips = batch.crops
        device = self.device
        images = crop_flip_batch(
            batch.images.to(device, non_blocking=True),
            rois.to(device, non_blocking=True),
            flips.to(device, non_blocking=True),
            self.crop_flip.size,
        )
        return replace(batch, images=images, crops=None)


@dataclass
class DeviceDecode(DeviceCrop):
    """decode_on="device": JPEGs travel encoded (an `EncodedJpeg` has the decoded array's `shape`, so the
    draws are those of `DeviceCrop`); the main process decodes them on `device`."""

    _fallback: tuple | None = field(default=None, repr=False)  # main process: a batch none of whose JPEGs decoded
    _noted: set = field(default_factory=set, repr=False)  # main process: shards noted for a JPEG the device refused

    def decode(self, raw, num_classes: int):
        return decoders.read_for_device(raw, num_classes, self.draft_side)

    def make(self, filled: list):
        images, boxes, labels, flips = self._draws(filled)
        encoded, rois = encode_regions(images, boxes)
        return encoded, labels, (rois, flips)

    def finish(self, batch: WorkerBatch, plan: Plan) -> WorkerBatch:
        """The batch's images [B, 3, size, size] on the device (decode_regions, then the batched crop +
        flip). The samples of a JPEG the device cannot decode become repeats of good samples of the
        batch (index -1, `fill_sources`, the workers' rule), and the JPEG is counted in `skipped` and
        noted (once per shard)."""
        device, size, encoded = self.device, self.crop_flip.size, batch.images
        rois, flips = batch.crops
        regions, failed = decode_regions(encoded, device)
        images = crop_flip_batch(regions, rois.to(device, non_blocking=True), flips.to(device, non_blocking=True), size)
        if not failed:
            return replace(batch, images=images, crops=None)
        failed_regions = encoded.jpeg_regions[failed]
        bad = torch.isin(rois[:, 0].long(), failed_regions)
        lost = sum(int((batch.indices[rois[:, 0].long() == r] >= 0).any()) for r in failed_regions.tolist())
        notes = tuple(batch.notes)
        for k in failed:
            url, key = encoded.names[k]
            if (url, "device") not in self._noted:
                self._noted.add((url, "device"))
                notes += ((url, f"shard {url}: sample {key} skipped (its JPEG cannot be decoded on {device})"),)
        indices, labels = batch.indices.clone(), batch.labels
        indices[bad] = -1
        sources = fill_sources(bad.tolist())  # bad is on the CPU (from the rois): no device sync
        if sources is not None:
            take = torch.tensor(sources, dtype=torch.int64)
            images, labels = images[take.to(device)], labels[take]
        else:  # no sample of the batch decoded: the first decodable sample of the shards, whole (as the workers)
            image, label = self._fallback_image(plan)
            images = image.expand(len(bad), -1, -1, -1).clone()
            labels = torch.full_like(labels, label)
        return replace(
            batch, images=images, labels=labels, indices=indices, skipped=batch.skipped + lost, notes=notes, crops=None
        )

    def _fallback_image(self, plan: Plan) -> tuple[torch.Tensor, int]:
        """([1, 3, size, size] on the device, label): the first sample of the shards that decodes in a
        worker's way, resized whole (no crop, no flip)."""
        if self._fallback is None:
            array, label = first_decodable(plan, super().decode)
            regions, rois = pack_regions([array], [(0, 0, array.shape[0], array.shape[1])])
            image = crop_flip_batch(
                torch.from_numpy(regions).to(self.device),
                torch.from_numpy(rois),
                torch.zeros(1, dtype=torch.bool),
                self.crop_flip.size,
            )
            self._fallback = (image, label)
        return self._fallback


def batch_maker(spec: LoaderSpec):
    """The `BatchMaker` of the spec's mode (module docstring)."""
    draft_side = getattr(spec.transform, "decode_min_side", None)
    if spec.augment_on == "cpu":
        return CpuTransform(spec.transform, draft_side)
    if not spec.training:
        raise ValueError("augment_on='device' applies to training loaders only")
    crop_flip = CropFlip.of(spec.transform)
    if crop_flip is None:
        raise UserError(
            f"Key 'data.augment_on' is 'device', but the training transform is not "
            f"RandomResizedCrop + flip alone (it is {describe_transform(spec.transform)}); "
            "set data.augment_on=cpu for this stage."
        )
    device = spec.device if spec.device is not None else torch.device("cpu")
    maker = DeviceDecode if spec.decode_on == "device" else DeviceCrop
    return maker(crop_flip, draft_side, device)


def describe_transform(transform) -> str:
    """The transform's steps by class name ("RandomResizedCrop + ToTensor"), for error sentences."""
    steps = getattr(transform, "transforms", None)
    if steps:
        return " + ".join(type(t).__name__ for t in steps)
    return type(transform).__name__
