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

An ImageFolder is read exactly: its samples are the regular files under the class
folders, each labelled by the class folder it really lies in, so a link can neither
repeat images nor move them to another label, and nothing blocks:

- classes are the real, non-hidden sub-folders of `--root`, in sorted name order; a
  class folder without any file is refused (its label would belong to no image, and
  adding one image later would shift every label after it);
- a symlink to a folder is never followed, whether it leads back inside the tree (a
  loop such as `cat/loop -> ..` would file every other class under `cat`) or outside
  `--root`;
- a symlink to a file is followed when it resolves to a regular file, wherever that
  lies (a "symlink farm", a labelled view of images stored elsewhere, is a common way
  to build a data set; a file link cannot loop), and the image is filed under the
  folder the link is in;
- FIFOs, sockets and devices are never opened (reading a FIFO waits forever);
- everything not read is listed with its reason in the manifest's skipped inputs;
- a tree already split keeps its splits: `train/`, `val/` (or `validation/`) and `test/`
  directly under `--root`, each holding class folders, become the splits `train`,
  `validation` and `test`, with one class list (every class needs training images); a
  tree without `val/` gets its validation split carved from `train/` (`--val-fraction`), one
  without `test/` its test split (`--test-fraction`);
  split folders beside other folders, or holding images directly, are refused as
  ambiguous.

