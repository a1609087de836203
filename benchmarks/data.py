"""Benchmark data, made here: ImageNet-like JPEGs, the same files as shards, and small shards.

The photo-like images (default 500 x 375, ImageNet's most common size) are a
smooth random colour field plus texture and sensor-like noise, so their JPEGs
carry about as much entropy-coded data per pixel as photographs (a flat
synthetic picture decodes several times faster than a photo and would flatter
every loader). They are written once as an ImageFolder tree; the shards are made
from that tree by `make_shards`, which keeps JPEG files byte for byte, so both
loaders read the very same JPEGs.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_QUALITY = 90  # a typical camera/web quality (ImageNet's files are mostly 75-96)
CLASSES = 4


def photo_like(index: int, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A deterministic photo-like RGB image of `size` (width, height)."""
    rng = np.random.default_rng([seed, index, 0xF070])
    w, h = size
    # low-frequency colour field: a coarse random grid upsampled bicubically
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    # mid-frequency texture: a finer grid, and edges from a few random discs
    fine = rng.uniform(-40, 40, size=(h // 12 + 1, w // 12 + 1, 1)).astype(np.float32)
    fine = np.asarray(Image.fromarray(((fine[..., 0] + 40) * 3).astype(np.uint8), "L").resize((w, h), Image.Resampling.BILINEAR),
                      dtype=np.float32)[..., None] / 3 - 40
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        field[inside] = field[inside] * 0.5 + rng.uniform(0, 255, size=3) * 0.5
    noise = rng.normal(0, 14, size=(h, w, 3)).astype(np.float32)
    pixels = np.clip(field + fine + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_photo_folder(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """An ImageFolder tree `root/class_k/xxxxxxxx.jpg` of `count` photo-like JPEGs (made once)."""
    root = Path(root)
    done = root / ".complete"
    if done.exists() and done.read_text() == f"{count} {size} {seed}":
        return root
    for index in range(count):
        folder = root / f"class_{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        out = io.BytesIO()
        photo_like(index, size, seed).save(out, format="JPEG", quality=JPEG_QUALITY)
        (folder / f"{index:08d}.jpg").write_bytes(out.getvalue())
    done.write_text(f"{count} {size} {seed}")
    return root


def shards_from_folder(root: Path, out: Path, max_size: int | None = None, maxcount: int = 64) -> Path:
    """Shards of an ImageFolder tree through `make_shards` (JPEGs kept byte for byte unless resized)."""
    from vitmpp.datasets import write_shards

    out = Path(out)
    if not (out / "_info.json").exists():
        write_shards(out, "imagefolder", root=root, fmt="jpg", max_size=max_size, maxcount=maxcount,
                     val_fraction=0.0, progress=False)
    return out


def synthetic_shards(out: Path, count: int, image_size: int, maxcount: int = 256) -> Path:
    """`make_shards --source synthetic --format jpg` shards (made once)."""
    from vitmpp.datasets import write_shards

    out = Path(out)
    if not (out / "_info.json").exists():
        write_shards(out, "synthetic", fmt="jpg", image_size=image_size, count=count, maxcount=maxcount,
                     val_fraction=0.0, progress=False)
    return out


def folder_bytes(root: Path) -> tuple[int, int]:
    """(files, total bytes) of the JPEGs under `root`."""
    files = list(Path(root).rglob("*.jpg"))
    return len(files), sum(f.stat().st_size for f in files)
