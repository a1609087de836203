"""Where images come from before they become shards: the inputs of `make_shards`.

Every source lists its samples up front as `Item`s (label known, pixels loaded on
demand) so the train/validation split can be stratified before anything is read:

- `digits`: scikit-learn's bundled 1,797 handwritten 8x8 digits (no download),
  upscaled to `image_size` and written as RGB;
- `synthetic`: procedurally drawn shapes on textured backgrounds; the class is the
  (shape, colour) pair, everything else (position, size, rotation, background) is
  drawn per image from a generator seeded by (seed, index), so any image can be
  regenerated alone;
- `imagefolder`: a class-per-folder tree; files PIL cannot read are reported as
  skipped, never fatal;
- `torchvision`: a torchvision data set already on disk (`download=False`).

Each source is a function registered by name (`register_source`): its keyword parameters are
its options (`make_shards --root`, `--image-size`, ...), so a new source is one function. The
built-in ones: `digits` and `torchvision` here, `synthetic` (synthetic.py), `imagefolder`
(imagefolder.py, which says what an ImageFolder reads and skips), `mnist5k` (packaged.py).

Images of every PIL mode become RGB through `pixels.to_rgb` (16-bit and float
pixels scaled, alpha composited), never through a clipping `convert("RGB")`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitmpp.common.errors import UserError
from vitmpp.common.io import special_kind

from .pixels import UnknownScale, to_rgb


class SkipInput(Exception):
    """An input that cannot become a sample (unreadable, not an image); its message is the reason."""


@dataclass
class Loaded:
    """A loaded input: the RGB image, plus its encoded bytes and extension when they decode to exactly it."""

    image: Image.Image
    data: bytes | None = None
    ext: str | None = None


@dataclass
class Item:
    """One input sample: its label, where it came from (for the json member and skip lists), its loader."""

    label: int
    origin: str
    load: Callable[[], Loaded]


@dataclass
class SourceData:
    """What a source offers: class names and either one pool of items (split by us) or fixed splits."""

    name: str
    class_names: list[str]
    items: list[Item] | None = None
    fixed_splits: dict[str, list[Item]] | None = None
    skipped: list[dict] | None = None  # inputs rejected while listing (outside a class folder)
    files: bool = False  # items are files: each sample keeps its path (a json member), and a class none
    #                      of whose files could be read is refused (its label would belong to no image)
    own_splits: str | None = None  # what its fixed splits are, for the manifest's splits_made_by
    train_origin: str = "train"  # what its train split is called there ("train/" for a folder)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Source:
    """A registered source: `read(**options) -> SourceData`, its keyword parameters its options. The
    writer's `seed` and `max_size` reach it too when it names them."""

    name: str
    read: Callable[..., SourceData]
    test_fraction: float | None = None  # a test split of this fraction, the same for every seed (`test_seed`)
    test_seed: int | None = None

    @property
    def options(self) -> dict[str, Any]:
        """Its options and their defaults."""
        return {n: p.default for n, p in inspect.signature(self.read).parameters.items()}


SOURCES: dict[str, Source] = {}
SHARED_OPTIONS = ("seed", "max_size")  # the writer's, given to a source that names them


def register_source(name: str, *, test_fraction: float | None = None, test_seed: int | None = None):
    """Register the decorated function as source `name` (`make_shards --source name`)."""

    def register(read: Callable[..., SourceData]) -> Callable[..., SourceData]:
        SOURCES[name] = Source(name, read, test_fraction, test_seed)
        return read

    return register


# ----------------------------------------------------------------------------- digits


