"""Write a data set as webdataset shards plus an `_info.json` manifest.

    python -m vitmpp.datasets.make_shards --source digits --out data/digits
    python -m vitmpp.datasets.make_shards --source mnist5k --out data/mnist5k   # pip install "vitmpp[mnist5k]"
    python -m vitmpp.datasets.make_shards --source imagefolder --root ~/photos --out data/photos \
        --format jpg --max-size 256
    python -m vitmpp.datasets.make_shards --source torchvision --dataset CIFAR10 --root ~/cifar --out data/cifar10

Output (`--out`): `{name}-{split}-{000000..N}.tar` for the splits `train`,
`validation` and `test`, each sample holding `{key}.{jpg|png|webp}` (RGB, or grey kept as it was;
other modes are converted by `pixels.to_rgb`), `{key}.cls` (the
label as decimal text) and, for imagefolder, `{key}.json` (the file it came from); keys are the
sample's index in its split (8 digits, no dots). Next to them `_labels-{split}.npy`
(every label in shard order) and `_info.json` (see `manifest.py`).

Safety: everything is written into a hidden sibling folder `.{out}.partial` and
renamed to `--out` only when complete (the manifest last; `vitmpp.common.io.atomic_dir`),
so an interrupted run leaves no folder that looks complete; an existing non-empty
`--out` is refused unless `--overwrite`, and even then only if it holds nothing but
shards.

Three splits, each class-stratified and seeded: `test` (`--test-fraction`; for digits a fixed
20% that no `--seed` moves, so every run of the project reports on the same images), then
`validation` (`--val-fraction`) from the rest, and `train`. Choices (epochs, checkpoints,
recipes) are made on `validation`; `test` is only reported; pretraining reads only `train`. A
source's own test set (a torchvision data set's, an ImageFolder's `test/`) becomes `test`, and a
missing validation or test split is carved from its `train`. The manifest says how each split
was made (`splits_made_by`).

A requested split is never silently missing: when `--val-fraction` is too small to put
one image of any class into validation (or every image chosen for it was unreadable),
the shards are written without it (pretraining reads only `train`) and a `SplitWarning`
says so, with the fraction that would give one (fine-tuning needs it). An ImageFolder
class none of whose files could be read is refused: its label would belong to no image
(see `sources.py` for what an ImageFolder reads and skips).

The embedded default data set (`digits_shards`) is written the same way into the
cache folder, by one process per filesystem under a file lock.

`--max-size N` bounds the *shorter* side: larger images are downscaled (aspect
kept, never upscaled) so that a later RandomResizedCrop or centre crop at N still
has full resolution, while decoding stays cheap (as FFCV's max_resolution does
for the longer side; we bound the shorter one so no crop ever upsamples).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import io
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from vitmpp.common.errors import UserError, cli_entry
from vitmpp.common.io import atomic_dir, atomic_write_json

from .packaged import mnist5k_source
from .manifest import MANIFEST_NAME, Manifest, SplitInfo, read_manifest
from .sources import (
    SOURCES,
    Item,
    SkipInput,
    SourceData,
    digits_source,
    imagefolder_source,
    split_three_ways,
    synthetic_source,
    torchvision_source,
)

FORMATS = ("png", "jpg", "webp")
QUALITY = 95  # jpg and webp: visually lossless, ~3x smaller than PNG for photos
MANIFEST_VERSION = 1
DEFAULT_MAXCOUNT = 1000
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1
GENERATED_DEFAULTS = {"image_size": 32, "count": 1000, "num_classes": 10}
# files a shard folder may hold; --overwrite refuses folders with anything else
_OURS = (".tar", MANIFEST_NAME)


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """RGB image -> file bytes in `fmt` (png lossless; jpg/webp at quality 95)."""
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, format="PNG")
    elif fmt == "jpg":
        image.save(out, format="JPEG", quality=QUALITY)
    else:
        image.save(out, format="WEBP", quality=QUALITY)
    return out.getvalue()


def cap_shorter_side(image: Image.Image, max_size: int | None) -> Image.Image:
    """Downscale so the shorter side is at most `max_size` (aspect kept; never upscaled)."""
    if not max_size or min(image.size) <= max_size:
        return image
    w, h = image.size
    size = (max_size, max(1, round(h * max_size / w))) if w <= h else (max(1, round(w * max_size / h)), max_size)
    return image.resize(size, Image.Resampling.LANCZOS)


def _check_args(source, fmt, max_size, maxcount, val_fraction, test_fraction, image_size, count, num_classes) -> None:
    if source not in SOURCES:
        raise UserError(f"Unknown --source '{source}'; choose one of {', '.join(SOURCES)}.")
    if fmt not in FORMATS:
        raise UserError(f"Unknown --format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    if max_size is not None and max_size < 1:
        raise UserError(f"--max-size must be a positive number of pixels, got {max_size}.")
    if maxcount < 1:
        raise UserError(f"--maxcount must be at least 1 sample per shard, got {maxcount}.")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    if not 0 <= test_fraction < 1:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}.")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"--val-fraction {val_fraction:g} and --test-fraction {test_fraction:g} leave nothing for "
                        "training; make their sum smaller than 1.")
    if source == "digits" and test_fraction != DIGITS_TEST_FRACTION:
        raise UserError(f"The digits source has a fixed test split ({DIGITS_TEST_FRACTION:g} of every class, the "
                        "same for every --seed, so that all reported numbers share it); leave --test-fraction out.")
    generated = source in ("digits", "mnist5k", "synthetic")
    if image_size is not None and not generated:
        raise UserError(f"--image-size applies to the digits, mnist5k and synthetic sources, not {source}; "
                        "use --max-size to bound the size of real images.")
    if image_size is not None and not 4 <= image_size <= 4096:
        raise UserError(f"--image-size must be between 4 and 4096 pixels, got {image_size}.")
    for flag, value in (("--count", count), ("--num-classes", num_classes)):
        if value is not None and source != "synthetic":
            raise UserError(f"{flag} applies to the synthetic source only, not {source}.")
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}.")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty folder unless `overwrite`, and then only if it holds just shards."""
    if out.exists() and not out.is_dir():
        raise UserError(f"Output '{out}' exists and is not a folder; choose another --out.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"Output folder '{out}' already exists and is not empty; pass --overwrite to replace "
                        "its shards, or choose another --out.")
    foreign = [p.name for p in out.iterdir()
               if not (p.is_file() and (p.name.endswith(_OURS) or p.name.startswith("_labels-")))]
    if foreign:
        raise UserError(f"Refusing to overwrite '{out}': it holds {foreign[0]!r}, which is not a shard file; "
                        "choose another --out.")


