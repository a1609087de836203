"""Write a data set as webdataset shards plus an `_info.json` manifest (`write_shards`; its command
line is make_shards.py):

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
(see `imagefolder.py` for what an ImageFolder reads and skips).

Sources are registered by name (`sources.register_source`): a function whose keyword parameters
are its options (`--root`, `--image-size`, ...) and which returns the images; a new source is one
function, and `write_shards(out, name, **options)` writes it.

The embedded default data set (`digits_cache.digits_shards`) is written the same way into the
cache folder, by one process per filesystem under a file lock.

`--max-size N` bounds the *shorter* side: larger images are downscaled (aspect
kept, never upscaled) so that a later RandomResizedCrop or centre crop at N still
has full resolution, while decoding stays cheap (as FFCV's max_resolution does
for the longer side; we bound the shorter one so no crop ever upsamples).
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from vitmpp.common.errors import UserError
from vitmpp.common.io import atomic_dir, atomic_write_json

# the built-in sources register on import (sources.py: digits, torchvision)
from . import imagefolder, packaged, synthetic  # noqa: F401
from .manifest import MANIFEST_NAME, Manifest, SplitInfo, read_manifest
from .sources import SHARED_OPTIONS, SOURCES, Item, SkipInput, Source, SourceData
from .splits import SplitWarning, make_splits

FORMATS = ("png", "jpg", "webp")
QUALITY = 95  # jpg and webp: visually lossless, ~3x smaller than PNG for photos
MANIFEST_VERSION = 1
DEFAULT_MAXCOUNT = 1000
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1
# the sources' own options the writer checks the range of
OPTION_RANGES = {"image_size": (4, 4096), "count": (1, None), "num_classes": (1, None)}
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


def _check_args(source: Source, fmt, max_size, maxcount, val_fraction, test_fraction, options: dict) -> None:
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
        raise UserError(
            f"--val-fraction {val_fraction:g} and --test-fraction {test_fraction:g} leave nothing for "
            "training; make their sum smaller than 1."
        )
    if source.test_fraction is not None and test_fraction != source.test_fraction:
        raise UserError(
            f"The {source.name} source has a fixed test split ({source.test_fraction:g} of every class, "
            "the same for every --seed, so that all reported numbers share it); leave --test-fraction out."
        )
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key not in source.options or key in SHARED_OPTIONS:
            takers = [name for name, s in SOURCES.items() if key in s.options]
            if not takers:
                raise UserError(
                    f"Unknown option {flag} for --source {source.name}; it takes "
                    f"{', '.join('--' + k.replace('_', '-') for k in source.options) or 'none'}."
                )
            which = (
                f"the {takers[0]} source"
                if len(takers) == 1
                else f"the {', '.join(takers[:-1])} and {takers[-1]} sources"
            )
            raise UserError(f"{flag} applies to {which} only, not {source.name}.")
        low, high = OPTION_RANGES.get(key, (None, None))
        if (low is not None and value < low) or (high is not None and value > high):
            within = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise UserError(f"{flag} must be {within}, got {value}.")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty folder unless `overwrite`, and then only if it holds just shards."""
    if out.exists() and not out.is_dir():
        raise UserError(f"Output '{out}' exists and is not a folder; choose another --out.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(
            f"Output folder '{out}' already exists and is not empty; pass --overwrite to replace "
            "its shards, or choose another --out."
        )
    foreign = [
        p.name for p in out.iterdir() if not (p.is_file() and (p.name.endswith(_OURS) or p.name.startswith("_labels-")))
    ]
    if foreign:
        raise UserError(
            f"Refusing to overwrite '{out}': it holds {foreign[0]!r}, which is not a shard file; choose another --out."
        )


def _load_sample(item: Item, fmt: str, max_size: int | None) -> tuple[bytes, tuple[int, int]]:
    loaded = item.load()
    image = cap_shorter_side(loaded.image, max_size)
    if loaded.data is not None and loaded.ext == fmt and image is loaded.image:
        # the file is already in the requested format and size: keep its bytes (no re-encoding loss)
        return loaded.data, image.size
    return encode_image(image, fmt), image.size


def _write_split(
    tmp: Path,
    name: str,
    split: str,
    items: list[Item],
    *,
    fmt: str,
    max_size: int | None,
    maxcount: int,
    bar,
    skipped: list[dict],
    sizes: set,
    with_origin: bool,
) -> SplitInfo | None:
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
        name=split,
        num_samples=len(labels),
        filenames=[os.path.basename(f) for f, _ in shards],
        shard_lengths=[n for _, n in shards],
        labels_file=labels_file,
        shard_bytes=[os.path.getsize(f) for f, _ in shards],
    )


def _refuse_classes_without_samples(class_names: list[str], infos: dict, tmp: Path, skipped: list[dict], root) -> None:
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
        raise UserError(
            f"Class folder '{missing[0]}' under '{root}' has no readable image{hint}{others}; "
            "add readable images or remove the folder."
        )


