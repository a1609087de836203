"""The one training loop every stage runs (pretraining, linear probe, fine-tuning, scratch).

    open_run ─ Accelerate, seed, run folder checks, resume point
       │
    stage.setup ─> Plan(model, optimizer, loader spec, training samples)
       │
    schedule, prepare (DDP/FSDP), guard, checkpointer; restore a checkpoint
       │
    for each step:  micro-batches ─ stage.forward ─> loss ─ backward ─ clip ─ agree finite ─ optimizer step
       │            interval log │ stage.after_step (pictures, evaluation) │ stop request? │ checkpoint
       ▼
    final checkpoint ─ stage.finish (export, results)

A stage supplies only what is its own through the `Stage` methods; everything a
run promises (exact resume, on any process count that divides the run's logical ranks
(`HostedRanks`, docs/distributed.md), stop requests, non-finite skips, atomic checkpoints,
interval logging, progress) is written once, here. The loop knows the data only by
the loader contract (`vitmpp.datasets.spec`): the stage hands it a loader factory
(`vitmpp.datasets.LoaderFactory`, built from the stage's data config) that gives each epoch's spec
and loader, so `common` never imports a layer above it and never reads `cfg.data`. `Callback`s observe the loop
through public hooks: fault injection (`vitmpp.common.faults`) and benchmark
instrumentation use them, so nothing needs monkeypatching.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import rundir
from .callbacks import Callback
from .checkpoint import Checkpointer, checkpoints_dir, load_logical_rng, logical_ranks_of, read_state, save_logical_rng
from .config import dump_yaml, flatten
from .console import Console, quiet_libraries
from .distributed import ControlPlane, StopSignal, explain_failure, full_tensor, make_accelerator, sharding_summary
from .errors import ConfigError, Interrupted, UserError
from .faults import fault_callbacks
from .optim import NonFiniteGuard, Schedule, batch_geometry, build_scheduler, current_lr, make_schedule, peak_lr
from .seeding import generator_state, seed_generators, set_generator_state
from .tracking import IntervalLog, Tracker, peak_flops

# ----------------------------------------------------------------------------- hooks


class Callbacks(Callback):
    """Several callbacks called in order: what the loop holds."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_loader_spec(self, spec):
        for cb in self.callbacks:
            spec = cb.on_loader_spec(spec)
        return spec

    def on_loader(self, loader, spec, epoch: int, start_batch: int):
        for cb in self.callbacks:
            loader = cb.on_loader(loader, spec, epoch, start_batch)
        return loader

    def on_batch(self, batch) -> None:
        for cb in self.callbacks:
            cb.on_batch(batch)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        for cb in self.callbacks:
            loss = cb.on_loss(step, loss)
        return loss

    def after_step(self, step: int) -> None:
        for cb in self.callbacks:
            cb.after_step(step)

    def stop_reason(self, step: int) -> str | None:
        return next((reason for cb in self.callbacks if (reason := cb.stop_reason(step))), None)

    def before_checkpoint_commit(self, partial: Path, step: int) -> None:
        for cb in self.callbacks:
            cb.before_checkpoint_commit(partial, step)

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(step, scalars)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        from contextlib import ExitStack

        with ExitStack() as stack:
            for cb in self.callbacks:
                stack.enter_context(cb.phase(name))
            yield

    def on_end(self, run: Run, model: torch.nn.Module, step: int) -> None:
        for cb in self.callbacks:
            cb.on_end(run, model, step)


# ----------------------------------------------------------------------------- the run and the stage


