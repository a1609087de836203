"""The shard loader: batches of uint8 images for one epoch of one rank.

    spec = LoaderSpec(shards="data/digits", manifest=read_manifest("data/digits"), split="train",
                      batch_size=64, transform=pretrain_transform(32), training=True, seed=s, rank=r, world_size=w)
    loader = open_loader(spec, epoch=e)   # a Loader (datasets/spec.py states the contract)
    for batch in loader:                  # Batch(images uint8 [B,3,H,W], labels, indices, skipped)
        x = normalize_batch(batch.images.to(device), mean, std)

Build the spec once per run and open a new loader for every epoch (and on resume, with
`start_batch`): the epoch is part of every seed. The spec holds the manifest, so opening a
loader never re-reads it. Worker processes outlive the epoch: a pass that delivered all its
batches hands its workers to the next loader of the same plan in this process (the next epoch,
the next evaluation), which tells them its epoch and start batch through shared memory
(`_Pool`); what they yield is a function of those alone, so reused workers give the same
batches as fresh ones. They start that next pass (epoch + 1 from batch 0; an evaluation's same
pass) as soon as the last batch is delivered, so an epoch of a few batches does not begin
with a wait (`RUN_AHEAD`). A pass stopped early, or by an error, ends its workers;
`close_idle_workers()` ends the kept ones (it runs at exit). A kept pool's workers are withdrawn
from torch's SIGCHLD watch while idle, so one killed then (the OOM killer) is replaced when the
pool is next taken instead of raising from whatever line the main process was on.

Training (`training=True`): the stream of every (rank, worker) is a pure function
of (seed, epoch, rank, worker):

1. shards: an endless sequence of seeded permutations of the shard list (a new
   permutation each pass, the same on every rank); the worker with global id g of
   G = world_size x num_workers takes every G-th shard from position g. Passes
   repeat as often as needed, so there are never too few shards for the workers
   and no rank runs dry on uneven shards;
2. the first (its batches x batch_size) samples of those shards (optionally only
   `keep_indices`), through a shuffle buffer seeded by (seed, epoch, rank, worker)
   that drains at the end rather than reading into the next pass;
3. batch j of a worker is the next `batch_size` raw samples; a sample that fails
   to decode is replaced by a repeat of a good one of the same batch (index -1),
   so batch j is always made of the same raw samples: resuming at `start_batch=k`
   skips the raw samples of the first k batches without decoding them, and the
   rest of the epoch is bit-identical, augmentations included (their random state
   is seeded per batch from (seed, epoch, rank, worker, j));
4. every rank yields exactly `batches_per_epoch` batches (default: the manifest's
   sample count // (batch_size x world_size)); worker w yields bpe//W + (w < bpe%W),
   so torch's round-robin over workers fixes the batch order.

Evaluation (`training=False`): every real sample exactly once over all ranks: the
index range is cut into contiguous per-rank blocks of ceil(N / world_size), each
rank's block into contiguous per-worker runs of whole batches; a rank reads only
the shards its block overlaps and skips other samples without decoding. Ranks
with fewer samples (the last) are padded with repeats (index -1) so that all
yield the same number of full batches.

With `augment_on="device"` (LoaderSpec) the workers decode and draw the crop boxes and flips
of step 3 exactly as the transform would, and the main process makes the images in one batched
op on the spec's device (datasets/device_augment.py): the same raw samples, boxes and flips,
only the resampling differs. With `decode_on="device"` as well, the workers do not decode the
JPEGs the device can (they read only their headers' sizes, which the boxes are drawn on, by the
same draws): the main process decodes each batch's JPEGs in one call on the device and merges
them with the images the workers decoded (PNG, ...); a JPEG the device cannot decode is skipped
there, its samples repeats of good ones (index -1), counted and noted as a worker's would be.

Streamed shards (http(s) URLs, `pipe:` commands) keep all of this: `read_shard` retries a
failed transport by re-reading the shard from its start and passing over what it already
yielded, so the raw samples, and everything above, are those of an undisturbed read; a
shard that stays unreachable is a UserError, never skipped (docs/streaming.md). The
retries reach the main process with the batches (`ShardLoader.retries`).

Why not `webdataset.WebDataset`: its `split_by_node`/`split_by_worker` give ranks
unequal counts (a DDP hang), `with_epoch` counts samples after errors so a resume
cannot find its place, its resampling is seeded from pid and time, and its error
handlers sleep. The pieces below are webdataset's (gopen, tar iteration, key
grouping, the shuffle buffer) arranged so the guarantees above hold exactly.
"""
from __future__ import annotations

import atexit
import itertools
import math
import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitmpp.common.distributed import (dead_worker_error, explain_failure, leave_stop_signals_to_parent,
                                        no_interrupts_in_children, worker_exit_detail)
from vitmpp.common.errors import UserError
from vitmpp.common.seeding import restored_generators, seed_generators

from .device_augment import CropFlip, EncodedBatch, crop_flip_batch, decode_regions, encode_regions, pack_regions
from .manifest import Manifest, expand_shard_spec, is_url, names_all_shards, shard_name
from .samples import BadSample, RawSample, Tally, decode_array, decode_sample, read_for_device, read_shard
from .spec import Batch, Loader, LoaderSpec



class ShardWarning(UserWarning):
    """A shard is damaged or holds members we ignore (printed once per shard per process)."""