def _load_sample(item: Item, fmt: str, max_size: int | None) -> tuple[bytes, tuple[int, int]]:
    loaded = item.load()
    image = cap_shorter_side(loaded.image, max_size)
    if loaded.data is not None and loaded.ext == fmt and image is loaded.image:
        # the file is already in the requested format and size: keep its bytes (no re-encoding loss)
        return loaded.data, image.size
    return encode_image(image, fmt), image.size


def _write_split(tmp: Path, name: str, split: str, items: list[Item], *, fmt: str, max_size: int | None,
                 maxcount: int, bar, skipped: list[dict], sizes: set, with_origin: bool) -> SplitInfo | None:
    """Write one split's shards into `tmp`; returns its SplitInfo (None when nothing was written)."""
    import webdataset as wds

    pattern = str(tmp / f"{name}-{split}-%06d.tar")
    shards: list[tuple[str, int]] = []
    labels: list[int] = []
    writer = None

    def closed(fname: str) -> None:
        shards.append((fname, writer.count))

    try:
        for item in items:
            try:
                data, size = _load_sample(item, fmt, max_size)
            except SkipInput as reason:
                skipped.append({"path": item.origin, "reason": str(reason)})
                bar.set_postfix(skipped=len(skipped), refresh=False)
                bar.update(1)
                continue
            if writer is None:  # ShardWriter opens a shard at once: create it only when there is a sample
                # encoder=False: we hand over bytes; mtime fixed so equal inputs give identical tars
                writer = wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, post=closed, encoder=False, mtime=0)
            key = f"{len(labels):08d}"
            sample = {"__key__": key, fmt: data, "cls": str(item.label).encode()}
            if with_origin:
                sample["json"] = json.dumps({"source": item.origin.replace("\\", "/")}).encode()
            writer.write(sample)
            labels.append(item.label)
            sizes.add(size)
            bar.update(1)
    finally:
        if writer is not None:
            writer.close()
    if not labels:
        return None
    labels_file = f"_labels-{split}.npy"
    np.save(tmp / labels_file, np.asarray(labels, dtype=np.int64), allow_pickle=False)
    return SplitInfo(
        name=split, num_samples=len(labels), filenames=[os.path.basename(f) for f, _ in shards],
        shard_lengths=[n for _, n in shards], labels_file=labels_file,
        shard_bytes=[os.path.getsize(f) for f, _ in shards],
    )


