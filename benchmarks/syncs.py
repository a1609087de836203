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
  tensor and are patched at the Python level while counting.

Host-side bookkeeping of CPU tensors that never were on the device (the loader's
skip counts, for instance) would look the same on a CPU run; calls made from the
data layer (`vitmpp.datasets`) are therefore recorded apart (`loader_events`).
On CUDA, `device_only=True` counts only ops that touch a CUDA tensor.

    python -m vitmpp.benchmarks.syncs [--device cpu|cuda] -- key=value ...

runs the real `pretrain/main.py` and reports, as JSON, the syncs inside optimizer
steps (must be none) and those at logging intervals and checkpoints (allowed).
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR = {"_local_scalar_dense", "item"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "nonzero_static_fallback", "argwhere"}
_PATCHED = ("tolist", "numpy", "cpu")


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
    """'file:line in function' of the nearest caller outside torch and this module; whether the data layer is on the stack."""
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


@contextmanager
def count_host_syncs(device_only: bool = False):
    """Count host syncs inside the block (see the module docstring); yields the `HostSyncCounter`."""
    counter = HostSyncCounter(device_only=device_only)
    originals = {name: getattr(torch.Tensor, name) for name in _PATCHED}

    def patched(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            if not counter.device_only or self.device.type != "cpu":
                counter.record(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return method

    for name in _PATCHED:
        setattr(torch.Tensor, name, patched(name))
    try:
        with _Mode(counter):
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# ----------------------------------------------------------------------------- the real training loop

def audit_pretrain(overrides: list[str], device_only: bool = False) -> dict:
    """Run pretrain/main.py with the counter on from the first optimizer step to the end of the loop.

    Returns {"steps": n, "in_steps": [...], "at_intervals": [...], "loader": n}: syncs
    during steps and between them (must be empty), syncs inside logging intervals,
    checkpoints and pictures (allowed), and host-side loader bookkeeping.
    """
    from vitmpp.common import training
    from vitmpp.pretrain import engine
    from vitmpp.pretrain.main import main as pretrain_main

    state = {"counter": None, "context": None, "steps": 0, "allowed_depth": 0}
    in_steps: list = []
    at_intervals: list = []

    def collect():
        counter = state["counter"]
        if counter is not None:
            target = at_intervals if state["allowed_depth"] else in_steps
            target.extend(counter.take())

    def allowed(fn):
        def wrapper(*args, **kwargs):
            collect()
            state["allowed_depth"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                collect()
                state["allowed_depth"] -= 1
        return wrapper

    original_run = training.StepRunner.run

    def run(self, *args, **kwargs):
        if state["context"] is None:  # from the first step on
            state["context"] = count_host_syncs(device_only)
            state["counter"] = state["context"].__enter__()
        state["steps"] += 1
        return original_run(self, *args, **kwargs)

    original_export = engine.export_encoder

    def export(*args, **kwargs):
        stop()
        return original_export(*args, **kwargs)

    def stop():
        if state["context"] is not None:
            collect()
            loader = len(state["counter"].loader_events)
            state["context"].__exit__(None, None, None)
            state["context"] = None
            state["loader"] = loader

    patches = [
        (training.StepRunner, "run", run),
        (training.IntervalLog, "flush", allowed(training.IntervalLog.flush)),
        (training.Checkpointer, "save", allowed(training.Checkpointer.save)),
        (training.NonFiniteGuard, "read", allowed(training.NonFiniteGuard.read)),
        (engine, "_log_images", allowed(engine._log_images)),
        (engine, "export_encoder", export),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        pretrain_main(overrides)
    finally:
        stop()
        for owner, name, value in saved:
            setattr(owner, name, value)
    return {"steps": state["steps"], "in_steps": in_steps, "at_intervals": at_intervals,
            "loader": state.get("loader", 0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitmpp.benchmarks.syncs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-only", action="store_true", help="count only ops on non-CPU tensors (CUDA runs)")
    parser.add_argument("--out", help="write the report here as JSON")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then pretrain/main.py's key=value overrides")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    report = audit_pretrain(rest, device_only=args.device_only)
    summary = {"steps": report["steps"], "syncs_in_steps": len(report["in_steps"]),
               "syncs_at_log_intervals": len(report["at_intervals"]), "loader_host_reads": report["loader"],
               "in_steps": sorted({f"{op} at {where}" for op, where in report["in_steps"]}),
               "at_intervals": sorted({f"{op} at {where}" for op, where in report["at_intervals"]})}
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 1 if summary["syncs_in_steps"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