@dataclass
class _Plan:
    """Everything a worker needs (picklable): the shards in play and the epoch's geometry."""

    urls: list[str]
    lengths: list[int]
    offsets: list[int]
    keep: np.ndarray | None  # bool mask over the split's index space
    num_classes: int
    transform: Callable
    training: bool
    batch_size: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int              # logical workers (>= 1); the DataLoader's processes may be fewer (_ShardStream.__iter__)
    shuffle_buffer: int
    start_batch: int
    batches_per_epoch: int
    rank_indices: np.ndarray  # evaluation: this rank's real global indices, ascending
    all_indices_head: np.ndarray  # evaluation: first real indices of the split (padding for empty ranks)
    draft_side: int | None
    crop_flip: CropFlip | None = None  # augment_on="device": workers decode and draw boxes (device_augment.py)
    views: int = 1  # training: crops per decoded image, each a sample of the batch (LoaderSpec.views_per_image)
    decode_on_device: bool = False  # decode_on="device": workers send JPEG bytes, the main process decodes them

    def worker_batches(self, worker: int) -> int:
        return self.batches_per_epoch // self.workers + (worker < self.batches_per_epoch % self.workers)


# ----------------------------------------------------------------------------- seeding

def fill_sources(bad) -> list[int] | None:
    """The one rule by which a batch keeps its size when samples fail: position p of the batch holds
    its own sample when good, else that of the good position good[p % len(good)] (good: the good
    positions in order). `bad`: one bool per sample of the batch (views counted); None when no
    sample is good. The workers (`_ShardStream._assemble`) and the device decode
    (`ShardLoader._decode_on_device`) both fill by it, so a batch does not depend on where a
    sample failed."""
    bad = [bool(b) for b in bad]
    good = [p for p, b in enumerate(bad) if not b]
    if not good:
        return None
    return [good[p % len(good)] if b else p for p, b in enumerate(bad)]


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@contextmanager
def _seeded_globals(seed: int, restore: bool):
    """Seed torch's CPU generator, `random` and `np.random` (what timm/torchvision
    transforms draw from); restore them afterwards when running in the main process."""
    with restored_generators(enabled=restore):
        seed_generators(seed)
        yield


# ----------------------------------------------------------------------------- the worker side

