"""Run directories: where a run's config, events, checkpoints and exports live.

    runs/<name>/
        lock                 held while a process writes this folder (see below); names the holder
        config.yaml          the config the run is under now (the latest segment's)
        config-history/      segment-001-from-step-0000000.yaml, segment-002-from-step-0000400.yaml, ...
        tensorboard/         TensorBoard events
        checkpoints/         see vitmpp.common.checkpoint
        metrics.jsonl        one line per optimizer step (loss, lr, grad norm), and one per online
                             evaluation (eval/*), written as it runs: it can precede the loss rows of
                             its interval that are not flushed yet; read rows by their step
        encoder.safetensors, encoder.json   (pretraining, at the end)

One writer: `lock_run_folder` takes a POSIX record lock (`fcntl.lockf`) on `lock`
before anything else is written and keeps it until the process ends; a second run
of the same folder is refused with the holder's host, pid and start time, which the
holder writes into the file (and marks "ended" when it exits normally). The kernel
drops the lock when its holder dies (SIGKILL, the OOM killer, a lost node's lease on
NFS), so a lock left by a dead run is taken over by the next one, which says so (its
record lacks the mark). That is known on the holder's host only: many network filesystems
keep record locks per host, so a record of another host without the mark may be a run alive
there; it is refused, naming that run, until the user has made sure it stopped and names it
in $VITMPP_TAKE_OVER_LOCK (`host:pid`, as the message prints it). A record lock rather
than `flock`: forked data-loading workers do not inherit it, so a killed run's orphaned
workers cannot keep its folder locked. Its one trap, that closing any descriptor of the
file drops the process's lock, is why only this module opens it, once per process. Only
the main process of a multi-process run takes it. The file is never deleted (deleting a
lock file races with its next taker).

A run directory is never silently reused: starting a new run in a directory that
already holds one is refused (with the keys that differ, if the config changed);
`--resume` continues it. Resuming with a changed key that alters the computation
(anything but a stage's `RESUMABLE_KEYS`: logging, debugging, worker counts, the
shards' location, the run's length) is refused unless `--allow-changes` is given.

A run has an identity (`run.json`: a random id written when the folder is first used), which
every checkpoint carries: a checkpoint written by another run (copied into `checkpoints/`,
or named by `--resume PATH` in another run's folder) is refused in one sentence naming both
runs, or continued from under `--allow-changes`, which the new config segment records.
Checkpoints written before the id carry only their config's fingerprint: one that matches
no segment of this run's history is resumed with a warning.

The config history is never rewritten: each segment of a run (the first start and
every resume under a config that differs from the one before) is one file in
`config-history/`, written once. `segment-<k>-from-step-<s>.yaml` is the config
under which steps s+1 onward ran, until the next segment; a later segment with a
smaller `s` means the run was resumed from an older checkpoint and the steps
after that checkpoint were discarded. Each file is a complete config (loadable
with `--config`) whose comment header says where and when the segment began and
which keys it changed. `config.yaml` is always the latest segment's config.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint as ckpt
from .config import diff_keys, dump_yaml, flatten, format_value, to_dict
from .console import Console
from .errors import ConfigError, UserError
from .io import atomic_write, reported_writes

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "lock"
HISTORY_DIR = "config-history"
RUN_FILE = "run.json"

TAKE_OVER_ENV = "VITMPP_TAKE_OVER_LOCK"  # host:pid of another host's run the user knows has stopped
_HELD: dict[Path, int] = {}  # run folders this process holds (resolved path -> open lock file, kept till exit)


def cache_dir() -> Path:
    """Where data the project makes for itself (the embedded digits shards) is kept:
    $VITMPP_CACHE, else ~/.cache/vitmpp."""
    return Path(os.environ.get("VITMPP_CACHE", Path.home() / ".cache" / "vitmpp"))


# ----------------------------------------------------------------------------- where, and one writer


def check_location(run_dir: Path, name: str | None = None, *, output_key: str = "run.output_dir") -> None:
    """Refuse a run name that would leave the output folder, and a folder path that runs into a file,
    before anything is created (every rank checks; nothing is written)."""
    if name and (os.path.isabs(name) or "/" in name or (os.altsep and os.altsep in name) or name in (".", "..")):
        raise ConfigError(
            f"Key 'run.name' must be a single folder name (no '/', not '.' or '..'), got {name!r}; "
            f"choose where run folders go with {output_key}."
        )
    run_dir = Path(run_dir)
    for path in (run_dir, *run_dir.parents):
        if path.is_dir():
            return
        if path.exists() or path.is_symlink():
            what = "a file" if path.exists() else "a broken symbolic link"
            raise ConfigError(
                f"Run folder '{run_dir}' cannot be made: '{path}' is {what}, not a folder; "
                f"choose another {output_key}{' or run.name' if path == run_dir and name else ''}."
            )


def lock_run_folder(run_dir: Path, *, output_key: str = "run.output_dir", name_key: str = "run.name") -> str | None:
    """Create `run_dir` and hold its lock until this process ends; refuse (one sentence naming the
    holder) when another process holds it. Returns a note to print when the lock was taken over from
    a run that died holding it, or when the filesystem cannot lock; else None. The keys are what the
    messages tell the user to change."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:  # this process holds it already (a stage run twice in one process)
        return None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise UserError(
            f"Run folder '{run_dir}' cannot be created or written ({err.strerror}); "
            f"choose another {output_key} or fix its permissions."
        ) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. ENOLCK: a filesystem without locks
            _HELD[key] = fd
            return (
                f"run folder {run_dir} cannot be locked on this filesystem ({err.strerror}); "
                "make sure no other run writes it"
            )
        holder = _holder(fd, wait=True)
        os.close(fd)  # not ours: closing it releases nothing
        who = _describe(holder) if holder else "another process"
        raise UserError(
            f"Run folder '{run_dir}' is in use by {who}; wait for that run to end (or stop it), "
            f"or choose another {name_key}."
        ) from None
    previous = _holder(fd)  # every holder that exits normally marks its record "ended": one without died
    here = socket.gethostname()
    taken = "which died holding it"
    if previous and "ended" not in previous and previous.get("host") not in (None, here):
        # our lock says nothing about a process on another host: only the user can tell that it stopped
        holder = f"{previous.get('host')}:{previous.get('pid')}"
        if os.environ.get(TAKE_OVER_ENV) != holder:
            os.close(fd)  # drops our lock, leaves the record as it is
            raise UserError(
                f"Run folder '{run_dir}' is locked by {_describe(previous)}, and this host ({here}) "
                "cannot tell whether that process is still running; make sure that run has stopped, then "
                f"rerun with {TAKE_OVER_ENV}={holder}, or choose another {name_key}."
            ) from None
        taken = f"which {TAKE_OVER_ENV} says has stopped"
    me = {
        "host": here,
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv)[:500],
    }
    _write_holder(fd, me)
    _HELD[key] = fd
    atexit.register(lambda: _write_holder(fd, {**me, "ended": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
    if previous and "ended" not in previous:
        return f"run folder {run_dir} was locked by {_describe(previous)}, {taken}; taken over"
    return None


def _write_holder(fd: int, record: dict) -> None:
    """The record only names the holder in messages (the lock is the kernel's): a full disk may keep it."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)


def _holder(fd: int, wait: bool = False) -> dict | None:
    """The holder record in the lock file; with `wait`, give a holder that just locked a moment to write it."""
    for _ in range(20 if wait else 1):
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            record = None
        if isinstance(record, dict):
            return record
        if wait:
            time.sleep(0.05)
    return None


def _describe(holder: dict) -> str:
    ending = ", ending now" if "ended" in holder else ""
    return f"process {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}{ending})"


# ----------------------------------------------------------------------------- reuse and resume


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, verified against the checksums written with it: `auto` (the
    newest intact one, or None when the run has none at all), or a path, which must be intact.

    `auto` passes over newer damaged or incomplete checkpoints with a warning each, setting them
    aside as `<name>.damaged` (kept, out of reach of later saves and pruning); it refuses when
    none is intact. Reads every file of the checkpoint: the main process calls it and tells the others."""
    if resume is None:
        return None
    if resume == "auto":
        return _newest_intact(ckpt.checkpoints_dir(run_dir))
    path = Path(resume)
    if not path.is_dir():
        raise UserError(
            f"Checkpoint '{resume}' given to --resume does not exist;"
            " pass a checkpoint folder (e.g. runs/NAME/checkpoints/step-0000400) or 'auto'."
        )
    if not ckpt.is_complete(path):
        raise UserError(
            f"Checkpoint '{resume}' is incomplete (no {ckpt.STATE_FILE}; a save was interrupted); "
            "pass an earlier one or 'auto'."
        )
    problem = ckpt.damage(path)
    if problem is not None:
        raise UserError(
            f"Checkpoint '{resume}' is damaged ({problem}); pass an earlier one, or 'auto' "
            "(the newest intact checkpoint)."
        )
    _warn_if_unverifiable(path)
    return path


def _newest_intact(root: Path) -> Path | None:
    damaged = []
    for path in reversed(ckpt.step_folders(root)):
        problem = ckpt.damage(path)
        if problem is None:
            break
        damaged.append((path, problem))
    else:
        if damaged:
            found = ", ".join(f"{path.name}: {problem}" for path, problem in damaged)
            raise UserError(
                f"No checkpoint in {root} is intact ({found}); none was resumed or changed: pass an "
                "intact copy with --resume PATH, or choose another run.name to start afresh."
            )
        return None
    warn = Console(is_main=True).warn
    for bad, problem in damaged:
        kept = ckpt.set_aside(bad)
        warn(f"checkpoint {bad} cannot be resumed ({problem}); resuming from {path} instead; it is kept as {kept}")
    _warn_if_unverifiable(path)
    return path


def _warn_if_unverifiable(path: Path) -> None:
    if not ckpt.is_verifiable(path):
        Console(is_main=True).warn(
            f"checkpoint {path} was written without checksums (by an older version), "
            "so its files cannot be verified; resuming from it as it is"
        )


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
        checkpoints = ckpt.list_checkpoints(ckpt.checkpoints_dir(run_dir))
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


def refuse_changes(run_dir: Path, config: Any, changed: list[str], resume_from: Path | None, allow: bool) -> None:
    """Resuming a checkpoint under `changed` keys (ones that alter the computation) needs `--allow-changes`.

    Without a checkpoint nothing trained under the old config survives, so nothing is refused."""
    if not changed or resume_from is None or allow:
        return
    saved = flatten(yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text()) or {})
    new = flatten(to_dict(config))
    shown = ", ".join(f"{key} ({format_value(saved.get(key))} -> {format_value(new.get(key))})" for key in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise UserError(
        f"Checkpoint {resume_from} was trained with other values of {shown}{more}; resume with the values "
        f"in {Path(run_dir) / CONFIG_FILE}, or pass --allow-changes to continue under the new ones "
        f"({HISTORY_DIR}/ keeps which steps ran under which config)."
    )


# ----------------------------------------------------------------------------- which run a checkpoint is of


def config_fingerprint(config: Any) -> str:
    """A short digest of a config's values (what checkpoints carry to tell configs apart)."""
    text = json.dumps(to_dict(config) if not isinstance(config, dict) else config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id(run_dir: Path) -> str | None:
    """The id of the run in `run_dir` (`run.json`), or None when the folder has none yet."""
    path = Path(run_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise UserError(
            f"{path} is not the JSON a run writes; restore it from a copy of the run folder, or delete "
            "it to let the run take a new identity."
        ) from None
    value = record.get("id") if isinstance(record, dict) else None
    if not isinstance(value, str) or not value:
        raise UserError(
            f"{path} holds no run id; restore it from a copy of the run folder, or delete it to let "
            "the run take a new identity."
        )
    return value


def claim_run_id(run_dir: Path) -> str:
    """The run's id, made (a random UUID, kept in `run.json` for the folder's life) if it has none."""
    existing = run_id(run_dir)
    if existing is not None:
        return existing
    record = {
        "id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": socket.gethostname(),
        "folder": str(Path(run_dir).resolve()),
    }
    with reported_writes(str(Path(run_dir) / RUN_FILE), MetricsLog.ADVICE, run_dir):
        atomic_write(Path(run_dir) / RUN_FILE, json.dumps(record, indent=2) + "\n")
    return record["id"]


def check_checkpoint_origin(run_dir: Path, resume_from: Path | None, allow: bool) -> str | None:
    """Refuse a checkpoint that another run wrote (its `run_id` is not this folder's), unless `allow`
    (`--allow-changes`): then return a note for the config history. None: it is this run's own.

    A checkpoint without a `run_id` (an older version's) is compared by config fingerprint with
    this run's config history; matching none, it is resumed with a warning."""
    if resume_from is None:
        return None
    try:
        state = ckpt.read_state(resume_from)
    except (OSError, ValueError):  # Checkpointer.load names the damage
        return None
    ours, theirs = run_id(run_dir), state.get("run_id")
    if theirs is None:
        known = {config_fingerprint(yaml.safe_load(path.read_text()) or {}) for path in config_history(run_dir)}
        if state.get("config_fingerprint") not in known and known:
            Console(is_main=True).warn(
                f"checkpoint {resume_from} was written by an older version that did not "
                f"record its run, and under a config none of {Path(run_dir) / HISTORY_DIR}/ "
                "holds; make sure it is this run's"
            )
        return None
    if theirs == ours:
        return None
    where = state.get("run_dir") or str(Path(resume_from).resolve().parent.parent)
    mine = f"not by the run in {run_dir} (id {ours[:8]})" if ours else f"and {run_dir} holds no run of its own yet"
    told = f"Checkpoint {resume_from} was written by another run (the run in {where}, id {theirs[:8]}), {mine}"
    if allow:
        return f"{told}; continued from it under --allow-changes"
    raise UserError(
        f"{told}; resume that run in its own folder, or pass --allow-changes to continue this run "
        f"from it ({HISTORY_DIR}/ records it)."
    )


# ----------------------------------------------------------------------------- the config and its history


def config_history(run_dir: Path) -> list[Path]:
    """The segments of a run's config history, oldest first."""
    return sorted((Path(run_dir) / HISTORY_DIR).glob("segment-*.yaml"))


def record_config(
    run_dir: Path, config: Any, from_step: int, resumed_from: Path | None = None, notes: Sequence[str] = ()
) -> Path | None:
    """Make `config` the run's current config (`config.yaml`), first adding it to the history as a new
    segment from `from_step` unless it is the latest segment's already and there are no `notes` (what
    was accepted under --allow-changes besides keys: another run's checkpoint, other data); returns
    the new segment or None.

    A run folder made before the history existed has its config.yaml kept as segment 1 first."""
    run_dir = Path(run_dir)
    current = run_dir / CONFIG_FILE
    history = config_history(run_dir)
    if not history and current.is_file():
        _write_segment(run_dir, 1, 0, current.read_text(), "the config this run folder was made with")
        history = config_history(run_dir)
    latest = yaml.safe_load(history[-1].read_text()) if history else None
    changed = diff_keys(latest, to_dict(config)) if latest is not None else []
    segment = None
    if latest is None or changed or notes:
        if resumed_from is not None:
            origin = f"resumed from {resumed_from}"
        else:
            origin = "started" if from_step == 0 and not history else f"restarted from step {from_step}"
        host = f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} by process {os.getpid()} on host {socket.gethostname()}"
        header = f"{origin} {host}" + (f"; changed keys: {', '.join(changed)}" if changed else "")
        header += "".join(f"\n# {note}" for note in notes)
        segment = _write_segment(run_dir, len(history) + 1, from_step, dump_yaml(config), header)
    write_config(run_dir, config)
    return segment


def _write_segment(run_dir: Path, index: int, from_step: int, text: str, header: str) -> Path:
    path = run_dir / HISTORY_DIR / f"segment-{index:03d}-from-step-{from_step:07d}.yaml"
    comment = (
        f"# Segment {index} of the run in {run_dir}: the config of steps {from_step + 1} onward "
        f"(until the next segment).\n# {header}\n"
    )
    with reported_writes(str(path), MetricsLog.ADVICE, run_dir):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, comment + text)
    return path


def write_config(run_dir: Path, config: Any) -> None:
    """`config.yaml`: the config the run is under now."""
    run_dir = Path(run_dir)
    with reported_writes(str(run_dir / CONFIG_FILE), MetricsLog.ADVICE, run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / CONFIG_FILE, dump_yaml(config))


# ----------------------------------------------------------------------------- per-step metrics


class MetricsLog:
    """Append-only per-step metrics (`metrics.jsonl`), truncated to a checkpoint on resume.

    Lines after the checkpoint a run resumes from were written by the interrupted
    attempt; they are dropped so the file holds each step exactly once. A write the
    disk refuses stops the run with one sentence, the file cut back to its last whole line.
    """

    ADVICE = "the checkpoints written so far are intact; free disk space and continue with --resume auto"

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = Path(run_dir) / METRICS_FILE
        with reported_writes(str(self.path), self.ADVICE, self.path.parent):
            if resume_step is not None and self.path.exists():
                kept = [
                    line
                    for line in self.path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step
                ]
                atomic_write(self.path, "".join(line + "\n" for line in kept))
            elif resume_step is None and self.path.exists():
                self.path.unlink()

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with reported_writes(str(self.path), self.ADVICE, self.path.parent):
                with open(self.path, "a") as handle:
                    for row in rows:
                        handle.write(json.dumps(row, sort_keys=True) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
        except UserError:
            with contextlib.suppress(OSError):  # no half line left (shrinking needs no space); else resume drops it
                os.truncate(self.path, size)
            raise


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