def write_shards(
    out_dir,
    source: str,
    *,
    fmt: str = "png",
    max_size: int | None = None,
    maxcount: int = DEFAULT_MAXCOUNT,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    name: str | None = None,
    progress: bool = True,
    **options,
) -> Manifest:
    """Write source `source` (a name of `sources.SOURCES`) as shards into `out_dir` (see the module
    docstring); returns the manifest.

    `options` are the source's own, its function's keyword parameters (None: its default), e.g.
    `image_size` (digits, mnist5k, synthetic), `count` and `num_classes` (synthetic), `root`
    (imagefolder, torchvision), `dataset` (torchvision). `test_fraction` of every class goes to the
    `test` split (None: the source's fixed fraction, else 0.1), `val_fraction` to `validation`
    (sources with their own split folders keep them; see the module docstring).
    """
    from tqdm.auto import tqdm

    if source not in SOURCES:
        raise UserError(f"Unknown --source '{source}'; choose one of {', '.join(SOURCES)}.")
    entry = SOURCES[source]
    options = {k: v for k, v in options.items() if v is not None}
    if test_fraction is None:
        test_fraction = entry.test_fraction if entry.test_fraction is not None else DEFAULT_TEST_FRACTION
    _check_args(entry, fmt, max_size, maxcount, val_fraction, test_fraction, options)
    out = Path(out_dir).expanduser().absolute()
    _prepare_out(out, overwrite)
    used = {k: v for k, v in entry.options.items() if k not in SHARED_OPTIONS} | options  # defaults filled in
    shared = {k: v for k, v in (("seed", seed), ("max_size", max_size)) if k in entry.options}
    data: SourceData = entry.read(**used, **shared)
    root = used.get("root")

    name = name or data.name
    if not name or any(c in name for c in "./\\ ") or name.startswith("_"):
        raise UserError(
            f"Data set name '{name}' must be non-empty, not start with '_', and hold no dots, "
            "slashes or spaces (it starts every shard's file name)."
        )
    splits, made, used_val, used_test = make_splits(data, entry, val_fraction, test_fraction, seed)
    total = sum(len(v) for v in splits.values())
    if total == 0:
        raise UserError(f"Source {source} {('at ' + str(root)) if root else ''} holds no images; nothing to write.")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"Cannot create the output folder '{out}' ({err.strerror or err}); choose another --out."
        ) from None
    skipped: list[dict] = list(data.skipped or [])
    sizes: set = set()
    try:
        # the folder appears at `out` only when complete; on any error nothing is kept
        with atomic_dir(out) as tmp:
            with tqdm(total=total, desc=f"writing {name}", unit="img", disable=not progress, dynamic_ncols=True) as bar:
                infos = {}
                for split, items in splits.items():
                    bar.set_description(f"writing {name} {split}")
                    info = _write_split(
                        tmp,
                        name,
                        split,
                        items,
                        fmt=fmt,
                        max_size=max_size,
                        maxcount=maxcount,
                        bar=bar,
                        skipped=skipped,
                        sizes=sizes,
                        with_origin=data.files,
                    )
                    if info is not None:
                        infos[split] = info
            if "train" not in infos:
                raise UserError(
                    f"No readable image in source {source}{(' at ' + str(root)) if root else ''} "
                    f"({len(skipped)} inputs skipped, e.g. {skipped[0] if skipped else 'none'})."
                )
            if splits.get("validation") and "validation" not in infos:
                warnings.warn(
                    f"None of the {len(splits['validation'])} images chosen for the validation split could "
                    f"be read (e.g. {skipped[-1]['path']}: {skipped[-1]['reason']}), so the shards have no "
                    "validation split, which fine-tuning needs; fix or replace those files.",
                    SplitWarning,
                    stacklevel=2,
                )
            if data.files:
                _refuse_classes_without_samples(data.class_names, infos, tmp, skipped, root)
            square = {w for w, h in sizes if w == h}
            manifest = Manifest(
                root=out,
                name=name,
                splits=infos,
                num_classes=len(data.class_names),
                class_names=data.class_names,
                image_size=next(iter(square)) if len(sizes) == 1 and square else None,
                extra={
                    "vitmpp": {
                        "manifest_version": MANIFEST_VERSION,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "writer": {
                            "source": source,
                            **{k: str(v) if isinstance(v, Path) else v for k, v in used.items()},
                            "format": fmt,
                            "quality": QUALITY if fmt != "png" else None,
                            "max_size": max_size,
                            "maxcount": maxcount,
                            "val_fraction": used_val,
                            "test_fraction": used_test,
                            "seed": seed,
                        },
                        "splits_made_by": {split: made[split] for split in infos},
                        "num_skipped_inputs": len(skipped),
                        "skipped_inputs": skipped,
                    }
                },
            )
            atomic_write_json(tmp / MANIFEST_NAME, manifest.to_json())  # last: it marks the folder complete
    except OSError as err:  # disk full, permissions: say where (atomic_dir has removed the partial folder)
        raise UserError(
            f"Writing shards to '{out}' failed ({err.strerror or err}); nothing was kept. "
            "Free space or choose another --out."
        ) from None
    return read_manifest(out)


# ----------------------------------------------------------------------------- command line
