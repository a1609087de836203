"""The embedded default data set: scikit-learn's digits as shards in the cache folder, written once
per filesystem however many processes (and nodes) ask at once (`digits_shards`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from vitmpp.common.errors import UserError

from . import writer  # (write_shards looked up at call time)
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .sources import SOURCES


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
DIGITS_TEST_FRACTION = SOURCES["digits"].test_fraction  # 359 images, the same for every seed


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


def digits_shards(image_size: int, *, fmt: str = "png", seed: int = 0, cache: str | os.PathLike | None = None) -> str:
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
    wanted = {
        "source": "digits",
        "image_size": image_size,
        "format": fmt,
        "seed": seed,
        "maxcount": DIGITS_MAXCOUNT,
        "val_fraction": DIGITS_VAL_FRACTION,
        "test_fraction": DIGITS_TEST_FRACTION,
    }
    lock = root / f".{name}.lock"  # never removed: removing a lock file races with its next user

    def cannot_lock(err: OSError) -> UserError:
        hint = (
            "its filesystem does not support file locks"
            if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
            else err.strerror or err
        )
        return UserError(
            f"Cannot lock '{lock}' to write the digits shards ({hint}); set VITMPP_CACHE to a "
            "writable local folder, or write the shards once with `python -m vitmpp.datasets.make_shards "
            "--source digits` and pass their folder as data.shards."
        )

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
            writer.write_shards(
                out,
                "digits",
                fmt=fmt,
                image_size=image_size,
                seed=seed,
                maxcount=DIGITS_MAXCOUNT,
                val_fraction=DIGITS_VAL_FRACTION,
                overwrite=True,
                progress=False,
            )
    finally:
        os.close(fd)  # releases the lock
    return str(out)
