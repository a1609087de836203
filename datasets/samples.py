"""Reading samples out of shards, safely and with an account of what was lost.

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

Streamed shards (`http(s)://` URLs, `pipe:` commands; docs/streaming.md): a failure of the
*transport* is told apart from damage to the *data*. An HTTP body that ends before its
Content-Length, a dropped connection, a stall, an HTTP 5xx/408/429, a refused connection, or
a `pipe:` command that exits non-zero after its first byte is retried: the shard is opened
again from its beginning and the samples already yielded are passed over, so the reader
yields exactly what an undisturbed read yields (exact resume holds). Retries back off
exponentially (`RETRY_FIRST_DELAY_S` doubling up to `RETRY_MAX_DELAY_S`), at most
`retry_policy()` attempts within its time budget, counted in `Tally.retries`. A shard that
stays unreachable, an HTTP 4xx such as 404, or a `pipe:` command that fails before its first
byte stops the run with a `ShardUnreachable` sentence naming the URL: unlike a damaged shard,
whose bytes are the same at every read, skipping it would make the samples trained on depend
on the network. A stream that arrives whole but is not a valid tar is damage, as for a file.
"""
from __future__ import annotations

import io
import os
import random
import re
import select
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from vitmpp.common.errors import UserError

from .manifest import is_url
from .pixels import UnknownScale, to_rgb
from .tarmembers import NotLean, read_members

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
ALLOWED_MEMBERS = set(IMAGE_MEMBERS) | {"cls", "json"}
PIL_FORMATS = ["JPEG", "PNG", "WEBP"]
_LABEL = re.compile(r"-?[0-9]+", re.ASCII)
# What a shard's first bytes show when it is something else than a tar (a server's error or login
# page, a zip): said as such instead of "unreadable". A tar has no magic of its own at the start,
# and compressed tars (gzip, bz2, xz, zstd) are read as tars, so only these are named.
_NOT_TAR = ((re.compile(rb"\s*<(!doctype|html|\?xml|head|body|error)", re.IGNORECASE), "an HTML or XML page"),
            (re.compile(rb"PK\x03\x04"), "a zip archive"), (re.compile(rb"\s*[{\[]"), "a JSON document"),
            (re.compile(rb"%PDF-"), "a PDF"), (re.compile(rb"\x89PNG|\xff\xd8\xff"), "a single image"))


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


def _open_local(url: str):
    """A local shard opened for reading after `stat` says it is a regular file (never a FIFO)."""
    mode = os.stat(url).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"{url} is not a regular file")
    return open(url, "rb")


# ----------------------------------------------------------------------------- streamed shards

# The retry policy of streamed shards, in one place. The attempts and the time budget can be set
# per run through the environment (the loader's worker processes inherit it); the delays cannot.
RETRIES_ENV = "VITMPP_DATA_RETRIES"
RETRY_TIMEOUT_ENV = "VITMPP_DATA_RETRY_TIMEOUT_S"
DEFAULT_RETRIES = 10           # retries of one shard read after its first failure
DEFAULT_RETRY_TIMEOUT_S = 300.0  # from the start of the first failed attempt to giving up
RETRY_FIRST_DELAY_S = 0.25     # the delays: 0.25, 0.5, 1, ... s, each x0.5-1 random jitter ...
RETRY_MAX_DELAY_S = 30.0       # ... never more than this
STALL_TIMEOUT_S = 60.0         # no byte for this long (HTTP connect or read, pipe output): a failed attempt
# HTTP answers worth asking again (the server is busy, restarting or overloaded); any other 4xx is final
RETRIED_HTTP = {408, 425, 429}
_JITTER = random.SystemRandom()  # never the global `random`: augmentations draw from it (exact resume)


def retry_policy() -> tuple[int, float]:
    """(retries, time budget in s) for one shard read, from the environment or the defaults."""
    def number(name: str, default: float, kind):
        text = os.environ.get(name, "").strip()
        if not text:
            return default
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if value < 0:
            raise UserError(f"Environment variable {name}={text!r} is not a non-negative number; "
                            "unset it or give a number.")
        return value

    return number(RETRIES_ENV, DEFAULT_RETRIES, int), number(RETRY_TIMEOUT_ENV, DEFAULT_RETRY_TIMEOUT_S, float)


def is_streamed(url: str) -> bool:
    """Shards read over HTTP(S) or from a `pipe:` command: the ones whose reads are retried."""
    return url.startswith(("http://", "https://", "pipe:"))


