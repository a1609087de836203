"""The `_info.json` manifest that describes a folder of webdataset shards.

The schema is the one timm's webdataset reader reads (timm/data/readers/reader_wds.py)::

    {"name": "digits",
     "splits": {"train": {"name": "train", "num_samples": 1617,
                          "filenames": ["digits-train-000000.tar", ...],
                          "shard_lengths": [256, ...]}, ...}}

extended with our own fields, which timm ignores:

- top level: `num_classes`, `class_names`, `image_size` (the side of every image,
  or null when sizes vary), and `vitmpp` (writer parameters, skipped inputs);
- per split: `labels_file`, a sidecar `.npy` (int64, one label per sample in
  shard order) so label-dependent code (balanced label fractions) never decodes a
  shard, and `shard_bytes`, the size of every shard, to tell a complete folder from
  a damaged one without reading it.

`read_manifest` accepts whatever names the shards: the folder, the `_info.json`
path, a brace pattern or list of shard paths/URLs (the manifest is looked for next
to the first one), or a `Manifest`. The same forms work over HTTP(S): the folder URL
(`http://host/digits`, whose `_info.json` is the manifest), the `_info.json` URL, or shard
URLs. A `pipe:` command names a file too: the manifest of `pipe:aws s3 cp
s3://b/d/shard-{000000..000009}.tar -` is read with `aws s3 cp s3://b/d/_info.json -`
(the first `.tar` name in the command replaced), and `pipe:aws s3 cp s3://b/d/_info.json -`
names all the shards of that manifest (its shards are read with the same command, the file
name replaced). See docs/streaming.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitmpp.common.errors import UserError
from vitmpp.common.io import UnreadableFile, read_regular_file

# the shard names a manifest lists, and where they are (shardnames.py); imported from here by callers
from .shardnames import (
    expand_shard_spec,
    is_url,
    names_all_shards,
    pipe_with_file,  # noqa: F401
    shard_name,
    unsafe_file_name,
)
from .transport import read_url_bytes

MANIFEST_NAME = "_info.json"
# Bounds checked before anything is allocated from what a manifest says: a manifest of a million
# shards is ~50 MB; JSON deeper than this is not a manifest (ours is 4 levels); a sample in a tar
# shard takes at least one member (a 512-byte header and a 512-byte block), so a shard of n bytes
# holds at most n / 1024 samples.
MAX_MANIFEST_BYTES = 64 << 20
MAX_MANIFEST_DEPTH = 32
MIN_SAMPLE_BYTES = 1024
# Keys of the top-level JSON object that have their own attribute on Manifest.
_KNOWN_KEYS = {"name", "splits", "num_classes", "class_names", "image_size"}


@dataclass
class SplitInfo:
    """One split: its shards (names relative to the manifest) and their sample counts."""

    name: str
    num_samples: int
    filenames: list[str]
    shard_lengths: list[int]
    labels_file: str | None = None
    shard_bytes: list[int] | None = None

    @property
    def offsets(self) -> list[int]:
        """Global index of the first sample of every shard (index space of the split)."""
        return [int(v) for v in np.concatenate([[0], np.cumsum(self.shard_lengths)[:-1]])] if self.filenames else []

    def to_json(self) -> dict:
        data: dict[str, Any] = {
            "name": self.name,
            "num_samples": self.num_samples,
            "filenames": list(self.filenames),
            "shard_lengths": list(self.shard_lengths),
        }
        if self.labels_file is not None:
            data["labels_file"] = self.labels_file
        if self.shard_bytes is not None:
            data["shard_bytes"] = list(self.shard_bytes)
        return data


@dataclass
class Manifest:
    """A parsed `_info.json`; `root` is the folder (or URL prefix) shard names are relative to."""

    root: Path
    name: str
    splits: dict[str, SplitInfo]
    num_classes: int
    class_names: list[str]
    image_size: int | None
    extra: dict = field(default_factory=dict)
    # where the manifest was read from (a path or a URL), for messages
    source: str = ""
    # the root as a string: a local folder, or an http(s) prefix that Path would mangle
    base: str = ""
    _labels: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.base:
            self.base = str(self.root)
        if not self.source:
            self.source = _join(self.base, MANIFEST_NAME)

    def split(self, name: str) -> SplitInfo:
        """The split called `name`; a UserError lists the ones there are."""
        if name not in self.splits:
            available = ", ".join(repr(s) for s in self.splits) or "none"
            raise UserError(
                f"Manifest '{self.source}' has no split '{name}' (available: {available}); "
                "choose one of those or rewrite the shards with make_shards."
            )
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        """Absolute paths (or URLs) of the split's shards, in index order."""
        return [_join(self.base, f) for f in self.split(split).filenames]

    def labels(self, split: str) -> list[int]:
        """Every sample's label in shard order, read from the sidecar written with the shards."""
        return self.labels_array(split).tolist()

    def labels_array(self, split: str) -> np.ndarray:
        """`labels` as an int64 array (read once, then cached)."""
        if split not in self._labels:
            info = self.split(split)
            if not info.labels_file:
                raise UserError(
                    f"Manifest '{self.source}' stores no labels for split '{split}'; "
                    "rewrite the shards with `python -m vitmpp.datasets.make_shards`."
                )
            where = _join(self.base, info.labels_file)
            try:
                # int64 labels plus the .npy header (at most 64 KiB)
                raw = _read_bytes(where, 8 * info.num_samples + (64 << 10), "Label file")
                labels = np.load(io.BytesIO(raw), allow_pickle=False)
            except (OSError, ValueError) as err:
                raise UserError(
                    f"Label file '{where}' of manifest '{self.source}' cannot be read ({err}); "
                    "rewrite the shards with make_shards."
                ) from None
            if labels.ndim != 1 or len(labels) != info.num_samples or labels.dtype.kind not in "iu":
                raise UserError(
                    f"Label file '{where}' holds {labels.shape} {labels.dtype} values, not "
                    f"{info.num_samples} integers; rewrite the shards with make_shards."
                )
            self._labels[split] = labels.astype(np.int64)
        return self._labels[split]

    def identity(self, split: str, names: Sequence[str] | None = None) -> dict:
        """What identifies the samples of `split` (of its shards `names`, file names as listed, when
        only some are read): the data set's name, the split, and how many samples in how many shards,
        with a digest of every shard's file name, sample count and size. The same shards in another
        place have the same identity; another data set, split or shard has another."""
        info = self.split(split)
        keep = set(names) if names is not None else None
        sizes = info.shard_bytes or [None] * len(info.filenames)
        rows = [
            [name, length, size]
            for name, length, size in zip(info.filenames, info.shard_lengths, sizes)
            if keep is None or os.path.basename(name) in keep
        ]
        digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
        return {
            "name": self.name,
            "split": split,
            "samples": sum(row[1] for row in rows),
            "shards": len(rows),
            "digest": digest,
        }

    def to_json(self) -> dict:
        data = {
            "name": self.name,
            "splits": {name: info.to_json() for name, info in self.splits.items()},
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "image_size": self.image_size,
        }
        data.update(self.extra)
        return data


