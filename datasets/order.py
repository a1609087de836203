"""Sample-order planning: which raw samples every (rank, worker) reads, and in which batches.

Pure functions of the spec and the position (epoch, start batch), run without a process or a
file read: `plan_epoch` makes the `Plan` a worker stream follows (datasets/stream.py), and the
rules of loader.py's module docstring (shard passes, per-worker batch counts, evaluation blocks,
the fill of a failed sample) are written here once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vitmpp.common.errors import UserError

from .manifest import Manifest, expand_shard_spec, is_url, names_all_shards, shard_name
from .spec import LoaderSpec


@dataclass(frozen=True)
class Plan:
    """What one epoch of one rank reads (picklable: the workers get it): the shards in play and the geometry."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    offsets: tuple[int, ...]
    keep: np.ndarray | None  # bool mask over the split's index space
    num_classes: int
    training: bool
    batch_size: int  # samples per batch, views counted
    views: int  # training: crops per decoded image (LoaderSpec.views_per_image)
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int  # logical workers (>= 1); the DataLoader's processes may be fewer (`played_by`)
    shuffle_buffer: int
    start_batch: int
    batches_per_epoch: int
    rank_indices: np.ndarray  # evaluation: this rank's real global indices, ascending
    all_indices_head: np.ndarray  # evaluation: first real indices of the split (padding for empty ranks)

    @property
    def images_per_batch(self) -> int:
        """Raw samples (decoded images) per batch."""
        return self.batch_size // self.views

    def worker_batches(self, worker: int) -> int:
        """Batches logical worker `worker` yields in the whole epoch: bpe // W + (worker < bpe % W)."""
        return self.batches_per_epoch // self.workers + (worker < self.batches_per_epoch % self.workers)

    def batches_before_start(self, worker: int) -> int:
        """The batches of `worker` among the epoch's first `start_batch` (skipped on resume)."""
        return self.start_batch // self.workers + (worker < self.start_batch % self.workers)

    def logical_worker(self, physical: int) -> int:
        """After a resume at batch k, torch's round-robin starts at worker 0, which must make batch k:
        physical worker p plays logical worker (p + k) % W."""
        return (physical + self.start_batch) % self.workers

    def played_by(self, physical: int, processes: int) -> list[int]:
        """The logical workers process `physical` of `processes` (a divisor of W) plays in turn."""
        return [w for w in range(self.workers) if (w - self.start_batch) % processes == physical]

    def reads(self) -> int:
        """The images this rank reads from the start batch on (what `max_skip_fraction` is a fraction of):
        training, every batch's images; evaluation, this rank's real samples (padding is not read)."""
        if self.training:
            return (self.batches_per_epoch - self.start_batch) * self.images_per_batch
        return max(0, len(self.rank_indices) - self.start_batch * self.batch_size)


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def shard_order(plan: Plan, worker: int) -> Iterator[int]:
    """Endless shard positions of (rank, worker): every G-th (G = world_size x workers) of repeated
    seeded permutations of the shard list, a new one each pass, the same on every rank."""
    n = len(plan.urls)
    stride = plan.world_size * plan.workers
    position = plan.rank * plan.workers + worker
    while True:
        pass_index, within = divmod(position, n)
        order = np.random.default_rng(seed_of(plan.seed, plan.epoch, pass_index, 0x5A4D)).permutation(n)
        yield int(order[within])
        position += stride


def evaluation_slots(plan: Plan, worker: int) -> list[tuple[int, bool]]:
    """(global index, real) of every sample slot of `worker`'s evaluation batches, in order: a contiguous
    run of whole batches of the rank's block; slots past the rank's real samples repeat its first ones
    (or the split's, for an empty rank) as padding (real False)."""
    B, n_real = plan.batch_size, len(plan.rank_indices)
    first = sum(plan.worker_batches(w) for w in range(worker))
    pool = plan.rank_indices if n_real else plan.all_indices_head
    slots = []
    for slot in range(first * B, (first + plan.worker_batches(worker)) * B):
        if slot < n_real:
            slots.append((int(plan.rank_indices[slot]), True))
        else:
            slots.append((int(pool[(slot - n_real) % len(pool)]), False))
    return slots


def shards_holding(plan: Plan, indices: np.ndarray) -> list[int]:
    """The positions of the shards in play that hold at least one of `indices` (sorted ascending)."""
    firsts = np.searchsorted(indices, plan.offsets)
    return [
        k
        for k, (j, off, n) in enumerate(zip(firsts, plan.offsets, plan.lengths))
        if j < len(indices) and indices[j] < off + n
    ]


def fill_sources(bad) -> list[int] | None:
    """The one rule by which a batch keeps its size when samples fail: position p of the batch holds
    its own sample when good, else that of the good position good[p % len(good)] (good: the good
    positions in order). `bad`: one bool per sample of the batch (views counted); None when no
    sample is good. The workers (stream.py) and the device decode (strategies.py) both fill by it,
    so a batch does not depend on where a sample failed."""
    bad = [bool(b) for b in bad]
    good = [p for p, b in enumerate(bad) if not b]
    if not good:
        return None
    return [good[p % len(good)] if b else p for p, b in enumerate(bad)]


def worker_processes(workers: int, most: int | None) -> int:
    """The worker processes for `workers` logical workers: all of them, or the largest divisor that is
    at most `most` (0: read in the main process)."""
    if most is None or workers == 0:
        return workers
    return max((d for d in range(1, workers + 1) if workers % d == 0 and d <= most), default=0)