Images of every PIL mode become RGB through `pixels.to_rgb` (16-bit and float
pixels scaled, alpha composited), never through a clipping `convert("RGB")`.
"""
from __future__ import annotations

import colorsys
import inspect
import io
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from vitmpp.common.errors import UserError
from vitmpp.common.io import UnreadableFile, read_regular_file, special_kind

from .pixels import UnknownScale, to_rgb

SOURCES = ("digits", "mnist5k", "synthetic", "imagefolder", "torchvision")
# PIL format name -> our member extension, for passing encoded files through unchanged
PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


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


# ----------------------------------------------------------------------------- digits

def digits_source(image_size: int) -> SourceData:
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


# ----------------------------------------------------------------------------- synthetic

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "bars")
TEXTURES = ("noise", "stripes", "gradient", "checker")


def synthetic_class_names(num_classes: int) -> list[str]:
    hues = math.ceil(num_classes / len(SHAPES))
    return [f"{SHAPES[c % len(SHAPES)]}-hue{(c // len(SHAPES)) * 360 // hues:03d}" for c in range(num_classes)]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], phase: float = 0.0):
        return [(cx + radii[k % len(radii)] * r * math.cos(angle + phase + 2 * math.pi * k / n),
                 cy + radii[k % len(radii)] * r * math.sin(angle + phase + 2 * math.pi * k / n)) for k in range(n)]

    if kind == "square":
        return ring(4, [1.0], math.pi / 4)
    if kind == "triangle":
        return ring(3, [1.0], -math.pi / 2)
    if kind == "diamond":
        return ring(4, [1.0, 0.55])
    if kind == "star":
        return ring(10, [1.0, 0.42], -math.pi / 2)
    if kind == "cross":  # a plus sign: 12 corners at two radii
        w = 0.34
        pts = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]
    raise ValueError(kind)


def draw_synthetic(index: int, label: int, num_classes: int, image_size: int, seed: int) -> Image.Image:
    """The synthetic image number `index` of class `label` (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    size = image_size
    hues = math.ceil(num_classes / len(SHAPES))
    shape = SHAPES[label % len(SHAPES)]
    hue = (label // len(SHAPES)) / hues + rng.uniform(-0.25, 0.25) / hues
    fg = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)))

    # background: a low-saturation texture that carries no class information
    bg_hue = rng.uniform()
    base = np.array(colorsys.hsv_to_rgb(bg_hue, rng.uniform(0.0, 0.3), rng.uniform(0.15, 0.6))) * 255
    other = np.array(colorsys.hsv_to_rgb((bg_hue + 0.5) % 1, rng.uniform(0.0, 0.3), rng.uniform(0.15, 0.6))) * 255
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    if texture == "noise":
        mix = rng.uniform(size=(size, size))
    elif texture == "stripes":
        theta, freq = rng.uniform(0, math.pi), rng.uniform(2, 6)
        mix = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    elif texture == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        mix = np.clip(0.5 + 0.7 * ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta)), 0, 1)
    else:
        cells = int(rng.integers(2, 6))
        mix = ((np.floor(xx * cells * 0.999) + np.floor(yy * cells * 0.999)) % 2).astype(float)
    pixels = base[None, None, :] * (1 - mix[..., None]) + other[None, None, :] * mix[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")

    # foreground shape, 30-45% of the side in radius, fully inside the image
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "ring":
        draw.ellipse(box, outline=fg, width=max(1, int(r * 0.35)))
    elif shape == "bars":
        for k in (-1, 0, 1):
            dx, dy = math.cos(angle + math.pi / 2) * k * r * 0.6, math.sin(angle + math.pi / 2) * k * r * 0.6
            end = (math.cos(angle) * r, math.sin(angle) * r)
            draw.line([(cx + dx - end[0], cy + dy - end[1]), (cx + dx + end[0], cy + dy + end[1])],
                      fill=fg, width=max(1, int(r * 0.22)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fg)
    return image


def synthetic_source(count: int, image_size: int, num_classes: int, seed: int) -> SourceData:
    """`count` images, classes balanced (index i has label i % num_classes)."""

    def loader(i: int) -> Callable[[], Loaded]:
        return lambda: Loaded(draw_synthetic(i, i % num_classes, num_classes, image_size, seed))

    items = [Item(i % num_classes, f"synthetic[{i}]", loader(i)) for i in range(count)]
    return SourceData("synthetic", synthetic_class_names(num_classes), items=items)


# ----------------------------------------------------------------------------- files

def read_image_bytes(path: Path) -> bytes:
    """The bytes of an input image, or SkipInput with the reason (a FIFO, a device, unreadable)."""
    try:
        return read_regular_file(path)
    except UnreadableFile as err:
        raise SkipInput(err.reason.removeprefix("is ")) from None


def open_image_file(path: Path, *, keep_bytes: bool, draft_side: int | None = None) -> Loaded:
    """Read and fully decode an image file; SkipInput with the reason if it is not one.

    The file's bytes are kept (passed through to the shard) only when they decode to the
    same RGB pixels in any reader: RGB or grey, without a transparent colour."""
    data = read_image_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if draft_side and fmt == "JPEG":
                # decode at a reduced DCT scale when the result is still at least draft_side
                img.draft("RGB", (draft_side, draft_side))
            img.load()
            exact = img.mode in ("RGB", "L") and "transparency" not in img.info
            rgb = to_rgb(img)
    except Image.DecompressionBombError as err:
        raise SkipInput(f"too large to decode safely: {err}") from None
    except UnknownScale as err:
        raise SkipInput(str(err)) from None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        reason = "not an image" if isinstance(err, Image.UnidentifiedImageError) else f"corrupt image: {err}"
        raise SkipInput(reason) from None
    ext = PIL_FORMAT_EXT.get(fmt or "") if exact else None
    return Loaded(rgb, data if keep_bytes and ext else None, ext)


def _is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _list_class(folder: Path, root: Path, real_root: str, skipped: list[dict]) -> list[Path]:
    """The files of one class folder in name order, by the rules of the module docstring.

    Folders are recognised from `lstat` (never through a link); each real folder is entered
    once (a bind mount can make real folders loop too)."""
    files: list[Path] = []
    entered: set[tuple[int, int]] = set()

    def skip(path: Path, reason: str) -> None:
        skipped.append({"path": path.relative_to(root).as_posix(), "reason": reason})

    def visit(directory: Path) -> None:
        try:
            info = os.stat(directory, follow_symlinks=False)
            if (info.st_dev, info.st_ino) in entered:
                skip(directory, "folder already read through another path, not read again")
                return
            entered.add((info.st_dev, info.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            skip(directory, f"unreadable folder: {err.strerror or err}")
            return
        folders = []
        for entry in entries:
            path = Path(entry.path)
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    folders.append(path)
                elif stat.S_ISREG(mode):
                    files.append(path)
                elif stat.S_ISLNK(mode):
                    target = os.path.realpath(path)
                    target_mode = os.stat(path).st_mode
                    where = "inside" if _is_inside(target, real_root) else "outside"
                    if stat.S_ISDIR(target_mode):
                        skip(path, f"symlink to a folder {where} --root, not followed")
                    elif not stat.S_ISREG(target_mode):
                        skip(path, f"symlink to {special_kind(target_mode) or 'a special file'}, not followed")
                    else:
                        files.append(path)
                else:
                    skip(path, f"{special_kind(mode) or 'a special file'}, not a regular file")
            except OSError as err:  # a dangling or looping symlink, a file removed meanwhile
                skip(path, f"unreadable: {err.strerror or err}")
        for path in folders:  # a folder's files first, then its sub-folders (os.walk's order)
            visit(path)

    visit(folder)
    return files


# Folders that name a split when they sit directly under --root (the ImageNet layout:
# root/train/<class>/..., root/val/<class>/...), and the split each becomes.
SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def _class_folders(folder: Path, root: Path, skipped: list[dict]) -> list[str]:
    """The class folders directly under `folder` (non-hidden real folders, in name order); everything
    else there is recorded in `skipped` with its reason (paths relative to `root`)."""
    names: list[str] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        where = (Path(entry.path).relative_to(root)).as_posix()
        if entry.is_dir(follow_symlinks=False):
            if entry.name.startswith("."):
                skipped.append({"path": where, "reason": "hidden folder, not a class"})
            else:
                names.append(entry.name)
        elif entry.is_symlink() and entry.is_dir():
            skipped.append({"path": where, "reason": "symlink to a folder, not followed (not a class)"})
        else:
            skipped.append({"path": where, "reason": "outside a class folder"})
    return names


def imagefolder_source(root: Path, max_size: int | None) -> SourceData:
    """A class-per-folder tree under `root`, read exactly (module docstring); a tree already split
    (root/train/<class>, root/val/<class>, root/test/<class>) keeps its splits."""
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise UserError(f"Image folder '{root}' given with --root {what}; pass a folder of class sub-folders.")
    real_root = os.path.realpath(root)
    skipped: list[dict] = []
    top = _class_folders(root, root, skipped)
    if not top:
        linked = [s["path"] for s in skipped if s["reason"].startswith("symlink to a folder")]
        hint = (f"its {len(linked)} symlinked folders (e.g. '{linked[0]}') are not followed, so pass the folder they "
                "lead to as --root" if linked else
                "put each class's images in its own sub-folder (root/cat/1.jpg, root/dog/2.jpg)")
        raise UserError(f"Image folder '{root}' has no class sub-folders; {hint}.")
    split_folders = _split_layout(root, top)

    def loader(path: Path) -> Callable[[], Loaded]:
        return lambda: open_image_file(path, keep_bytes=True, draft_side=max_size)

    # (split or None, the folder whose sub-folders are the classes)
    parts = [(SPLIT_FOLDERS[f], root / f) for f in split_folders] if split_folders else [(None, root)]
    classes_of = {folder: (top if split is None else _class_folders(folder, root, skipped)) for split, folder in parts}
    class_names = sorted(set().union(*classes_of.values())) if split_folders else top
    if split_folders:
        stray = sorted(set(class_names) - set(classes_of[root / "train"]))
        if stray:
            raise UserError(f"Class folder '{stray[0]}' of '{root}' is in another split's folder but not in train/; "
                            "every class needs training images (add them, or remove the folder).")
    index = {name: label for label, name in enumerate(class_names)}
    splits: dict[str | None, list[Item]] = {}
    empty = []
    for split, folder in parts:
        items = []
        for name in classes_of[folder]:
            # every file is tried: an extension filter would hide mislabelled files instead of reporting them
            files = _list_class(folder / name, root, real_root, skipped)
            if not files:
                empty.append((folder / name).relative_to(root).as_posix())
            items += [Item(index[name], path.relative_to(root).as_posix(), loader(path)) for path in files]
        splits[split] = items
    if empty:
        which = (f"Class folder '{empty[0]}' under '{root}' holds" if len(empty) == 1 else
                 f"Class folders {', '.join(repr(n) for n in empty)} under '{root}' hold")
        raise UserError(f"{which} no files; add images or remove it (every folder is a class, and a class "
                        "without images would take a label no sample has).")
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in root.resolve().name) or "images"
    if not split_folders:
        return SourceData(name, class_names, items=splits[None], skipped=skipped)
    return SourceData(name, class_names, fixed_splits=splits, skipped=skipped)


def _split_layout(root: Path, top: list[str]) -> list[str]:
    """The split folders of an already split tree (train/ first), [] for a plain class-per-folder tree;
    a tree that is neither is refused with one sentence."""
    named = [f for f in top if f in SPLIT_FOLDERS]
    if not named:
        return []
    others = [f for f in top if f not in SPLIT_FOLDERS]
    holds_classes = {f: any(e.is_dir(follow_symlinks=False) and not e.name.startswith(".") for e in os.scandir(root / f))
                     for f in named}
    if others:
        raise UserError(f"Image folder '{root}' mixes split folders ({', '.join(named)}) with other folders "
                        f"('{others[0]}'); put every class under train/ (and val/, test/), or, if '{named[0]}' is "
                        "really a class, rename it.")
    if not any(holds_classes.values()):
        raise UserError(f"Image folder '{root}' holds {', '.join(f + '/' for f in named)} with images directly inside, "
                        "so it is unclear whether they are splits or classes; for splits put each class in its own "
                        "folder (train/cat/1.jpg), for classes rename them.")
    if not all(holds_classes.values()):
        flat = next(f for f, has in holds_classes.items() if not has)
        raise UserError(f"Image folder '{root}' looks split, but {flat}/ holds no class folders while "
                        f"{next(f for f, has in holds_classes.items() if has)}/ does; give every split the same "
                        "layout (split/class/image).")
    if "val" in named and "validation" in named:
        raise UserError(f"Image folder '{root}' has both val/ and validation/; keep one of them.")
    if "train" not in named:
        raise UserError(f"Image folder '{root}' has {', '.join(f + '/' for f in named)} but no train/; "
                        "pretraining and fine-tuning read the train split.")
    return sorted(named, key=lambda f: ("train", "val", "validation", "test").index(f))


# ----------------------------------------------------------------------------- torchvision

def torchvision_source(dataset: str, root: Path | None) -> SourceData:
    """A torchvision data set on disk; its own train/test split is kept when it has one."""
    import torchvision.datasets as tvd

    if root is None:
        raise UserError("--source torchvision needs --root, the folder that holds the data set's files.")
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
            raise UserError(f"torchvision {dataset} is not on disk under '{root}'; put its files there "
                            "(vitmpp never downloads data).") from None

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
            if os.path.islink(path) and _is_inside(os.path.realpath(dirpath), os.path.realpath(path)):
                raise UserError(f"'{path}' under --root is a symlink to one of its own parent folders, which "
                                "would be read again and again; remove it.")
        for fname in filenames:
            path = os.path.join(dirpath, fname)
            try:
                kind = special_kind(os.stat(path).st_mode)
            except OSError:  # a dangling link: torchvision reports a missing file itself
                continue
            if kind is not None:
                raise UserError(f"'{path}' under --root is {kind}, not a regular file, and reading it could wait "
                                "forever; remove it or point --root at the data set's own files.")


def _dataset_labels(ds) -> list[int]:
    for attr in ("targets", "labels", "_labels", "_targets"):
        values = getattr(ds, attr, None)
        if values is not None and len(values) == len(ds):
            return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    # no label list: read them (decodes each image once, before writing)
    return [int(ds[i][1]) for i in range(len(ds))]


def _classes_from(items: list[Item]) -> list[str]:
    return [str(c) for c in range(max((it.label for it in items), default=-1) + 1)]


# ----------------------------------------------------------------------------- splitting

def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a seeded, per-class train/validation split (validation gets round(n_c * f) per class).

    Written by hand rather than with sklearn's `train_test_split(stratify=...)`, which
    refuses classes with a single member and validation sets smaller than the number
    of classes; here such classes simply contribute nothing to validation.
    """
    rng = np.random.default_rng([seed, 0x5B117])
    labels_arr = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == c)
        members = members[rng.permutation(len(members))]
        n_val = int(round(len(members) * val_fraction))
        if n_val >= len(members):  # keep at least one training example per class
            n_val = len(members) - 1
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    # write order is shuffled too: shards then mix classes, which a shuffle buffer alone does poorly
    train = [train[i] for i in rng.permutation(len(train))]
    val = [val[i] for i in rng.permutation(len(val))]
    return train, val


def split_three_ways(labels: list[int], val_fraction: float, test_fraction: float, seed: int,
                     test_seed: int | None = None) -> dict[str, list[int]]:
    """Indices of the `train`, `validation` and `test` splits, each class-stratified.

    The test split is carved first (seeded by `test_seed`, default `seed`: a source whose test split
    must not move with `--seed` passes a constant), then validation from the rest; both fractions are
    of the whole class, so --val-fraction 0.2 --test-fraction 0.2 keeps about 60% for training. A
    fraction of 0 gives no such split (and leaves the other split exactly as without it).
    """
    indices = list(range(len(labels)))
    test: list[int] = []
    if test_fraction > 0:
        indices, test = stratified_split(labels, test_fraction, seed if test_seed is None else test_seed)
    rest_labels = [labels[i] for i in indices]
    train_pos, val_pos = stratified_split(rest_labels, val_fraction / (1.0 - test_fraction), seed)
    return {"train": [indices[i] for i in train_pos], "validation": [indices[i] for i in val_pos], "test": test}
