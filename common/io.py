"""Writing files so that a reader (or a resumed run) never sees half of one.

Every file and folder vitmpp writes goes through these two functions: the content
is written under a hidden temporary name next to the target, flushed to disk, and
renamed over it (a rename is atomic within one filesystem). A crash, a kill or a
full disk leaves the old file or nothing, never a truncated one.

    atomic_write(path, text_or_bytes)     one file
    with atomic_file(path) as tmp: ...    one file a library writes to a path
    atomic_write_json(path, data)         one JSON file (sorted keys, indented)
    with atomic_dir(final) as tmp: ...    a whole folder, renamed into place at the end
    with reported_writes(what, advice): ...   a write the storage refuses becomes one sentence

and every file vitmpp reads that a user or a data set supplies (configs, manifests, label
files, images being ingested) through one reader that never blocks on a special file:

    read_regular_file(path, limit=...)    bytes, or UnreadableFile(reason) for the caller's sentence
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError


class UnreadableFile(Exception):
    """A file `read_regular_file` would not or could not read. `reason` completes a sentence about
    the file ("is a FIFO, not a regular file"); `missing` is set when it does not exist,
    so the caller can say what to pass instead."""

    def __init__(self, reason: str, *, missing: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


def special_kind(mode: int) -> str | None:
    """'a FIFO', 'a socket', ... for a mode that is not a regular file; None for one."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "a special file"


def read_regular_file(path: str | os.PathLike, *, limit: int | None = None) -> bytes:
    """The bytes of `path`, at most `limit` of them; UnreadableFile otherwise.

    The path is checked to be a regular file before it is opened and again through the open
    descriptor: opening a FIFO waits for a writer forever and a device may never end, and the
    path may have been swapped between the two looks (O_NONBLOCK keeps the open itself from
    waiting). The size is checked from the stat and again from what was read, since a file
    can grow while it is read."""

    def too_big(size: str) -> UnreadableFile:
        return UnreadableFile(f"is {size} bytes, more than the {limit:,} it may be")

    try:
        info = os.stat(path)
        kind = special_kind(info.st_mode)
        if kind is not None:
            raise UnreadableFile(f"is {kind}, not a regular file")
        if limit is not None and info.st_size > limit:
            raise too_big(f"{info.st_size:,}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            kind = special_kind(os.fstat(fd).st_mode)
            if kind is not None:
                raise UnreadableFile(f"is {kind}, not a regular file")
            raw = f.read() if limit is None else f.read(limit + 1)
    except FileNotFoundError:
        raise UnreadableFile("does not exist", missing=True) from None
    except OSError as err:
        raise UnreadableFile(f"cannot be read ({err.strerror or err})") from None
    if limit is not None and len(raw) > limit:
        raise too_big("more than that")
    return raw


_UMASK = os.umask(0)
os.umask(_UMASK)


def temporary_name(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """The hidden sibling `.<name>.<tag>` a write goes to before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """For a library that writes to a path itself (safetensors, matplotlib): yield a unique
    temporary path beside `path`; on success it is fsynced and renamed over `path`, on failure
    deleted. Unique (`.<name>.<random>.tmp`): two writers of one file never share a copy."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the usual permissions
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` via a temporary file, fsync and rename; returns `path`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """`atomic_write` of `data` as JSON with sorted keys."""
    return atomic_write(path, json.dumps(data, indent=indent, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final` (an old `final` is removed
    only after the new one is complete); on failure it is deleted and `final` is untouched.

    The temporary folder has a fixed name (`.<name>.partial`, which is how an interrupted
    write is recognised later): one writer per folder, which callers ensure (a lock, a rank)."""
    final = Path(final)
    tmp = temporary_name(final, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(complete: Path, final: Path) -> None:
    """Rename the finished folder `complete` to `final`, replacing an existing `final` last."""
    fsync_dir(complete)
    if final.exists():
        trash = temporary_name(final, "old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(complete, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(complete, final)
    fsync_dir(final.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- when the storage refuses a write

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)  # full, over quota, failing, read-only
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # safetensors: "I/O error: No space left on device (os error 28)"
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container", "iostream error", "file write failed")
_LOW_SPACE = 1 << 20


def write_failure(error: BaseException, where: str | os.PathLike | None = None) -> str | None:
    """Why a write failed, in the C library's words ("No space left on device"), or None when
    `error` is not a failed write (a bug, which keeps its traceback).

    Libraries report a refused write their own way, so the type says little: Python raises
    OSError with an errno; safetensors raises SafetensorError("... (os error 28)"); torch.save
    raises RuntimeError with its zip writer's words ("unexpected pos 576 vs 534", chained to
    "basic_ios::clear: iostream error") and no errno at all. For those, the free space left
    at `where` (the folder written to) tells a full disk from another failure. Deeper in the
    exception chain only a storage errno counts: a library may have handled another OSError there."""
    for depth, err in enumerate(_chain(error)):
        if isinstance(err, OSError) and err.errno is not None and (depth == 0 or err.errno in STORAGE_ERRNOS):
            return os.strerror(err.errno)
        text = str(err)
        if match := _RUST_OS_ERROR.search(text):
            return os.strerror(int(match.group(1)))
        if known := next((os.strerror(code) for code in STORAGE_ERRNOS if os.strerror(code) in text), None):
            return known
    if any(mark in str(err) for err in _chain(error) for mark in _TORCH_WRITER):
        free = free_bytes(where) if where is not None else None
        if free is not None and free < _LOW_SPACE:
            return f"{os.strerror(errno.ENOSPC)}: {free} bytes free"
        return f"a write failed: {str(error).splitlines()[0][:160]}"
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (its nearest existing folder)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


@contextmanager
def reported_writes(what: str, advice: str, where: str | os.PathLike | None = None) -> Iterator[None]:
    """Inside the block, a write the storage refuses (whatever the library raised) becomes one
    sentence: "Could not write {what} ({reason}); {advice}." Other errors pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - libraries raise their own types for a refused write
        reason = write_failure(err, where)
        if reason is None:
            raise
        raise UserError(f"Could not write {what} ({reason}); {advice}.") from None