def select_shards(
    manifest: Manifest, split: str, shards: str | tuple[str, ...]
) -> tuple[list[str], list[int], list[int]]:
    """URLs, lengths and index offsets of the shards in play (`LoaderSpec.shards`), in index order."""
    info = manifest.split(split)
    all_urls = manifest.shard_urls(split)
    offsets = info.offsets
    if names_all_shards(shards):  # a folder, _info.json, folder URL or pipe: command of the manifest
        chosen = list(range(len(all_urls)))
        urls = all_urls
    else:
        names = expand_shard_spec(shards)
        by_name = {os.path.basename(f): k for k, f in enumerate(info.filenames)}
        chosen, urls_given = [], {}
        for name in names:
            base = shard_name(name)
            if base not in by_name:
                raise UserError(
                    f"Shard '{name}' is not in split '{split}' of manifest '{manifest.source}'; "
                    "name shards of that split (or the folder that holds them)."
                )
            k = by_name[base]
            if k not in urls_given:
                chosen.append(k)
                urls_given[k] = name
        chosen.sort()
        urls = [urls_given.get(k) for k in range(len(all_urls))]
    return ([urls[k] for k in chosen], [info.shard_lengths[k] for k in chosen], [offsets[k] for k in chosen])


def plan_epoch(spec: LoaderSpec, epoch: int, start_batch: int) -> Plan:
    """The `Plan` of epoch `epoch` of `spec` from batch `start_batch` on (loader.py's module docstring).

    Raises UserError when a local shard is missing or the split is too small for one batch of every
    rank, ValueError for a position or geometry the spec cannot have."""
    if epoch < 0 or start_batch < 0:
        raise ValueError(f"open_loader: epoch={epoch} and start_batch={start_batch} must not be negative")
    man, split, batch_size, world_size = spec.manifest, spec.split, spec.batch_size, spec.world_size
    info = man.split(split)
    urls, lengths, offsets = select_shards(man, split, spec.shards)
    missing = [u for u in urls if not is_url(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        # a FIFO or device is refused here, unopened: reading one would block the loader forever
        what = "is not a regular file" if os.path.exists(missing[0]) else "does not exist"
        raise UserError(
            f"Shard '{missing[0]}'{more} listed in '{man.source}' {what}; restore it or "
            "rewrite the shards with make_shards."
        )

    keep = in_play = None
    if spec.keep_indices is not None:
        keep = np.zeros(info.num_samples, dtype=bool)
        ranges = np.zeros(info.num_samples, dtype=bool)
        for off, n in zip(offsets, lengths):
            ranges[off : off + n] = True
        in_play = np.unique(np.asarray(spec.keep_indices, dtype=np.int64))
        if len(in_play) and (in_play[0] < 0 or in_play[-1] >= info.num_samples or not ranges[in_play].all()):
            raise ValueError(f"keep_indices must be sample indices of the shards in play (0..{info.num_samples - 1})")
        keep[in_play] = True
    num_samples = len(in_play) if in_play is not None else int(sum(lengths))
    if spec.training:  # keep only shards with something to read
        usable = [
            k
            for k, (off, n) in enumerate(zip(offsets, lengths))
            if n > 0 and (keep is None or keep[off : off + n].any())
        ]
        urls, lengths, offsets = [urls[k] for k in usable], [lengths[k] for k in usable], [offsets[k] for k in usable]
    if num_samples == 0 or not urls:
        raise UserError(f"Split '{split}' of '{man.source}' has no samples to load; check the shards or keep_indices.")
    if spec.views_per_image > 1 and not spec.training:
        raise ValueError("views_per_image applies to training loaders only")

    if spec.training:
        bpe = spec.batches_per_epoch if spec.batches_per_epoch is not None else num_samples // (batch_size * world_size)
        if bpe < 1:
            raise UserError(
                f"Split '{split}' of '{man.source}' has {num_samples} samples, fewer than one global "
                f"batch of {batch_size} x {world_size} processes; lower the batch size or add data."
            )
        rank_indices = head = np.zeros(0, dtype=np.int64)
    else:
        if start_batch:
            raise ValueError("start_batch applies to training loaders only")
        all_indices = (
            in_play
            if in_play is not None
            else np.concatenate([np.arange(off, off + n, dtype=np.int64) for off, n in zip(offsets, lengths)])
        )
        per_rank = math.ceil(num_samples / world_size)
        rank_indices = all_indices[spec.rank * per_rank : (spec.rank + 1) * per_rank]
        head = all_indices[:batch_size]
        needed = math.ceil(per_rank / batch_size)
        bpe = spec.batches_per_epoch if spec.batches_per_epoch is not None else needed
        if bpe < needed:
            raise ValueError(f"batches_per_epoch={bpe} is too few to evaluate {per_rank} samples per rank")
    if not 0 <= start_batch <= bpe:
        raise ValueError(f"start_batch={start_batch} is outside the epoch's {bpe} batches")
    return Plan(
        urls=tuple(urls),
        lengths=tuple(lengths),
        offsets=tuple(offsets),
        keep=keep,
        num_classes=man.num_classes,
        training=spec.training,
        batch_size=batch_size,
        views=spec.views_per_image,
        seed=spec.seed,
        epoch=epoch,
        rank=spec.rank,
        world_size=world_size,
        workers=max(1, min(spec.num_workers, bpe)),
        shuffle_buffer=spec.shuffle_buffer if spec.training else 0,
        start_batch=start_batch,
        batches_per_epoch=bpe,
        rank_indices=rank_indices,
        all_indices_head=head,
    )
