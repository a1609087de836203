"""Checkpoint directories that are either complete or absent.

Layout of a run's `checkpoints/` folder::

    step-0000500/            complete: renamed into place after every file was written
        model.safetensors, optimizer.bin, random_states_0.pkl, ...   (Accelerate's save_state; under
                              FSDP, sharded: pytorch_model_fsdp_0/ and optimizer_0/, each with
                              .metadata and one __<rank>_0.distcp per rank, written by every rank)
        logical_rank_00000_rng.safetensors, ...   (ours: every logical rank's torch generators, so that
                              any divisor of the logical ranks can resume; docs/distributed.md)
        trainer_state.json   (ours: step, epoch, data position, counters, and the size and
                              sha256 of every other file; written last)
    .step-0001000.partial/   a save in progress, or one a crash interrupted: never read
    step-0000400.damaged/    a checkpoint that failed verification, set aside by --resume auto

A save writes into the `.partial` folder, then the main process renames it to
`step-XXXXXXX`, so a crash at any moment leaves the previous checkpoint intact.
Old checkpoints are deleted only after the new one is complete (Accelerate's
`total_limit` deletes before it writes, which can leave nothing after a crash).
A write the storage refuses (a full disk, a quota, an I/O error, a read-only
remount), whatever the library doing it raised, stops every rank with one sentence
and removes the `.partial` folder.

Resuming verifies every file against the size and checksum recorded when it was
written, so bit rot, a truncated copy or a file lost in transfer is found before
training continues on it; every file below the folder counts, so a sharded (FSDP)
checkpoint's shards and their `.metadata` are checked one by one like any other file.
sha256 rather than a faster non-cryptographic hash: with
the CPUs' SHA extensions (x86 SHA-NI, ARMv8 crypto) OpenSSL's sha256 is faster here
than blake2b (a 350 MB file, the size of ViT-B's weights: 0.23 s vs 0.31 s on an
AMD EPYC; about 0.7 s for a whole ViT-B checkpoint with its optimizer state, at each
save and once at resume), and `sha256sum` checks a file by hand. A checkpoint written
before checksums existed still loads, with a warning that it cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from .errors import UserError
from .io import atomic_write_json, replace_dir, write_failure

STATE_FILE = "trainer_state.json"
FILES_KEY = "files"  # in the trainer state: {relative path: {"bytes": size, "sha256": hex digest}}
CHECKSUM = "sha256"
_NAME = re.compile(r"^step-(\d{7,})$")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """The run folder's `checkpoints/` (the layout above; the run folder itself: vitmpp.common.rundir)."""
    return Path(run_dir) / "checkpoints"


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


def read_state(path: str | os.PathLike) -> dict:
    with open(Path(path) / STATE_FILE) as handle:
        return json.load(handle)


def step_folders(root: str | os.PathLike) -> list[Path]:
    """Every `step-XXXXXXX` folder under `root`, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=checkpoint_step)


def file_checksums(folder: Path) -> dict[str, dict]:
    """The size and sha256 of every file in a checkpoint folder but the trainer state (which holds them)."""
    found = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != STATE_FILE):
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, CHECKSUM).hexdigest()
        found[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, CHECKSUM: digest}
    return found


def is_verifiable(path: Path) -> bool:
    """Whether a complete checkpoint records its files' checksums (those written before checksums did not)."""
    try:
        return FILES_KEY in read_state(path)
    except (OSError, ValueError):
        return False


