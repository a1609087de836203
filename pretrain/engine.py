"""The pretraining engine: one loop, readable in one sitting.

    shards --build_loader--> uint8 batches --normalise on device--> objective (mpp | mae | supervised)
        --> loss --backward (DDP/FSDP via Accelerate)--> clip --agree finiteness--> optimizer step

Every `log.log_every` steps: one host sync to read the step losses, a console line,
TensorBoard scalars and `metrics.jsonl` rows. Every `log.checkpoint_every` steps and
at the end: an atomic checkpoint. At the end: `encoder.safetensors` + `encoder.json`.

Resuming restores model, optimizer, every RNG and the data position (epoch, batch),
so the losses after a resume are the ones an uninterrupted run would have had.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vitmpp.common import rundir
from vitmpp.common.config import dump_yaml, flatten
from vitmpp.common.console import Console, quiet_libraries
from vitmpp.common.distributed import make_accelerator
from vitmpp.common.errors import UserError
from vitmpp.common.faults import ExitAfterCalls
from vitmpp.common.training import (
    Checkpointer,
    ControlPlane,
    IntervalLog,
    NonFiniteGuard,
    StepRunner,
    Tracker,
    batch_geometry,
    build_optimizer,
    build_scheduler,
    guarded_loop,
    config_fingerprint,
    current_lr,
    peak_flops,
    peak_lr,
    warmup_steps,
)
from vitmpp.datasets import build_loader, ensure_digits_shards, normalize_batch, pretrain_transform, read_manifest
from vitmpp.models import create_objective, encoder_from_config, flops_per_image, save_encoder

from .config import RESUMABLE_KEYS, PretrainConfig


@dataclass
class Schedule:
    """How long the run is, in optimizer steps, derived from the manifest and the batch."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float


def resolve_shards(cfg: PretrainConfig, accelerator) -> str:
    """The shards to train on; the embedded default writes digits shards to the cache once."""
    if cfg.data.shards:
        return cfg.data.shards
    out = rundir.cache_dir() / f"digits-{cfg.model.img_size}px"
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            ensure_digits_shards(out, image_size=cfg.model.img_size)
    return str(out)


def make_schedule(cfg: PretrainConfig, num_samples: int, global_batch: int) -> Schedule:
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch < 1:
        raise UserError(
            f"The training split has {num_samples} samples, fewer than one global batch of {global_batch}; "
            "lower train.global_batch or add data."
        )
    total = cfg.train.steps if cfg.train.steps is not None else max(1, round(cfg.train.epochs * steps_per_epoch))
    return Schedule(steps_per_epoch, total, warmup_steps(cfg.optim, steps_per_epoch), peak_lr(cfg.optim, global_batch))