class SplitWarning(UserWarning):
    """A split that was asked for came out empty and was not written."""


class SmallSplitWarning(UserWarning):
    """A validation or test split too small for its numbers to mean much (MIN_EVAL_IMAGES)."""


# Below this many images an accuracy measured on a split moves by more than +-10 points (95%, at 50%
# accuracy: 1.96 x sqrt(0.25 / n)) by chance alone, more than most differences between recipes.
MIN_EVAL_IMAGES = 100


def _small_split(count: int, total: int, split: str) -> str:
    """Why a validation or test split of `count` images (of the `total` its fraction is taken of) gives
    numbers that are noise, and the fraction that would give MIN_EVAL_IMAGES."""
    flag = "--val-fraction" if split == "validation" else "--test-fraction"
    spread = 100 * 1.96 * math.sqrt(0.25 / count)
    use = "every choice made on it (recipe, checkpoint) is" if split == "validation" else "a result on it is"
    needed = math.ceil(100 * (MIN_EVAL_IMAGES + 2) / total) / 100  # (+2: each class rounds its share)
    fix = (f"pass {flag} {needed:.2f} for about {MIN_EVAL_IMAGES}" if needed < 0.5
           else f"the {total} images are too few for a {split} split of {MIN_EVAL_IMAGES}: read differences "
                f"smaller than that as noise")
    return (f"The {split} split has {count} images: an accuracy measured on it moves by up to ±{spread:.0f} points "
            f"by chance (95%), so {use} mostly noise; {fix}.")


def _empty_split(items: list[Item], fraction: float, split: str = "validation") -> str:
    """Why --val-fraction (or --test-fraction) gave `split` no image, and the fraction (or class size) that
    would give one.

    A class of n images gives round(n x f) images to the split and always keeps one for training."""
    flag = "--val-fraction" if split == "validation" else "--test-fraction"
    largest = int(np.bincount([it.label for it in items]).max())
    needs = "fine-tuning needs" if split == "validation" else "reported results need"
    written = f"so the shards have no {split} split, which {needs}"
    if largest < 2:
        return (f"{flag} {fraction:g} puts no image in the {split} split (every class has a single "
                f"image, which stays in training), {written}; add images, or pass {flag} 0 to say you "
                "want none.")
    needed = max(2, math.floor(0.5 / fraction) + 1)
    while round(needed * fraction) < 1:
        needed += 1
    smallest = math.ceil(50 / largest) / 100
    while round(largest * smallest) < 1:
        smallest += 0.01
    return (f"{flag} {fraction:g} puts no image in the {split} split (the largest class has "
            f"{largest} images, and a class needs {needed} for one {split} image at that fraction), {written}; "
            f"pass {flag} {smallest:.2f} or more, or 0 to say you want none.")


