"""The process's random generators: torch's (host, and the CUDA device a run uses), numpy's global
one and Python's `random` (what timm and torchvision transforms draw from). One place seeds them,
reads and restores them:

    state = generator_state(device)            # a dict, picklable (checkpoints hold it)
    seed_generators(seed, device)              # all of them from one integer
    with restored_generators(device): ...      # seed at will inside; afterwards they are as before

Why not `torch.random.fork_rng` alone: it leaves numpy's and Python's generators out, and the
loader's transforms draw from those.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def _cuda(device: torch.device | None) -> torch.device | None:
    return device if device is not None and device.type == "cuda" else None


def generator_state(device: torch.device | None = None) -> dict:
    """{"cpu", "cuda" (None off CUDA), "numpy", "python"}: every generator's state."""
    cuda = _cuda(device)
    return {
        "cpu": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(cuda) if cuda else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_generator_state(state: dict, device: torch.device | None = None) -> None:
    """Put back what `generator_state(device)` read."""
    torch.random.set_rng_state(state["cpu"])
    cuda = _cuda(device)
    if cuda is not None and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], cuda)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def seed_generators(seed: int, device: torch.device | None = None) -> None:
    """Seed torch's host generator (and `device`'s, on CUDA), numpy's (seed mod 2**32) and Python's
    with one integer (>= 0)."""
    torch.random.default_generator.manual_seed(seed)
    cuda = _cuda(device)
    if cuda is not None:
        with torch.cuda.device(cuda):
            torch.cuda.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextmanager
def restored_generators(device: torch.device | None = None, enabled: bool = True) -> Iterator[None]:
    """Inside: the generators may be reseeded at will; afterwards (when `enabled`) they are as
    before, so the work inside (an evaluation, a batch's augmentation in the main process) never
    moves the training's random stream, and a resumed run draws what an unbroken one drew."""
    saved = generator_state(device) if enabled else None
    try:
        yield
    finally:
        if saved is not None:
            set_generator_state(saved, device)