def train(cfg: PretrainConfig, run_dir: Path, resume: str | None = None) -> Path:
    """Pretrain an encoder as `cfg` says, in `run_dir`; returns `run_dir`."""
    quiet_libraries()
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision, project_dir=run_dir)
    console = Console(accelerator.is_main_process)
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    rank, world = accelerator.process_index, accelerator.num_processes

    # ---- run directory: never silently reuse another run's folder
    resume_from = rundir.resolve_resume(run_dir, resume)
    changed = rundir.check_reuse(run_dir, cfg, resume, ignore=RESUMABLE_KEYS)
    if changed:
        console.warn(f"resuming with changed config keys: {', '.join(changed)}")
    accelerator.wait_for_everyone()

    # ---- data and schedule
    shards = resolve_shards(cfg, accelerator)
    manifest = read_manifest(shards)
    split = manifest.split(cfg.data.train_split)
    geometry = batch_geometry(cfg.train, world)
    plan = make_schedule(cfg, split.num_samples, geometry.global_batch)
    transform = pretrain_transform(cfg.model.img_size, scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip,
                                   interpolation=cfg.data.interpolation)
    if cfg.debug.kill_worker_after_samples is not None:
        transform = ExitAfterCalls(transform, cfg.debug.kill_worker_after_samples)

    # ---- model, objective, optimizer
    objective = create_objective(cfg.objective, encoder_from_config(cfg.model), mean=cfg.data.mean, std=cfg.data.std,
                                 num_classes=manifest.num_classes, **cfg.objective_options())
    peak = peak_flops(cfg.train.peak_tflops)
    flops = flops_per_image(objective, cfg.model.img_size) if peak else None
    optimizer = build_optimizer(objective, cfg.optim, plan.peak_lr)
    scheduler = build_scheduler(optimizer, cfg.optim, plan.total_steps, plan.warmup_steps)
    model, optimizer = accelerator.prepare(torch.compile(objective) if cfg.train.compile else objective, optimizer)
    device = accelerator.device
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)

    control = ControlPlane(accelerator)
    checkpointer = Checkpointer(accelerator, run_dir, cfg.log.keep_checkpoints, control, cfg.debug.checkpoint_delay_s,
                                cfg.debug.checkpoint_disk_full_at_step)
    guard = NonFiniteGuard(accelerator, optimizer, cfg.train.max_nonfinite_steps)

    # ---- state: fresh or resumed
    step, skipped_before, nonfinite_before = 0, 0, 0
    if resume_from is not None:
        state = checkpointer.load(resume_from)
        step, skipped_before, nonfinite_before = state["step"], state["skipped_samples"], state["nonfinite_steps"]
        console.print(f"resumed from {resume_from} at step {step}")
    elif resume is not None:
        console.print(f"no checkpoint in {rundir.checkpoints_dir(run_dir)}; starting from step 0")
    resumed_at = step if resume_from is not None else None
    metrics = None
    if accelerator.is_main_process:
        rundir.write_config(run_dir, cfg)
        metrics = rundir.MetricsLog(run_dir, resumed_at)
    tracker = Tracker(accelerator, "tensorboard", flatten(cfg), resumed_at)
    if resumed_at is None:
        tracker.text("config", "```\n" + dump_yaml(cfg) + "```", 0)

    console.print(
        f"pretraining {cfg.objective} on {shards} ({split.num_samples} images): {world} process(es) x "
        f"{geometry.per_device_batch} images x {geometry.accumulation} accumulation = global batch {geometry.global_batch}; "
        f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch), peak lr {plan.peak_lr:.3g}, "
        f"precision {accelerator.mixed_precision}, device {device}"
    )
    console.print(f"run directory: {run_dir}    watch: tensorboard --logdir {run_dir}")

    log = IntervalLog(accelerator, tracker, console, guard, metrics=metrics,
                      total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch, flops_per_image=flops,
                      peak=peak, nonfinite_before=nonfinite_before)
    log.last_checkpoint = checkpointer.last
    runner = StepRunner(accelerator, model, optimizer, scheduler, guard, geometry.accumulation, cfg.optim.clip_grad)
    poison_rank = cfg.debug.inject_nonfinite_rank in (None, rank)
    loader = None

    def skipped_samples() -> int:
        # the loader counts this epoch from its start batch; earlier epochs are in skipped_before
        return skipped_before + (loader.skipped_samples if loader is not None else 0)

    def flush_log() -> None:
        log.flush({"data/skipped_samples": skipped_samples()})

    def save(at_step: int, periodic: bool = False) -> Path | None:
        flush_log()
        if periodic and guard.read()[1] > 0:
            # inside a run of non-finite steps: keep the last good checkpoint as the newest one
            console.warn(f"step {at_step}: not saving a checkpoint during a run of non-finite steps")
            return None
        state = {
            "step": at_step, "epoch": at_step // plan.steps_per_epoch,
            "batch_in_epoch": (at_step % plan.steps_per_epoch) * geometry.accumulation,
            "world_size": world, "global_batch": geometry.global_batch, "per_device_batch": geometry.per_device_batch,
            "accumulation": geometry.accumulation, "skipped_samples": skipped_samples(),
            "nonfinite_steps": log.nonfinite_steps(), "config_fingerprint": config_fingerprint(cfg),
            "objective": cfg.objective, "time": time.time(),
        }
        path = log.last_checkpoint = checkpointer.save(at_step, state)
        tracker.flush()
        return path

    seen: list[int] = []  # debug.record_samples: this rank's sample indices

    def forward(batch):
        if cfg.debug.record_samples:
            seen.extend(batch.indices.tolist())
        images = normalize_batch(batch.images.to(device, non_blocking=True), mean, std)
        output = model(images, batch.labels.to(device, non_blocking=True))
        return output.loss, (images, output)

    console.start_bar(plan.total_steps, initial=step, desc=cfg.objective)
    model.train()
    with guarded_loop(rank, console) as stop:
        while step < plan.total_steps:
            epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
            loader = build_loader(
                shards, split=cfg.data.train_split, batch_size=geometry.per_device_batch, transform=transform,
                training=True, epoch=epoch, seed=cfg.train.seed, rank=rank, world_size=world,
                num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                batches_per_epoch=plan.steps_per_epoch * geometry.accumulation,
                start_batch=step_in_epoch * geometry.accumulation, pin_memory=device.type == "cuda",
                max_skip_fraction=cfg.data.max_skip_fraction,
            )
            batches = iter(loader)
            epoch_end = min(plan.total_steps, (epoch + 1) * plan.steps_per_epoch)
            while step < epoch_end:
                poison = poison_rank and step + 1 in cfg.debug.inject_nonfinite_steps
                loss, grad_norm, (images, output) = runner.run(
                    step, forward, log.timed(batches, geometry.accumulation), poison=poison)
                step += 1
                log.add(step, loss, grad_norm, current_lr(optimizer), geometry.per_device_batch * geometry.accumulation)
                console.update_bar(1)
                if cfg.debug.step_delay_s:
                    time.sleep(cfg.debug.step_delay_s)

                # between steps: logging, pictures, stop requests, checkpoints
                if step % cfg.log.log_every == 0:
                    flush_log()
                if cfg.log.image_every and step % cfg.log.image_every == 0 and accelerator.is_main_process:
                    _log_images(tracker, objective, images, output, step)
                if cfg.log.analysis_every and step % cfg.log.analysis_every == 0 and accelerator.is_main_process:
                    _log_analysis(tracker, objective, images, step)
                if control.any(stop.requested or step == cfg.debug.stop_at_step):
                    path = save(step)
                    console.close_bar()
                    reason = stop.signal_name or ("debug.stop_at_step" if step == cfg.debug.stop_at_step else "a signal to another rank")
                    console.print(f"stopped by {reason} at step {step}; "
                                  f"checkpoint {path}; continue with --resume auto")
                    tracker.close()
                    return run_dir
                if step % cfg.log.checkpoint_every == 0 and step < plan.total_steps:
                    save(step, periodic=True)
            skipped_before, loader = skipped_samples(), None
            del batches

        if checkpointer.last is None or checkpointer.last.name != f"step-{step:07d}":
            save(step)
        flush_log()
        console.close_bar()
        export_encoder(accelerator, model, cfg, run_dir, step, shards)
        if cfg.debug.record_samples:
            _record(run_dir, rank, world, seen, model)
        console.print(f"done: {step} steps; encoder: {run_dir / 'encoder.safetensors'}")
        console.print(f"watch: tensorboard --logdir {run_dir}")
        tracker.close()
        return run_dir


