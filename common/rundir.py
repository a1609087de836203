"""Run directories: where a run's config, events, checkpoints and exports live.

    runs/<name>/
        config.yaml          the resolved config (written once, compared on reuse)
        tensorboard/         TensorBoard events
        checkpoints/         see vitmpp.common.checkpoint
        metrics.jsonl        one line per optimizer step (loss, lr, grad norm)
        encoder.safetensors, encoder.json   (pretraining, at the end)

A run directory is never silently reused: starting a new run in a directory that
already holds one is refused (with the keys that differ, if the config changed);
`--resume` continues it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import checkpoint as ckpt
from .config import diff_keys, dump_yaml, to_dict
from .errors import UserError
from .io import atomic_write

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


def cache_dir() -> Path:
    """Where data the project makes for itself (the embedded digits shards) is kept:
    $VITMPP_CACHE, else ~/.cache/vitmpp."""
    return Path(os.environ.get("VITMPP_CACHE", Path.home() / ".cache" / "vitmpp"))


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: `auto` (newest complete one, or None), or a path."""
    if resume is None:
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(checkpoints_dir(run_dir))
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"Checkpoint '{resume}' given to --resume does not exist; pass a checkpoints/step-XXXXXXX folder or 'auto'.")
    if not ckpt.is_complete(path):
        raise UserError(
            f"Checkpoint '{resume}' is incomplete (no {ckpt.STATE_FILE}; a save was interrupted); "
            "pass an earlier one or 'auto'."
        )
    return path


def check_reuse(run_dir: Path, config: Any, resume: str | None, ignore: Iterable[str] = ()) -> list[str]:
    """Refuse to start a fresh run in a directory that holds another; return changed keys on resume.

    `ignore` lists key prefixes that may change between a run and its resumption
    (e.g. logging intervals) without being reported.
    """
    run_dir = Path(run_dir)
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        return []
    saved = yaml.safe_load(saved_file.read_text()) or {}
    changed = diff_keys(saved, to_dict(config), ignore=ignore)
    if resume is None:
        checkpoints = ckpt.list_checkpoints(checkpoints_dir(run_dir))
        if changed:
            shown = ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
            raise UserError(
                f"Run directory '{run_dir}' holds a run with a different config (keys {shown}); "
                "choose another run.name, or pass --resume auto to continue that run."
            )
        if checkpoints or (run_dir / METRICS_FILE).exists():
            last = ckpt.checkpoint_step(checkpoints[-1]) if checkpoints else 0
            raise UserError(
                f"Run directory '{run_dir}' already holds this run (last checkpoint at step {last}); "
                "pass --resume auto to continue it, or choose another run.name."
            )
    return changed


def write_config(run_dir: Path, config: Any) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / CONFIG_FILE, dump_yaml(config))


class MetricsLog:
    """Append-only per-step metrics (`metrics.jsonl`), truncated to a checkpoint on resume.

    Lines after the checkpoint a run resumes from were written by the interrupted
    attempt; they are dropped so the file holds each step exactly once.
    """

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) <= resume_step]
            atomic_write(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        with open(self.path, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
