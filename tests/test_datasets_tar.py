"""The lean tar member reader (datasets/tarmembers.py) yields and fails exactly as webdataset's
`tar_file_iterator` over Python's tarfile, on whole, truncated and corrupted shards, so the
samples of a damaged shard and the count of those lost do not depend on the reader."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
from webdataset.handlers import reraise_exception
from webdataset.tariterators import tar_file_iterator

from datasets_helpers import write_tiny_shards
from vitmpp.datasets.samples import Tally, read_shard
from vitmpp.datasets.tarmembers import NotLean, read_members


def reference(data: bytes):
    """(members, failure) as tarfile through webdataset reads them."""
    out = []
    try:
        for f in tar_file_iterator(io.BytesIO(data), handler=reraise_exception):
            out.append((f["fname"], f["data"]))
    except Exception as err:  # noqa: BLE001 - the failure is what is compared
        return out, (type(err).__name__, str(err).split(" @ ")[0])
    return out, None


def lean(data: bytes):
    """(members, failure) from the lean reader; failure "NotLean" when it hands over to tarfile."""
    out = []
    try:
        for f in read_members(io.BytesIO(data), "u"):
            assert f["__url__"] == "u"
            out.append((f["fname"], f["data"]))
    except NotLean:
        return out, "NotLean"
    except Exception as err:  # noqa: BLE001
        return out, (type(err).__name__, str(err))
    return out, None


def agree(data: bytes) -> bool:
    """The readers agree; where the lean one hands over, what it yielded is a prefix of tarfile's
    (read_shard then passes over those samples in tarfile's reading). Returns whether it handed over."""
    expected, got = reference(data), lean(data)
    if got[1] == "NotLean":
        assert expected[0][: len(got[0])] == got[0]
        return True
    assert got == expected
    return False


def tar_bytes(members: list[tuple], fmt=tarfile.PAX_FORMAT) -> bytes:
    """A tar of (name, bytes) regular members, or (name, None, type) other members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, *kind in members:
            info = tarfile.TarInfo(name)
            if kind:
                info.type = kind[0]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> bytes:
    """One shard as make_shards' writer makes them: 4 samples, png + cls members."""
    out = tmp_path_factory.mktemp("tar")
    write_tiny_shards(out, [4], size=8)
    return (out / "tiny-train-000000.tar").read_bytes()


def test_a_whole_shard_reads_the_same(shard):
    assert not agree(shard)
    members, failure = lean(shard)
    assert failure is None and len(members) == 8


def test_every_truncation_fails_or_ends_as_tarfile_does(shard):
    for cut in range(len(shard) + 1):
        assert not agree(shard[:cut]), cut


@pytest.mark.parametrize("value", [0x00, 0xFF, ord("x"), ord("7"), ord(" "), ord("/")])
def test_a_corrupted_header_byte_fails_or_ends_as_tarfile_does(shard, value):
    # every byte of the first three headers (the first member, a later one, and the one after its data)
    positions = [0]
    for _ in range(2):
        size = int(shard[positions[-1] + 124 : positions[-1] + 136].split(b"\0")[0] or b"0", 8)
        positions.append(positions[-1] + 512 + -(-size // 512) * 512)
    for header in positions:
        for k in range(512):
            damaged = bytearray(shard)
            damaged[header + k] = value
            agree(bytes(damaged))


def test_other_member_types_are_skipped_or_handed_to_tarfile():
    plain = [("a.cls", b"1"), ("a.png", b"xyz" * 300)]
    assert not agree(tar_bytes([("d/", None, tarfile.DIRTYPE), ("l", None, tarfile.SYMTYPE), *plain]))
    assert not agree(tar_bytes([("__meta__", b"m"), ("__x__/y.txt", b"m"), *plain]))
    assert not agree(tar_bytes(plain, fmt=tarfile.USTAR_FORMAT))
    assert not agree(tar_bytes(plain, fmt=tarfile.GNU_FORMAT))
    # a long name (a pax header), a GNU long name, a ustar prefix, a compressed stream: tarfile's
    long_name = "k" * 120 + ".png"
    assert agree(tar_bytes([*plain, (long_name, b"p")]))
    assert agree(tar_bytes([*plain, (long_name, b"p")], fmt=tarfile.GNU_FORMAT))
    assert agree(tar_bytes([*plain, ("p" * 60 + "/" + "q" * 60 + ".png", b"p")], fmt=tarfile.USTAR_FORMAT))
    assert agree(gzip.compress(tar_bytes(plain)))


def test_read_shard_hands_a_pax_shard_to_tarfile_without_losing_samples(tmp_path):
    members = []
    for i in range(3):
        key = f"{i:04d}" if i != 1 else "k" * 120  # the second sample's names need a pax header
        members += [(f"{key}.cls", str(i).encode()), (f"{key}.png", b"img%d" % i)]
    path = tmp_path / "pax.tar"
    path.write_bytes(tar_bytes(members))
    tally = Tally()
    samples = list(read_shard(str(path), 10, 3, None, tally))
    assert [s.index for s in samples] == [10, 11, 12]
    assert [s.members["cls"] for s in samples] == [b"0", b"1", b"2"]
    assert tally.skipped == 0 and not tally.notes
