"""MAE's RandomResizedCrop + flip as one batched op on any device (`LoaderSpec(augment_on="device")`).

With `augment_on="device"` the loader's workers only decode: for every sample they draw the
crop box and the flip bit from the same seeded per-batch random state, in the same order, as
the CPU transform would (`CropFlip.draw` calls the transform's own `get_params`, then draws the
flip as its `RandomHorizontalFlip` does), cut out the pixels the box needs (plus a one-pixel
border for interpolation, repeated at the image's edges; one region for all the views of an
image) and send them padded into one uint8 batch `[R, H, W, 3]`, with the boxes in that
batch's pixel coordinates and the flip bits. The main process moves that batch to the device
and `crop_flip_batch` makes the final `[B, 3, size, size]` uint8 images there (through a
transient float32 copy of the regions: ~0.6 GB for 256 full 500 x 375 images). The boxes are
those the CPU path draws on the same decoded image (bit for bit), so determinism and exact
resume carry over unchanged, and only the resampling differs.

The resampling is `torchvision.ops.roi_align` (`aligned=True`, `sampling_ratio=-1`): each output
pixel averages ceil(box / size)^2 bilinear samples of its bin, so a downscale is area-averaged
(antialiased) and an upscale is bilinear, one kernel for the whole batch with a box per image.
`grid_sample` (bilinear or bicubic) samples one point per output pixel and aliases when the crop
is shrunk, which RandomResizedCrop does to most ImageNet-size crops. Against the CPU path's PIL
bicubic (antialiased) resize of the same boxes, on 500 x 375 photo-like JPEGs cropped to 224:
roi_align differs by 1.2 grey levels on average (PIL's own bilinear by 1.2, grid_sample bilinear
by 1.7, grid_sample bicubic by 2.4); `tests/test_datasets_device_augment.py` holds it under 2.
The transform's `interpolation` is therefore not followed: the device path is always this.

The flip is a `torch.where` over the batch (no host synchronisation); the result is rounded
back to uint8, so the `Batch` contract (uint8 images, normalised by the stage) is unchanged.

With `decode_on="device"` as well (`data.decode=gpu`) the workers do not decode the JPEGs the
device can (`decoders.device_jpeg_size`: 8-bit Huffman-coded YCbCr or grey, ending with EOI): they
read the size from the header, draw the box and flip on it (on the draft size PIL would decode
at, `EncodedJpeg.shape`: the very draws of the worker-decode path) and send the bytes
(`encode_regions`: one buffer per batch, beside the regions of the images they did decode, PNG and
the rest). The main process decodes the batch's JPEGs in one `torchvision.io.decode_jpeg` call on
the device (nvJPEG on CUDA; libjpeg-turbo on the CPU, where the result is bit-identical to the
worker path's), averages draft-sized ones down by their scale, cuts the same regions into the same
`[R, H, W, 3]` batch (`decode_regions`) and runs `crop_flip_batch` as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .decoders import EncodedJpeg


@dataclass(frozen=True)
class CropFlip:
    """A per-sample transform that is exactly RandomResizedCrop (+ horizontal flip) to uint8 CHW,
    as timm builds it (`pretrain_transform`); `of(transform)` finds it, or None for any other."""

    crop: object  # the transform's RandomResizedCropAndInterpolation (its get_params draws the box)
    size: tuple[int, int]  # output (height, width)
    hflip: float | None  # the flip's probability; None: the transform has no flip step (and draws nothing)

    @classmethod
    def of(cls, transform) -> CropFlip | None:
        """The crop + flip of `transform` if it is exactly [RandomResizedCrop, (RandomHorizontalFlip),
        to-uint8-tensor] with one interpolation; None otherwise (it cannot run on the device)."""
        from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation, ToNumpy
        from torchvision.transforms import RandomHorizontalFlip

        steps = list(getattr(transform, "transforms", None) or [])
        if len(steps) not in (2, 3) or not isinstance(steps[0], RandomResizedCropAndInterpolation):
            return None
        if isinstance(steps[0].interpolation, (tuple, list)):  # a random interpolation draws too
            return None
        hflip = None
        if len(steps) == 3:
            if type(steps[1]) is not RandomHorizontalFlip:
                return None
            hflip = float(steps[1].p)
        if not isinstance(steps[-1], (MaybePILToTensor, ToNumpy)):
            return None
        size = steps[0].size
        size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return cls(steps[0], size, hflip)

    def draw(self, width: int, height: int) -> tuple[int, int, int, int, bool]:
        """(i, j, h, w, flip) for an image of this size: the draws the CPU transform makes, from the
        same global random state (Python's `random` for the box, torch's for the flip)."""
        dummy = torch.empty((0, height, width), dtype=torch.uint8)  # get_params reads only the size
        i, j, h, w = self.crop.get_params(dummy, self.crop.scale, self.crop.ratio)
        flip = bool(torch.rand(1) < self.hflip) if self.hflip is not None else False
        return int(i), int(j), int(h), int(w), flip


def region_unions(images: list, boxes: list[tuple[int, int, int, int]]):
    """(owners, unions, sources): the region of each box and each region's union box and image.

    Boxes of the same image (the same object: several views of one decode, `views_per_image`)
    share one region, numbered in order of first appearance; `unions[r]` is [top, left, bottom,
    right] in the pixels of `sources[r]` (edges, exclusive at bottom/right)."""
    owner_of: dict[int, int] = {}  # id(image) -> region
    owners: list[int] = []
    unions: list[list[int]] = []
    sources: list = []
    for image, (i, j, h, w) in zip(images, boxes):
        r = owner_of.setdefault(id(image), len(unions))
        owners.append(r)
        if r == len(unions):
            unions.append([i, j, i + h, j + w])
            sources.append(image)
        else:
            u = unions[r]
            u[:] = min(u[0], i), min(u[1], j), max(u[2], i + h), max(u[3], j + w)
    return owners, unions, sources


def region_shape(unions) -> tuple[int, int]:
    """(height, width) of a regions batch holding these unions with their one-pixel borders."""
    return (
        max(bottom - top for top, _, bottom, _ in unions) + 2,
        max(right - left for _, left, _, right in unions) + 2,
    )


def fill_regions(out, sources, unions) -> None:
    """Write each union of its source image [H, W, 3] with a one-pixel border into out[r] (HWC, at the
    top left; the image's edge pixels repeated where the union touches an edge). numpy arrays or torch
    tensors alike (the decode-only workers, and `decode_regions` on the device)."""
    for region, image, (i, j, bottom_edge, right_edge) in zip(out, sources, unions):
        H, W = image.shape[:2]
        h, w = bottom_edge - i, right_edge - j
        y0, y1, x0, x1 = max(i - 1, 0), min(i + h + 1, H), max(j - 1, 0), min(j + w + 1, W)
        top, left = y0 - (i - 1), x0 - (j - 1)  # 1 where the border is outside the image
        bottom, right = top + y1 - y0, left + x1 - x0
        region[top:bottom, left:right] = image[y0:y1, x0:x1]
        if top:
            region[0, left:right] = region[1, left:right]
        if bottom < h + 2:
            region[bottom, left:right] = region[bottom - 1, left:right]
        if left:
            region[: h + 2, 0] = region[: h + 2, 1]
        if right < w + 2:
            region[: h + 2, right] = region[: h + 2, right - 1]


def region_rois(owners: list[int], unions, boxes) -> np.ndarray:
    """float32 [N, 5]: each box as (region, x1, y1, x2, y2) in its region's pixel-edge coordinates
    (the border is the region's first row and column), as `torchvision.ops.roi_align` takes them."""
    rois = np.empty((len(boxes), 5), dtype=np.float32)
    for n, (r, (i, j, h, w)) in enumerate(zip(owners, boxes)):
        top, left = unions[r][0], unions[r][1]
        x1, y1 = 1.0 + j - left, 1.0 + i - top
        rois[n] = (r, x1, y1, x1 + w, y1 + h)
    return rois


def pack_regions(images: list[np.ndarray], boxes: list[tuple[int, int, int, int]]):
    """The pixels the boxes need, padded into one uint8 batch: (regions [R, H, W, 3], rois [N, 5]).

    Boxes of the same image (the same array: several views of one decode, `views_per_image`)
    share one region, the union of their boxes; region r is that union (i, j, h, w) with a
    one-pixel border (the image's edge pixels repeated where the union touches it), and each
    box's roi is (r, x1, y1, x2, y2) in its region's pixel-edge coordinates, as
    `torchvision.ops.roi_align` takes them. The rest of the batch is zeros that no sample reaches."""
    owners, unions, sources = region_unions(images, boxes)
    regions = np.zeros((len(unions), *region_shape(unions), 3), dtype=np.uint8)
    fill_regions(regions, sources, unions)
    return regions, region_rois(owners, unions, boxes)


def crop_flip_batch(
    regions: torch.Tensor, rois: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """uint8 regions [R, H, W, 3] + boxes [N, 5] (region, x1, y1, x2, y2 in pixel edges) + flip bits [N]
    -> uint8 images [N, 3, size[0], size[1]] on the regions' device (module docstring)."""
    from torchvision.ops import roi_align

    x = regions.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    boxes = rois.to(device=x.device, dtype=torch.float32)
    out = roi_align(x, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = torch.where(flips.to(x.device).view(-1, 1, 1, 1), out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- JPEGs decoded on the device


class EncodedBatch(NamedTuple):
    """What a decode-only worker sends with `decode_on="device"` in place of the regions batch: the
    JPEGs the device decodes, still encoded, and the regions of the images the worker decoded itself
    (not JPEG, or a JPEG the device is not given: `decoders.device_jpeg_size`). `decode_regions` makes
    the `[R, H, W, 3]` regions batch of `pack_regions` from it; the rois and flips travel as before."""

    data: torch.Tensor  # uint8 [bytes]: the JPEG files one after another (one block of shared memory)
    offsets: torch.Tensor  # int64 [J + 1]: file k is data[offsets[k]:offsets[k + 1]]
    sizes: torch.Tensor  # int64 [J, 2]: file k's (height, width) as its header states it
    scales: torch.Tensor  # int64 [J]: file k's draft reduction s (1, 2, 4, 8): decoded, s x s blocks are averaged
    jpeg_regions: torch.Tensor  # int64 [J]: the region file k fills
    pieces: torch.Tensor  # uint8 [P, h, w, 3]: the worker-decoded regions (fill_regions), zero-padded
    piece_regions: torch.Tensor  # int64 [P]: the region each piece is
    unions: torch.Tensor  # int64 [R, 4]: region r's union box (top, left, bottom, right) in its image's pixels
    names: tuple  # (shard url, sample key) of each file: what a note names when it cannot be decoded


def encode_regions(images: list, boxes: list[tuple[int, int, int, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    """`pack_regions` for the workers of `decode_on="device"`: `images` are HWC uint8 arrays or
    `EncodedJpeg`s (their boxes drawn on `EncodedJpeg.shape`, the reduced size); returns the batch to
    send and the rois [N, 5], which are those `pack_regions` gives for the decoded images."""
    owners, unions, sources = region_unions(images, boxes)
    rois = region_rois(owners, unions, boxes)
    files = [r for r, source in enumerate(sources) if isinstance(source, EncodedJpeg)]
    decoded = [r for r, source in enumerate(sources) if not isinstance(source, EncodedJpeg)]
    shape = region_shape([unions[r] for r in decoded]) if decoded else (1, 1)
    pieces = np.zeros((len(decoded), *shape, 3), dtype=np.uint8)
    fill_regions(pieces, [sources[r] for r in decoded], [unions[r] for r in decoded])
    data, offsets = bytearray(), [0]
    for r in files:
        data += sources[r].data
        offsets.append(len(data))
    encoded = EncodedBatch(
        data=torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8),
        offsets=torch.tensor(offsets, dtype=torch.int64),
        sizes=torch.tensor([(sources[r].height, sources[r].width) for r in files], dtype=torch.int64).view(-1, 2),
        scales=torch.tensor([sources[r].scale for r in files], dtype=torch.int64),
        jpeg_regions=torch.tensor(files, dtype=torch.int64),
        pieces=torch.from_numpy(pieces),
        piece_regions=torch.tensor(decoded, dtype=torch.int64),
        unions=torch.tensor(unions, dtype=torch.int64).view(-1, 4),
        names=tuple((sources[r].url, sources[r].key) for r in files),
    )
    return encoded, torch.from_numpy(rois)


def decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 CHW RGB images on `device` of the JPEG files (1-D uint8 CPU tensors), decoded in one call of
    `torchvision.io.decode_jpeg` (nvJPEG's batched decode on CUDA, libjpeg-turbo on the CPU); None for a
    file that cannot be decoded. One bad file fails the whole call: the files are then decoded one by
    one, each on the device and, failing that, on the CPU (libjpeg-turbo, which nvJPEG may not match
    in what it accepts), so the bad one is found and the rest still delivered."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not files:
        return []
    try:
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # one bad file failed the whole call: decode them one by one to find it
        places = [device] if device.type == "cpu" else [device, torch.device("cpu")]
        return [_decode_one(file, places, device) for file in files]


def _decode_one(file: torch.Tensor, places: list[torch.device], device: torch.device) -> torch.Tensor | None:
    """`file` decoded on the first of `places` that can, moved to `device`; None when none can."""
    from torchvision.io import ImageReadMode, decode_jpeg

    for place in places:
        try:
            return decode_jpeg(file, mode=ImageReadMode.RGB, device=place).to(device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            continue
    return None


def _reduce(image: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, ceil(H / scale), ceil(W / scale)], each pixel the mean of its
    scale x scale block (cut short at the edges): the size PIL's draft decoding gives, which the
    boxes were drawn on (libjpeg's DCT scaling there; an area average here)."""
    reduced = torch.nn.functional.avg_pool2d(image.unsqueeze(0).float(), scale, scale, ceil_mode=True)[0]
    return reduced.round_().to(torch.uint8)


def decode_regions(batch: EncodedBatch, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """(regions uint8 [R, H, W, 3] on `device`, the files k that could not be decoded): the batch's JPEGs
    decoded on the device in one call (`decode_jpegs`), reduced to their draft size, their regions cut
    out (one-pixel border, edges repeated) beside the worker-decoded pieces. A failed file's region
    stays zeros (the caller replaces its samples); so does that of a file whose decoded size is not
    the one its header stated (the boxes were drawn for that size)."""
    device = torch.device(device)
    unions = batch.unions.tolist()
    regions = torch.zeros((len(unions), *region_shape(unions), 3), dtype=torch.uint8, device=device)
    if len(batch.piece_regions):
        _, h, w, _ = batch.pieces.shape
        regions[batch.piece_regions.to(device), :h, :w] = batch.pieces.to(device, non_blocking=True)
    offsets = batch.offsets.tolist()
    images = decode_jpegs([batch.data[a:b] for a, b in zip(offsets[:-1], offsets[1:])], device)
    failed, targets, sources = [], [], []
    for k, (image, (height, width), scale, r) in enumerate(
        zip(images, batch.sizes.tolist(), batch.scales.tolist(), batch.jpeg_regions.tolist())
    ):
        if image is None or tuple(image.shape) != (3, height, width):
            failed.append(k)
            continue
        if scale > 1:
            image = _reduce(image, scale)
        targets.append(r)
        sources.append(image.permute(1, 2, 0))  # HWC view, as fill_regions reads images
    fill_regions([regions[r] for r in targets], sources, [unions[r] for r in targets])
    return regions, failed
