"""Per-sample transforms (in the loader workers) and the normalisation (on the device).

Every transform takes an RGB PIL image and returns a uint8 CHW tensor: uint8
batches are 4x smaller to move to the device, and normalising there is one fused
op on the whole batch (timm's "prefetcher" convention, `use_prefetcher=True`). The
ImageNet mean/std are timm's `IMAGENET_DEFAULT_MEAN/STD` (re-exported by
vitmpp.datasets as IMAGENET_MEAN/IMAGENET_STD).

Each transform also carries `decode_min_side`, the shorter side an image needs for
the transform never to upsample; the loader uses it to let PIL decode large JPEGs
at a reduced DCT scale (`Image.draft`), which is much faster and loses nothing the
transform would keep.

`to_rgb` (pixels.py) is the one way a decoded image of any mode becomes RGB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.data import create_transform

# below this size a centre crop throws away too much of the (tiny) image: evaluate the whole of it
TINY_IMAGE = 64
# RandomResizedCrop's default aspect ratio range is (3/4, 4/3)
_MIN_RATIO = 3 / 4


def _crop_side_needed(img_size: int, min_scale: float) -> int:
    """Shorter image side at which the smallest RandomResizedCrop is still `img_size` pixels."""
    # a crop of area fraction s and aspect ratio r on an S x S image has a shorter side of
    # S * sqrt(s * r) for r < 1; the worst case is the smallest s and r
    return math.ceil(img_size / math.sqrt(min_scale * _MIN_RATIO))


def pretrain_transform(
    img_size: int, scale: Sequence[float] = (0.2, 1.0), hflip: float = 0.5, interpolation: str = "bicubic"
):
    """MAE's pretraining augmentation: RandomResizedCrop(scale) and a horizontal flip, nothing else."""
    transform = create_transform(
        img_size,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=None,
        auto_augment=None,
        interpolation=interpolation,
        re_prob=0.0,
        use_prefetcher=True,
    )
    transform.decode_min_side = _crop_side_needed(img_size, scale[0])
    return transform


def finetune_transform(
    img_size: int,
    *,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: float | None = None,
):
    """DeiT/MAE fine-tuning augmentation from timm (RandAugment by default), as uint8.

    Random erasing and mixup/cutmix act on normalised batches, so the fine-tuning
    engine applies them on the device."""
    transform = create_transform(
        img_size,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment or None,
        interpolation=interpolation,
        re_prob=0.0,
        use_prefetcher=True,
    )
    transform.decode_min_side = _crop_side_needed(img_size, scale[0])
    _allow_zero_bit_posterize(transform)
    return transform


def _posterize_any_bits(img, bits_to_keep, **_):
    """timm's posterize, also for 0 bits (a black image), as Pillow did before version 13.

    RandAugment's increasing posterize keeps 4 - int(level * 4 / 10) bits, which is 0
    when the magnitude noise ('mstd') reaches the maximum level; Pillow 13 refuses 0."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform) -> None:
    from timm.data.auto_augment import RandAugment, posterize

    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize_any_bits


def eval_transform(img_size: int, crop_pct: float | None = None, interpolation: str = "bicubic"):
    """Resize the shorter side to img_size / crop_pct, then centre-crop img_size.

    `crop_pct` None means timm's 0.875, or 1.0 for images under 64 pixels (a 12.5%
    border is too much of a 32-pixel digit)."""
    if crop_pct is None:
        crop_pct = 1.0 if img_size < TINY_IMAGE else 0.875
    transform = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, use_prefetcher=True
    )
    transform.decode_min_side = math.floor(img_size / crop_pct)
    return transform


def unit_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """The loader's uint8 images [B, 3, H, W] as what an objective takes: float32 pixels in [0, 1]."""
    return images_uint8.float().div_(255.0)


def normalize_batch(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> float32 (x / 255 - mean) / std, on the images' device.

    `mean`/`std`: C numbers (a sequence, or a tensor of C or [1, C, 1, 1] elements)."""
    if images_uint8.dim() != 4:
        raise ValueError(f"normalize_batch expects images [B, C, H, W], got shape {tuple(images_uint8.shape)}")
    device = images_uint8.device
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    if mean_t.shape[1] != images_uint8.shape[1] or std_t.shape[1] != images_uint8.shape[1]:
        raise ValueError(
            f"mean/std have {mean_t.shape[1]}/{std_t.shape[1]} values for {images_uint8.shape[1]} channels"
        )
    # one pass: x * (1 / (255 std)) - mean / std
    return torch.addcmul((-mean_t / std_t), images_uint8.float(), 1.0 / (255.0 * std_t))