_INTACT: dict[Path, tuple] = {}  # checkpoints this process verified -> their files' (name, size, mtime) then


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path`, as a phrase, or None when every file it recorded is there with the
    size and checksum it was written with (or when it recorded none: written before checksums existed).

    Reads every file; a checkpoint this process verified before, whose files' sizes and times have
    not changed since, is not read again (the resume point is checked when chosen and when loaded)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return f"it has no {STATE_FILE}, so its save never finished"
    try:
        files = read_state(path).get(FILES_KEY, {})
        recorded = {name: (int(entry["bytes"]), str(entry[CHECKSUM])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its {STATE_FILE} cannot be read ({type(err).__name__}: {err})"
    seen = _fingerprint(path, recorded)
    if seen is not None and _INTACT.get(path.resolve()) == seen:
        return None
    for name, (size, digest) in sorted(recorded.items()):
        file = path / name
        try:
            actual = file.stat().st_size
            if actual != size:
                return f"{name} has {actual} bytes, but {size} were written"
            with open(file, "rb") as handle:
                if hashlib.file_digest(handle, CHECKSUM).hexdigest() != digest:
                    return f"{name} does not match the {CHECKSUM} checksum recorded when it was written"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
    _INTACT[path.resolve()] = seen
    return None


def _fingerprint(path: Path, names) -> tuple | None:
    """The (name, size, mtime) of each file: enough to tell one changed since it was verified, without reading it."""
    try:
        return tuple((name, (stat := (path / name).stat()).st_size, stat.st_mtime_ns) for name in sorted(names))
    except OSError:
        return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged` (`.damaged-2`, ... if taken): kept for the user,
    and out of reach of the saves and the pruning of the run that continues without it."""
    path = Path(path)
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, target)
    return target


def finalize(partial: Path, final: Path) -> None:
    """Rename a fully written `.partial` folder into place (main process only).

    A checkpoint of this step may already exist (a resumed run saving the same step
    again): it is replaced only now that the new one is complete."""
    replace_dir(Path(partial), Path(final))


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and stale partial saves."""
    root = Path(root)
    removed = []
    complete = list_checkpoints(root)
    for path in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    remove_partials(root)
    return removed


