"""Reading samples out of shards, safely and with an account of what was lost.

Built on webdataset's tar iteration (`gopen`, `tar_file_iterator`, `group_by_keys`)
but not on its decoders or its error handlers:

- webdataset's default decoders unpickle `.pkl`/`.pyd` and `torch.load` `.pth`
  members: a shard is data, not code, so only image members (jpg/jpeg/png/webp,
  opened by PIL restricted to those three formats), `cls` (a decimal integer) and
  `json` (passed over) are accepted; any other member is ignored without being
  read as anything but bytes, and reported once per shard;
- `warn_and_continue` sleeps 0.5 s per error and cannot tell how much of a shard
  was lost: here a shard that stops early (truncated, zero bytes, unreadable) is
  charged with exactly the samples the manifest says it still held, and a sample
  whose image or label is bad is charged once, without sleeping;
- nothing is ever written to disk, so tar member names (`../x`, `/etc/x`) are only
  dictionary keys;
- a key that appears again in the same shard (webdataset's grouping raises there and
  the rest of the shard was lost) is a duplicate: it takes its place in the shard's
  count, is charged as one skipped sample and never decoded, and reading goes on;
- a local shard is opened only once `stat` says it is a regular file: a FIFO named as
  a shard would block its reader forever;
- images of every mode become RGB through `transforms.to_rgb` (16-bit values scaled,
  alpha composited), not through a clipping `convert("RGB")`.
"""
from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterator

from PIL import Image

from .manifest import is_url
from .transforms import UnknownScale, to_rgb

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
ALLOWED_MEMBERS = set(IMAGE_MEMBERS) | {"cls", "json"}
PIL_FORMATS = ["JPEG", "PNG", "WEBP"]


class BadSample(Exception):
    """A sample that cannot be used; the message says why."""


@dataclass
class RawSample:
    """Undecoded members of one sample and its global index in the split."""

    index: int
    url: str
    members: dict


@dataclass
class Tally:
    """What a worker lost since its last batch: a count, and notes naming shards (each shard once)."""

    skipped: int = 0
    notes: list = field(default_factory=list)
    noted: set = field(default_factory=set)

    def note(self, url: str, kind: str, message: str) -> None:
        if (url, kind) not in self.noted:
            self.noted.add((url, kind))
            self.notes.append((url, message))

    def take(self) -> tuple[int, tuple]:
        skipped, notes = self.skipped, tuple(self.notes)
        self.skipped, self.notes = 0, []
        return skipped, notes


def _samples(files: Iterator[dict]) -> Iterator[tuple[dict, bool]]:
    """Group tar members into samples by key, as webdataset's `group_by_keys` does, yielding
    (members, duplicate): a member name repeated within a sample starts the next sample, and
    a sample whose key was met before in this shard is a duplicate."""
    from webdataset.tariterators import base_plus_ext

    seen: set[str] = set()
    current: dict | None = None
    for f in files:
        key, suffix = base_plus_ext(f["fname"])
        if key is None:
            continue
        suffix = suffix.lower()
        if current is None or key != current["__key__"] or suffix in current:
            if current is not None:
                yield current, current["__key__"] in seen
                seen.add(current["__key__"])
            current = {"__key__": key, "__url__": f["__url__"]}
        current[suffix] = f["data"]
    if current is not None:
        yield current, current["__key__"] in seen


def _open_local(url: str):
    """A local shard opened for reading after `stat` says it is a regular file (never a FIFO)."""
    mode = os.stat(url).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"{url} is not a regular file")
    return open(url, "rb")


def read_shard(url: str, offset: int, length: int, wanted: Callable[[int], bool] | None,
               tally: Tally, count_lost: bool = True) -> Iterator[RawSample]:
    """Yield the wanted samples of one shard, in order, with global indices offset + position.

    If the shard ends early or cannot be read, the wanted samples the manifest says
    were still in it are added to `tally.skipped` (when `count_lost`) and a note names it.
    """
    from webdataset.gopen import gopen
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import tar_file_iterator

    position = 0

    def lost_from(start: int) -> int:
        if wanted is None:
            return length - start
        return sum(1 for i in range(offset + start, offset + length) if wanted(i))

    def with_url(files):
        for f in files:
            f["__url__"] = url
            yield f

    try:
        stream = gopen(url) if is_url(url) else _open_local(url)
        try:
            files = with_url(tar_file_iterator(stream, handler=reraise_exception))
            for members, duplicate in _samples(files):
                if position >= length:
                    tally.note(url, "long", f"shard {url} holds more samples than the {length} its manifest lists; "
                                            "the extra ones are ignored")
                    break
                index = offset + position
                position += 1
                if duplicate:
                    tally.note(url, "duplicate", f"shard {url} holds key {members['__key__']} more than once; "
                                                 "each repeat is skipped")
                    if count_lost and (wanted is None or wanted(index)):
                        tally.skipped += 1
                    continue
                unknown = set(members) - ALLOWED_MEMBERS - {"__key__", "__url__", "__local_path__"}
                if unknown:
                    tally.note(url, "members", f"shard {url} holds members of type {', '.join(sorted(unknown))}, "
                                               "which are ignored and never decoded")
                if wanted is None or wanted(index):
                    yield RawSample(index, url, members)
        finally:
            stream.close()
    except Exception as err:  # truncated or zero-byte tar, unreadable file, failed pipe/http
        lost = lost_from(position)
        if count_lost:
            tally.skipped += lost
        reason = str(err).split(" @ ")[0] or type(err).__name__
        tally.note(url, "broken", f"shard {url} is unreadable after {position} of its {length} samples ({reason}); "
                                  f"{lost} samples skipped")
        return
    if position < length:
        lost = lost_from(position)
        if count_lost:
            tally.skipped += lost
        tally.note(url, "short", f"shard {url} ends after {position} samples but its manifest lists {length}; "
                                 f"{lost} samples skipped")


def decode_sample(raw: RawSample, num_classes: int, draft_side: int | None) -> tuple[Image.Image, int]:
    """RGB image and label of a raw sample; BadSample if either is missing or unreadable."""
    members = raw.members
    image_key = next((k for k in IMAGE_MEMBERS if k in members), None)
    if image_key is None:
        raise BadSample("no image member")
    if "cls" not in members:
        raise BadSample("no cls member")
    try:
        label = int(members["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample("cls is not an integer") from None
    if num_classes > 0 and not 0 <= label < num_classes:
        raise BadSample(f"label {label} outside [0, {num_classes})")
    try:
        with Image.open(io.BytesIO(members[image_key]), formats=PIL_FORMATS) as img:
            if draft_side and img.format == "JPEG" and min(img.size) >= 2 * draft_side:
                img.draft("RGB", (draft_side, draft_side))  # decode at 1/2, 1/4 or 1/8 scale
            img.load()
            image = to_rgb(img)
    except UnknownScale as err:
        raise BadSample(str(err)) from None
    except Exception as err:  # PIL raises many types on bad bytes (OSError, SyntaxError, ValueError, ...)
        raise BadSample(f"image cannot be decoded ({type(err).__name__})") from None
    return image, label
