"""MAE's RandomResizedCrop + flip as one batched op on any device (`LoaderSpec(augment_on="device")`).

With `augment_on="device"` the loader's workers only decode: for every sample they draw the
crop box and the flip bit from the same seeded per-batch random state, in the same order, as
the CPU transform would (`CropFlip.draw` calls the transform's own `get_params`, then draws the
flip as its `RandomHorizontalFlip` does), cut out the pixels the box needs (plus a one-pixel
border for interpolation, repeated at the image's edges; one region for all the views of an
image) and send them padded into one uint8 batch `[R, H, W, 3]`, with the boxes in that
batch's pixel coordinates and the flip bits. The main process moves that batch to the device
and `crop_flip_batch` makes the final `[B, 3, size, size]` uint8 images there (through a
transient float32 copy of the regions: ~0.6 GB for 256 full 500 x 375 images). The boxes are those the CPU path draws on the same
decoded image (bit for bit), so determinism and exact resume carry over unchanged, and only
the resampling differs.

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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CropFlip:
    """A per-sample transform that is exactly RandomResizedCrop (+ horizontal flip) to uint8 CHW,
    as timm builds it (`pretrain_transform`); `of(transform)` finds it, or None for any other."""

    crop: object          # the transform's RandomResizedCropAndInterpolation (its get_params draws the box)
    size: tuple[int, int]  # output (height, width)
    hflip: float | None   # the flip's probability; None: the transform has no flip step (and draws nothing)

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


def pack_regions(images: list[np.ndarray], boxes: list[tuple[int, int, int, int]]):
    """The pixels the boxes need, padded into one uint8 batch: (regions [R, H, W, 3], rois [N, 5]).

    Boxes of the same image (the same array: several views of one decode, `views_per_image`)
    share one region, the union of their boxes; region r is that union (i, j, h, w) with a
    one-pixel border (the image's edge pixels repeated where the union touches it), and each
    box's roi is (r, x1, y1, x2, y2) in its region's pixel-edge coordinates, as
    `torchvision.ops.roi_align` takes them. The rest of the batch is zeros that no sample reaches."""
    owners: dict[int, int] = {}  # id(image) -> region
    unions: list[list[int]] = []  # top, left, bottom, right per region
    sources: list[np.ndarray] = []
    for image, (i, j, h, w) in zip(images, boxes):
        r = owners.setdefault(id(image), len(unions))
        if r == len(unions):
            unions.append([i, j, i + h, j + w])
            sources.append(image)
        else:
            u = unions[r]
            u[:] = min(u[0], i), min(u[1], j), max(u[2], i + h), max(u[3], j + w)
    height = max(bottom - top for top, _, bottom, _ in unions) + 2
    width = max(right - left for _, left, _, right in unions) + 2
    regions = np.zeros((len(unions), height, width, 3), dtype=np.uint8)
    for out, image, (i, j, bottom_edge, right_edge) in zip(regions, sources, unions):
        H, W = image.shape[:2]
        h, w = bottom_edge - i, right_edge - j
        y0, y1, x0, x1 = max(i - 1, 0), min(i + h + 1, H), max(j - 1, 0), min(j + w + 1, W)
        top, left = y0 - (i - 1), x0 - (j - 1)  # 1 where the border is outside the image
        bottom, right = top + y1 - y0, left + x1 - x0
        out[top:bottom, left:right] = image[y0:y1, x0:x1]
        if top:
            out[0, left:right] = out[1, left:right]
        if bottom < h + 2:
            out[bottom, left:right] = out[bottom - 1, left:right]
        if left:
            out[:h + 2, 0] = out[:h + 2, 1]
        if right < w + 2:
            out[:h + 2, right] = out[:h + 2, right - 1]
    rois = np.empty((len(boxes), 5), dtype=np.float32)
    for n, (image, (i, j, h, w)) in enumerate(zip(images, boxes)):
        r = owners[id(image)]
        top, left = unions[r][0], unions[r][1]
        x1, y1 = 1.0 + j - left, 1.0 + i - top
        rois[n] = (r, x1, y1, x1 + w, y1 + h)
    return regions, rois


def crop_flip_batch(regions: torch.Tensor, rois: torch.Tensor, flips: torch.Tensor,
                    size: tuple[int, int]) -> torch.Tensor:
    """uint8 regions [R, H, W, 3] + boxes [N, 5] (region, x1, y1, x2, y2 in pixel edges) + flip bits [N]
    -> uint8 images [N, 3, size[0], size[1]] on the regions' device (module docstring)."""
    from torchvision.ops import roi_align

    x = regions.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    boxes = rois.to(device=x.device, dtype=torch.float32)
    out = roi_align(x, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = torch.where(flips.to(x.device).view(-1, 1, 1, 1), out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)