def remove_partials(root: str | os.PathLike) -> None:
    """Delete leftovers of interrupted saves (call on the main process when no save runs)."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(".step-") and (path.name.endswith(".partial") or path.name.endswith(".old")):
            shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """Save and restore Accelerate state plus our trainer state, atomically.

    Accelerate writes model, optimizer, scaler and every process's RNG state. We do
    not register extra objects with it: its custom-object loader unpickles with
    `weights_only=False`, which would let a tampered checkpoint run code. Our own
    state (step, data position, counters) is JSON; the LR schedule is a function of
    the step and needs no state.
    """

    def __init__(self, accelerator, run_dir: Path, keep_last: int, control, hooks=None):
        """`control`: a `ControlPlane` (agrees on failures across ranks); `hooks`: a loop `Callback`
        whose `before_checkpoint_commit(partial, step)` runs between the state and its completion mark."""
        self.accelerator = accelerator
        self.root = checkpoints_dir(run_dir)
        self.keep_last = keep_last
        self.control = control
        self.hooks = hooks
        self.last: Path | None = latest_checkpoint(self.root)

    def save(self, step: int, state: dict) -> Path:
        """Write checkpoint `step`: Accelerate's state on every rank, then (main process) the trainer
        state with every file's size and checksum, which marks it complete; then rename it into place.

        A write refused on any rank stops every rank after that phase with one sentence; the
        `.partial` folder is removed and the previous checkpoint is untouched."""
        acc = self.accelerator
        final = self.root / checkpoint_name(step)
        partial = partial_dir(self.root, step)

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()

        def write_states() -> None:
            acc.save_state(str(partial), safe_serialization=True)
            if self.hooks is not None:
                self.hooks.before_checkpoint_commit(partial, step)

        def mark_complete() -> None:  # every rank's files are written: the agreement before it waited for them
            atomic_write_json(partial / STATE_FILE, {**state, FILES_KEY: file_checksums(partial)})

        for phase, on_every_rank in ((prepare, False), (write_states, True), (mark_complete, False)):
            error: Exception | None = None
            if on_every_rank or acc.is_main_process:
                try:
                    phase()
                except Exception as err:  # noqa: BLE001 - libraries raise their own types for a refused write
                    error = err
            if self.control.any(error is not None):  # the same decision on every rank, after every rank's phase
                self._abandon(final, partial, error)
        if acc.is_main_process:
            finalize(partial, final)
            prune(self.root, self.keep_last)
        acc.wait_for_everyone()
        self.last = final
        return final

    def _abandon(self, final: Path, partial: Path, error: Exception | None) -> None:
        """Remove a failed save's `.partial` folder and stop: one sentence for a refused write, the
        original traceback for anything else (a bug)."""
        reason = write_failure(error, partial) if error is not None else "on another rank"
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        if reason is None:
            raise error
        kept = f"the previous checkpoint {self.last} is intact" if self.last else "no earlier checkpoint exists"
        stopped = UserError(
            f"Could not write checkpoint {final} ({reason}); {kept}; free disk space and rerun with --resume auto."
        )
        stopped.same_on_every_rank = error is None  # a rank that failed says why; the others' line is said once
        raise stopped from None

    def load(self, path: Path) -> dict:
        """Restore a checkpoint on a number of processes that divides its run's logical ranks (`logical_ranks_of`),
        once its files match the checksums they were written with (the main process reads them; every rank gets
        its verdict). On another process count than the one that wrote it, the random states of the logical ranks
        are the loop's to set (`load_logical_rng`): Accelerate's per-process files belong to other processes."""
        acc = self.accelerator
        problem = _decided_on_main(acc, lambda: damage(path))
        if problem is not None:
            error = UserError(
                f"Checkpoint {path} is damaged ({problem}); resume from an earlier one with --resume PATH, "
                "or with --resume auto, which passes over damaged checkpoints."
            )
            error.same_on_every_rank = True
            raise error
        state = read_state(path)
        logical_ranks_of(state, path, acc.num_processes)  # refuses a process count that cannot host them
        saved_world = int(state.get("world_size", acc.num_processes))
        if saved_world != acc.num_processes and any(Path(path).glob("pytorch_model_fsdp*")):
            raise UserError(
                f"Checkpoint {path} holds the FSDP shards of {saved_world} processes, and resuming sharded "
                f"checkpoints on another process count is untested; resume with --num_processes {saved_world}."
            )
        try:
            acc.load_state(str(path))
        except Exception as err:  # noqa: BLE001 - name the checkpoint, never run what it holds
            import pickle

            if (
                isinstance(err, pickle.UnpicklingError)
                or "weights_only" in str(err)
                or "Unsupported global" in str(err)
            ):
                raise UserError(
                    f"Checkpoint {path} holds pickled objects other than tensors and plain data; refusing to load it "
                    "(loading is weights-only). Resume from a checkpoint this program wrote."
                ) from None
            raise UserError(
                f"Checkpoint {path} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "resume from an earlier one."
            ) from None
        if int(state.get("world_size", acc.num_processes)) == acc.num_processes:
            self._verify_rng(
                path
            )  # else Accelerate's files are other processes'; the loop sets them (load_logical_rng)
        self.last = Path(path)
        return state

    def _verify_rng(self, path: Path) -> None:
        # Accelerate only logs a failure to restore RNG states; a resumed run
        # would then silently draw different masks. Check and refuse instead.
        import torch
        from accelerate.utils import load as safe_load

        rng_file = Path(path) / f"random_states_{self.accelerator.process_index}.pkl"
        try:
            saved = safe_load(rng_file)
            ok = torch.equal(saved["torch_manual_seed"], torch.get_rng_state())
            if ok and torch.cuda.is_available() and "torch_cuda_manual_seed" in saved:
                ok = all(
                    torch.equal(a, b) for a, b in zip(saved["torch_cuda_manual_seed"], torch.cuda.get_rng_state_all())
                )
        except Exception as err:  # noqa: BLE001 - any failure means the RNG was not restored
            raise UserError(
                f"Could not restore the random state from {rng_file} ({type(err).__name__}); the checkpoint is damaged."
            ) from None
        if not ok:
            raise UserError(
                f"The random state in {rng_file} was not restored; the checkpoint is damaged or from another setup."
            )


# ----------------------------------------------------------------------------- logical ranks (docs/distributed.md)

LOGICAL_RNG_FILE = "logical_rank_{:05d}_rng.safetensors"  # torch's CPU and device generators, numpy's, python's


def logical_ranks_of(state: dict, path: Path, processes: int, configured: int | None = None) -> int:
    """The logical ranks of the run that wrote checkpoint `path` (trainer `state`), once `processes` can
    host them (a divisor of them); else a one-sentence UserError naming the counts that would work.

    A checkpoint written before logical ranks were recorded has one per process and resumes on that
    count alone; `configured` (train.logical_ranks, when set) must agree with the checkpoint's."""
    saved_world = int(state.get("world_size", processes))
    if "logical_ranks" not in state:
        if saved_world != processes:
            raise UserError(
                f"Checkpoint {path} was written by {saved_world} processes, before runs recorded their logical ranks, "
                f"but this run has {processes}; resume with --num_processes {saved_world} (a different count would "
                "change the data order and batch)."
            )
        ranks = saved_world
    else:
        ranks = int(state["logical_ranks"])
    if configured is not None and configured != ranks:
        raise UserError(
            f"Checkpoint {path} belongs to a run with {ranks} logical ranks, but train.logical_ranks="
            f"{configured}; a run keeps its logical ranks for life: resume with train.logical_ranks={ranks}, "
            "or start a new run."
        )
    if ranks % processes:
        import math

        counts = [str(d) for d in range(1, ranks + 1) if ranks % d == 0]
        listed = counts[0] if len(counts) == 1 else ", ".join(counts[:-1]) + f" or {counts[-1]}"
        raise UserError(
            f"Checkpoint {path} was started with {ranks} logical ranks (train.logical_ranks), which {processes} "
            f"processes cannot share evenly; resume on {listed} processes, or start runs that may grow with "
            f"train.logical_ranks={math.lcm(ranks, processes)}."
        )
    return ranks