@dataclass
class Run:
    """One run of a stage: its config, folder, processes and console (made by `open_run`)."""

    cfg: Any
    run_dir: Path
    accelerator: Any
    console: Console
    resume_from: Path | None
    resume: str | None
    callbacks: Callbacks = field(default_factory=Callbacks)
    changed: list[str] = field(default_factory=list)  # keys that differ from the run folder's config (resume)
    tracker: Tracker | None = None  # TensorBoard, once the loop (or a stage that trains nothing) opened the records
    metrics: rundir.MetricsLog | None = None  # metrics.jsonl (main process), opened with the tracker
    schedule: Schedule | None = None  # the run's length, set by the loop right after `Stage.setup`
    logical_ranks: int | None = (
        None  # the run's for life (train.logical_ranks, or its checkpoint's); None: one per process
    )
    run_id: str | None = None  # the run folder's identity (rundir.run_id), which its checkpoints carry
    allow_changes: bool = False  # --allow-changes: a changed key, another run's checkpoint or other data may be resumed
    notes: list[str] = field(default_factory=list)  # what --allow-changes let through, for the config history

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def ranks(self) -> int:
        """The run's logical ranks: its data streams and random states (docs/distributed.md, "Elastic resume")."""
        return self.logical_ranks or self.world

    @property
    def hosted(self) -> range:
        """The logical ranks this process hosts: itself alone unless the run has more logical ranks than processes."""
        k = self.ranks // self.world
        return range(self.rank * k, (self.rank + 1) * k)

    @property
    def geometry(self):
        """Per-device batch and accumulation from `train.global_batch` (a one-sentence error if impossible)."""
        return batch_geometry(self.cfg.train, self.world, self.ranks)

    @property
    def peak_lr(self) -> float:
        return peak_lr(self.cfg.optim, self.geometry.global_batch)

    def open_records(
        self, resumed_at: int | None, namespace: str = "train"
    ) -> tuple[Tracker, rundir.MetricsLog | None]:
        """config.yaml (+ its history), metrics.jsonl and TensorBoard, whose scalars go under `namespace`
        (`Stage.namespace`); on resume, what came after `resumed_at` is dropped."""
        metrics = None
        if self.accelerator.is_main_process:
            segment = rundir.record_config(self.run_dir, self.cfg, resumed_at or 0, self.resume_from, self.notes)
            for note in self.notes:
                self.console.warn(f"{note}; {segment} records it")
            if self.changed and self.resume_from is not None:
                self.console.warn(
                    f"continuing under changed keys {', '.join(self.changed)} (--allow-changes); "
                    f"{segment} records the config of the steps from here"
                )
            metrics = self.metrics = rundir.MetricsLog(self.run_dir, resumed_at)
        tracker = self.tracker = Tracker(self.accelerator, "tensorboard", flatten(self.cfg), resumed_at, namespace)
        if resumed_at is None:
            tracker.text("config", "```\n" + dump_yaml(self.cfg) + "```", 0)
        return tracker, metrics


def open_run(
    cfg,
    run_dir: Path,
    resume: str | None,
    *,
    resumable_keys: Sequence[str] = (),
    allow_changes: bool = False,
    callbacks: Sequence[Callback] = (),
) -> Run:
    """Accelerate and the seed; lock the run folder; refuse to reuse another run's folder, or to resume
    under keys outside `resumable_keys` unless `allow_changes`; find the checkpoint to resume.

    The main process decides (it alone holds the lock) and tells the others, so every rank
    stops with the same one-sentence error, or none does. The loop's callbacks are those
    `cfg.debug` asks for (fault injection), then `callbacks`."""
    from accelerate.utils import broadcast_object_list, set_seed

    rundir.check_location(run_dir, cfg.run.name)
    quiet_libraries()
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision, project_dir=run_dir)
    console = Console(accelerator.is_main_process)
    set_seed(cfg.train.seed)
    decision: dict[str, Any] = {}
    failure: Exception | None = None
    if accelerator.is_main_process:
        try:
            note = rundir.lock_run_folder(run_dir)
            resume_from = rundir.resolve_resume(run_dir, resume)
            changed = rundir.check_reuse(run_dir, cfg, resume, ignore=resumable_keys)
            rundir.refuse_changes(run_dir, cfg, changed, resume_from, allow_changes)
            origin = rundir.check_checkpoint_origin(run_dir, resume_from, allow_changes)
            ranks = decide_logical_ranks(
                getattr(cfg.train, "logical_ranks", None), resume_from, accelerator.num_processes
            )
            decision = {
                "note": note,
                "resume_from": resume_from,
                "changed": changed,
                "logical_ranks": ranks,
                "run_id": rundir.claim_run_id(run_dir),
                "notes": [origin] if origin else [],
            }
        except Exception as err:  # noqa: BLE001 - the other ranks must learn of any failure, or they wait forever
            failure, decision = err, {"error": str(err) if isinstance(err, UserError) else None}
    decision = broadcast_object_list([decision])[0]
    if failure is not None:
        raise failure
    if "error" in decision:
        stopped = UserError(decision["error"] or "the main process failed; its message above names the cause")
        stopped.same_on_every_rank = True  # the main process prints it
        raise stopped
    if decision["note"]:
        console.warn(decision["note"])
    return Run(
        cfg,
        Path(run_dir),
        accelerator,
        console,
        decision["resume_from"],
        resume,
        Callbacks([*fault_callbacks(cfg.debug), *callbacks]),
        changed=decision["changed"],
        logical_ranks=decision["logical_ranks"],
        run_id=decision["run_id"],
        allow_changes=allow_changes,
        notes=decision["notes"],
    )


