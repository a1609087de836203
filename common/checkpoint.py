"""Checkpoint directories that are either complete or absent.

Layout of a run's `checkpoints/` folder::

    step-0000500/            complete: renamed into place after every file was written
        model.safetensors, optimizer.bin, random_states_0.pkl, ...   (Accelerate's save_state)
        trainer_state.json   (ours: step, epoch, data position, counters; written last)
    .step-0001000.partial/   a save in progress, or one a crash interrupted: never read

A save writes into the `.partial` folder, then the main process renames it to
`step-XXXXXXX`, so a crash at any moment leaves the previous checkpoint intact.
Old checkpoints are deleted only after the new one is complete (Accelerate's
`total_limit` deletes before it writes, which can leave nothing after a crash).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def partial_dir(root: Path, step: int) -> Path:
    """Where a save of `step` is written before it is renamed into place."""
    return Path(root) / f".{checkpoint_name(step)}.partial"


def is_complete(path: Path) -> bool:
    return bool(_NAME.match(path.name)) and (path / STATE_FILE).is_file()


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (incomplete ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint directory name")
    return int(match.group(1))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON via a temporary file, fsync and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_state(path: str | os.PathLike) -> dict:
    with open(Path(path) / STATE_FILE) as handle:
        return json.load(handle)


def finalize(partial: Path, final: Path) -> None:
    """Rename a fully written `.partial` folder into place (main process only)."""
    _fsync_dir(partial)
    if final.exists():
        # A checkpoint of this step already exists (a resumed run saving the
        # same step again): replace it only now that the new one is complete.
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(partial, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(partial, final)
    _fsync_dir(final.parent)


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and stale partial saves."""
    root = Path(root)
    removed = []
    complete = list_checkpoints(root)
    for path in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_partials(root: str | os.PathLike) -> None:
    """Delete leftovers of interrupted saves (call on the main process when no save runs)."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(".step-") and (path.name.endswith(".partial") or path.name.endswith(".old")):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
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