def save_logical_rng(folder: Path, states: dict[int, dict]) -> None:
    """Write each logical rank's generator states into `folder`, as tensors (`loop.HostedRanks.state_dict`:
    {rank: {"cpu": ByteTensor, "cuda": ByteTensor or None, "numpy": np.random.get_state(),
    "python": random.getstate()}})."""
    import torch
    from safetensors.torch import save_file

    for rank, state in states.items():
        _, keys, position, has_gauss, gauss = state["numpy"]
        version, words, gauss_next = state["python"]
        tensors = {
            "cpu": state["cpu"].contiguous(),
            "numpy_keys": torch.tensor(keys.astype("int64")),
            "numpy_rest": torch.tensor([position, has_gauss, gauss], dtype=torch.float64),
            "python_words": torch.tensor(words, dtype=torch.int64),
            "python_rest": torch.tensor([version, gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
        }
        if state.get("cuda") is not None:
            tensors["cuda"] = state["cuda"].contiguous()
        save_file(tensors, str(Path(folder) / LOGICAL_RNG_FILE.format(rank)))


def load_logical_rng(path: Path, ranks) -> dict[int, dict]:
    """The generator states `save_logical_rng` wrote for `ranks` in checkpoint `path` (tensors only, nothing
    unpickled); a file that is missing or unreadable is a one-sentence UserError."""
    import numpy as np
    from safetensors.torch import load_file

    states = {}
    for rank in ranks:
        file = Path(path) / LOGICAL_RNG_FILE.format(rank)
        try:
            t = load_file(str(file))
            position, has_gauss, gauss = t["numpy_rest"].tolist()
            version, has_next, gauss_next = t["python_rest"].tolist()
            states[rank] = {
                "cpu": t["cpu"],
                "cuda": t.get("cuda"),
                "numpy": ("MT19937", t["numpy_keys"].numpy().astype(np.uint32), int(position), int(has_gauss), gauss),
                "python": (
                    int(version),
                    tuple(int(w) for w in t["python_words"].tolist()),
                    gauss_next if has_next else None,
                ),
            }
        except Exception as err:  # noqa: BLE001 - any failure means the state of that logical rank is lost
            raise UserError(
                f"Could not read the random state of logical rank {rank} from {file} "
                f"({type(err).__name__}); the checkpoint is damaged or incomplete."
            ) from None
    return states


def _decided_on_main(accelerator, decide):
    """`decide()` run by the main process alone (it reads the files), its answer returned on every rank;
    should it fail, every other rank stops too instead of waiting for an answer that never comes."""
    if accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    answer, failure = None, None
    if accelerator.is_main_process:
        try:
            answer = decide()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others were told
            failure = err
    answer, failed = broadcast_object_list([answer, failure is not None])
    if failure is not None:
        raise failure
    if failed:
        stopped = UserError("The main process failed while verifying a checkpoint; its message above names the cause.")
        stopped.same_on_every_rank = True
        raise stopped
    return answer