class _ShardStream(IterableDataset):
    """Yields (images, labels, indices, skipped, notes, retries, crops) batches for one worker of one rank.

    `position`: where a worker pool's pass starts, [epoch, start_batch] in memory shared with
    the workers (`_Pool`), read as each pass starts; None: the plan's own."""

    def __init__(self, plan: _Plan, position=None):
        super().__init__()
        self.base_plan = self.plan = plan
        self.position = position
        self._fallback = None

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if self.position is not None:
            self.plan = replace(self.base_plan, epoch=int(self.position[0]), start_batch=int(self.position[1]))
        plan = self.plan
        # After a resume at batch k, the DataLoader starts its round-robin at worker 0, which
        # must produce batch k: physical worker p plays logical worker (p + k) % W.
        worker = (physical + plan.start_batch) % plan.workers
        in_main = info is None
        if plan.training:
            processes = info.num_workers if info is not None else 1
            if processes != plan.workers:
                return self._train_several(physical, processes, in_main)
            return self._train(worker, in_main)
        return self._evaluate(worker)

    def _train_several(self, physical: int, processes: int, in_main: bool):
        """Physical worker `physical` of `processes` (a divisor of the W logical workers; 1 in the main
        process) plays every logical worker w with (w - k) % processes == physical, k the start batch.

        The epoch's batch i is batch i // W of logical worker i % W; the DataLoader takes batch i from
        its worker (i - k) % processes, so this worker yields batches k + physical, k + physical +
        processes, ... from its logical workers' streams in turn: the same batches in the same order as
        W worker processes would give (open_loader's `max_worker_processes`)."""
        p = self.plan
        streams = {w: self._train(w, in_main) for w in range(p.workers) if (w - p.start_batch) % processes == physical}
        try:
            for position in range(p.start_batch + physical, p.batches_per_epoch, processes):
                yield next(streams[position % p.workers])
        finally:
            for stream in streams.values():
                stream.close()

    # -- pieces shared by both modes

    def _decode(self, raw: RawSample, tally: Tally):
        if self.plan.crop_flip is None:
            decode = decode_sample
        else:  # decode-only workers: an array, or with decode_on="device" a JPEG's bytes and header size
            decode = read_for_device if self.plan.decode_on_device else decode_array
        try:
            image, label = decode(raw, self.plan.num_classes, self.plan.draft_side)
        except BadSample as err:
            tally.note(raw.url, "sample", f"shard {raw.url}: sample {raw.members.get('__key__')} skipped ({err})")
            return None
        return image, label

    def _to_tensor(self, image) -> torch.Tensor:
        out = self.plan.transform(image)
        if isinstance(out, np.ndarray):  # timm's ToNumpy gives CHW uint8 arrays
            out = torch.from_numpy(out)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.dim() != 3:
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"the loader's transform must return a uint8 CHW tensor, got {got} "
                            "(use the transforms of vitmpp.datasets.transforms)")
        return out

    def _fallback_sample(self):
        """The first decodable sample of the shards in play: fills a batch none of whose samples
        decoded (rare), without consuming the stream, so batch boundaries stay where they were."""
        if self._fallback is None:
            scratch = Tally()
            p = self.plan
            for url, offset, length in zip(p.urls, p.offsets, p.lengths):
                for raw in read_shard(url, offset, length, None, scratch, count_lost=False):
                    decoded = self._decode(raw, scratch)
                    if decoded is not None:
                        self._fallback = (decoded[0], decoded[1])
                        return self._fallback
            raise UserError(f"No sample of {len(p.urls)} shards (e.g. {p.urls[0]}) can be decoded; "
                            "check or rewrite the shards with make_shards.")
        return self._fallback

    def _assemble(self, raws: list, tally: Tally, real: list[bool], count_bad: bool = True):
        """Decode and transform one batch; bad samples become repeats (index -1) of good ones."""
        decoded, indices = [], []
        for raw, is_real in zip(raws, real):
            item = self._decode(raw, tally) if raw is not None else None
            if item is None:
                if is_real and count_bad and raw is not None:
                    tally.skipped += 1
                decoded.append(None)
                indices.append(-1)
            else:
                decoded.append(item)
                indices.append(raw.index if is_real else -1)
        views = self.plan.views
        if views > 1:  # every decoded image k times in a row: k samples, each with its own crop (and flip)
            decoded = [item for item in decoded for _ in range(views)]
            indices = [index for index in indices for _ in range(views)]
        sources = fill_sources([item is None for item in decoded])
        filled = ([decoded[s] for s in sources] if sources is not None
                  else [self._fallback_sample()] * len(decoded))
        skipped, notes = tally.take()
        retries, tally.retries = tally.retries, 0
        tail = (torch.tensor(indices, dtype=torch.int64), torch.tensor(skipped, dtype=torch.int64), notes, retries)
        if self.plan.crop_flip is not None:
            return self._regions(filled, tail)
        images, labels = [], []
        for image, label in filled:
            images.append(self._to_tensor(image))
            labels.append(label)
        try:
            stacked = torch.stack(images)
        except RuntimeError:
            shapes = sorted({tuple(t.shape) for t in images})
            raise TypeError(f"the loader's transform returned images of different shapes {shapes}; it must "
                            "produce a fixed size (crop or resize to img_size)") from None
        return (stacked, torch.tensor(labels, dtype=torch.int64), *tail, None)

    def _regions(self, filled: list, tail: tuple):
        """augment_on="device": the crop boxes and flips drawn as the transform draws them, in the same
        order, and the pixels they need (device_augment.py); the main process makes the images. With
        decode_on="device" a JPEG is an `EncodedJpeg`, whose `shape` is the decoded array's: the same
        draws, and the bytes travel instead of the pixels (`encode_regions`)."""
        crop_flip = self.plan.crop_flip
        images, labels, boxes, flips = [], [], [], []
        for image, label in filled:
            i, j, h, w, flip = crop_flip.draw(image.shape[1], image.shape[0])
            images.append(image)
            labels.append(label)
            boxes.append((i, j, h, w))
            flips.append(flip)
        labels, flips = torch.tensor(labels, dtype=torch.int64), torch.tensor(flips, dtype=torch.bool)
        if self.plan.decode_on_device:
            encoded, rois = encode_regions(images, boxes)
            return (encoded, labels, *tail, (rois, flips))
        regions, rois = pack_regions(images, boxes)
        return (torch.from_numpy(regions), labels, *tail, (torch.from_numpy(rois), flips))

    # -- training

    def _shards_of(self, worker: int) -> Iterator[int]:
        """Endless shard positions for this (rank, worker): every G-th of repeated seeded permutations."""
        p = self.plan
        n = len(p.urls)
        stride = p.world_size * p.workers
        position = p.rank * p.workers + worker
        while True:
            pass_index, within = divmod(position, n)
            order = np.random.default_rng(_seed(p.seed, p.epoch, pass_index, 0x5A4D)).permutation(n)
            yield int(order[within])
            position += stride

    def _raw_stream(self, worker: int, tally: Tally) -> Iterator[RawSample]:
        p = self.plan
        wanted = (lambda i: bool(p.keep[i])) if p.keep is not None else None
        empty_in_a_row = 0
        limit = 20 * len(p.urls) + p.world_size * p.workers
        for shard in self._shards_of(worker):
            produced = False
            for raw in read_shard(p.urls[shard], p.offsets[shard], p.lengths[shard], wanted, tally):
                produced = True
                yield raw
            empty_in_a_row = 0 if produced else empty_in_a_row + 1
            if empty_in_a_row > limit:
                why = next((message for url, message in reversed(tally.notes) if url == p.urls[shard]), None)
                reads = (f"read shard {p.urls[shard]} {empty_in_a_row} times" if len(p.urls) == 1 else
                         f"read {empty_in_a_row} shards in a row (the last {p.urls[shard]})")
                raise UserError(f"Worker {worker} of rank {p.rank} {reads} without a usable sample"
                                f"{f' ({why})' if why else ''}; check or rewrite the shards.")

    def _train(self, worker: int, in_main: bool):
        import webdataset as wds

        p = self.plan
        tally = Tally()
        W = p.workers
        total = p.worker_batches(worker)
        done = p.start_batch // W + (worker < p.start_batch % W)  # this worker's batches among the first k
        per_batch = p.batch_size // p.views  # raw samples (decoded images) per batch
        source = self._raw_stream(worker, tally)
        # Exactly the raw samples this worker's batches use (a bad sample is replaced, never
        # topped up from the stream): the buffer then drains at the end of the epoch instead of
        # reading ahead into the next pass, so one epoch covers the data about once.
        stream = itertools.islice(source, total * per_batch)
        buffer = min(p.shuffle_buffer, total * per_batch)
        if buffer > 1:
            rng = random.Random(_seed(p.seed, p.epoch, p.rank, worker, 0x5B0F))
            stream = wds.filters.shuffle(buffer, max(1, buffer // 4), rng=rng)(stream)
        stream = iter(stream)
        try:
            for _ in range(done * per_batch):  # resume: skip raw samples, decode nothing
                next(stream)
            # losses met while skipping were counted before the resume; keep only the notes
            tally.skipped = 0
            for j in range(done, total):
                raws = [next(stream) for _ in range(per_batch)]
                with _seeded_globals(_seed(p.seed, p.epoch, p.rank, worker, j, 0xA06), restore=in_main):
                    batch = self._assemble(raws, tally, [True] * len(raws))
                yield batch  # outside the seeded state: the caller's own draws must not come from it
        finally:
            source.close()

    # -- evaluation

    def _evaluate(self, worker: int):
        p = self.plan
        B = p.batch_size
        n_real = len(p.rank_indices)
        first = sum(p.worker_batches(w) for w in range(worker))
        slots = range(first * B, (first + p.worker_batches(worker)) * B)

        def source(slot: int) -> tuple[int, bool]:
            if slot < n_real:
                return int(p.rank_indices[slot]), True
            pool = p.rank_indices if n_real else p.all_indices_head
            return int(pool[(slot - n_real) % len(pool)]), False

        plan_slots = [source(s) for s in slots]
        needed = {i for i, _ in plan_slots}
        pad_sources = {i for i, real in plan_slots if not real}
        needed_sorted = np.array(sorted(needed), dtype=np.int64)
        # the shards holding at least one needed index (a needed index in [off, off + n))
        firsts = np.searchsorted(needed_sorted, p.offsets)
        shards = [k for k, (j, off, n) in enumerate(zip(firsts, p.offsets, p.lengths))
                  if j < len(needed_sorted) and needed_sorted[j] < off + n]

        def wanted(i: int) -> bool:
            j = np.searchsorted(needed_sorted, i)
            return j < len(needed_sorted) and needed_sorted[j] == i

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

        for b in range(0, len(plan_slots), B):
            chunk = plan_slots[b:b + B]
            raws, real = [], []
            for index, is_real in chunk:
                raw = fetch(index)
                if raw is None and is_real:
                    tally.skipped += 1  # lost with an unreadable part of its shard
                raws.append(raw)
                real.append(is_real)
            yield self._assemble(raws, tally, real)


# ----------------------------------------------------------------------------- the main-process side

_WARNED: set = set()
# streamed shard reads retried (datasets/samples.py), as the batches of every loader of this
# process reported them: what `ShardLoader.retries` tells (the loop logs it)
_RETRIES = [0]


class ShardLoader:
    """The `Loader` (datasets/spec.py) over the `Batch`es of one epoch on one rank (module docstring).

    Made by `open_loader`; besides the contract it tells `num_samples` (samples in play),
    `batches_per_epoch` (the whole epoch's, before `start_batch`) and `bad_shards`."""

    def __init__(self, plan: _Plan, spec: LoaderSpec, num_samples: int, *, num_workers: int):
        self._plan = plan
        self.spec = spec
        self.manifest = spec.manifest
        self.split = spec.split
        self.epoch = plan.epoch
        self.shards = list(plan.urls)
        self.num_samples = num_samples
        self.batches_per_epoch = plan.batches_per_epoch
        self.start_batch = plan.start_batch
        self.num_workers = num_workers
        self.device = spec.device if spec.device is not None else torch.device("cpu")  # augment_on="device"
        self.pin_memory = spec.pin_memory
        self.prefetch_factor = spec.prefetch_factor
        self.max_skip_fraction = spec.max_skip_fraction
        self.skipped_samples = 0
        self.bad_shards: list[str] = []
        self._delivered = 0
        self._fallback = None  # decode_on="device": the images for a batch none of whose samples decoded
        self._noted: set = set()  # decode_on="device": shards already noted for a JPEG the device could not decode

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    @property
    def retries(self) -> int:
        """Streamed shard reads retried so far in this process: cumulative over every loader and
        epoch of the process (a resumed run counts from 0 again), counted as their batches arrive;
        a retry while skipping to `start_batch` arrives with the first batch."""
        return _RETRIES[0]

    def _batches(self):
        """(iterator over the workers' batches, the worker pool serving it or None when reading in this process)."""
        if self.num_workers == 0:
            loader = DataLoader(_ShardStream(self._plan), batch_size=None, num_workers=0, pin_memory=self.pin_memory,
                                generator=torch.Generator().manual_seed(self._plan.seed))  # (see _Pool)
            return iter(loader), None
        key = _pool_key(self._plan, self.num_workers, self.pin_memory, self.prefetch_factor)
        kept = _take_pool(key)
        if kept is not None:
            try:
                return kept.start(self._plan.epoch, self._plan.start_batch), kept
            except Exception:  # noqa: BLE001 - a kept worker that died while idle: start afresh
                kept.close()
        pool = _Pool(key, self._plan, self.num_workers, self.pin_memory, self.prefetch_factor)
        try:
            return pool.start(self._plan.epoch, self._plan.start_batch), pool
        except BaseException:
            pool.close()
            raise

    def _account(self, skipped: int, indices: torch.Tensor, notes) -> None:
        for url, message in notes:
            if url not in self.bad_shards:
                self.bad_shards.append(url)
            if (url, message) not in _WARNED:
                _WARNED.add((url, message))
                warnings.warn(message, ShardWarning, stacklevel=3)
        self.skipped_samples += skipped
        self._delivered += int((indices >= 0).sum()) // self._plan.views  # images, as skipped_samples counts
        # Judged on the epoch, as the limit says: stop once the skipped samples are more than the
        # fraction of all the epoch reads here (each batch takes batch_size / views images, skipped
        # ones included), never on a running estimate that early bad luck can push over it.
        p = self._plan
        reads = len(self) * (p.batch_size // p.views)
        if not p.training:  # this rank's real samples from the start batch on (padding is not read)
            reads = max(0, len(p.rank_indices) - p.start_batch * p.batch_size)
        if self.skipped_samples and self.skipped_samples > self.max_skip_fraction * reads:
            shards = ", ".join(self.bad_shards[:5]) + (f" and {len(self.bad_shards) - 5} more"
                                                       if len(self.bad_shards) > 5 else "")
            raise UserError(
                f"{self.skipped_samples} samples of split '{self.split}' could not be read, more than "
                f"max_skip_fraction={self.max_skip_fraction} of the {reads} this epoch reads on rank "
                f"{self._plan.rank}; damaged shards: {shards or 'unknown'}. "
                "Rewrite them with make_shards or raise data.max_skip_fraction."
            )

    def _decode_on_device(self, encoded: EncodedBatch, labels, indices, skipped, notes, crops):
        """decode_on="device": the batch's images [B, 3, size, size] on the device from a worker's
        `EncodedBatch` (device_augment.decode_regions, then the batched crop + flip). The samples of a
        JPEG the device cannot decode become repeats of good samples of the batch (index -1), the rule
        of the workers (`_assemble`), and the JPEG is counted in `skipped` and noted (once per shard)."""
        device, size = self.device, self._plan.crop_flip.size
        rois, flips = crops
        regions, failed = decode_regions(encoded, device)
        images = crop_flip_batch(regions, rois.to(device, non_blocking=True), flips.to(device, non_blocking=True), size)
        if not failed:
            return images, labels, indices, skipped, notes
        failed_regions = encoded.jpeg_regions[failed]
        bad = torch.isin(rois[:, 0].long(), failed_regions)
        lost = sum(int((indices[rois[:, 0].long() == r] >= 0).any()) for r in failed_regions.tolist())
        notes = tuple(notes)
        for k in failed:
            url, key = encoded.names[k]
            message = f"shard {url}: sample {key} skipped (its JPEG cannot be decoded on {device})"
            if (url, "device") not in self._noted:
                self._noted.add((url, "device"))
                notes += ((url, message),)
        indices = indices.clone()
        indices[bad] = -1
        sources = fill_sources(bad.tolist())  # bad is on the CPU (from the rois): no device sync
        if sources is not None:
            take = torch.tensor(sources, dtype=torch.int64)
            images, labels = images[take.to(device)], labels[take]
        else:  # no sample of the batch decoded: the first decodable sample of the shards, whole (as _assemble)
            image, label = self._fallback_image()
            images = image.expand(len(bad), -1, -1, -1).clone()
            labels = torch.full_like(labels, label)
        return images, labels, indices, skipped + lost, notes

    def _fallback_image(self) -> tuple[torch.Tensor, int]:
        """([1, 3, size, size] on the device, label): the first sample of the shards that decodes in a
        worker's way, resized whole (no crop, no flip), for a batch none of whose JPEGs decoded (rare)."""
        if self._fallback is None:
            array, label = _ShardStream(replace(self._plan, decode_on_device=False))._fallback_sample()
            regions, rois = pack_regions([array], [(0, 0, array.shape[0], array.shape[1])])
            image = crop_flip_batch(torch.from_numpy(regions).to(self.device), torch.from_numpy(rois),
                                    torch.zeros(1, dtype=torch.bool), self._plan.crop_flip.size)
            self._fallback = (image, label)
        return self._fallback

    def __iter__(self) -> Iterator[Batch]:
        self.skipped_samples, self._delivered, produced = 0, 0, 0
        batches, pool = self._batches()
        handed_back = False
        try:
            while produced < len(self):
                try:
                    images, labels, indices, skipped, notes, retries, crops = next(batches)
                except StopIteration:
                    break
                _RETRIES[0] += retries
                if isinstance(images, EncodedBatch):  # decode_on="device": decode, crop and flip here
                    images, labels, indices, skipped, notes = self._decode_on_device(
                        images, labels, indices, skipped, notes, crops)
                    crops = None
                self._account(int(skipped), indices, notes)
                produced += 1
                if crops is not None:  # augment_on="device": the batched crop + flip, here (device_augment.py)
                    device = self.device
                    images = crop_flip_batch(images.to(device, non_blocking=True), crops[0].to(device, non_blocking=True),
                                             crops[1].to(device, non_blocking=True), self._plan.crop_flip.size)
                if produced == len(self) and pool is not None:
                    # the pass is all here: its workers go back to the pool now, and start the next pass
                    # while this last batch is trained on (`batches` is not read again)
                    handed_back = True
                    _give_back(pool, self._plan.epoch)
                yield Batch(images, labels, indices, skipped)
        except UserError as err:
            # a worker's UserError arrives wrapped with its traceback: keep the sentence
            text = str(err)
            if not text.startswith("Caught "):
                raise
            # (its last line is "<module.Class>: sentence", the class UserError or a subclass such as
            # samples.ShardUnreachable)
            raise UserError(text.strip().splitlines()[-1].split(": ", 1)[-1]) from None
        except Exception as err:  # noqa: BLE001 - whatever a dead worker surfaces as, see _worker_death
            explained = _worker_death(err, batches, self._plan.rank)
            if explained is None:
                raise
            raise explained from None
        finally:
            if pool is None:
                _shutdown(batches)
            elif not handed_back:  # stopped early, or an error: these workers end
                pool.close()
            del batches
        if produced != len(self):
            raise RuntimeError(f"the loader produced {produced} batches instead of {len(self)} (a bug in vitmpp)")


def _shutdown(batches) -> None:
    """Stop the workers of a DataLoader iterator now, also on an error or an early break: a traceback that
    keeps it alive would otherwise keep their pids registered with torch's SIGCHLD handler, which then
    raises at a random later point when they exit."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        try:
            shutdown()
        except RuntimeError as err:
            # torch's SIGCHLD handler reports another worker that died while the first death
            # (already explained above) was being handled: one sentence is enough
            if "DataLoader worker" not in str(err):
                raise


# ----------------------------------------------------------------------------- worker pools

# Finished pools kept for the next pass with the same plan (the next epoch, the next evaluation),
# most recently used last; beyond this many the oldest is closed.
MAX_IDLE_POOLS = 4
_IDLE_POOLS: list = []
# a forked child (a loader worker, a process of a test or launcher) inherits its parent's pools, whose
# workers are not its children: it keeps them untouched, never using, closing or collecting them
_INHERITED: list = []


def _forget_inherited_pools() -> None:
    _INHERITED.extend(_IDLE_POOLS)
    _IDLE_POOLS.clear()


os.register_at_fork(after_in_child=_forget_inherited_pools)


class _Pool:
    """Worker processes that serve every pass (epoch, start batch) of one plan: one DataLoader with
    persistent workers, whose stream reads the pass's position from memory shared with them as the
    pass starts. A pass is a pure function of the plan and the position, as with fresh workers
    (they seed everything they draw per batch), so reusing them changes no batch; it saves starting
    processes, which for short epochs (a linear probe on 10% of the labels) cost more than the epoch."""

    def __init__(self, key: tuple, plan: _Plan, processes: int, pin_memory: bool, prefetch_factor: int):
        import multiprocessing

        self.key = key
        self.training = plan.training
        self.ahead: tuple[int, int] | None = None  # the position of a pass started before it was asked for
        self.pid = os.getpid()  # the process whose children the workers are
        self.position = multiprocessing.Array("q", 2, lock=False)  # epoch, start batch
        self.loader = DataLoader(
            _ShardStream(plan, self.position), batch_size=None, num_workers=processes, pin_memory=pin_memory,
            persistent_workers=True, prefetch_factor=prefetch_factor,
            # the stop signals are the main process's: a signal to the whole run must not kill the workers
            worker_init_fn=leave_stop_signals_to_parent,
            # DataLoader draws its base seed from this generator instead of the global RNG, so
            # creating a loader never shifts the training process's random stream (exact resume);
            # the workers seed their own randomness per batch.
            generator=torch.Generator().manual_seed(plan.seed),
        )
        self.iterator = None

    def start(self, epoch: int, start_batch: int):
        """The DataLoader iterator of a pass from (epoch, start_batch): the workers start on the first pass
        (never acting on a stop signal: `no_interrupts_in_children`); later passes reset the same ones
        (torch drains what a stopped pass left). A pass already running ahead from this position is the one
        returned. Raises RuntimeError when a worker died while the pool was idle (the caller closes it and
        starts afresh)."""
        if self.iterator is not None and not all(w.is_alive() for w in self.iterator._workers):
            raise RuntimeError("a kept data-loading worker died while its pool was idle")
        self.watch(True)
        ahead, self.ahead = self.ahead, None
        if ahead == (epoch, start_batch) and self.iterator is not None:
            return self.iterator
        self.position[0], self.position[1] = epoch, start_batch
        with no_interrupts_in_children():
            self.iterator = iter(self.loader)
        return self.iterator

    def watch(self, on: bool) -> None:
        """Register (on) or withdraw the workers' pids with torch's SIGCHLD handler, which raises in the
        main thread, at whatever it is doing, when a registered worker dies. A pool in use is watched; an
        idle one is not, so that a kept worker killed while training runs on (say by the OOM killer) is
        not a traceback from a random line but is found when the pool is next taken (`start`)."""
        from torch.utils.data._utils import signal_handling  # torch's own registry (private, torch >= 1.x)

        iterator = self.iterator
        if iterator is None or getattr(iterator, "_worker_pids_set", False) == on:
            return
        if on:
            signal_handling._set_worker_pids(id(iterator), tuple(w.pid for w in iterator._workers))
        else:
            signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = on  # what its own shutdown reads to withdraw them (or not)

    def run_ahead(self, epoch: int) -> None:
        """Start the pass most likely asked for next, so that its first batches are ready when it is:
        training, the next epoch from its start; evaluation, the same pass again (the next evaluation).
        Its batches are those of that position whenever it is asked for; asked for another, the workers
        finish the batch in hand and switch (at most one batch per worker of wasted work)."""
        position = (epoch + 1, 0) if self.training else (epoch, 0)
        self.start(*position)
        self.ahead = position

    def close(self) -> None:
        if self.iterator is not None and self.pid == os.getpid():
            iterator, self.iterator, self.loader._iterator = self.iterator, None, None
            _shutdown(iterator)


def _pool_key(plan: _Plan, processes: int, pin_memory: bool, prefetch_factor: int) -> tuple:
    """What must be equal for a pool to serve a plan: all of it but the position (the transform by identity)."""
    def array(a):
        return None if a is None else (a.dtype.str, a.shape, a.tobytes())

    return (tuple(plan.urls), tuple(plan.lengths), tuple(plan.offsets), array(plan.keep), plan.num_classes,
            id(plan.transform), plan.training, plan.batch_size, plan.seed, plan.rank, plan.world_size, plan.workers,
            plan.shuffle_buffer, plan.batches_per_epoch, array(plan.rank_indices), array(plan.all_indices_head),
            plan.draft_side, plan.crop_flip is not None, plan.views, plan.decode_on_device, processes, pin_memory,
            prefetch_factor)


def _take_pool(key: tuple) -> _Pool | None:
    for k, pool in enumerate(_IDLE_POOLS):
        if pool.key == key:
            return _IDLE_POOLS.pop(k)
    return None


# kept pools start the pass likely asked for next (`_Pool.run_ahead`); off: they wait for the ask
RUN_AHEAD = True


def _give_back(pool: _Pool, epoch: int) -> None:
    _IDLE_POOLS.append(pool)
    while len(_IDLE_POOLS) > MAX_IDLE_POOLS:
        _IDLE_POOLS.pop(0).close()
    if RUN_AHEAD and pool in _IDLE_POOLS:
        try:
            pool.run_ahead(epoch)
        except Exception:  # noqa: BLE001 - a worker died: the pool is of no further use
            _IDLE_POOLS.remove(pool)
            pool.close()
    if pool in _IDLE_POOLS:
        pool.watch(False)  # idle: a worker's death is found when the pool is taken (`_Pool.start`)


def close_idle_workers() -> None:
    """End the worker processes kept for later passes (at exit, and for measurements of worker CPU time)."""
    while _IDLE_POOLS:
        _IDLE_POOLS.pop().close()


# before torch's own exit handler (registered earlier, so run later) makes worker shutdown a no-op
atexit.register(close_idle_workers)


# how long a worker whose pipe broke may take to finish dying (it closes its files first, then exits)
_DEATH_GRACE_S = 5.0


def _worker_death(error: Exception, batches, rank: int) -> UserError | None:
    """The one-sentence error for `error` when a DataLoader worker died, else None.

    A dead worker surfaces as whatever the main process was doing when it died, and on a
    busy machine that is a race: torch's SIGCHLD handler raises its RuntimeError at any
    bytecode, reading the result pipe raises ConnectionResetError, EOFError or
    BrokenPipeError, the batch queue finds the worker gone. So the workers themselves are
    asked (their exit status), not the message. Torch's handler may fire again while they
    are asked; it reports the same death, so they are asked again.
    """
    if str(error).startswith("Caught "):  # the worker's own exception, re-raised by torch: it is alive
        return None
    for _ in range(3):
        try:
            return _dead_worker_error(batches, rank, error) or _in_torch_words(error, rank)
        except RuntimeError as again:  # torch's SIGCHLD handler, raising inside the check
            error = again
    return _in_torch_words(error, rank)


def _in_torch_words(error: Exception, rank: int) -> UserError | None:
    # torch's own report of a death whose worker was reaped elsewhere
    return explain_failure(error, rank) if isinstance(error, RuntimeError) else None


def _dead_worker_error(batches, rank: int, error: Exception | None = None) -> UserError | None:
    """The sentence for the first worker of `batches` that has ended (reaped, so that torch's
    SIGCHLD handler stops reporting it), or None when every worker is still alive. `error`: the
    latest failure seen, whose words stand in when the worker's exit status was lost (below)."""
    import multiprocessing.connection

    # torch's multiprocessing.Process objects of this iterator (none when reading in the main process)
    workers = list(getattr(batches, "_workers", []))
    if not workers:
        return None
    ended = multiprocessing.connection.wait([w.sentinel for w in workers], timeout=_DEATH_GRACE_S)
    for worker in workers:
        if worker.sentinel in ended:
            worker.join()
            if worker.exitcode is None:
                # reaped, but the status not kept: torch's SIGCHLD handler raised inside an earlier
                # join, after its waitpid took the status and before multiprocessing stored it (seen
                # on a busy CPU); that handler's RuntimeError carries the status in torch's words
                return _in_torch_words(error, rank) or dead_worker_error(
                    rank, f"DataLoader worker (pid {worker.pid}) ended, its exit status lost to a signal handler")
            return dead_worker_error(rank, worker_exit_detail(worker.pid, worker.exitcode))
    return None


# ----------------------------------------------------------------------------- building

def _select_shards(manifest: Manifest, split: str,
                   shards: str | tuple[str, ...]) -> tuple[list[str], list[int], list[int]]:
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
                raise UserError(f"Shard '{name}' is not in split '{split}' of manifest '{manifest.source}'; "
                                "name shards of that split (or the folder that holds them).")
            k = by_name[base]
            if k not in urls_given:
                chosen.append(k)
                urls_given[k] = name
        chosen.sort()
        urls = [urls_given.get(k) for k in range(len(all_urls))]
    return ([urls[k] for k in chosen], [info.shard_lengths[k] for k in chosen], [offsets[k] for k in chosen])


def open_loader(spec: LoaderSpec, *, epoch: int = 0, start_batch: int = 0,
                max_worker_processes: int | None = None) -> Loader:
    """The `Loader` over epoch `epoch` of `spec`, from batch `start_batch` on (module docstring).

    `start_batch` (training only): resume mid-epoch; the batches are exactly those of an
    uninterrupted epoch from that batch on. `max_worker_processes` (training only): start at most
    this many worker processes (the largest divisor of the logical workers, `spec.num_workers`, that
    fits; 0: read in the main process), each playing several logical workers in turn: the batches
    are the same, only fewer processes make them (a process hosting several logical ranks, loop.py).
    Raises UserError before any batch when a local shard is missing or the split is too small for
    one batch of every rank.
    """
    if epoch < 0 or start_batch < 0:
        raise ValueError(f"open_loader: epoch={epoch} and start_batch={start_batch} must not be negative")
    man, split, batch_size, world_size = spec.manifest, spec.split, spec.batch_size, spec.world_size
    info = man.split(split)
    urls, lengths, offsets = _select_shards(man, split, spec.shards)
    missing = [u for u in urls if not is_url(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        # a FIFO or device is refused here, unopened: reading one would block the loader forever
        what = "is not a regular file" if os.path.exists(missing[0]) else "does not exist"
        raise UserError(f"Shard '{missing[0]}'{more} listed in '{man.source}' {what}; restore it or "
                        "rewrite the shards with make_shards.")

    keep = None
    if spec.keep_indices is not None:
        keep = np.zeros(info.num_samples, dtype=bool)
        ranges = np.zeros(info.num_samples, dtype=bool)
        for off, n in zip(offsets, lengths):
            ranges[off:off + n] = True
        kept = np.unique(np.asarray(spec.keep_indices, dtype=np.int64))
        if len(kept) and (kept[0] < 0 or kept[-1] >= info.num_samples or not ranges[kept].all()):
            raise ValueError(f"keep_indices must be sample indices of the shards in play (0..{info.num_samples - 1})")
        keep[kept] = True
        in_play = kept
    else:
        in_play = None
    num_samples = len(in_play) if in_play is not None else int(sum(lengths))
    if spec.training:
        # keep only shards with something to read
        usable = [k for k, (off, n) in enumerate(zip(offsets, lengths))
                  if n > 0 and (keep is None or keep[off:off + n].any())]
        urls, lengths, offsets = [urls[k] for k in usable], [lengths[k] for k in usable], [offsets[k] for k in usable]
    if num_samples == 0 or not urls:
        raise UserError(f"Split '{split}' of '{man.source}' has no samples to load; check the shards or keep_indices.")

    views = spec.views_per_image
    if views > 1 and not spec.training:
        raise ValueError("views_per_image applies to training loaders only")
    if spec.training:
        bpe = (spec.batches_per_epoch if spec.batches_per_epoch is not None
               else num_samples // (batch_size * world_size))
        if bpe < 1:
            raise UserError(f"Split '{split}' of '{man.source}' has {num_samples} samples, fewer than one global "
                            f"batch of {batch_size} x {world_size} processes; lower the batch size or add data.")
        rank_indices = np.zeros(0, dtype=np.int64)
    else:
        if start_batch:
            raise ValueError("start_batch applies to training loaders only")
        all_indices = in_play if in_play is not None else np.concatenate(
            [np.arange(off, off + n, dtype=np.int64) for off, n in zip(offsets, lengths)])
        per_rank = math.ceil(num_samples / world_size)
        rank_indices = all_indices[spec.rank * per_rank:(spec.rank + 1) * per_rank]
        needed = math.ceil(per_rank / batch_size)
        bpe = spec.batches_per_epoch if spec.batches_per_epoch is not None else needed
        if bpe < needed:
            raise ValueError(f"batches_per_epoch={bpe} is too few to evaluate {per_rank} samples per rank")
    if not 0 <= start_batch <= bpe:
        raise ValueError(f"start_batch={start_batch} is outside the epoch's {bpe} batches")

    crop_flip = None
    if spec.augment_on == "device":
        if not spec.training:
            raise ValueError("augment_on='device' applies to training loaders only")
        crop_flip = CropFlip.of(spec.transform)
        if crop_flip is None:
            raise UserError(f"Key 'data.augment_on' is 'device', but the training transform is not "
                            f"RandomResizedCrop + flip alone (it is {_describe_transform(spec.transform)}); "
                            "set data.augment_on=cpu for this stage.")
    workers = min(spec.num_workers, bpe)
    processes = workers
    if max_worker_processes is not None and spec.training and workers > 0:
        processes = max((d for d in range(1, workers + 1) if workers % d == 0 and d <= max_worker_processes), default=0)
    plan = _Plan(
        urls=urls, lengths=lengths, offsets=offsets, keep=keep, num_classes=man.num_classes,
        transform=spec.transform, training=spec.training, batch_size=batch_size, seed=spec.seed, epoch=epoch,
        rank=spec.rank, world_size=world_size, workers=max(1, workers),
        shuffle_buffer=spec.shuffle_buffer if spec.training else 0, start_batch=start_batch,
        batches_per_epoch=bpe, rank_indices=rank_indices,
        all_indices_head=(all_indices[:batch_size] if not spec.training else rank_indices),
        draft_side=getattr(spec.transform, "decode_min_side", None), crop_flip=crop_flip, views=views,
        decode_on_device=spec.decode_on == "device",
    )
    return ShardLoader(plan, spec, num_samples, num_workers=processes)


def _describe_transform(transform) -> str:
    steps = getattr(transform, "transforms", None)
    if steps:
        return " + ".join(type(t).__name__ for t in steps)
    return type(transform).__name__
