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

from .errors import UserError
from .io import atomic_write_json, replace_dir

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


def read_state(path: str | os.PathLike) -> dict:
    with open(Path(path) / STATE_FILE) as handle:
        return json.load(handle)


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
        from .rundir import checkpoints_dir

        self.accelerator = accelerator
        self.root = checkpoints_dir(run_dir)
        self.keep_last = keep_last
        self.control = control
        self.hooks = hooks
        self.last: Path | None = latest_checkpoint(self.root)

    def save(self, step: int, state: dict) -> Path:
        acc = self.accelerator
        final = self.root / checkpoint_name(step)
        partial = partial_dir(self.root, step)
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        acc.wait_for_everyone()
        error: OSError | None = None
        try:
            acc.save_state(str(partial), safe_serialization=True)
            if self.hooks is not None:
                self.hooks.before_checkpoint_commit(partial, step)
            if acc.is_main_process:
                atomic_write_json(partial / STATE_FILE, state)  # last: marks the save complete
        except OSError as err:
            error = err
        if self.control.any(error is not None):
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            reason = f" ({error.strerror or error})" if error is not None else " (on another rank)"
            kept = f"the previous checkpoint {self.last} is intact" if self.last else "no earlier checkpoint exists"
            raise UserError(
                f"Could not write checkpoint {final}{reason}; {kept}; free disk space and rerun with --resume auto."
            )
        if acc.is_main_process:
            finalize(partial, final)
            prune(self.root, self.keep_last)
        acc.wait_for_everyone()
        self.last = final
        return final

    def load(self, path: Path) -> dict:
        """Restore a checkpoint written by a run with the same number of processes."""
        acc = self.accelerator
        state = read_state(path)
        saved_world = int(state.get("world_size", acc.num_processes))
        if saved_world != acc.num_processes:
            raise UserError(
                f"Checkpoint {path} was written by {saved_world} processes but this run has {acc.num_processes}; "
                f"resume with --num_processes {saved_world} (a different count would change the data order and batch)."
            )
        try:
            acc.load_state(str(path))
        except Exception as err:  # noqa: BLE001 - name the checkpoint, never run what it holds
            import pickle

            if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err) or "Unsupported global" in str(err):
                raise UserError(
                    f"Checkpoint {path} holds pickled objects other than tensors and plain data; refusing to load it "
                    "(loading is weights-only). Resume from a checkpoint this program wrote."
                ) from None
            raise UserError(f"Checkpoint {path} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                            "resume from an earlier one.") from None
        self._verify_rng(path)
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
                ok = all(torch.equal(a, b) for a, b in zip(saved["torch_cuda_manual_seed"], torch.cuda.get_rng_state_all()))
        except Exception as err:  # noqa: BLE001 - any failure means the RNG was not restored
            raise UserError(f"Could not restore the random state from {rng_file} ({type(err).__name__}); the checkpoint is damaged.") from None
        if not ok:
            raise UserError(f"The random state in {rng_file} was not restored; the checkpoint is damaged or from another setup.")