def decide_logical_ranks(configured: int | None, resume_from: Path | None, processes: int) -> int:
    """The run's logical ranks: its checkpoint's when resuming (refused when `processes` cannot host them,
    or when `configured` differs), else `configured` (train.logical_ranks), else one per process."""
    if resume_from is not None:
        try:
            state = read_state(resume_from)
        except (OSError, ValueError):  # Checkpointer.load names the damage
            state = None
        if state is not None:
            return logical_ranks_of(state, resume_from, processes, configured)
    ranks = configured or processes
    if ranks % processes:
        raise ConfigError(
            f"Key 'train.logical_ranks' is {ranks}, which {processes} processes cannot share evenly; "
            f"set a multiple of {processes} (a run that may grow later: a multiple of every process "
            "count it may run on), or null for one per process."
        )
    return ranks


@dataclass
class Plan:
    """What a stage trains and on what (from `Stage.setup`)."""

    model: torch.nn.Module  # trained as a whole; its forward is the stage's business
    optimizer: torch.optim.Optimizer  # over `model`'s parameters, at `run.peak_lr`
    loader: Any  # a `vitmpp.datasets.LoaderFactory` of the training data: each epoch's spec and loader
    num_samples: int  # training samples in one epoch (what `train.epochs` counts)
    description: str  # one line for the start banner, e.g. "pretraining mpp on ... (1438 images)"


class Stage(ABC):
    """What a stage plugs into the loop (`setup` and `forward` are required). The loop calls, in this order:

    setup -> (flops_per_image) -> begin -> [forward ... after_step] per step -> finish;
    state_dict on every checkpoint, load_state_dict on resume.
    """

    name = "train"  # the progress bar's label
    resumable_keys: tuple[str, ...] = ()  # config keys that may change on --resume

    @property
    def namespace(self) -> str:
        """Where TensorBoard files the stage's scalars (`<namespace>/loss`, `system/<namespace>/...`): one
        name per kind of stage, so that two kinds never share a chart. Defaults to `name`."""
        return self.name

    @abstractmethod
    def setup(self, run: Run) -> Plan:
        """Build the model, its optimizer (at `run.peak_lr`) and the training data's spec."""

    @abstractmethod
    def forward(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, Any]:
        """One micro-batch (uint8 `Batch` on the host) -> (scalar loss, whatever after_step wants)."""

    def begin(self, step: int, total_steps: int) -> None:
        """Before the first step of this process, fresh (`step` 0) or resumed: the run's length is known."""

    def after_step(self, step: int, model: torch.nn.Module, output: Any) -> bool:
        """Between steps: pictures, evaluation. Return True to write a checkpoint now."""
        return False

    def finish(self, step: int, model: torch.nn.Module) -> Any:
        """After the last step and checkpoint: exports and results; the return value is the run's."""
        return None

    def flops_per_image(self, model: torch.nn.Module) -> float | None:
        """Training FLOPs per image for MFU (asked only when the device's peak is known)."""
        return None

    def state_dict(self) -> dict:
        """The stage's own JSON state, saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (the whole checkpoint state is passed)."""


# ----------------------------------------------------------------------------- one optimizer step


