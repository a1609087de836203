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
(pool.py); what they yield is a function of those alone, so reused workers give the same
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

How a batch is made is the mode's strategy (strategies.py), chosen once as the loader opens.
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

The reader, file by file: order.py plans which raw samples make which batch (pure functions);
samples.py reads them out of a shard, over transport.py (local files, http(s), `pipe:`,
retries); decoders.py decodes them; stream.py is a worker's stream of `WorkerBatch`es;
strategies.py makes the batches of each mode; pool.py keeps the worker processes. This file
opens a loader and checks, in the main process, what arrives.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

from vitmpp.common.errors import UserError

from .order import Plan, plan_epoch, worker_processes
from .pool import close_idle_workers, give_back, open_batches, shutdown, worker_death
from .spec import Batch, Loader, LoaderSpec
from .strategies import batch_maker

__all__ = ["ShardLoader", "ShardWarning", "close_idle_workers", "open_loader"]


class ShardWarning(UserWarning):
    """A shard is damaged or holds members we ignore (printed once per shard per process)."""


_WARNED: set = set()
# streamed shard reads retried (datasets/transport.py), as the batches of every loader of this
# process reported them: what `ShardLoader.retries` tells (the loop logs it)
_RETRIES = [0]


class ShardLoader:
    """The `Loader` (datasets/spec.py) over the `Batch`es of one epoch on one rank (module docstring).

    Made by `open_loader`; besides the contract it tells `num_samples` (samples in play),
    `batches_per_epoch` (the whole epoch's, before `start_batch`) and `bad_shards`."""

    def __init__(self, plan: Plan, maker, spec: LoaderSpec, num_samples: int, *, num_workers: int):
        self._plan = plan
        self._maker = maker  # strategies.py: how this mode makes a batch
        self.spec = spec
        self.manifest = spec.manifest
        self.split = spec.split
        self.epoch = plan.epoch
        self.shards = list(plan.urls)
        self.num_samples = num_samples
        self.batches_per_epoch = plan.batches_per_epoch
        self.start_batch = plan.start_batch
        self.num_workers = num_workers
        self.max_skip_fraction = spec.max_skip_fraction
        self.skipped_samples = 0
        self.bad_shards: list[str] = []

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    @property
    def retries(self) -> int:
        """Streamed shard reads retried so far in this process: cumulative over every loader and
        epoch of the process (a resumed run counts from 0 again), counted as their batches arrive;
        a retry while skipping to `start_batch` arrives with the first batch."""
        return _RETRIES[0]

    def _account(self, skipped: int, notes) -> None:
        for url, message in notes:
            if url not in self.bad_shards:
                self.bad_shards.append(url)
            if (url, message) not in _WARNED:
                _WARNED.add((url, message))
                warnings.warn(message, ShardWarning, stacklevel=3)
        self.skipped_samples += skipped
        # Judged on the epoch, as the limit says: stop once the skipped samples are more than the
        # fraction of all the epoch reads here (each batch takes batch_size / views images, skipped
        # ones included), never on a running estimate that early bad luck can push over it.
        reads = self._plan.reads()
        if self.skipped_samples and self.skipped_samples > self.max_skip_fraction * reads:
            shards = ", ".join(self.bad_shards[:5]) + (
                f" and {len(self.bad_shards) - 5} more" if len(self.bad_shards) > 5 else ""
            )
            raise UserError(
                f"{self.skipped_samples} samples of split '{self.split}' could not be read, more than "
                f"max_skip_fraction={self.max_skip_fraction} of the {reads} this epoch reads on rank "
                f"{self._plan.rank}; damaged shards: {shards or 'unknown'}. "
                "Rewrite them with make_shards or raise data.max_skip_fraction."
            )

    def __iter__(self) -> Iterator[Batch]:
        self.skipped_samples, produced = 0, 0
        spec = self.spec
        batches, pool = open_batches(self._plan, self._maker, self.num_workers, spec.pin_memory, spec.prefetch_factor)
        handed_back = False
        try:
            while produced < len(self):
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                _RETRIES[0] += batch.retries
                batch = self._maker.finish(batch, self._plan)  # the mode's main-process step (strategies.py)
                self._account(int(batch.skipped), batch.notes)
                produced += 1
                if produced == len(self) and pool is not None:
                    # the pass is all here: its workers go back to the pool now, and start the next pass
                    # while this last batch is trained on (`batches` is not read again)
                    handed_back = True
                    give_back(pool, self._plan.epoch)
                yield Batch(batch.images, batch.labels, batch.indices, batch.skipped)
        except UserError as err:
            # a worker's UserError arrives wrapped with its traceback: keep the sentence
            text = str(err)
            if not text.startswith("Caught "):
                raise
            # (its last line is "<module.Class>: sentence", the class UserError or a subclass such as
            # transport.ShardUnreachable)
            raise UserError(text.strip().splitlines()[-1].split(": ", 1)[-1]) from None
        except Exception as err:  # noqa: BLE001 - whatever a dead worker surfaces as, see pool.worker_death
            explained = worker_death(err, batches, self._plan.rank)
            if explained is None:
                raise
            raise explained from None
        finally:
            if pool is None:
                shutdown(batches)
            elif not handed_back:  # stopped early, or an error: these workers end
                pool.close()
            del batches
        if produced != len(self):
            raise RuntimeError(f"the loader produced {produced} batches instead of {len(self)} (a bug in vitmpp)")


def open_loader(
    spec: LoaderSpec, *, epoch: int = 0, start_batch: int = 0, max_worker_processes: int | None = None
) -> Loader:
    """The `Loader` over epoch `epoch` of `spec`, from batch `start_batch` on (module docstring).

    `start_batch` (training only): resume mid-epoch; the batches are exactly those of an
    uninterrupted epoch from that batch on. `max_worker_processes` (training only): start at most
    this many worker processes (the largest divisor of the logical workers, `spec.num_workers`, that
    fits; 0: read in the main process), each playing several logical workers in turn: the batches
    are the same, only fewer processes make them (a process hosting several logical ranks, loop.py).
    Raises UserError before any batch when a local shard is missing or the split is too small for
    one batch of every rank.
    """
    plan = plan_epoch(spec, epoch, start_batch)
    maker = batch_maker(spec)
    workers = min(spec.num_workers, plan.batches_per_epoch)
    processes = worker_processes(workers, max_worker_processes if spec.training else None)
    num_samples = int(plan.keep.sum()) if plan.keep is not None else int(sum(plan.lengths))
    return ShardLoader(plan, maker, spec, num_samples, num_workers=processes)
