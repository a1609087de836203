"""Finding host-device synchronisations in the training loop, on any device (the CPU included).

`torch.cuda.set_sync_debug_mode` only exists for CUDA. On any device, a sync is
the host asking for a value the device computed, and that goes through a small
set of doors, all of which `HostSyncCounter` watches:

* `aten._local_scalar_dense`: what `.item()`, `bool(t)`, `int(t)`, `float(t)` and
  `if t:` dispatch to;
* ops whose output shape depends on the data (`nonzero`, `masked_select`,
  boolean-mask indexing, `unique`, `repeat_interleave` without `output_size`):
  the host must learn the size before it can allocate;
* `Tensor.tolist()`, `.numpy()`, `.cpu()`, which do not dispatch an op on a CPU
  tensor and are seen at the Python level (a `TorchFunctionMode`) while counting.

Host-side bookkeeping of CPU tensors that never were on the device (the loader's
skip counts, for instance) would look the same on a CPU run; calls made from the
data layer (`vitmpp.datasets`) are therefore recorded apart (`loader_events`).
On CUDA, `device_only=True` counts only ops that touch a CUDA tensor.

    python -m vitmpp.benchmarks.syncs [--device-only] [--out FILE] -- [--config FILE] key=value ...

runs the real pretraining stage (`vitmpp.pretrain.engine.pretrain`, pretrain/main.py's
command line after `--`) with a `SyncAudit` loop callback and reports, as JSON, the
syncs inside optimizer steps (must be none) and those at logging intervals,
checkpoints and pictures (allowed).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from vitmpp.common.errors import cli_entry
from vitmpp.common.loop import Callback

_SCALAR = {"_local_scalar_dense", "item"}
_DATA_DEPENDENT = {
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "nonzero_static_fallback",
    "argwhere",
}
_METHODS = ("tolist", "numpy", "cpu")


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _data_layer_dir() -> str:
    import os

    import vitmpp.datasets

    return os.path.dirname(os.path.abspath(vitmpp.datasets.__file__)) + os.sep


def _where() -> tuple[str, bool]:
    """'file:line in function' of the nearest caller outside torch and this module, and whether
    the data layer is on the stack."""
    frames = traceback.extract_stack()[:-2]
    data_layer = _data_layer_dir()
    in_loader = any(f.filename.startswith(data_layer) for f in frames)
    for frame in reversed(frames):
        name = frame.filename
        if "/torch/" in name or name.endswith("syncs.py") or "/contextlib.py" in name:
            continue
        return f"{name}:{frame.lineno} in {frame.name}", in_loader
    return "?", in_loader


@dataclass
class HostSyncCounter:
    """What the counter saw: (op, where) pairs, split by whether the data layer was calling."""

    device_only: bool = False
    events: list = field(default_factory=list)
    loader_events: list = field(default_factory=list)
    active: bool = True

    def record(self, op: str) -> None:
        if not self.active:
            return
        where, in_loader = _where()
        (self.loader_events if in_loader else self.events).append((op, where))

    def take(self) -> list:
        out, self.events = self.events, []
        return out


class _Mode(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        sync = name in _SCALAR or name in _DATA_DEPENDENT
        if name == "index" and any(t.dtype == torch.bool for t in _tensors(args[1:])):
            sync = True  # x[mask]: the output size is the number of True values
        if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
            sync = True
        if sync and self.counter.device_only:
            sync = any(t.device.type != "cpu" for t in _tensors(list(args) + list(kwargs.values())))
        if sync:
            self.counter.record(f"aten.{name}")
        return func(*args, **kwargs)


class _TensorMethods(TorchFunctionMode):
    """`Tensor.tolist()`, `.numpy()`, `.cpu()`: seen at the Python level, where they do not dispatch an op."""

    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _METHODS and args and isinstance(args[0], torch.Tensor):
            if not self.counter.device_only or args[0].device.type != "cpu":
                self.counter.record(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_syncs(device_only: bool = False):
    """Count host syncs inside the block (see the module docstring); yields the `HostSyncCounter`."""
    counter = HostSyncCounter(device_only=device_only)
    with _TensorMethods(counter), _Mode(counter):
        yield counter


# ----------------------------------------------------------------------------- the real training loop

ALLOWED_PHASES = ("log", "checkpoint", "pictures")  # the loop's phases where the host may read the device


class SyncAudit(Callback):
    """A loop callback: counts host syncs from the first optimizer step to the stage's `finish`.

    Counting starts when the loop first enters its `step` phase (each `step` phase is one
    optimizer step) and stops when it enters `finish` (exports). Syncs inside the phases
    `log`, `checkpoint` and `pictures` are at intervals (allowed); any other one, inside a
    step or between steps, is in steps (must be none).
    """

    def __init__(self, device_only: bool = False):
        self.device_only = device_only
        self.steps = 0
        self.in_steps: list = []
        self.at_intervals: list = []
        self.loader = 0
        self._counting = None  # the count_host_syncs context while counting
        self._counter: HostSyncCounter | None = None
        self._allowed_depth = 0
        self._finished = False

    def _collect(self) -> None:
        if self._counter is not None:
            (self.at_intervals if self._allowed_depth else self.in_steps).extend(self._counter.take())

    def start(self) -> None:
        if self._counting is None and not self._finished:
            self._counting = count_host_syncs(self.device_only)
            self._counter = self._counting.__enter__()

    def stop(self) -> None:
        """End counting (idempotent): what is left is attributed, the loader's host reads are kept."""
        self._finished = True
        if self._counting is not None:
            self._collect()
            self.loader = len(self._counter.loader_events)
            counting, self._counting, self._counter = self._counting, None, None
            counting.__exit__(None, None, None)

    @contextmanager
    def phase(self, name: str):
        if name == "finish":
            self.stop()
        elif name == "step":
            self.start()
            if self._counting is not None:
                self.steps += 1
        allowed = name in ALLOWED_PHASES
        if allowed:
            self._collect()
            self._allowed_depth += 1
        try:
            yield
        finally:
            if allowed:
                self._collect()
                self._allowed_depth -= 1

    def report(self) -> dict:
        return {
            "steps": self.steps,
            "in_steps": self.in_steps,
            "at_intervals": self.at_intervals,
            "loader": self.loader,
        }