class StreamFailed(OSError):
    """The transport of a streamed shard failed, not its contents (`reason` says how).
    `final`: asking again cannot help (an HTTP 404, a command that never produced a byte)."""

    def __init__(self, reason: str, final: bool = False):
        super().__init__(reason)
        self.reason, self.final = reason, final


class ShardUnreachable(UserError):
    """A streamed shard (or manifest) that could not be read within the retry policy."""


def _describe(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    if reason is not None and not isinstance(reason, str):
        err = reason  # urllib wraps the socket error
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.rstrip(".")


class _HttpStream:
    """An HTTP(S) response body that raises StreamFailed when the transport fails, including a body
    that ends before its Content-Length (http.client returns b"" there without a word)."""

    def __init__(self, url: str):
        import http.client
        import urllib.error
        import urllib.request

        self._errors = (OSError, http.client.HTTPException)
        try:
            self.response = urllib.request.urlopen(url, timeout=STALL_TIMEOUT_S)
        except urllib.error.HTTPError as err:
            err.close()
            # a 3xx here is a redirect urllib gave up on (a loop, too many): the same on every attempt
            final = 300 <= err.code < 500 and err.code not in RETRIED_HTTP
            reason = "its redirects loop" if 300 <= err.code < 400 else (str(err.reason).splitlines() or [""])[0]
            raise StreamFailed(f"the server answered HTTP {err.code}: {reason}", final=final) from None
        except (http.client.InvalidURL, ValueError, UnicodeError) as err:  # a space, a control character, non-ASCII
            raise StreamFailed(f"the URL is not one HTTP can send ({_describe(err)}); percent-encode spaces, "
                               "control and non-ASCII characters", final=True) from None
        except (urllib.error.URLError, *self._errors) as err:
            raise StreamFailed(_describe(err)) from None
        self.expected = self.response.length  # None for a chunked body (http.client checks those itself)
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.response.read(size if size is not None and size >= 0 else None)
        except self._errors as err:  # a reset, a stall (TimeoutError), a chunked body cut short
            raise StreamFailed(f"the connection failed after {self.received:,} bytes ({_describe(err)})") from None
        self.received += len(data)
        if not data and size != 0 and self.expected is not None and self.received < self.expected:
            raise StreamFailed(f"the connection closed after {self.received:,} of {self.expected:,} bytes")
        return data

    def close(self) -> None:
        self.response.close()


class _PipeStream:
    """The standard output of a `pipe:` shell command. Reaching its end checks the exit status
    (non-zero: StreamFailed, with the last line it wrote to stderr); no output for
    STALL_TIMEOUT_S is a failure too; closing early ends the command and its children."""

    def __init__(self, url: str):
        self.command = url[len("pipe:"):].strip()
        self.errors = tempfile.TemporaryFile()
        self.received = 0
        # its own session: closing early can end the whole pipeline (killpg), and a Ctrl-C at the
        # terminal reaches the training process only, which stops its workers (and their commands)
        self.proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.errors, bufsize=0, start_new_session=True)

    def _failed(self, reason: str) -> StreamFailed:
        # a command that fails before its first byte is wrong (path, tool, credentials) far more
        # often than unlucky, and aws/gsutil/curl --retry retry their own connections: say so at once
        return StreamFailed(reason, final=self.received == 0)

    def _stderr_tail(self) -> str:
        self.errors.seek(0, os.SEEK_END)
        self.errors.seek(max(0, self.errors.tell() - 2000))
        lines = [line.strip() for line in self.errors.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return f": {lines[-1]}" if lines else ""

    def read(self, size: int = -1) -> bytes:
        out = self.proc.stdout
        ready, _, _ = select.select([out], [], [], STALL_TIMEOUT_S)
        if not ready:
            self._end()
            raise self._failed(f"it wrote nothing for {STALL_TIMEOUT_S:.0f} s after {self.received:,} bytes")
        data = out.read(size if size is not None and size > 0 else 1 << 20)
        self.received += len(data)
        if not data and size != 0:
            try:
                status = self.proc.wait(timeout=STALL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._end()
                raise self._failed(f"it closed its output but did not exit within {STALL_TIMEOUT_S:.0f} s") from None
            if status != 0:
                how = f"exit status {status}" if status > 0 else f"killed by signal {-status}"
                raise self._failed(f"{how} after {self.received:,} bytes{self._stderr_tail()}")
        return data

    def _end(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()

    def close(self) -> None:
        self.proc.stdout.close()  # a command still writing gets SIGPIPE
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self._end()
        self.errors.close()


def open_stream(url: str):
    """A readable stream of a shard URL: HTTP(S) and `pipe:` by us (StreamFailed on a transport
    failure), any other scheme by webdataset's `gopen`."""
    if url.startswith(("http://", "https://")):
        return _HttpStream(url)
    if url.startswith("pipe:"):
        return _PipeStream(url)
    from webdataset.gopen import gopen

    return gopen(url)


class Attempts:
    """The retry policy applied to one read of one URL: `failed` returns how long to wait before
    the next attempt, or raises ShardUnreachable. Progress (a sample or byte delivered since the
    previous failure) starts the count and the time budget afresh."""

    def __init__(self, url: str, what: str = "Shard"):
        self.url, self.what = url, what
        self.retries, self.budget = retry_policy()
        self.failures, self.since, self.started = 0, None, time.monotonic()

    def attempt(self) -> None:
        """Call as each attempt starts."""
        self.started = time.monotonic()

    def failed(self, err: StreamFailed, progressed: bool) -> float:
        if progressed:
            self.failures, self.since = 0, None
        if self.since is None:
            self.since = self.started
        self.failures += 1
        elapsed = time.monotonic() - self.since
        delay = min(RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2 ** (self.failures - 1)) * _JITTER.uniform(0.5, 1.0)
        if err.final or self.failures > self.retries or elapsed + delay > self.budget:
            raise self.unreachable(err, elapsed)
        return delay

    def unreachable(self, err: StreamFailed, elapsed: float) -> ShardUnreachable:
        what, url = self.what, self.url
        if url.startswith("pipe:"):
            name = f"{what} command '{url[len('pipe:'):].strip()}'"
            fix = ("check that it runs in a shell on this machine and writes the file to its standard output "
                   "(tool installed, credentials, path)")
        else:
            name = f"{what} '{url}'"
            fix = ("check the URL and that the server holds it" if err.final
                   else "check that the server is up and reachable from every node")
        if err.final and self.failures == 1:
            told = f"cannot be read ({err.reason})"
        else:
            told = f"could not be read in {self.failures} attempts over {elapsed:.1f} s (last: {err.reason})"
        if what == "Shard":
            fix += ", then continue the run with --resume auto"
        else:  # (from Python, a local copy of the manifest can be passed instead)
            fix += " (from Python, pass a local copy as LoaderSpec(manifest=read_manifest(path)))"
        return ShardUnreachable(f"{name} {told}; {fix}.")


def read_url_bytes(url: str, limit: int, what: str) -> bytes:
    """Up to `limit` bytes of a URL (a manifest, a label file), with the shard retry policy for
    streamed URLs; the caller tells from the length whether there was more."""
    if not is_streamed(url):
        from webdataset.gopen import gopen

        with gopen(url) as stream:
            return stream.read(limit)
    attempts = Attempts(url, what)
    while True:
        attempts.attempt()
        chunks, received = [], 0
        try:
            stream = open_stream(url)
            try:
                while received < limit:
                    chunk = stream.read(min(1 << 20, limit - received))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    received += len(chunk)
            finally:
                stream.close()
            return b"".join(chunks)
        except StreamFailed as err:
            time.sleep(attempts.failed(err, progressed=False))


def read_shard(url: str, offset: int, length: int, wanted: Callable[[int], bool] | None,
               tally: Tally, count_lost: bool = True) -> Iterator[RawSample]:
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
            stream = check_tar_start(open_stream(url) if is_url(url) else _open_local(url))
            try:
                if lean:
                    files = read_members(stream, url)
                else:
                    files = with_url(tar_file_iterator(stream, handler=reraise_exception))
                for again, (members, duplicate) in enumerate(_samples(files)):
                    if again < resume_at:
                        continue  # yielded (or passed over) by an earlier attempt: the same bytes
                    if position >= length:
                        tally.note(url, "long", f"shard {url} holds more samples than the {length} its manifest "
                                                "lists; the extra ones are ignored")
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
                        tally.note(url, "members", f"shard {url} holds members of type "
                                                   f"{', '.join(sorted(unknown))}, which are ignored and never decoded")
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
            tally.note(url, "broken", f"shard {url} is unreadable after {position} of its {length} samples "
                                      f"({reason}); {lost} samples skipped")
            return
        break
    if position < length:
        lost = lost_from(position)
        if count_lost:
            tally.skipped += lost
        tally.note(url, "short", f"shard {url} ends after {position} samples but its manifest lists {length}; "
                                 f"{lost} samples skipped")


def _image_and_label(raw: RawSample, num_classes: int) -> tuple[bytes, int]:
    """The image member's bytes and the label of a raw sample; BadSample if either is missing or bad."""
    members = raw.members
    image_key = next((k for k in IMAGE_MEMBERS if k in members), None)
    if image_key is None:
        raise BadSample("no image member")
    if "cls" not in members:
        raise BadSample("no cls member")
    text = members["cls"].decode("utf-8", "replace").strip()
    # decimal digits only: Python's int() would also take '0_3', '+3', ' ３ ' (full-width) silently
    if not _LABEL.fullmatch(text):
        shown = repr(text) if len(text) <= 20 else repr(text[:17]) + "..."
        raise BadSample(f"its label (cls) is {shown}, not a class number")
    label = int(text)
    if num_classes > 0 and not 0 <= label < num_classes:
        raise BadSample(f"its label (cls) is {label}, outside the manifest's classes 0..{num_classes - 1}")
    return members[image_key], label


def _draft_scale(width: int, height: int, draft_side: int | None) -> int:
    """The reduction PIL's `draft` picks for a JPEG of this size (1, 2, 4 or 8; 1: none)."""
    if not draft_side or min(width, height) < 2 * draft_side:
        return 1
    fits = min(width // draft_side, height // draft_side)
    return next(s for s in (8, 4, 2, 1) if fits >= s)


def decode_sample(raw: RawSample, num_classes: int, draft_side: int | None) -> tuple[Image.Image, int]:
    """RGB image and label of a raw sample; BadSample if either is missing or unreadable."""
    data, label = _image_and_label(raw, num_classes)
    try:
        # not closed: closing drops the decoded pixels, and the file is bytes in memory
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        if draft_side and img.format == "JPEG" and _draft_scale(*img.size, draft_side) > 1:
            img.draft("RGB", (draft_side, draft_side))  # decode at 1/2, 1/4 or 1/8 scale
        img.load()
        # plain RGB is used as decoded (to_rgb would return an identical copy)
        image = img if img.mode == "RGB" and "transparency" not in img.info else to_rgb(img)
    except UnknownScale as err:
        raise BadSample(str(err)) from None
    except Exception as err:  # PIL raises many types on bad bytes (OSError, SyntaxError, ValueError, ...)
        raise BadSample(f"image cannot be decoded ({type(err).__name__})") from None
    return image, label


_JPEG_START = b"\xff\xd8\xff"
_SIMPLEJPEG = []  # [module or None], imported on first use


def _simplejpeg():
    if not _SIMPLEJPEG:
        try:
            import simplejpeg
        except ImportError:  # the optional extra `vitmpp[fast]`
            simplejpeg = None
        _SIMPLEJPEG.append(simplejpeg)
    return _SIMPLEJPEG[0]


def use_fast_jpeg(enabled: bool) -> bool:
    """Switch the simplejpeg path of `decode_array` off (or back on, when installed) in this process;
    returns whether it was on (the benchmarks measure both)."""
    was = _simplejpeg() is not None
    _SIMPLEJPEG.clear()
    if not enabled:
        _SIMPLEJPEG.append(None)
    return was


def _fast_jpeg(data: bytes, draft_side: int | None) -> np.ndarray | None:
    """A baseline/progressive YCbCr or grey JPEG decoded by libjpeg-turbo through simplejpeg (when
    installed) at PIL's draft scale, as HWC uint8 RGB: the very pixels PIL gives; None for anything
    else, and for any warning or error of libjpeg (strict mode), which PIL then decides on."""
    simplejpeg = _simplejpeg()
    if simplejpeg is None or not data.startswith(_JPEG_START):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        limit = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb check stays PIL's
        if colorspace not in ("YCbCr", "Gray") or (limit is not None and width * height > limit):
            return None
        s = _draft_scale(width, height, draft_side)
        # simplejpeg picks the smallest scale with at least these sides: PIL's draft size, ceil(side / s)
        sides = {"min_height": -(-height // s), "min_width": -(-width // s)} if s > 1 else {}
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **sides)
    except Exception:  # noqa: BLE001 - every failure goes to PIL, which says what is wrong
        return None


def decode_array(raw: RawSample, num_classes: int, draft_side: int | None) -> tuple[np.ndarray, int]:
    """`decode_sample` as an HWC uint8 RGB array (the decode-only workers of `augment_on="device"`).

    JPEGs go through libjpeg-turbo directly when simplejpeg is installed (the `fast` extra: ~20%
    less CPU than PIL + `np.asarray` on 500 x 375 photos, docs/benchmarks.md) with the same pixels,
    size and draft scale; every other image, and any JPEG libjpeg warns about, through PIL exactly
    as `decode_sample` (so the samples that are skipped are the same)."""
    data, label = _image_and_label(raw, num_classes)
    fast = _fast_jpeg(data, draft_side)
    if fast is not None:
        return fast, label
    image, label = decode_sample(raw, num_classes, draft_side)
    return np.asarray(image), label


# ----------------------------------------------------------------------------- JPEGs left to the device

@dataclass(eq=False)  # compared by identity: the views of one image share its region (device_augment.py)
class EncodedJpeg:
    """A JPEG a decode-only worker leaves encoded for the device (`LoaderSpec(decode_on="device")`):
    its bytes and what its header says, so that the crop boxes are drawn without decoding it."""

    data: bytes
    height: int  # the full size, as the header states it
    width: int
    scale: int   # the draft reduction the worker would decode it at (1, 2, 4 or 8; `_draft_scale`)
    url: str     # where it came from, for the note when the device cannot decode it
    key: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of the array `decode_array` would give: PIL's draft size, ceil(side / scale)."""
        return -(-self.height // self.scale), -(-self.width // self.scale), 3


# Read by hand, not by PIL's lazy Image.open: PIL's header does not say the frame type (arithmetic-coded
# and lossless frames, which nvJPEG refuses) nor whether 3 components are stored as RGB (Adobe transform
# 0), and it does not check that the file is whole; opening it also costs more than this walk.
# SOF markers: baseline, extended sequential and progressive Huffman-coded frames, which nvJPEG and
# libjpeg-turbo both decode; every other frame type (lossless, hierarchical, arithmetic-coded) is PIL's
_SOF_DEVICE = {0xC0, 0xC1, 0xC2}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device may decode, read from its header alone; None for any other.

    It must be an 8-bit Huffman-coded YCbCr or grey JPEG (libjpeg's colour-space rules: JFIF, Adobe
    transform, component ids) that ends with its EOI marker (a truncated file is then decoded, and
    refused, in the worker as before), within PIL's decompression-bomb limit (above it PIL warns or
    refuses, in the worker)."""
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return None
    frame, jfif, adobe_transform = None, False, None
    pos, end = 2, len(data)
    while True:
        if pos + 4 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a segment
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in (0xD8, 0xD9) or length < 2 or pos + 2 + length > end:
            return None
        if marker == 0xDA:  # start of scan: the header is over
            break
        segment = data[pos + 4:pos + 2 + length]
        if marker in _SOF_OTHER or (marker in _SOF_DEVICE and (frame is not None or len(segment) < 6)):
            return None
        if marker in _SOF_DEVICE:
            frame = segment
        elif marker == 0xE0 and segment.startswith(b"JFIF\0"):
            jfif = True
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        pos += 2 + length
    if frame is None:
        return None
    precision, height, width, components = frame[0], int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big"), frame[5]
    if precision != 8 or components not in (1, 3) or not height or not width:
        return None
    if components == 3 and not jfif:  # stored as RGB rather than YCbCr (libjpeg's jdapimin.c rules)
        ids = frame[6:15:3]  # the three components' ids (each component: id, sampling, table)
        if adobe_transform == 0 or (adobe_transform is None and ids == b"RGB"):
            return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        return None
    return height, width


def read_for_device(raw: RawSample, num_classes: int, draft_side: int | None) -> tuple[EncodedJpeg | np.ndarray, int]:
    """`decode_array` for the decode-only workers of `decode_on="device"`: a JPEG the device may decode
    (`device_jpeg_size`) stays encoded (an `EncodedJpeg`, its header read, no pixel decoded); every
    other image is decoded here exactly as `decode_array` does (so it is skipped, or not, as there)."""
    data, label = _image_and_label(raw, num_classes)
    size = device_jpeg_size(data)
    if size is None:
        return decode_array(raw, num_classes, draft_side)
    height, width = size
    return EncodedJpeg(data, height, width, _draft_scale(width, height, draft_side), raw.url,
                       str(raw.members.get("__key__"))), label