class HostedRanks:
    """The random generators of the logical ranks one process hosts (`Run.hosted`; docs/distributed.md).

    The process's own generators (torch's CPU generator, on a GPU its device's, numpy's and python's
    global ones) are those of the first hosted logical rank; the states of the others are kept here
    and swapped in around their forwards and backwards (`active`), so that every logical rank draws
    its masks, drop-path, mixup and erasing from its own streams, whichever process hosts it. A
    process hosting only itself (as many processes as logical ranks) swaps nothing.
    """

    def __init__(self, ranks: Sequence[int], device: torch.device):
        self.ranks = list(ranks)
        self.device = device
        self.others: dict[int, tuple] = {}

    def _get(self) -> dict:
        return generator_state(self.device)

    def _set(self, state: dict) -> None:
        set_generator_state(state, self.device)

    def start(self, seed: int) -> None:
        """A fresh run: give every logical rank a random stream of its own.

        The process's generators stand, on every process alike, where `train.seed` and the model's
        initialisation left them (the same initial weights everywhere, which FSDP needs). From there
        logical rank 0 goes on as it is (a one-process run draws what it always drew), and logical
        rank l > 0 starts from a seed made of (train.seed, l): otherwise every rank would draw the
        same masks, drop-path and augmentations for its images, as MAE's reference code avoids by
        seeding `seed + rank`.
        """
        own = self._get()
        states = {}
        for rank in self.ranks:
            if rank == 0:
                states[rank] = own
                continue
            self._seed(seed, rank)
            states[rank] = self._get()
        self._set(states[self.ranks[0]])
        self.others = {rank: states[rank] for rank in self.ranks[1:]}

    def _seed(self, seed: int, rank: int) -> None:
        import numpy as np

        seed_generators(
            int(np.random.SeedSequence([seed & 0xFFFFFFFF, rank, 0x10C4]).generate_state(1, np.uint64)[0] >> 1),
            self.device,
        )

    @contextmanager
    def active(self, slot: int) -> Iterator[None]:
        """Around the work of hosted logical rank number `slot` (0: the process's own; nothing to swap)."""
        if slot == 0:
            yield
            return
        rank, own = self.ranks[slot], self._get()
        self._set(self.others[rank])
        try:
            yield
        finally:
            self.others[rank] = self._get()
            self._set(own)

    def state_dict(self) -> dict[int, dict]:
        """{logical rank: {"cpu", "cuda" (None off a GPU), "numpy", "python": generator state}} of every
        hosted logical rank, as of now."""
        return {self.ranks[0]: self._get(), **self.others}

    def load_state_dict(self, states: dict[int, dict]) -> None:
        self._set(states[self.ranks[0]])
        self.others = {rank: states[rank] for rank in self.ranks[1:]}


class StepRunner:
    """One optimizer step from `accumulation` micro-batches (of each hosted logical rank).

    Gradients are all-reduced only on the last forward (`no_sync` before it); the loss is
    divided by the forwards of the step (accumulation x hosted logical ranks) so the gradient
    is the mean over the global batch; the gradient norm is always computed (and clipped when
    asked); finiteness is agreed across ranks before the step; the learning rate of the step
    is set from the step number alone. Nothing here synchronises the host.

    A process hosting k logical ranks (`ranks`, a `HostedRanks`) takes its micro-batches k at a
    time, one of each hosted logical rank in order, each under that rank's random state.
    """

    def __init__(
        self,
        accelerator,
        model,
        optimizer,
        scheduler,
        guard: NonFiniteGuard,
        accumulation: int,
        clip_grad: float | None,
        hooks: Callback | None = None,
        ranks: HostedRanks | None = None,
    ):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.guard = guard
        self.accumulation = accumulation
        self.clip = clip_grad if clip_grad is not None else float("inf")
        self.hooks = hooks or Callback()
        self.ranks = ranks
        self.hosted = len(ranks.ranks) if ranks is not None else 1

    def run(self, step: int, forward, micro_batches):
        """`forward(micro_batch) -> (loss, output)`; returns (step loss, grad norm, last output of the
        first hosted logical rank)."""
        acc, hosted = self.accelerator, self.hosted
        forwards = self.accumulation * hosted
        step_loss = torch.zeros((), device=acc.device)
        output = None
        for micro, batch in enumerate(micro_batches):
            syncing = micro == forwards - 1
            with self.ranks.active(micro % hosted) if hosted > 1 else nullcontext():
                with nullcontext() if syncing else acc.no_sync(self.model):
                    with acc.autocast():
                        loss, out = forward(batch)
                    loss = self.hooks.on_loss(step, loss / forwards)
                    acc.backward(loss)
            if micro % hosted == 0:
                output = out
            step_loss += loss.detach().float()
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.clip)
        if grad_norm is None:  # some backends return nothing; compute it the plain way
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        grad_norm = full_tensor(grad_norm)  # FSDP2: a DTensor, which plain collectives and logging cannot take
        finite = self.guard.agree(step_loss, grad_norm)  # the same decision on every rank
        self.scheduler.step_update(step)  # the lr of this step is a function of the step alone
        self.guard.step(self.optimizer, finite)
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm.detach().float(), output


