"""A lean reader of the members of a local, uncompressed tar shard.

`read_members(file, url)` yields what webdataset's `tar_file_iterator` (over Python's
`tarfile` in stream mode) yields for the same bytes: `{"fname", "data", "__url__"}` for every
regular member whose name is not webdataset metadata (`__...__`), in order, and it ends or
raises exactly where `tarfile` ends or raises, with the same `tarfile.ReadError` sentences
("unexpected end of data", "empty file", "bad checksum", "truncated header", ...). So the
samples of a damaged shard, and the count of those lost (samples.read_shard), do not depend on
which reader read it; `tests/test_datasets_tar.py` checks this on every truncation and on
corruptions of every header byte of a shard.

Why: `tarfile` builds a `TarInfo` and parses every field of every header through several
layers of file objects; our shards (webdataset's `TarWriter`, three members per sample) cost
~24 us per member that way, ~5 here: 10% of a decode-only worker's time on 500 x 375 JPEGs
(docs/benchmarks.md). A header is read in one 512-byte block (ustar: name 0..100, size
124..136 in octal, checksum 148..156, type 156, prefix 345..500). A header that is not plain
(a number field that is not plain octal, a checksum that only matches signed) is parsed by
`tarfile.TarInfo.frombuf` itself, so every oddity gets tarfile's verdict; content this reader
does not interpret (pax and GNU long-name headers, sparse members, a ustar name prefix in a
plain header, a compressed stream) raises
`NotLean` before anything of that member is yielded, and the caller reads the shard again
with tarfile (samples.read_shard passes over what was already yielded).
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_ENCODING, _ERRORS = tarfile.ENCODING, "surrogateescape"  # what TarFile uses when reading
# number fields of a header (mode, uid, gid, size, mtime, checksum, devmajor, devminor)
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))
# a number field our reader parses itself: octal digits, then spaces/NULs (anything else goes to tarfile)
_PLAIN_NUMBER = re.compile(rb" *[0-7]*[ \0]*")
_REGULAR = (b"0", b"\0", b"7")  # tarfile.REGULAR_TYPES without GNU sparse (not interpreted here)
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # supported types whose size is not followed by data
_NOT_INTERPRETED = (b"L", b"K", b"S", b"x", b"g", b"X")  # GNU long names, sparse, pax headers
# what tarfile's "r|*" mode recognises as compressed
_COMPRESSED = (b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ")
# webdataset's tar_file_iterator skips these names (its `meta_prefix`/`meta_suffix` and `skip_meta`)
_META = re.compile(r"__[^/]*__($|/)")


class NotLean(Exception):
    """The shard holds something this reader leaves to tarfile (the message says what)."""


def _header(buf: bytes, at_start: bool) -> tuple[str, int, bytes] | None:
    """(name, size, type) of one header block; None where tarfile ends the archive quietly;
    tarfile.ReadError where tarfile raises (only at the start, as tarfile does)."""
    if len(buf) != BLOCK or buf.count(0) == BLOCK:
        if at_start and len(buf) != BLOCK:
            raise tarfile.ReadError("empty file" if not buf else "truncated header")
        return None  # an end-of-archive block, or a header cut short after the first member
    plain = all(_PLAIN_NUMBER.fullmatch(buf, a, b) for a, b in _NUMBER_FIELDS)
    if plain:
        chksum = int(buf[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        if chksum == 256 + sum(buf) - sum(buf[148:156]):
            if buf[345:500].split(b"\0", 1)[0]:
                raise NotLean("a ustar name prefix")
            kind = buf[156:157]
            name = buf[0:100].split(b"\0", 1)[0].decode(_ENCODING, _ERRORS)
            if kind == b"\0" and name.endswith("/"):
                kind = b"5"  # V7 tar: a directory is a regular file with a trailing slash
            size = int(buf[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            return name, size, kind
    # anything else (a signed checksum, base-256 numbers, a bad field): tarfile's own verdict
    try:
        info = tarfile.TarInfo.frombuf(buf, _ENCODING, _ERRORS)
    except tarfile.HeaderError as err:
        if at_start:
            raise tarfile.ReadError(str(err)) from None
        return None
    if info.size < 0:
        raise NotLean("a negative member size")
    return info.name, info.size, info.type  # (frombuf has applied the V7 rule and any name prefix)


def read_members(file: BinaryIO, url: str) -> Iterator[dict]:
    """The regular, non-metadata members of an uncompressed tar file, as `tar_file_iterator`
    yields them (module docstring); `file` is read from its current position (the start)."""
    offset = 0  # where the next header starts
    while True:
        if offset and file.tell() != offset:
            # tarfile's check: the previous member's data and padding must all be there
            file.seek(offset - 1)
            if not file.read(1):
                raise tarfile.ReadError("unexpected end of data")
        buf = file.read(BLOCK)
        if offset == 0 and (buf.startswith(_COMPRESSED) or (buf[0:3] == b"BZh" and buf[4:10] == b"1AY&SY")):
            raise NotLean("a compressed stream")
        header = _header(buf, at_start=offset == 0)
        if header is None:
            return
        name, size, kind = header
        if kind in _NOT_INTERPRETED:
            raise NotLean(f"a member of type {kind.decode(_ENCODING, _ERRORS)!r}")
        data_at = offset + BLOCK
        offset = data_at if kind in _NO_DATA else data_at + -(-size // BLOCK) * BLOCK
        if kind not in _REGULAR:
            continue
        if "/" not in name and name.startswith("__") and name.endswith("__") or _META.match(name):
            continue
        data = file.read(size)
        if len(data) != size:
            raise tarfile.ReadError("unexpected end of data")
        yield {"fname": name, "data": data, "__url__": url}