def _refuse_classes_without_samples(class_names: list[str], infos: dict, tmp: Path, skipped: list[dict],
                                    root) -> None:
    """UserError when an ImageFolder class got no sample (all its files were unreadable):
    its label would stay in the manifest with no image, which no later step can tell."""
    present = set()
    for info in infos.values():
        present.update(np.load(tmp / info.labels_file).tolist())
    missing = [name for label, name in enumerate(class_names) if label not in present]
    if missing:
        example = next((s for s in skipped if s["path"].startswith(missing[0] + "/")), None)
        hint = f" (e.g. {example['path']}: {example['reason']})" if example else ""
        others = f", nor have {len(missing) - 1} other class folders" if len(missing) > 1 else ""
        raise UserError(f"Class folder '{missing[0]}' under '{root}' has no readable image{hint}{others}; "
                        "add readable images or remove the folder.")


def write_shards(
    out_dir,
    source: str,
    *,
    root=None,
    fmt: str = "png",
    max_size: int | None = None,
    maxcount: int = DEFAULT_MAXCOUNT,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    image_size: int | None = None,
    count: int | None = None,
    num_classes: int | None = None,
    name: str | None = None,
    progress: bool = True,
    dataset: str = "CIFAR10",
) -> Manifest:
    """Write `source` as shards into `out_dir` (see the module docstring); returns the manifest.

    `image_size` (default 32) applies to digits and synthetic, `count` (1000) and
    `num_classes` (10) to synthetic, `root` to imagefolder and torchvision, `dataset`
    (a torchvision class name) to torchvision. `test_fraction` of every class goes to the
    `test` split (None: 0.2 fixed for digits, else 0.1), `val_fraction` to `validation`
    (sources with their own split folders keep them; see the module docstring).
    """
    from tqdm.auto import tqdm

    if test_fraction is None:
        test_fraction = DIGITS_TEST_FRACTION if source == "digits" else DEFAULT_TEST_FRACTION
    _check_args(source, fmt, max_size, maxcount, val_fraction, test_fraction, image_size, count, num_classes)
    out = Path(out_dir).expanduser().absolute()
    _prepare_out(out, overwrite)
    if source in ("digits", "mnist5k", "synthetic"):
        image_size = image_size or GENERATED_DEFAULTS["image_size"]
    if source == "synthetic":
        count = count or GENERATED_DEFAULTS["count"]
        num_classes = num_classes or GENERATED_DEFAULTS["num_classes"]

    if source == "digits":
        data: SourceData = digits_source(image_size)
    elif source == "mnist5k":
        data = mnist5k_source(image_size)
    elif source == "synthetic":
        data = synthetic_source(count, image_size, num_classes, seed)
    elif source == "imagefolder":
        if root is None:
            raise UserError("--source imagefolder needs --root, a folder with one sub-folder of images per class.")
        data = imagefolder_source(Path(root).expanduser(), max_size)
    else:
        data = torchvision_source(dataset, Path(root).expanduser() if root is not None else None)

    name = name or data.name
    if not name or any(c in name for c in "./\\ ") or name.startswith("_"):
        raise UserError(f"Data set name '{name}' must be non-empty, not start with '_', and hold no dots, "
                        "slashes or spaces (it starts every shard's file name).")
    rng = np.random.default_rng([seed, 0x0D3])
    stratified = f"a class-stratified --val-fraction {val_fraction:g} (seed {seed})"
    test_seed = DIGITS_TEST_SEED if source == "digits" else seed
    by_test = (f"a class-stratified --test-fraction {test_fraction:g} (seed {test_seed}"
               + (", fixed for every --seed)" if source == "digits" else ")"))
    used_val, used_test = val_fraction, test_fraction  # what the manifest records: the fractions that made a split
    if data.fixed_splits is not None:
        own = ("the tree's own split folders (train/, val/ or validation/, test/)" if source == "imagefolder"
               else f"the data set's own {source} split")
        made = {split: own for split in data.fixed_splits}
        fixed = dict(data.fixed_splits)
        # a missing validation or test split is carved from train, so that choices are made on
        # validation and test stays for the report
        carve_val = "validation" not in fixed and val_fraction > 0
        carve_test = "test" not in fixed and test_fraction > 0
        used_val, used_test = (val_fraction if carve_val else None), (test_fraction if carve_test else None)
        if carve_val or carve_test:
            parts = split_three_ways([it.label for it in fixed["train"]], val_fraction if carve_val else 0.0,
                                     test_fraction if carve_test else 0.0, seed)
            carved = {k: [fixed["train"][i] for i in idx] for k, idx in parts.items() if idx or k == "train"}
            fixed = {**{k: v for k, v in fixed.items() if k != "train"}, **carved}
            for split in carved:
                if split != "train":
                    made[split] = (f"carved from {'train/' if source == 'imagefolder' else 'train'} by "
                                   f"{stratified if split == 'validation' else by_test}")
            made["train"] = f"{own}, less what was carved from it"
        fixed = {k: fixed[k] for k in ("train", "validation", "test") if k in fixed}
        splits = {s: [items[i] for i in rng.permutation(len(items))] for s, items in fixed.items()}
    else:
        parts = split_three_ways([it.label for it in data.items], val_fraction, test_fraction, seed, test_seed)
        splits = {s: [data.items[i] for i in idx] for s, idx in parts.items() if s != "test" or test_fraction > 0}
        made = {"train": f"the rest after {by_test} and {stratified}" if test_fraction > 0 else f"the rest after {stratified}",
                "validation": f"{stratified} of what the test split left", "test": by_test}
    total = sum(len(v) for v in splits.values())
    if total == 0:
        raise UserError(f"Source {source} {('at ' + str(root)) if root else ''} holds no images; nothing to write.")
    if data.fixed_splits is None:
        for split, fraction in (("test", test_fraction), ("validation", val_fraction)):
            if fraction > 0 and not splits[split]:
                warnings.warn(_empty_split(data.items, fraction, split), SplitWarning, stacklevel=2)
            elif fraction > 0 and len(splits[split]) < MIN_EVAL_IMAGES:
                warnings.warn(_small_split(len(splits[split]), len(data.items), split), SmallSplitWarning,
                              stacklevel=2)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"Cannot create the output folder '{out}' ({err.strerror or err}); choose another --out.") from None
    skipped: list[dict] = list(data.skipped or [])
    sizes: set = set()
    try:
        # the folder appears at `out` only when complete; on any error nothing is kept
        with atomic_dir(out) as tmp:
            with tqdm(total=total, desc=f"writing {name}", unit="img", disable=not progress,
                      dynamic_ncols=True) as bar:
                infos = {}
                for split, items in splits.items():
                    bar.set_description(f"writing {name} {split}")
                    info = _write_split(tmp, name, split, items, fmt=fmt, max_size=max_size,
                                        maxcount=maxcount, bar=bar, skipped=skipped, sizes=sizes,
                                        with_origin=source == "imagefolder")
                    if info is not None:
                        infos[split] = info
            if "train" not in infos:
                raise UserError(f"No readable image in source {source}{(' at ' + str(root)) if root else ''} "
                                f"({len(skipped)} inputs skipped, e.g. {skipped[0] if skipped else 'none'}).")
            if splits.get("validation") and "validation" not in infos:
                warnings.warn(f"None of the {len(splits['validation'])} images chosen for the validation split could "
                              f"be read (e.g. {skipped[-1]['path']}: {skipped[-1]['reason']}), so the shards have no "
                              "validation split, which fine-tuning needs; fix or replace those files.",
                              SplitWarning, stacklevel=2)
            if source == "imagefolder":
                _refuse_classes_without_samples(data.class_names, infos, tmp, skipped, root)
            square = {w for w, h in sizes if w == h}
            manifest = Manifest(
                root=out, name=name, splits=infos, num_classes=len(data.class_names), class_names=data.class_names,
                image_size=next(iter(square)) if len(sizes) == 1 and square else None,
                extra={"vitmpp": {
                    "manifest_version": MANIFEST_VERSION,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "writer": {"source": source, "root": str(root) if root is not None else None,
                               "dataset": dataset if source == "torchvision" else None, "format": fmt,
                               "quality": QUALITY if fmt != "png" else None, "max_size": max_size,
                               "maxcount": maxcount, "val_fraction": used_val,
                               "test_fraction": used_test, "seed": seed,
                               "image_size": image_size, "count": count, "num_classes": num_classes},
                    "splits_made_by": {split: made[split] for split in infos},
                    "num_skipped_inputs": len(skipped),
                    "skipped_inputs": skipped,
                }},
            )
            atomic_write_json(tmp / MANIFEST_NAME, manifest.to_json())  # last: it marks the folder complete
    except OSError as err:  # disk full, permissions: say where (atomic_dir has removed the partial folder)
        raise UserError(f"Writing shards to '{out}' failed ({err.strerror or err}); nothing was kept. "
                        "Free space or choose another --out.") from None
    return read_manifest(out)