class SaveLogicalRng(Callback):
    """Writes the random states of the logical ranks this process hosts into every checkpoint
    (`checkpoint.save_logical_rng`), between Accelerate's state and the completion mark."""

    def __init__(self, ranks: HostedRanks):
        self.ranks = ranks

    def before_checkpoint_commit(self, partial: Path, step: int) -> None:
        save_logical_rng(partial, self.ranks.state_dict())


class HostedLoaders:
    """The loaders of the logical ranks one process hosts, read in turn: one batch of each, in the order of
    the ranks, per micro-step. Keeps the `Loader` contract's counts (summed) and the shard loader's
    `retries` (a count of the process)."""

    def __init__(self, loaders: Sequence[Any]):
        self.loaders = list(loaders)

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    @property
    def skipped_samples(self) -> int:
        return sum(loader.skipped_samples for loader in self.loaders)

    @property
    def retries(self) -> float:
        return getattr(self.loaders[0], "retries", float("nan"))

    def __iter__(self):
        iterators = [iter(loader) for loader in self.loaders]
        try:
            while True:
                for iterator in iterators:
                    batch = next(iterator, None)
                    if batch is None:
                        return
                    yield batch
        finally:  # end every loader's workers now, not when the iterators are collected
            for iterator in iterators:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()


@contextmanager
def guarded_loop(rank: int, console: Console):
    """Around a training loop: stop signals are remembered (not fatal), torch's cryptic
    failures (a dead loader worker, a lost peer) become one-sentence errors, and the
    progress bar is closed whatever happens. Yields the `StopSignal` to poll."""
    stop = StopSignal().install()
    try:
        yield stop
    except RuntimeError as err:
        explained = explain_failure(err, rank)
        if explained is None:
            raise
        raise explained from None
    finally:
        stop.uninstall()
        console.close_bar()


def check_resume_point(state: dict, path: Path, schedule: Schedule, geometry) -> None:
    """The loop continues from a checkpoint's step with this config's geometry; refuse when that step is
    past the run's end, or when it would read the data elsewhere than the checkpoint stopped (its epoch
    and images into the epoch, from `Loop.save`): a changed global batch or training set moves it."""
    step = state["step"]
    if step > schedule.total_steps:
        raise ConfigError(
            f"Checkpoint {path} is at step {step}, past the {schedule.total_steps} steps this config "
            "trains; set train.steps (or train.epochs) to at least that, or resume from an earlier checkpoint."
        )
    if "batch_in_epoch" not in state:  # written before the data position was saved
        return
    # batch_in_epoch counts the batches of one logical rank (of one process, before logical ranks were recorded)
    ranks = state.get("logical_ranks", state["world_size"])
    saved = (state["epoch"], state["batch_in_epoch"] * state["per_device_batch"] * ranks)
    epoch, step_in_epoch = divmod(step, schedule.steps_per_epoch)
    if saved != (epoch, step_in_epoch * geometry.global_batch):
        raise ConfigError(
            f"Checkpoint {path} stopped {saved[1]} images into epoch {saved[0]} "
            f"at global batch {state['global_batch']}, "
            f"but with global batch {geometry.global_batch} and {schedule.steps_per_epoch} steps per epoch its step "
            f"{step} would continue {step_in_epoch * geometry.global_batch} images into epoch {epoch}; resume with "
            f"train.global_batch={state['global_batch']} and the same training data, or start a new run."
        )


