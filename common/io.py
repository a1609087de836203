"""Writing files so that a reader (or a resumed run) never sees half of one.

Every file and folder vitmpp writes goes through these two functions: the content
is written under a hidden temporary name next to the target, flushed to disk, and
renamed over it (a rename is atomic within one filesystem). A crash, a kill or a
full disk leaves the old file or nothing, never a truncated one.

    atomic_write(path, text_or_bytes)     one file
    with atomic_file(path) as tmp: ...    one file a library writes to a path
    atomic_write_json(path, data)         one JSON file (sorted keys, indented)
    with atomic_dir(final) as tmp: ...    a whole folder, renamed into place at the end
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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
