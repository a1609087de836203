"""Data-making helpers for the data-layer tests and the reliability tests.

- `write_tiny_shards`: shards of any lengths (uneven on purpose) whose images
  encode their own index and label in their pixels, with a manifest and labels,
  so a test can check that every image arrived with its own label and index;
- `index_of_image`: reads that code back from a uint8 CHW tensor;
- shard damage: `truncate_shard`, `empty_shard`, `replace_member`, `drop_member`,
  `add_member` (e.g. a pickle that would create a marker file when unpickled);
- `spec_for`: a LoaderSpec whose manifest is read from the shards (or `manifest=`).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vitmpp.common.io import atomic_write_json
from vitmpp.datasets import LoaderSpec, read_manifest
from vitmpp.datasets.manifest import MANIFEST_NAME, Manifest, SplitInfo


def code_image(index: int, label: int, size: int = 16, textured: bool = False) -> Image.Image:
    """An image whose colour is (index % 256, index // 256, label) - exact under PNG.

    `textured`: the border (all but the centre 4x4) is seeded noise instead, so that
    random crops and flips change the pixels (a flat image hides augmentations)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = (index % 256, index // 256, label)
    if textured:
        noise = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
        c = size // 2
        noise[c - 2 : c + 2, c - 2 : c + 2] = image[c - 2 : c + 2, c - 2 : c + 2]
        image = noise
    return Image.fromarray(image)


def index_of_image(image: torch.Tensor) -> tuple[int, int]:
    """(index, label) from an image made by `code_image` (uint8 CHW), read at its centre."""
    h, w = image.shape[1] // 2, image.shape[2] // 2
    r, g, b = (int(v) for v in image[:, h, w])
    return r + 256 * g, b


def write_tiny_shards(
    out: Path,
    lengths: Sequence[int],
    *,
    split: str = "train",
    num_classes: int = 5,
    size: int = 16,
    name: str = "tiny",
    fmt: str = "png",
    extra_splits: dict | None = None,
    textured: bool = False,
) -> Manifest:
    """Write shards `{name}-{split}-{k:06d}.tar` of the given lengths; sample i has label i % num_classes.

    `extra_splits` maps more split names to their shard lengths; `textured` see `code_image`."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split_name, split_lengths in {split: lengths, **(extra_splits or {})}.items():
        filenames, labels, index = [], [], 0
        for k, n in enumerate(split_lengths):
            fname = f"{name}-{split_name}-{k:06d}.tar"
            with wds.TarWriter(str(out / fname), encoder=False, mtime=0) as writer:
                for _ in range(n):
                    label = index % num_classes
                    buf = io.BytesIO()
                    code_image(index, label, size, textured).save(
                        buf, format="PNG" if fmt == "png" else "JPEG", quality=95
                    )
                    writer.write({"__key__": f"{index:08d}", fmt: buf.getvalue(), "cls": str(label).encode()})
                    labels.append(label)
                    index += 1
            filenames.append(fname)
        np.save(out / f"_labels-{split_name}.npy", np.asarray(labels, dtype=np.int64))
        splits[split_name] = SplitInfo(
            split_name,
            int(sum(split_lengths)),
            filenames,
            list(split_lengths),
            labels_file=f"_labels-{split_name}.npy",
            shard_bytes=[os.path.getsize(out / f) for f in filenames],
        )
    manifest = Manifest(
        root=out,
        name=name,
        splits=splits,
        num_classes=num_classes,
        class_names=[str(c) for c in range(num_classes)],
        image_size=size,
    )
    atomic_write_json(out / MANIFEST_NAME, manifest.to_json())
    return manifest


def spec_for(shards, *, manifest=None, **fields) -> LoaderSpec:
    """`LoaderSpec(shards=shards, ...)` with the manifest read from `manifest` (a path or a
    Manifest) or else from next to the shards: what a caller does once per run."""
    return LoaderSpec(shards=shards, manifest=read_manifest(manifest if manifest is not None else shards), **fields)


# ----------------------------------------------------------------------------- damage


def _rewrite(path: Path, edit) -> None:
    """Rewrite tar `path` member by member; `edit(name, data)` returns (name, data) or None to drop."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    out = []
    for name, data in members:
        result = edit(name, data)
        if result is not None:
            out.extend(result if isinstance(result, list) else [result])
    with tarfile.open(path, "w") as tar:
        for name, data in out:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def replace_member(path: Path, key: str, ext: str, data: bytes) -> None:
    """Replace the bytes of member `{key}.{ext}` (e.g. garbage instead of a PNG)."""
    _rewrite(Path(path), lambda name, old: (name, data if name == f"{key}.{ext}" else old))


def drop_member(path: Path, key: str, ext: str) -> None:
    """Remove member `{key}.{ext}` (e.g. a sample's cls)."""
    _rewrite(Path(path), lambda name, old: None if name == f"{key}.{ext}" else (name, old))


def add_member(path: Path, key: str, ext: str, data: bytes) -> None:
    """Add member `{key}.{ext}` right after the sample's other members."""

    def edit(name, old):
        if name == f"{key}.cls":
            return [(name, old), (f"{key}.{ext}", data)]
        return (name, old)

    _rewrite(Path(path), edit)


def truncate_shard(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut the file to a fraction of its bytes, mid-member (a partial copy)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction) // 512 * 512 + 100)


def empty_shard(path: Path) -> None:
    """Make the shard a zero-byte file."""
    Path(path).write_bytes(b"")


def keys_of(path: Path) -> list[str]:
    """Sample keys in shard order."""
    with tarfile.open(path) as tar:
        seen = []
        for m in tar.getmembers():
            key = m.name.split(".", 1)[0]
            if key not in seen:
                seen.append(key)
    return seen


class MarkerPickle:
    """Unpickling this creates `path`: proof that something ran pickle.loads on it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