def check_same_data(state: dict, path: Path, identity: dict | None, allow: bool) -> str | None:
    """Refuse to resume a checkpoint onto other data than it was trained on (`LoaderSpec.identity`:
    data set, split, shard names, counts and sizes; not where the shards are), unless `allow`
    (--allow-changes): then return a note for the config history."""
    saved = state.get("data")
    if saved is None or identity is None or saved == identity:  # (a checkpoint of an older version has none)
        return None

    def told(data: dict) -> str:
        kept = f", {data['kept']} of them kept" if "kept" in data else ""
        shards = data.get("shards")
        return (
            f"split '{data.get('split')}' of '{data.get('name')}' ({data.get('samples')} samples in "
            f"{shards} shard{'' if shards == 1 else 's'}{kept}, digest {data.get('digest')})"
        )

    what = f"Checkpoint {path} was trained on {told(saved)}, but data.shards now names {told(identity)}"
    if allow:
        return f"{what}; continued on it under --allow-changes"
    raise UserError(
        f"{what}; point data.shards at the shards the run was trained on (the same shards in another "
        "place are fine), or pass --allow-changes to continue on these."
    )


# ----------------------------------------------------------------------------- the loop


def train(stage: Stage, run: Run) -> Any:
    """Run `stage` to the end (returns `stage.finish(...)`) or to a stop request (returns None;
    after Ctrl-C raises `errors.Interrupted`, exit 130)."""
    return Loop(stage, run).fit()