# the digits' test split is a fixed 20% that no seed moves: every digits number is reported on it
@register_source("digits", test_fraction=0.2, test_seed=0)
def digits_source(image_size: int = 32) -> SourceData:
    """scikit-learn's digits (8x8, 17 grey levels 0..16), upscaled with bicubic to `image_size`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 -> 0..255; rounding keeps the 17 levels distinct
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return grey_digit_images("digits", pixels, digits.target.astype(int), image_size)


def grey_digit_images(name: str, pixels: np.ndarray, labels: np.ndarray, image_size: int) -> SourceData:
    """Ten classes of small grey images held in memory: pixels (N, H, W) uint8, labels (N,) 0..9; each
    item is upscaled with bicubic to `image_size` and written as RGB (digits and mnist5k alike)."""

    def loader(i: int) -> Callable[[], Loaded]:
        def load() -> Loaded:
            small = Image.fromarray(pixels[i], mode="L")
            return Loaded(small.resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB"))

        return load

    items = [Item(int(labels[i]), f"{name}[{i}]", loader(i)) for i in range(len(labels))]
    return SourceData(name, [str(d) for d in range(10)], items=items)


# ----------------------------------------------------------------------------- torchvision


@register_source("torchvision")
def torchvision_source(dataset: str = "CIFAR10", root: Path | None = None) -> SourceData:
    """A torchvision data set on disk; its own train/test split is kept when it has one."""
    import torchvision.datasets as tvd

    if root is None:
        raise UserError("--source torchvision needs --root, the folder that holds the data set's files.")
    root = Path(root).expanduser()
    cls = getattr(tvd, dataset, None)
    if not (inspect.isclass(cls) and issubclass(cls, tvd.VisionDataset)):
        raise UserError(f"'{dataset}' given with --dataset is not a torchvision data set (e.g. CIFAR10, MNIST).")
    refuse_special_files(Path(root))
    params = inspect.signature(cls.__init__).parameters
    kwargs = {"download": False} if "download" in params else {}

    def load(**split_kw):
        try:
            return cls(str(root), **split_kw, **kwargs)
        except (RuntimeError, FileNotFoundError, OSError):
            # torchvision's own message suggests download=True: we never download
            raise UserError(
                f"torchvision {dataset} is not on disk under '{root}'; put its files there "
                "(vitmpp never downloads data)."
            ) from None

    # the data set's own test split stays `test` (what papers report on); validation is carved from train
    if "train" in params:
        parts = {"train": load(train=True), "test": load(train=False)}
    elif "split" in params:
        parts = {"train": load(split="train"), "test": load(split="test")}
    else:
        parts = {"all": load()}

    def items_of(ds, split: str) -> list[Item]:
        labels = _dataset_labels(ds)

        def loader(i: int) -> Callable[[], Loaded]:
            def fetch() -> Loaded:
                try:
                    image = ds[i][0]
                except Exception as err:  # a damaged file inside the data set: skip it, say why
                    raise SkipInput(f"unreadable: {err}") from None
                if not isinstance(image, Image.Image):
                    raise SkipInput(f"{dataset}[{i}] is a {type(image).__name__}, not an image")
                try:
                    return Loaded(to_rgb(image))
                except UnknownScale as err:
                    raise SkipInput(str(err)) from None

            return fetch

        return [Item(int(labels[i]), f"{dataset}/{split}[{i}]", loader(i)) for i in range(len(ds))]

    first = next(iter(parts.values()))
    classes = [str(c) for c in getattr(first, "classes", [])]
    name = "".join(c if c.isalnum() else "_" for c in dataset.lower())
    if "all" in parts:
        items = items_of(parts["all"], "all")
        return SourceData(name, classes or _classes_from(items), items=items)
    fixed = {split: items_of(ds, split) for split, ds in parts.items()}
    return SourceData(name, classes or _classes_from(fixed["train"] + fixed["test"]), fixed_splits=fixed)


def refuse_special_files(root: Path) -> None:
    """UserError naming a FIFO, socket or device under `root` (or a link to one), or a symlink to
    one of its own parent folders: torchvision reads the files it expects without checking (it
    would wait forever on a FIFO), and its ImageFolder follows every symlinked folder."""
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are not entered
        for dname in dirnames:
            path = os.path.join(dirpath, dname)
            if os.path.islink(path) and is_inside(os.path.realpath(dirpath), os.path.realpath(path)):
                raise UserError(
                    f"'{path}' under --root is a symlink to one of its own parent folders, which "
                    "would be read again and again; remove it."
                )
        for fname in filenames:
            path = os.path.join(dirpath, fname)
            try:
                kind = special_kind(os.stat(path).st_mode)
            except OSError:  # a dangling link: torchvision reports a missing file itself
                continue
            if kind is not None:
                raise UserError(
                    f"'{path}' under --root is {kind}, not a regular file, and reading it could wait "
                    "forever; remove it or point --root at the data set's own files."
                )


def _dataset_labels(ds) -> list[int]:
    for attr in ("targets", "labels", "_labels", "_targets"):
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    # no label list: read them (decodes each image once, before writing)
    return [int(ds[i][1]) for i in range(len(ds))]


def _classes_from(items: list[Item]) -> list[str]:
    return [str(c) for c in range(max((it.label for it in items), default=-1) + 1)]


def is_inside(path: str, root: str) -> bool:
    """Whether real path `path` is `root` or lies under it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
