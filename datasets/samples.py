"""Reading samples out of shards, safely and with an account of what was lost (the decoders are
decoders.py, the transport of streamed shards transport.py).

Built on webdataset's tar iteration (`gopen`, `tar_file_iterator`, `group_by_keys`; for
local files our own lean member reader, tarmembers.py, which yields and fails exactly as
`tar_file_iterator` does) but not on its decoders or its error handlers:

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
- images of every mode become RGB through `pixels.to_rgb` (16-bit values scaled,
  alpha composited), not through a clipping `convert("RGB")`.

A streamed shard whose transport fails is read again from its start, the samples already
yielded passed over (transport.py says when and how often), so the reader yields exactly what
an undisturbed read yields.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .shardnames import is_url
from .tarmembers import NotLean, read_members
from .transport import Attempts, StreamFailed, is_streamed, open_local, open_stream

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
ALLOWED_MEMBERS = set(IMAGE_MEMBERS) | {"cls", "json"}
# What a shard's first bytes show when it is something else than a tar (a server's error or login
# page, a zip): said as such instead of "unreadable". A tar has no magic of its own at the start,
# and compressed tars (gzip, bz2, xz, zstd) are read as tars, so only these are named.
_NOT_TAR = (
    (re.compile(rb"\s*<(!doctype|html|\?xml|head|body|error)", re.IGNORECASE), "an HTML or XML page"),
    (re.compile(rb"PK\x03\x04"), "a zip archive"),
    (re.compile(rb"\s*[{\[]"), "a JSON document"),
    (re.compile(rb"%PDF-"), "a PDF"),
    (re.compile(rb"\x89PNG|\xff\xd8\xff"), "a single image"),
)


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
    retries: int = 0  # streamed shard reads retried (transport failures); the loader takes them per batch

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


class NotATar(ValueError):
    """A shard whose first bytes show it is another kind of file (`_NOT_TAR`)."""


class _Replay:
    """A stream whose first bytes, read ahead to see what it is, are given back first."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data

    def close(self) -> None:
        self.stream.close()


def _tar_header(block: bytes) -> bool:
    """Whether `block` is a tar header: its checksum field (octal, at 148) is the sum of its bytes
    with that field read as spaces."""
    if len(block) < 512:
        return False
    field_text = block[148:156].replace(b"\x00", b" ").strip()
    try:
        recorded = int(field_text or b"x", 8)
    except ValueError:
        return False
    return recorded == sum(block[:148]) + 8 * 32 + sum(block[156:512])


def check_tar_start(stream):
    """`stream`, unchanged to its reader, after its first bytes were checked for being a tar;
    NotATar when they show another kind of file (an HTML page with status 200, a zip)."""
    head = b""
    while len(head) < 512:
        data = stream.read(512 - len(head))
        if not data:
            break
        head += data
    for pattern, kind in _NOT_TAR:
        if pattern.match(head) and not _tar_header(head):  # (a tar's first member may be named '<x>.jpg')
            stream.close()
            shown = head[:40].decode("utf-8", "replace").strip().splitlines()[0][:40] if head.strip() else ""
            raise NotATar(f"it is {kind}, not a tar" + (f": it starts {shown!r}" if shown else ""))
    if getattr(stream, "seekable", lambda: False)():  # a local file: the lean reader seeks in it
        stream.seek(0)
        return stream
    return _Replay(head, stream)


def read_shard(
    url: str, offset: int, length: int, wanted: Callable[[int], bool] | None, tally: Tally, count_lost: bool = True
) -> Iterator[RawSample]:
    """Yield the wanted samples of one shard, in order, with global indices offset + position.

    If the shard ends early or cannot be read, the wanted samples the manifest says
    were still in it are added to `tally.skipped` (when `count_lost`) and a note names it.
    A streamed shard whose transport fails is read again from its beginning, passing over
    the samples already yielded (module docstring); each retry adds one to `tally.retries`.
    """
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import tar_file_iterator

    position = 0  # samples of the shard passed so far (yielded or not), over every attempt
    attempts = Attempts(url) if is_streamed(url) else None

    def lost_from(start: int) -> int:
        if wanted is None:
            return length - start
        return sum(1 for i in range(offset + start, offset + length) if wanted(i))

    def with_url(files):
        for f in files:
            f["__url__"] = url
            yield f

    lean = not is_url(url)  # local files: our own member reader (tarmembers.py), else webdataset's
    while True:
        resume_at = position  # a retry re-reads from the start: these samples were passed before
        try:
            if attempts is not None:
                attempts.attempt()
            stream = check_tar_start(open_stream(url) if is_url(url) else open_local(url))
            try:
                if lean:
                    files = read_members(stream, url)
                else:
                    files = with_url(tar_file_iterator(stream, handler=reraise_exception))
                for again, (members, duplicate) in enumerate(_samples(files)):
                    if again < resume_at:
                        continue  # yielded (or passed over) by an earlier attempt: the same bytes
                    if position >= length:
                        tally.note(
                            url,
                            "long",
                            f"shard {url} holds more samples than the {length} its manifest "
                            "lists; the extra ones are ignored",
                        )
                        break
                    index = offset + position
                    position += 1
                    if duplicate:
                        tally.note(
                            url,
                            "duplicate",
                            f"shard {url} holds key {members['__key__']} more than once; each repeat is skipped",
                        )
                        if count_lost and (wanted is None or wanted(index)):
                            tally.skipped += 1
                        continue
                    unknown = set(members) - ALLOWED_MEMBERS - {"__key__", "__url__", "__local_path__"}
                    if unknown:
                        tally.note(
                            url,
                            "members",
                            f"shard {url} holds members of type "
                            f"{', '.join(sorted(unknown))}, which are ignored and never decoded",
                        )
                    if wanted is None or wanted(index):
                        yield RawSample(index, url, members)
            finally:
                stream.close()
        except NotLean:  # content the lean reader leaves to tarfile: read again, passing over what was yielded
            lean = False
            continue
        except StreamFailed as err:  # the transport of a streamed shard: ask again, or give up (UserError)
            delay = attempts.failed(err, progressed=position > resume_at)
            tally.retries += 1
            time.sleep(delay)
            continue
        except Exception as err:  # truncated or zero-byte tar, unreadable file, a failed gopen stream
            lost = lost_from(position)
            if count_lost:
                tally.skipped += lost
            reason = str(err).split(" @ ")[0] or type(err).__name__
            tally.note(
                url,
                "broken",
                f"shard {url} is unreadable after {position} of its {length} samples "
                f"({reason}); {lost} samples skipped",
            )
            return
        break
    if position < length:
        lost = lost_from(position)
        if count_lost:
            tally.skipped += lost
        tally.note(
            url,
            "short",
            f"shard {url} ends after {position} samples but its manifest lists {length}; {lost} samples skipped",
        )