class Loop:
    """One run of a stage through the loop. `__init__` prepares everything (and restores a
    checkpoint); `fit` is the loop itself. The attributes are the run's state: `step` (optimizer
    steps done), `loader` (this epoch's), `skipped_before` (samples skipped in earlier epochs)."""

    def __init__(self, stage: Stage, run: Run):
        cfg, acc = run.cfg, run.accelerator
        self.stage, self.run, self.cfg, self.hooks, self.console = stage, run, cfg, run.callbacks, run.console
        self.geometry = geometry = run.geometry
        self.plan = plan = stage.setup(run)
        self.schedule = run.schedule = make_schedule(cfg.train, cfg.optim, plan.num_samples, geometry.global_batch)
        scheduler = build_scheduler(plan.optimizer, cfg.optim, self.schedule.total_steps, self.schedule.warmup_steps)
        peak = peak_flops(cfg.train.peak_tflops)
        flops = stage.flops_per_image(plan.model) if peak else None
        model = torch.compile(plan.model) if cfg.train.compile else plan.model
        self.model, self.optimizer = acc.prepare(model, plan.optimizer)
        self.control = ControlPlane(acc)
        self.ranks = HostedRanks(run.hosted, run.device)
        # every checkpoint holds every logical rank's random state, whatever process hosts it (before the
        # debug hooks, which may kill a save in progress)
        self.checkpointer = Checkpointer(
            acc,
            run.run_dir,
            cfg.log.keep_checkpoints,
            self.control,
            Callbacks([SaveLogicalRng(self.ranks), self.hooks]),
        )
        self.guard = NonFiniteGuard(acc, self.optimizer, cfg.train.max_nonfinite_steps)
        self.runner = StepRunner(
            acc,
            self.model,
            self.optimizer,
            scheduler,
            self.guard,
            geometry.accumulation,
            cfg.optim.clip_grad,
            self.hooks,
            ranks=self.ranks,
        )

        # fresh or resumed: model, optimizer and RNGs from Accelerate's state, the rest from our JSON
        self.step, self.skipped_before, nonfinite_before, self.loader, self.output = 0, 0, 0, None, None
        # The data-loading workers are part of each logical rank's sample stream (datasets/loader.py), so
        # their number is fixed at the run's start like the logical ranks; a resume with another
        # data.num_workers starts that many processes, each playing some of the run's logical workers.
        self.data_workers = plan.loader.num_workers
        self.data_identity = plan.loader.identity() if hasattr(plan.loader, "identity") else None
        if run.resume_from is not None:
            state = self.checkpointer.load(run.resume_from)
            check_resume_point(state, run.resume_from, self.schedule, geometry)
            note = check_same_data(state, run.resume_from, self.data_identity, run.allow_changes)
            if note:
                run.notes.append(note)
            self.data_workers = int(state.get("data_workers", self.data_workers))
            if "logical_ranks" in state:  # else written by as many processes as now: Accelerate restored them
                self.ranks.load_state_dict(load_logical_rng(run.resume_from, run.hosted))
            self.step, self.skipped_before, nonfinite_before = (
                state["step"],
                state["skipped_samples"],
                state["nonfinite_steps"],
            )
            stage.load_state_dict(state)
            self.console.print(f"resumed from {run.resume_from} at step {self.step}")
        elif run.resume is not None:
            self.console.print(f"no checkpoint in {checkpoints_dir(run.run_dir)}; starting from step 0")
        # a resumed run drops what the interrupted attempt logged after its checkpoint (all of it, without one)
        self.tracker, metrics = run.open_records(self.step if run.resume is not None else None, stage.namespace)
        self.log = IntervalLog(
            acc,
            self.tracker,
            self.console,
            self.guard,
            metrics=metrics,
            total_steps=self.schedule.total_steps,
            steps_per_epoch=self.schedule.steps_per_epoch,
            flops_per_image=flops,
            peak=peak,
            nonfinite_before=nonfinite_before,
        )
        self.log.last_checkpoint = self.checkpointer.last
        hosting = f"{geometry.hosted} logical ranks x " if geometry.hosted > 1 else ""
        self.console.print(
            f"{plan.description}: {run.world} process(es) x {hosting}{geometry.per_device_batch} images x "
            f"{geometry.accumulation} accumulation = global batch {geometry.global_batch}; "
            f"{self.schedule.total_steps} steps ({self.schedule.steps_per_epoch}/epoch), peak lr "
            f"{self.schedule.peak_lr:.3g}, precision {acc.mixed_precision}, device {run.device}"
        )
        self.console.print(f"run directory: {run.run_dir}    watch: tensorboard --logdir {run.run_dir}")
        if (sharding := sharding_summary(acc, self.model)) is not None:
            self.console.print(sharding)
        stage.begin(self.step, self.schedule.total_steps)  # draws nothing
        if run.resume_from is None:  # last: nothing above may draw from a generator the hosted ranks copy
            self.ranks.start(self.cfg.train.seed)

    def fit(self) -> Any:
        cfg, schedule, hooks = self.cfg, self.schedule, self.hooks
        self.console.start_bar(schedule.total_steps, initial=self.step, desc=self.stage.name)
        with guarded_loop(self.run.rank, self.console) as stop:
            while self.step < schedule.total_steps:
                batches = self.open_epoch()
                epoch_end = min(
                    schedule.total_steps, (self.step // schedule.steps_per_epoch + 1) * schedule.steps_per_epoch
                )
                while self.step < epoch_end:
                    self.train_step(batches)
                    if self.step % cfg.log.log_every == 0:
                        self.flush_log()
                    with hooks.phase("stage"):
                        checkpoint_now = self.stage.after_step(self.step, self.model, self.output)
                    hooks.after_step(self.step)

                    reason = stop.signal_name if stop.requested else hooks.stop_reason(self.step)
                    if self.control.any(reason is not None):  # every rank stops at the same step
                        return self.stop(reason or "a signal to another rank", stop)
                    if checkpoint_now or (
                        self.step % cfg.log.checkpoint_every == 0 and self.step < schedule.total_steps
                    ):
                        self.save(periodic=True)
                self.skipped_before, self.loader = self.skipped_samples(), None
                del batches  # the epoch's loader ends before the next one opens (its workers serve the next, loader.py)

            if self.checkpointer.last is None or self.checkpointer.last.name != f"step-{self.step:07d}":
                self.save()
            self.flush_log()
            self.console.close_bar()
            with hooks.phase("finish"):
                result = self.stage.finish(self.step, self.model)
            hooks.on_end(self.run, self.model, self.step)
            self.tracker.close()
            return result

    def open_epoch(self):
        """This epoch's loader, from the batch the current step starts at; returns its iterator.

        A process hosting several logical ranks opens one loader per hosted rank (the stream of that
        rank among all of them, with the run's logical workers) and reads them in turn (`HostedLoaders`);
        their worker processes share `data.num_workers` (the loader's `max_worker_processes`)."""
        accumulation, steps_per_epoch = self.geometry.accumulation, self.schedule.steps_per_epoch
        epoch, step_in_epoch = divmod(self.step, steps_per_epoch)
        start_batch = step_in_epoch * accumulation
        hosted = self.run.hosted
        loaders = []
        for rank in hosted:
            fields: dict[str, Any] = {
                "batches_per_epoch": steps_per_epoch * accumulation,
                "num_workers": self.data_workers,
            }
            options: dict[str, Any] = {}
            if len(hosted) > 1:
                fields.update(rank=rank, world_size=self.run.ranks)
            if len(hosted) > 1 or self.data_workers != self.plan.loader.num_workers:
                options["max_worker_processes"] = self.plan.loader.num_workers // len(hosted)
            spec = self.hooks.on_loader_spec(self.plan.loader.epoch_spec(**fields))
            loader = self.plan.loader.open(spec, epoch=epoch, start_batch=start_batch, **options)
            loaders.append(self.hooks.on_loader(loader, spec, epoch, start_batch))
        self.loader = loaders[0] if len(loaders) == 1 else HostedLoaders(loaders)
        return iter(self.loader)

    def train_step(self, batches) -> None:
        """One optimizer step from the next `accumulation` micro-batches (of each hosted logical rank);
        values stay on the device."""

        def micro_batches():
            for batch in self.log.timed(batches, self.geometry.accumulation * self.geometry.hosted):
                self.hooks.on_batch(batch)
                yield batch

        model = self.model
        model.train()  # every step: a stage's evaluation in after_step leaves it in eval mode
        with self.hooks.phase("step"):
            loss, grad_norm, self.output = self.runner.run(
                self.step, lambda batch: self.stage.forward(model, batch), micro_batches()
            )
        self.step += 1
        self.log.add(
            self.step,
            loss,
            grad_norm,
            current_lr(self.optimizer),
            self.geometry.per_device_batch * self.geometry.accumulation * self.geometry.hosted,
        )
        self.console.update_bar(1)

    def skipped_samples(self) -> int:
        # the loader counts this epoch from its start batch; earlier epochs are in skipped_before
        return self.skipped_before + (self.loader.skipped_samples if self.loader is not None else 0)

    def flush_log(self) -> None:
        """The interval's one host sync: console line, TensorBoard scalars, metrics.jsonl rows."""
        with self.hooks.phase("log"):
            scalars = self.log.flush(
                {
                    "skipped_samples": self.skipped_samples(),  # + retried shard reads (a NaN is not logged)
                    "retries": getattr(self.loader, "retries", float("nan")),
                }
            )
        if scalars is not None:
            self.hooks.on_log(self.step, scalars)

    def save(self, periodic: bool = False) -> Path | None:
        """A checkpoint of this step (Accelerate's state + ours); a periodic one is skipped
        inside a run of non-finite steps, so the newest checkpoint is always a good one."""
        with self.hooks.phase("checkpoint"):
            self.flush_log()
            if periodic and self.guard.read()[1] > 0:
                self.console.warn(f"step {self.step}: not saving a checkpoint during a run of non-finite steps")
                return None
            steps_per_epoch, geometry = self.schedule.steps_per_epoch, self.geometry
            state = {
                "step": self.step,
                "epoch": self.step // steps_per_epoch,
                "batch_in_epoch": (self.step % steps_per_epoch) * geometry.accumulation,
                "world_size": self.run.world,
                "logical_ranks": self.run.ranks,
                "data_workers": self.data_workers,
                "global_batch": geometry.global_batch,
                "per_device_batch": geometry.per_device_batch,
                "accumulation": geometry.accumulation,
                "skipped_samples": self.skipped_samples(),
                "nonfinite_steps": self.log.nonfinite_steps(),
                "config_fingerprint": rundir.config_fingerprint(self.cfg),
                "stage": self.stage.name,
                "time": time.time(),
                "run_id": self.run.run_id,
                "run_dir": str(self.run.run_dir.resolve()),
                "data": self.data_identity,
                **self.stage.state_dict(),
            }
            path = self.log.last_checkpoint = self.checkpointer.save(self.step, state)
            self.tracker.flush()
            return path

    def stop(self, reason: str, signals: StopSignal | None = None) -> None:
        """A stop request (a signal, `debug.stop_at_step`): checkpoint this step and return;
        after Ctrl-C, raise `Interrupted` (exit 130, no traceback) once the checkpoint is written."""
        path = self.save()
        self.console.close_bar()
        self.console.print(f"stopped by {reason} at step {self.step}; checkpoint {path}; continue with --resume auto")
        self.tracker.close()
        if signals is not None and signals.interrupted:
            raise Interrupted()
        return None
