"""The worker pool: the processes that run the worker streams, kept from one pass to the next.

The one file that touches torch's DataLoader internals (its SIGCHLD pid registry
`_set_worker_pids`, an iterator's `_workers` and `_shutdown_workers`, a loader's `_iterator`):
torch has no public way to keep persistent workers across loaders, to stop watching idle ones,
or to ask which worker died.

Worker processes outlive the epoch: a pass that delivered all its batches hands its workers to
the next loader of the same plan in this process (the next epoch, the next evaluation), which
tells them its epoch and start batch through shared memory; what they yield is a function of
those alone, so reused workers give the same batches as fresh ones. They start that next pass
(epoch + 1 from batch 0; an evaluation's same pass) as soon as the last batch is delivered, so
an epoch of a few batches does not begin with a wait (`RUN_AHEAD`). A pass stopped early, or by
an error, ends its workers; `close_idle_workers()` ends the kept ones (it runs at exit). A kept
pool's workers are withdrawn from torch's SIGCHLD watch while idle, so one killed then (the OOM
killer) is replaced when the pool is next taken instead of raising from whatever line the main
process was on.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os

import torch
from torch.utils.data import DataLoader

from vitmpp.common.distributed import (
    dead_worker_error,
    explain_failure,
    leave_stop_signals_to_parent,
    no_interrupts_in_children,
    worker_exit_detail,
)
from vitmpp.common.errors import UserError

from .order import Plan
from .stream import ShardStream

# Finished pools kept for the next pass with the same plan (the next epoch, the next evaluation),
# most recently used last; beyond this many the oldest is closed.
MAX_IDLE_POOLS = 4
# kept pools start the pass likely asked for next (`WorkerPool.run_ahead`); off: they wait for the ask
RUN_AHEAD = True
_IDLE_POOLS: list = []
# a forked child (a loader worker, a process of a test or launcher) inherits its parent's pools, whose
# workers are not its children: it keeps them untouched, never using, closing or collecting them
_INHERITED: list = []


def _forget_inherited_pools() -> None:
    _INHERITED.extend(_IDLE_POOLS)
    _IDLE_POOLS.clear()


os.register_at_fork(after_in_child=_forget_inherited_pools)


class WorkerPool:
    """Worker processes that serve every pass (epoch, start batch) of one plan: one DataLoader with
    persistent workers, whose stream reads the pass's position from memory shared with them as the
    pass starts. A pass is a pure function of the plan and the position, as with fresh workers
    (they seed everything they draw per batch), so reusing them changes no batch; it saves starting
    processes, which for short epochs (a linear probe on 10% of the labels) cost more than the epoch."""

    def __init__(self, key: tuple, plan: Plan, maker, processes: int, pin_memory: bool, prefetch_factor: int):
        self.key = key
        self.training = plan.training
        self.ahead: tuple[int, int] | None = None  # the position of a pass started before it was asked for
        self.pid = os.getpid()  # the process whose children the workers are
        self.position = multiprocessing.Array("q", 2, lock=False)  # epoch, start batch
        self.loader = DataLoader(
            ShardStream(plan, maker, self.position),
            batch_size=None,
            num_workers=processes,
            pin_memory=pin_memory,
            persistent_workers=True,
            prefetch_factor=prefetch_factor,
            # the stop signals are the main process's: a signal to the whole run must not kill the workers
            worker_init_fn=leave_stop_signals_to_parent,
            # DataLoader draws its base seed from this generator instead of the global RNG, so
            # creating a loader never shifts the training process's random stream (exact resume);
            # the workers seed their own randomness per batch.
            generator=torch.Generator().manual_seed(plan.seed),
        )
        self.iterator = None

    def worker_pids(self) -> set[int]:
        return {w.pid for w in self.iterator._workers} if self.iterator is not None else set()

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
            shutdown(iterator)


def pool_key(plan: Plan, maker, processes: int, pin_memory: bool, prefetch_factor: int) -> tuple:
    """What must be equal for a pool to serve a plan: all of it but the position, and the maker's key."""

    def array(a):
        return None if a is None else (a.dtype.str, a.shape, a.tobytes())

    return (
        plan.urls,
        plan.lengths,
        plan.offsets,
        array(plan.keep),
        plan.num_classes,
        plan.training,
        plan.batch_size,
        plan.views,
        plan.seed,
        plan.rank,
        plan.world_size,
        plan.workers,
        plan.shuffle_buffer,
        plan.batches_per_epoch,
        array(plan.rank_indices),
        array(plan.all_indices_head),
        maker.key(),
        processes,
        pin_memory,
        prefetch_factor,
    )