# ----------------------------------------------------------------------------- locating


def _join(base: str, name: str) -> str:
    if base.startswith("pipe:"):  # the base of a pipe: manifest is its command (_dirname)
        return pipe_with_file(base, name)
    if is_url(base):  # a name is a path, not URL text: '#', '?', '%' and spaces are quoted
        return base.rstrip("/") + "/" + urllib.parse.quote(name, safe="/")
    return os.path.join(base, name)


def _dirname(location: str) -> str:
    if location.startswith("pipe:"):  # a command has no folder: _join swaps its file name
        return location
    if is_url(location):
        return location.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(location))


def _read_bytes(location: str, limit: int, what: str) -> bytes:
    """The bytes of a manifest or label file, refused (UserError) when larger than `limit` or, for a
    local path, not a regular file: reading a FIFO would wait forever for a writer."""
    if is_url(location):
        raw = read_url_bytes(location, limit + 1, what)  # HTTP and pipe: with the shard retry policy
        if len(raw) > limit:
            raise UserError(
                f"{what} '{location}' is more than the {limit:,} bytes it may be; rewrite the shards with make_shards."
            )
        return raw
    try:
        return read_regular_file(location, limit=limit)
    except UnreadableFile as err:
        if err.missing:
            raise FileNotFoundError(location) from None  # the caller says what to do
        advice = (
            "rewrite the shards with make_shards"
            if "bytes" in err.reason
            else "point to a folder written by make_shards"
        )
        raise UserError(f"{what} '{location}' {err.reason}; {advice}.") from None