def export_encoder(accelerator, model, cfg: PretrainConfig, run_dir: Path, step: int, shards: str) -> None:
    """Write encoder.safetensors + encoder.json from the full (gathered) state dict.

    `get_state_dict` gathers FSDP shards too; every rank must call it.
    """
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        prefix = "encoder."
        weights = {}
        for key, value in state.items():
            key = key.replace("_orig_mod.", "")
            if key.startswith(prefix):
                weights[key[len(prefix):]] = value
        encoder = encoder_from_config(cfg.model)
        encoder.load_state_dict(weights)
        save_encoder(encoder, run_dir, objective=cfg.objective, step=step,
                     extra={"mean": list(cfg.data.mean), "std": list(cfg.data.std), "shards": str(shards)})
    accelerator.wait_for_everyone()


def _record(run_dir: Path, rank: int, world: int, seen: list[int], model) -> None:
    """Test instrumentation: which samples this rank read, and a checksum of its weights."""
    import json

    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    (run_dir / f"debug-rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world, "samples": seen, "weights_checksum": checksum}))


def _log_analysis(tracker: Tracker, objective, images: torch.Tensor, step: int) -> None:
    """The ViT paper's Figure 7 pictures of the encoder as it trains (cheap: one small forward)."""
    from vitmpp.analyze import training_figures

    images01 = objective.to_unit_range(images[:8])
    for name, figure in training_figures(objective.encoder, images[:8], images01).items():
        tracker.image(f"analysis/{name}", figure, step)


def _log_images(tracker: Tracker, objective, images: torch.Tensor, output, step: int) -> None:
    visual = objective.visualize(images, output)
    tracker.image(f"visual/{type(objective).__name__}", visual.grid, step)
    tracker.text("visual/caption", visual.caption, step)
