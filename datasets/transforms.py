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

`to_rgb` is the one way a decoded image of any PIL mode becomes RGB, both where
make_shards reads input files and where the loader decodes shard members, because
PIL's own `convert("RGB")` clips 16- and 32-bit values at 255 (a 16-bit PNG comes out
white), turns 0..1 floats black and drops alpha.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

# below this size a centre crop throws away too much of the (tiny) image: evaluate the whole of it
TINY_IMAGE = 64
# RandomResizedCrop's default aspect ratio range is (3/4, 4/3)
_MIN_RATIO = 3 / 4


# transparent pixels are composited onto white, what a viewer shows (logos and product shots on
# transparent backgrounds), rather than keeping the arbitrary colours stored under them
ALPHA_BACKGROUND = 255
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_LAB_TO_SRGB = None


class UnknownScale(ValueError):
    """Pixels with no known 8-bit scale (32-bit integers outside 0..65535, floats outside 0..1)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` (any PIL mode) as 8-bit RGB, values scaled, never clipped.

    - `I;16*` and `I` are 16-bit grey (Pillow opens 16-bit PNG, TIFF and PGM so): v / 257;
      `I` values outside 0..65535 raise UnknownScale;
    - `F` follows the 0..1 float convention: v x 255; values outside it raise UnknownScale;
    - alpha (`RGBA`, `LA`, `PA`, `RGBa`, or a transparent colour of `P`, `L`, `RGB`) is
      composited onto white;
    - `LAB` (ICC Lab, D50) goes to sRGB through LittleCMS without its precomputed 8-bit
      table, which is off by up to 7 levels in dark colours;
    - `1`, `L`, `P`, `CMYK`, `YCbCr`, `HSV`, `RGBX`: Pillow's conversion, which is exact
      or the standard formula.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if mode == "F" else 65535.0
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > top:
            kind = "float pixels outside 0..1" if mode == "F" else "32-bit integer pixels outside 0..65535"
            raise UnknownScale(f"{kind} have no known 8-bit scale")
        grey = np.rint(values * (255.0 / top)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in _ALPHA or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
        return Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    if mode == "LAB":
        global _LAB_TO_SRGB
        from PIL import ImageCms

        if _LAB_TO_SRGB is None:
            _LAB_TO_SRGB = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                                   "LAB", "RGB", flags=ImageCms.Flags.NOOPTIMIZE)
        return ImageCms.applyTransform(image, _LAB_TO_SRGB)
    return image.convert("RGB")


def _crop_side_needed(img_size: int, min_scale: float) -> int:
    """Shorter image side at which the smallest RandomResizedCrop is still `img_size` pixels."""
    # a crop of area fraction s and aspect ratio r on an S x S image has a shorter side of
    # S * sqrt(s * r) for r < 1; the worst case is the smallest s and r
    return math.ceil(img_size / math.sqrt(min_scale * _MIN_RATIO))


def pretrain_transform(img_size: int, scale: Sequence[float] = (0.2, 1.0), hflip: float = 0.5,
                       interpolation: str = "bicubic"):
    """MAE's pretraining augmentation: RandomResizedCrop(scale) and a horizontal flip, nothing else."""
    transform = create_transform(
        img_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=None, auto_augment=None,
        interpolation=interpolation, re_prob=0.0, use_prefetcher=True,
    )
    transform.decode_min_side = _crop_side_needed(img_size, scale[0])
    return transform


def finetune_transform(img_size: int, *, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                       interpolation: str = "bicubic", scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5,
                       color_jitter: float | None = None):
    """DeiT/MAE fine-tuning augmentation from timm (RandAugment by default), as uint8.

    Random erasing and mixup/cutmix act on normalised batches, so the fine-tuning
    engine applies them on the device."""
    transform = create_transform(
        img_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
        auto_augment=auto_augment or None, interpolation=interpolation, re_prob=0.0, use_prefetcher=True,
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
    transform = create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                                 use_prefetcher=True)
    transform.decode_min_side = math.floor(img_size / crop_pct)
    return transform


def normalize_batch(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> float32 (x / 255 - mean) / std, on the images' device.

    `mean`/`std`: C numbers (a sequence, or a tensor of C or [1, C, 1, 1] elements)."""
    if images_uint8.dim() != 4:
        raise ValueError(f"normalize_batch expects images [B, C, H, W], got shape {tuple(images_uint8.shape)}")
    device = images_uint8.device
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    if mean_t.shape[1] != images_uint8.shape[1] or std_t.shape[1] != images_uint8.shape[1]:
        raise ValueError(f"mean/std have {mean_t.shape[1]}/{std_t.shape[1]} values for {images_uint8.shape[1]} channels")
    # one pass: x * (1 / (255 std)) - mean / std
    return torch.addcmul((-mean_t / std_t), images_uint8.float(), 1.0 / (255.0 * std_t))