def _depth(data: Any) -> int:
    """How deeply JSON containers nest in `data` (iteratively: a deep one must not recurse here)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def locate_manifest(shards: str | os.PathLike | Sequence[str]) -> str:
    """Where the manifest for `shards` is: inside a folder, the path itself, or next to the first shard."""
    if names_all_shards(shards):
        text = os.fspath(shards)
        if not is_url(text) and os.path.isdir(text):
            return os.path.join(text, MANIFEST_NAME)
        if text.startswith("pipe:") or shard_name(text).endswith(".json"):
            return text
        return _join(text, MANIFEST_NAME)  # a folder URL
    names = expand_shard_spec(shards)
    if not names:
        raise UserError(f"The shard list {shards!r} is empty; name a shard folder, an _info.json or shard files.")
    first = names[0]
    if first.startswith("pipe:"):
        return pipe_with_file(first, MANIFEST_NAME)  # the same command, reading _info.json
    return _join(_dirname(first), MANIFEST_NAME)


# ----------------------------------------------------------------------------- reading


def read_manifest(path_or_dir: Any) -> Manifest:
    """Read and check the manifest for a shard folder, `_info.json`, shard pattern/list or URL.

    Raises UserError naming the file when it is missing, not JSON, or inconsistent.
    """
    if isinstance(path_or_dir, Manifest):
        return path_or_dir
    location = locate_manifest(path_or_dir)
    try:
        raw = _read_bytes(location, MAX_MANIFEST_BYTES, "Manifest")
    except FileNotFoundError:
        missing = _missing_local_path(path_or_dir)
        if missing is not None:  # name what the user gave, not the _info.json guessed next to it
            where = (
                "do not exist" if missing == os.fspath(path_or_dir) else f"are not there: '{missing}' does not exist"
            )
            raise UserError(
                f"Shards '{path_or_dir}' {where}; pass the folder that make_shards wrote "
                "(it holds the shards and their _info.json)."
            ) from None
        raise UserError(
            f"No manifest at '{location}'; write the shards with `python -m vitmpp.datasets.make_shards`, "
            "or point to the folder that holds their _info.json."
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(f"Manifest '{location}' cannot be read: {err}.") from None
    too_deep = UserError(
        f"Manifest '{location}' nests JSON more than {MAX_MANIFEST_DEPTH} levels deep, which no "
        "manifest does; rewrite it with make_shards."
    )
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"Manifest '{location}' is not valid JSON ({err}); rewrite it with make_shards.") from None
    except RecursionError:  # json's parser recurses per level: ~1,000 levels is Python's limit
        raise too_deep from None
    if _depth(data) > MAX_MANIFEST_DEPTH:
        raise too_deep
    manifest = parse_manifest(data, root=_dirname(location), source=location)
    _check_capacity(manifest)
    return manifest


def _missing_local_path(given: Any) -> str | None:
    """The part of a local shard location that does not exist: the path itself, or for a
    pattern (`{000..009}`, `*`) its folder; None for URLs, lists and existing paths."""
    if not isinstance(given, (str, os.PathLike)):
        return None
    text = os.fspath(given)
    if is_url(text):
        return None
    if any(ch in text for ch in "{*?["):
        folder = os.path.dirname(text) or "."
        return None if os.path.isdir(folder) else folder
    return None if os.path.exists(text) else text


def _check_capacity(manifest: Manifest) -> None:
    """Every shard can hold the samples the manifest gives it (MIN_SAMPLE_BYTES each), by the sizes it
    recorded (`shard_bytes`) or, for local shards of manifests without them (timm's), by the files:
    sample counts drive allocations (index arrays, label masks) before any shard is read."""
    for key, info in manifest.splits.items():
        sizes: list[int | None] = list(info.shard_bytes or [None] * len(info.filenames))
        for k, (name, length) in enumerate(zip(info.filenames, info.shard_lengths)):
            path = _join(manifest.base, name)
            if sizes[k] is None and not is_url(path) and os.path.isfile(path):
                sizes[k] = os.path.getsize(path)
            if sizes[k] is not None and length * MIN_SAMPLE_BYTES > sizes[k]:
                raise UserError(
                    f"Manifest '{manifest.source}' is invalid: split '{key}' gives shard '{name}' "
                    f"{length:,} samples, more than its {sizes[k]:,} bytes can hold; "
                    "rewrite it with make_shards."
                )


def parse_manifest(data: Any, *, root: str, source: str) -> Manifest:
    """Check the JSON object of a manifest and build a Manifest (UserError naming `source`)."""

    def bad(what: str) -> UserError:
        return UserError(f"Manifest '{source}' is invalid: {what}; rewrite it with make_shards.")

    if not isinstance(data, dict):
        raise bad("the top level is not a JSON object")
    splits_raw = data.get("splits")
    if not isinstance(splits_raw, dict) or not splits_raw:
        raise bad("it has no 'splits' mapping")
    splits = {}
    for key, info in splits_raw.items():
        if not isinstance(info, dict):
            raise bad(f"split '{key}' is not an object")
        try:
            filenames = [str(f) for f in info["filenames"]]
            lengths = [_count(n, f"split '{key}' shard_lengths", bad) for n in info["shard_lengths"]]
            num_samples = _count(info["num_samples"], f"split '{key}' num_samples", bad)
        except (KeyError, TypeError) as err:
            raise bad(f"split '{key}' lacks or mangles {err}") from None
        if len(filenames) != len(lengths):
            raise bad(f"split '{key}' lists {len(filenames)} filenames but {len(lengths)} shard_lengths")
        if sum(lengths) != num_samples:
            raise bad(f"split '{key}' has num_samples {num_samples} but its shard_lengths sum to {sum(lengths)}")
        labels_file = info.get("labels_file")
        if labels_file is not None and not isinstance(labels_file, str):
            raise bad(f"split '{key}' has a 'labels_file' that is not a string")
        for name in filenames + ([labels_file] if labels_file else []):
            # names come from a file that may not be ours (docs/security.md)
            why = unsafe_file_name(name)
            if why:
                raise bad(f"split '{key}' names {_show(name, 80)}, which is not a plain relative file name ({why})")
        shard_bytes = info.get("shard_bytes")
        if shard_bytes is not None:
            if not isinstance(shard_bytes, list):
                raise bad(f"split '{key}' has 'shard_bytes' that is not a list")
            shard_bytes = [_count(b, f"split '{key}' shard_bytes", bad) for b in shard_bytes]
            if len(shard_bytes) != len(filenames):
                raise bad(f"split '{key}' lists {len(shard_bytes)} shard_bytes for {len(filenames)} shards")
        splits[key] = SplitInfo(
            name=str(info.get("name", key)),
            num_samples=num_samples,
            filenames=filenames,
            shard_lengths=lengths,
            labels_file=labels_file,
            shard_bytes=shard_bytes,
        )
    class_names = data.get("class_names") or []
    if not isinstance(class_names, list):
        raise bad("'class_names' is not a list")
    num_classes = _count(data.get("num_classes", len(class_names)), "'num_classes'", bad)
    # A model allocates a weight per class (a head of num_classes x width) before any shard is read:
    # the count must agree with the names, or without names be one a split could show.
    total = sum(info.num_samples for info in splits.values())
    if class_names and num_classes != len(class_names):
        raise bad(f"'num_classes' is {num_classes:,} but 'class_names' lists {len(class_names):,}")
    if not class_names and num_classes > total:
        raise bad(f"'num_classes' is {num_classes:,}, more than its {total:,} samples could show")
    image_size = data.get("image_size")
    if image_size is not None:
        image_size = _count(image_size, "'image_size'", bad, "an integer or null")
    extra = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
    base = root if is_url(root) else os.path.abspath(root)
    return Manifest(
        root=Path(base) if not is_url(base) else Path(base.split("://", 1)[-1]),
        name=str(data.get("name", "")),
        splits=splits,
        num_classes=num_classes,
        class_names=[str(c) for c in class_names],
        image_size=image_size,
        extra=extra,
        source=source,
        base=base,
    )


def _count(value: Any, what: str, bad, kind: str = "a non-negative integer") -> int:
    """`value` as a count (a JSON integer >= 0; not a bool, float or string), else `bad(...)`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad(f"{what} is {_show(value)}, not {kind}")
    return value


def _show(value: Any, width: int = 40) -> str:
    """`value` as Python writes it, on one line (control characters escaped: `'x\\ny.tar'`), cut to `width`."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
