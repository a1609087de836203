"""The worker stream: the `WorkerBatch`es one (rank, worker) makes from its raw samples.

It follows a `Plan` (order.py: which raw samples, in which batches) and hands each batch's
decoding and making to the loader's `BatchMaker` (strategies.py: one per mode, chosen when the
loader opens). A sample that fails to decode becomes a repeat of a good one of its batch
(index -1, `order.fill_sources`), so batch j is always made of the same raw samples; each batch
draws its augmentations from global generators seeded by (seed, epoch, rank, worker, j).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vitmpp.common.errors import UserError
from vitmpp.common.seeding import restored_generators, seed_generators

from .decoders import BadSample
from .order import Plan, evaluation_slots, fill_sources, seed_of, shard_order, shards_holding
from .samples import RawSample, Tally, read_shard


@dataclass
class WorkerBatch:
    """One batch as a worker hands it to the main process, before the mode's main-process step
    (`BatchMaker.finish`) turns it into a `Batch`."""

    images: Any  # uint8 [B, 3, H, W] (cpu transform), regions [R, h, w, 3] (device crop),
    #                           or an `EncodedBatch` (device decode)
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B], -1 for padding and fill
    skipped: torch.Tensor  # int64 scalar: samples this worker skipped since its previous batch
    notes: tuple  # ((shard url, message), ...): what went wrong, each shard once per worker
    retries: int  # streamed shard reads retried since the previous batch
    crops: tuple | None = None  # device modes: (rois [B, 5], flips bool [B]); the main process crops

    def pin_memory(self) -> WorkerBatch:
        """The batch with its tensors in pinned memory (torch's pin-memory thread calls this)."""

        def pin(x):
            if isinstance(x, torch.Tensor):
                return x.pin_memory()
            if isinstance(x, tuple):
                return type(x)(*(pin(t) for t in x)) if hasattr(x, "_fields") else tuple(pin(t) for t in x)
            return x

        return replace(
            self, images=pin(self.images), labels=pin(self.labels), indices=pin(self.indices), crops=pin(self.crops)
        )


@contextmanager
def _seeded_globals(seed: int, restore: bool):
    """Seed torch's CPU generator, `random` and `np.random` (what timm/torchvision
    transforms draw from); restore them afterwards when running in the main process."""
    with restored_generators(enabled=restore):
        seed_generators(seed)
        yield


def decode_or_note(decode, raw: RawSample, num_classes: int, tally: Tally):
    """(image, label) of `raw` by `decode`, or None with a note when it cannot be used."""
    try:
        return decode(raw, num_classes)
    except BadSample as err:
        tally.note(raw.url, "sample", f"shard {raw.url}: sample {raw.members.get('__key__')} skipped ({err})")
        return None


def first_decodable(plan: Plan, decode):
    """The first sample of the shards in play that `decode` accepts: fills a batch none of whose samples
    decoded (rare), without consuming the stream, so batch boundaries stay where they were."""
    scratch = Tally()
    for url, offset, length in zip(plan.urls, plan.offsets, plan.lengths):
        for raw in read_shard(url, offset, length, None, scratch, count_lost=False):
            decoded = decode_or_note(decode, raw, plan.num_classes, scratch)
            if decoded is not None:
                return decoded
    raise UserError(
        f"No sample of {len(plan.urls)} shards (e.g. {plan.urls[0]}) can be decoded; "
        "check or rewrite the shards with make_shards."
    )


class ShardStream(IterableDataset):
    """Yields the `WorkerBatch`es of one worker of one rank (every worker of the DataLoader runs a copy).

    `position`: where a worker pool's pass starts, [epoch, start_batch] in memory shared with the
    workers (pool.py), read as each pass starts; None: the plan's own."""

    def __init__(self, plan: Plan, maker, position=None):
        super().__init__()
        self.base_plan = self.plan = plan
        self.maker = maker  # strategies.BatchMaker: decode() and make() run here, in the worker
        self.position = position
        self._fallback = None

    def __iter__(self) -> Iterator[WorkerBatch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if self.position is not None:
            self.plan = replace(self.base_plan, epoch=int(self.position[0]), start_batch=int(self.position[1]))
        plan, in_main = self.plan, info is None
        if not plan.training:
            return self._evaluate(plan.logical_worker(physical))
        processes = info.num_workers if info is not None else 1
        if processes != plan.workers:
            return self._train_several(physical, processes, in_main)
        return self._train(plan.logical_worker(physical), in_main)

    def _train_several(self, physical: int, processes: int, in_main: bool):
        """Process `physical` of `processes` (a divisor of the W logical workers; 1 in the main process)
        plays every logical worker w with (w - k) % processes == physical, k the start batch.

        The epoch's batch i is batch i // W of logical worker i % W; the DataLoader takes batch i from
        its worker (i - k) % processes, so this worker yields batches k + physical, k + physical +
        processes, ... from its logical workers' streams in turn: the same batches in the same order as
        W worker processes would give (open_loader's `max_worker_processes`)."""
        p = self.plan
        streams = {w: self._train(w, in_main) for w in p.played_by(physical, processes)}
        try:
            for position in range(p.start_batch + physical, p.batches_per_epoch, processes):
                yield next(streams[position % p.workers])
        finally:
            for stream in streams.values():
                stream.close()

    def _assemble(self, raws: list, tally: Tally, real: list[bool]) -> WorkerBatch:
        """Decode and make one batch; bad samples become repeats (index -1) of good ones."""
        decoded, indices = [], []
        for raw, is_real in zip(raws, real):
            item = decode_or_note(self.maker.decode, raw, self.plan.num_classes, tally) if raw is not None else None
            if item is None and is_real and raw is not None:
                tally.skipped += 1
            decoded.append(item)
            indices.append(-1 if item is None or not is_real else raw.index)
        views = self.plan.views
        if views > 1:  # every decoded image k times in a row: k samples, each with its own crop (and flip)
            decoded = [item for item in decoded for _ in range(views)]
            indices = [index for index in indices for _ in range(views)]
        sources = fill_sources([item is None for item in decoded])
        if sources is None:
            if self._fallback is None:
                self._fallback = first_decodable(self.plan, self.maker.decode)
            filled = [self._fallback] * len(decoded)
        else:
            filled = [decoded[s] for s in sources]
        skipped, notes = tally.take()
        retries, tally.retries = tally.retries, 0
        images, labels, crops = self.maker.make(filled)
        return WorkerBatch(
            images,
            labels,
            torch.tensor(indices, dtype=torch.int64),
            torch.tensor(skipped, dtype=torch.int64),
            notes,
            retries,
            crops,
        )

    # -- training

    def _raw_stream(self, worker: int, tally: Tally) -> Iterator[RawSample]:
        p = self.plan
        wanted = (lambda i: bool(p.keep[i])) if p.keep is not None else None
        empty_in_a_row = 0
        limit = 20 * len(p.urls) + p.world_size * p.workers
        for shard in shard_order(p, worker):
            produced = False
            for raw in read_shard(p.urls[shard], p.offsets[shard], p.lengths[shard], wanted, tally):
                produced = True
                yield raw
            empty_in_a_row = 0 if produced else empty_in_a_row + 1
            if empty_in_a_row > limit:
                why = next((message for url, message in reversed(tally.notes) if url == p.urls[shard]), None)
                reads = (
                    f"read shard {p.urls[shard]} {empty_in_a_row} times"
                    if len(p.urls) == 1
                    else f"read {empty_in_a_row} shards in a row (the last {p.urls[shard]})"
                )
                raise UserError(
                    f"Worker {worker} of rank {p.rank} {reads} without a usable sample"
                    f"{f' ({why})' if why else ''}; check or rewrite the shards."
                )

    def _train(self, worker: int, in_main: bool):
        import webdataset as wds

        p = self.plan
        tally = Tally()
        total, done, per_batch = p.worker_batches(worker), p.batches_before_start(worker), p.images_per_batch
        source = self._raw_stream(worker, tally)
        # Exactly the raw samples this worker's batches use (a bad sample is replaced, never
        # topped up from the stream): the buffer then drains at the end of the epoch instead of
        # reading ahead into the next pass, so one epoch covers the data about once.
        stream = itertools.islice(source, total * per_batch)
        buffer = min(p.shuffle_buffer, total * per_batch)
        if buffer > 1:
            rng = random.Random(seed_of(p.seed, p.epoch, p.rank, worker, 0x5B0F))
            stream = wds.filters.shuffle(buffer, max(1, buffer // 4), rng=rng)(stream)
        stream = iter(stream)
        try:
            for _ in range(done * per_batch):  # resume: skip raw samples, decode nothing
                next(stream)
            # losses met while skipping were counted before the resume; keep only the notes
            tally.skipped = 0
            for j in range(done, total):
                raws = [next(stream) for _ in range(per_batch)]
                with _seeded_globals(seed_of(p.seed, p.epoch, p.rank, worker, j, 0xA06), restore=in_main):
                    batch = self._assemble(raws, tally, [True] * len(raws))
                yield batch  # outside the seeded state: the caller's own draws must not come from it
        finally:
            source.close()

    # -- evaluation

    def _evaluate(self, worker: int):
        p = self.plan
        slots = evaluation_slots(p, worker)
        pad_sources = {i for i, real in slots if not real}
        needed = np.array(sorted({i for i, _ in slots}), dtype=np.int64)
        shards = shards_holding(p, needed)

        def wanted(i: int) -> bool:
            j = np.searchsorted(needed, i)
            return j < len(needed) and needed[j] == i

        tally = Tally()

        def raw_stream():
            for k in shards:
                # losses are charged per slot below (a missing real sample), not per shard
                yield from read_shard(p.urls[k], p.offsets[k], p.lengths[k], wanted, tally, count_lost=False)

        stream = raw_stream()
        cache: dict[int, RawSample] = {}
        exhausted = False

        def fetch(index: int) -> RawSample | None:
            """The raw sample `index`, or None if it was lost. Real slots ask in ascending order, padding
            slots (all after them) in any order; the stream is ascending, so a sample passed by is lost,
            except padding sources, which are kept when passed."""
            nonlocal exhausted
            if index in cache:
                return cache[index] if index in pad_sources else cache.pop(index)
            while not exhausted:
                raw = next(stream, None)
                if raw is None:
                    exhausted = True
                    break
                if raw.index in pad_sources or raw.index > index:
                    cache[raw.index] = raw
                if raw.index == index:
                    return raw
                if raw.index > index:
                    return None
            return None

        for b in range(0, len(slots), p.batch_size):
            raws, real = [], []
            for index, is_real in slots[b : b + p.batch_size]:
                raw = fetch(index)
                if raw is None and is_real:
                    tally.skipped += 1  # lost with an unreadable part of its shard
                raws.append(raw)
                real.append(is_real)
            yield self._assemble(raws, tally, real)