def open_batches(plan: Plan, maker, processes: int, pin_memory: bool, prefetch_factor: int):
    """(iterator over the pass's `WorkerBatch`es, the pool serving it, or None when read in this process).
    A kept pool of the same key serves it when there is one (`give_back`)."""
    if processes == 0:
        loader = DataLoader(
            ShardStream(plan, maker),
            batch_size=None,
            num_workers=0,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(plan.seed),
        )  # (see WorkerPool)
        return iter(loader), None
    key = pool_key(plan, maker, processes, pin_memory, prefetch_factor)
    kept = next((pool for pool in _IDLE_POOLS if pool.key == key), None)
    if kept is not None:
        _IDLE_POOLS.remove(kept)
        try:
            return kept.start(plan.epoch, plan.start_batch), kept
        except Exception:  # noqa: BLE001 - a kept worker that died while idle: start afresh
            kept.close()
    pool = WorkerPool(key, plan, maker, processes, pin_memory, prefetch_factor)
    try:
        return pool.start(plan.epoch, plan.start_batch), pool
    except BaseException:
        pool.close()
        raise


def give_back(pool: WorkerPool, epoch: int) -> None:
    """Keep the workers of a pass that delivered all its batches for the next pass of the same plan."""
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
        pool.watch(False)  # idle: a worker's death is found when the pool is taken (`WorkerPool.start`)


def close_idle_workers() -> None:
    """End the worker processes kept for later passes (at exit, and for measurements of worker CPU time)."""
    while _IDLE_POOLS:
        _IDLE_POOLS.pop().close()


def kept_worker_pids() -> list[set[int]]:
    """The worker pids of every idle pool kept for a later pass, oldest first."""
    return [pool.worker_pids() for pool in _IDLE_POOLS]


# before torch's own exit handler (registered earlier, so run later) makes worker shutdown a no-op
atexit.register(close_idle_workers)


def shutdown(batches) -> None:
    """Stop the workers of a DataLoader iterator now, also on an error or an early break: a traceback that
    keeps it alive would otherwise keep their pids registered with torch's SIGCHLD handler, which then
    raises at a random later point when they exit."""
    stop = getattr(batches, "_shutdown_workers", None)
    if stop is not None:
        try:
            stop()
        except RuntimeError as err:
            # torch's SIGCHLD handler reports another worker that died while the first death
            # (already explained above) was being handled: one sentence is enough
            if "DataLoader worker" not in str(err):
                raise


# ----------------------------------------------------------------------------- a worker that died

# how long a worker whose pipe broke may take to finish dying (it closes its files first, then exits)
_DEATH_GRACE_S = 5.0


def worker_death(error: Exception, batches, rank: int) -> UserError | None:
    """The one-sentence error for `error` when a DataLoader worker of `batches` died, else None.

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
            return dead_worker(batches, rank, error) or _in_torch_words(error, rank)
        except RuntimeError as again:  # torch's SIGCHLD handler, raising inside the check
            error = again
    return _in_torch_words(error, rank)


def _in_torch_words(error: Exception, rank: int) -> UserError | None:
    # torch's own report of a death whose worker was reaped elsewhere
    return explain_failure(error, rank) if isinstance(error, RuntimeError) else None


def dead_worker(batches, rank: int, error: Exception | None = None) -> UserError | None:
    """The sentence for the first worker of `batches` that has ended (reaped, so that torch's
    SIGCHLD handler stops reporting it), or None when every worker is still alive. `error`: the
    latest failure seen, whose words stand in when the worker's exit status was lost (below)."""
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
                    rank, f"DataLoader worker (pid {worker.pid}) ended, its exit status lost to a signal handler"
                )
            return dead_worker_error(rank, worker_exit_detail(worker.pid, worker.exitcode))
    return None
