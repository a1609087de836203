"""Low-label regimes: a deterministic, class-balanced subset of the training split."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def balanced_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of `fraction` of the samples, the same fraction of every class.

    Each class keeps round(fraction x its count) samples (at least one), chosen by a
    permutation seeded with `seed`, so the subset is identical across runs, ranks and
    machines with the same seed. Returned sorted (shard order).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = np.asarray(by_class[label])
        take = max(1, int(round(fraction * len(members))))
        chosen.extend(members[rng.permutation(len(members))[:take]].tolist())
    return sorted(chosen)