# ----------------------------------------------------------------------------- the embedded default

def _writer_params(manifest: Manifest) -> dict:
    return (manifest.extra.get("vitmpp") or {}).get("writer") or {}


def shards_complete(manifest: Manifest) -> bool:
    """Every shard of every split is on disk with the size the manifest recorded."""
    for info in manifest.splits.values():
        paths = [Path(manifest.base) / f for f in info.filenames]
        if info.shard_bytes is None or not all(p.is_file() for p in paths):
            return False
        if [p.stat().st_size for p in paths] != info.shard_bytes:
            return False
        if info.labels_file and not (Path(manifest.base) / info.labels_file).is_file():
            return False
    return True


# the embedded set's shards: small (256) so that two ranks with two workers each have shards
# to spread; 20% test (359 images, fixed), 20% validation (359 images) for choices, 1079 for training
DIGITS_MAXCOUNT = 256
DIGITS_VAL_FRACTION = 0.2
DIGITS_TEST_FRACTION = 0.2  # 359 images, the same for every seed: the split every digits number is reported on
DIGITS_TEST_SEED = 0


def _reusable(out: Path, wanted: dict) -> bool:
    """`out` holds a complete shard folder written with the parameters `wanted`."""
    if not (out / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = read_manifest(out)
    except UserError:
        return False
    params = _writer_params(manifest)
    return all(params.get(k) == v for k, v in wanted.items()) and shards_complete(manifest)


def digits_shards(image_size: int, *, fmt: str = "png", seed: int = 0,
                  cache: str | os.PathLike | None = None) -> str:
    """The embedded default data set: scikit-learn's digits as shards at `image_size` pixels, in
    `cache / digits-{image_size}px` (`cache`: default $VITMPP_CACHE or ~/.cache/vitmpp, see
    vitmpp.common.rundir.cache_dir; another `fmt` or `seed` gets a folder of its own). Returns
    the folder.

    Every process of every node may call this at once: under an exclusive file lock in the
    cache folder, the first process of each filesystem writes the folder (atomically:
    a hidden temporary folder renamed into place) while the others wait, then they all
    find it complete and reuse it. A folder that is complete (its `_info.json` written last,
    every shard of the recorded size) and was written with these parameters is reused;
    a damaged or different one is rewritten."""
    from vitmpp.common import rundir

    root = Path(cache) if cache is not None else rundir.cache_dir()
    name = f"digits-{image_size}px" + ("" if (fmt, seed) == ("png", 0) else f"-{fmt}-seed{seed}")
    out = root / name
    wanted = {"source": "digits", "image_size": image_size, "format": fmt, "seed": seed,
              "maxcount": DIGITS_MAXCOUNT, "val_fraction": DIGITS_VAL_FRACTION, "test_fraction": DIGITS_TEST_FRACTION}
    lock = root / f".{name}.lock"  # never removed: removing a lock file races with its next user

    def cannot_lock(err: OSError) -> UserError:
        hint = ("its filesystem does not support file locks"
                if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) else err.strerror or err)
        return UserError(f"Cannot lock '{lock}' to write the digits shards ({hint}); set VITMPP_CACHE to a "
                         "writable local folder, or write the shards once with `python -m vitmpp.datasets.make_shards "
                         "--source digits` and pass their folder as data.shards.")

    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        if _reusable(out, wanted):  # e.g. a read-only cache someone else prepared
            return str(out)
        raise cannot_lock(err) from None
    try:
        try:
            # exclusive across the processes of this machine and, on NFS (where Linux emulates
            # flock with fcntl locks), of every node: one writes, the others wait here
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            raise cannot_lock(err) from None
        if not _reusable(out, wanted):
            write_shards(out, "digits", fmt=fmt, image_size=image_size, seed=seed, maxcount=DIGITS_MAXCOUNT,
                         val_fraction=DIGITS_VAL_FRACTION, overwrite=True, progress=False)
    finally:
        os.close(fd)  # releases the lock
    return str(out)


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitmpp.datasets.make_shards",
        description="Write images as webdataset shards with an _info.json manifest (train, validation and test splits).",
    )
    p.add_argument("--source", required=True, choices=SOURCES, help="where the images come from")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--root", help="input folder: the class-per-folder tree (imagefolder) or the torchvision data root")
    p.add_argument("--dataset", default="CIFAR10", help="torchvision data set class (source torchvision), e.g. CIFAR10")
    p.add_argument("--format", default="png", choices=FORMATS, help="image encoding in the shards (default png)")
    p.add_argument("--max-size", type=int, help="downscale images whose shorter side exceeds this many pixels")
    p.add_argument("--maxcount", type=int, default=DEFAULT_MAXCOUNT, help="samples per shard (default 1000)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="fraction of every class put in the validation split (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help=f"fraction of every class put in the test split (default {DEFAULT_TEST_FRACTION}; digits: a fixed "
                        f"{DIGITS_TEST_FRACTION}, the same for every --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, the write order and synthetic images")
    p.add_argument("--overwrite", action="store_true", help="replace the shards in an existing --out folder")
    p.add_argument("--image-size", type=int, help="side of digits/mnist5k/synthetic images in pixels (default 32)")
    p.add_argument("--count", type=int, help="number of synthetic images (default 1000)")
    p.add_argument("--num-classes", type=int, help="number of synthetic classes (default 10)")
    p.add_argument("--name", help="data set name, the prefix of every shard (default: from the source)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SplitWarning)
        warnings.simplefilter("always", SmallSplitWarning)
        manifest = write_shards(
            args.out, args.source, root=args.root, fmt=args.format, max_size=args.max_size, maxcount=args.maxcount,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite, image_size=args.image_size,
            count=args.count, num_classes=args.num_classes, name=args.name, progress=not args.quiet,
            dataset=args.dataset,
        )
    for w in caught:  # ours as one line, like an error; anything else as Python shows it
        if issubclass(w.category, (SplitWarning, SmallSplitWarning)):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    counts = ", ".join(f"{info.num_samples} {split} ({len(info.filenames)} shards)"
                       for split, info in manifest.splits.items())
    skipped = manifest.extra["vitmpp"]["skipped_inputs"]
    first = f"e.g. {skipped[0]['path']}: {skipped[0]['reason']}; " if skipped else ""
    note = f"; {len(skipped)} inputs skipped ({first}all listed in {MANIFEST_NAME})" if skipped else ""
    print(f"wrote {manifest.name}: {counts}, {manifest.num_classes} classes to {manifest.base}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