def audit_pretrain(overrides: list[str], device_only: bool = False) -> dict:
    """Run the pretraining stage (pretrain/main.py's command line) with the counter on from the
    first optimizer step to the end of the loop (a `SyncAudit` loop callback).

    Returns {"steps": n, "in_steps": [...], "at_intervals": [...], "loader": n}: syncs
    during steps and between them (must be empty), syncs inside logging intervals,
    checkpoints and pictures (allowed), and host-side loader bookkeeping.
    """
    from vitmpp.common.cli import parse_stage_command
    from vitmpp.pretrain.config import PretrainConfig
    from vitmpp.pretrain.engine import pretrain, run_dir_for

    cfg, args = parse_stage_command(PretrainConfig, overrides, prog="python -m vitmpp.benchmarks.syncs --")
    audit = SyncAudit(device_only)
    try:
        pretrain(cfg, run_dir_for(cfg, args.config), resume=args.resume, callbacks=[audit])
    finally:
        audit.stop()
    return audit.report()


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitmpp.benchmarks.syncs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-only", action="store_true", help="count only ops on non-CPU tensors (CUDA runs)")
    parser.add_argument("--out", help="write the report here as JSON")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then pretrain/main.py's key=value overrides")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    report = audit_pretrain(rest, device_only=args.device_only)
    summary = {
        "steps": report["steps"],
        "syncs_in_steps": len(report["in_steps"]),
        "syncs_at_log_intervals": len(report["at_intervals"]),
        "loader_host_reads": report["loader"],
        "in_steps": sorted({f"{op} at {where}" for op, where in report["in_steps"]}),
        "at_intervals": sorted({f"{op} at {where}" for op, where in report["at_intervals"]}),
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 1 if summary["syncs_in_steps"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
