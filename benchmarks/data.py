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

import argparse
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vitmpp.common.io import atomic_write

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
    fine = (
        np.asarray(
            Image.fromarray(((fine[..., 0] + 40) * 3).astype(np.uint8), "L").resize((w, h), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )[..., None]
        / 3
        - 40
    )
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        field[inside] = field[inside] * 0.5 + rng.uniform(0, 255, size=3) * 0.5
    noise = rng.normal(0, 14, size=(h, w, 3)).astype(np.float32)
    pixels = np.clip(field + fine + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _write_photo(args: tuple) -> None:
    path, index, size, seed = args
    out = io.BytesIO()
    photo_like(index, size, seed).save(out, format="JPEG", quality=JPEG_QUALITY)
    Path(path).write_bytes(out.getvalue())


def write_photo_folder(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """An ImageFolder tree `root/class_k/xxxxxxxx.jpg` of `count` photo-like JPEGs (made once, on every core)."""
    root = Path(root)
    done = root / ".complete"
    stamp = f"{count} {tuple(size)} {seed}"
    if done.exists() and done.read_text() == stamp:
        return root
    jobs = []
    for index in range(count):
        folder = root / f"class_{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{index:08d}.jpg"), index, tuple(size), seed))
    workers = min(os.cpu_count() or 1, max(1, count // 64))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_photo, jobs, chunksize=32))
    else:
        for job in jobs:
            _write_photo(job)
    done.write_text(stamp)
    return root


def repeat_shards(source: Path, out: Path, times: int) -> Path:
    """A shard folder whose train split lists every shard of `source` `times` times (symbolic links).

    An epoch of several passes over a small generated set keeps a short GPU run's
    epochs long (the loader keeps its workers across epochs, but each epoch starts with
    an empty prefetch queue). The loader shuffles shards and samples, so the passes differ.
    Only the train split is kept (no labels sidecar: pretraining does not read it).
    """
    source, out = Path(source).absolute(), Path(out)
    if (out / "_info.json").exists():
        return out
    info = json.loads((source / "_info.json").read_text())
    train = info["splits"]["train"]
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(times):
        for name in train["filenames"]:
            link = out / f"r{k:03d}-{name}"
            if not link.exists():
                link.symlink_to(source / name)
            names.append(link.name)
    split = {
        "name": "train",
        "num_samples": train["num_samples"] * times,
        "filenames": names,
        "shard_lengths": list(train["shard_lengths"]) * times,
    }
    if train.get("shard_bytes"):
        split["shard_bytes"] = list(train["shard_bytes"]) * times
    info["splits"] = {"train": split}
    atomic_write(out / "_info.json", json.dumps(info, indent=1))
    return out


def shards_from_folder(root: Path, out: Path, max_size: int | None = None, maxcount: int = 64) -> Path:
    """Shards of an ImageFolder tree through `make_shards` (JPEGs kept byte for byte unless resized)."""
    from vitmpp.datasets import write_shards

    out = Path(out)
    if not (out / "_info.json").exists():
        write_shards(
            out,
            "imagefolder",
            root=root,
            fmt="jpg",
            max_size=max_size,
            maxcount=maxcount,
            val_fraction=0.0,
            test_fraction=0.0,
            progress=False,
        )
    return out


def folder_from_shards(shards: Path, out: Path) -> Path:
    """An ImageFolder tree of the very JPEG bytes of a shard folder's train split (made once), so that
    ImageFolder + DataLoader can be measured on e.g. `--max-size` shards' images."""
    from vitmpp.datasets import read_manifest
    from vitmpp.datasets.samples import Tally, read_shard

    out = Path(out)
    done = out / ".complete"
    if done.exists():
        return out
    manifest = read_manifest(str(shards))
    info = manifest.split("train")
    tally = Tally()
    for url, offset, length in zip(manifest.shard_urls("train"), info.offsets, info.shard_lengths):
        for raw in read_shard(url, offset, length, None, tally):
            folder = out / f"class_{int(raw.members['cls'])}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{raw.index:08d}.jpg").write_bytes(raw.members["jpg"])
    done.write_text("")
    return out


def synthetic_shards(out: Path, count: int, image_size: int, maxcount: int = 256) -> Path:
    """`make_shards --source synthetic --format jpg` shards (made once)."""
    from vitmpp.datasets import write_shards

    out = Path(out)
    if not (out / "_info.json").exists():
        write_shards(
            out,
            "synthetic",
            fmt="jpg",
            image_size=image_size,
            count=count,
            maxcount=maxcount,
            val_fraction=0.0,
            test_fraction=0.0,
            progress=False,
        )
    return out


def folder_bytes(root: Path) -> tuple[int, int]:
    """(files, total bytes) of the JPEGs under `root`."""
    files = list(Path(root).rglob("*.jpg"))
    return len(files), sum(f.stat().st_size for f in files)


def main(argv: list[str] | None = None) -> int:
    """`python -m vitmpp.benchmarks.data --out DIR [--count N] [--size WxH] [--repeat K]`: pretraining shards
    of photo-like JPEGs for a GPU check (the images, their shards, and a K-pass view of them)."""
    parser = argparse.ArgumentParser(prog="python -m vitmpp.benchmarks.data", description=main.__doc__)
    parser.add_argument("--out", required=True, help="folder for the images and shards")
    parser.add_argument("--count", type=int, default=2048, help="distinct images")
    parser.add_argument(
        "--size", default="341x256", help="image width x height (341x256: ImageNet after --max-size 256)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="passes over the images per epoch")
    args = parser.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    out = Path(args.out)
    photos = write_photo_folder(out / f"photos-{w}x{h}-{args.count}", args.count, (w, h))
    shards = shards_from_folder(photos, out / f"shards-{w}x{h}-{args.count}", maxcount=128)
    if args.repeat > 1:
        shards = repeat_shards(shards, out / f"shards-{w}x{h}-{args.count}-x{args.repeat}", args.repeat)
    print(shards)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
