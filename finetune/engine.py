"""The evaluation engine: linear probe, full fine-tuning, scratch, and kNN.

The training protocols share the pretraining engine's plumbing (vitmpp.common.training:
step runner, non-finite guard, interval logging, atomic checkpoints, stop signals):
the loop below is epochs of optimizer steps, an evaluation on the validation split
at the end of each epoch, and a checkpoint after it. `knn` trains nothing.

Writes into the run directory: config.yaml, tensorboard/, checkpoints/, metrics.jsonl,
best.safetensors (weights at the best top-1), results.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from vitmpp.common import rundir
from vitmpp.common.checkpoint import write_json_atomic
from vitmpp.common.config import dump_yaml, flatten
from vitmpp.common.console import Console, quiet_libraries
from vitmpp.common.distributed import make_accelerator
from vitmpp.common.errors import UserError
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
    current_lr,
    peak_lr,
    warmup_steps,
)
from vitmpp.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_loader,
    default_digits_shards,
    eval_transform,
    finetune_transform,
    normalize_batch,
    pretrain_transform,
    read_manifest,
)
from vitmpp.models import create_encoder, load_encoder, read_encoder_info

from .config import RESUMABLE_KEYS, FinetuneConfig
from .heads import LinearProbe, make_classifier, pooled_features
from .subset import balanced_subset

DEFAULT_ENCODER = Path("runs") / "default-mpp"


# ----------------------------------------------------------------------------- inputs

def resolve_encoder(cfg: FinetuneConfig) -> Path | None:
    """The encoder.safetensors to evaluate (None for scratch without an encoder)."""
    if cfg.encoder is None and cfg.protocol == "scratch" and cfg.model.name is not None:
        return None
    path = Path(cfg.encoder) if cfg.encoder is not None else DEFAULT_ENCODER
    if path.is_dir():
        path = path / "encoder.safetensors"
    if not path.is_file():
        if cfg.encoder is None:
            raise UserError(
                f"There is no pretrained encoder at {path} yet; run `accelerate launch pretrain/main.py` first, "
                "or pass encoder=PATH."
            )
        raise UserError(f"Encoder '{cfg.encoder}' not found (looked for {path}); pass a pretraining run folder or an encoder.safetensors file.")
    return path


def normalisation(cfg: FinetuneConfig, info: dict) -> tuple[tuple, tuple]:
    """The encoder's own normalisation (from encoder.json) unless the config overrides it."""
    extra = info.get("extra", info) if info else {}
    mean = cfg.data.mean or tuple(extra.get("mean", IMAGENET_MEAN))
    std = cfg.data.std or tuple(extra.get("std", IMAGENET_STD))
    return tuple(mean), tuple(std)


def build_model(cfg: FinetuneConfig, encoder_path: Path | None, num_classes: int, img_size: int | None) -> nn.Module:
    if cfg.protocol in ("linear", "knn"):
        encoder = load_encoder(encoder_path, img_size=img_size)
        return LinearProbe(encoder, num_classes, pool=cfg.model.linear_pool)
    overrides = {"drop_path_rate": cfg.model.drop_path_rate, "global_pool": cfg.model.global_pool}
    if cfg.protocol == "finetune":
        encoder = load_encoder(encoder_path, img_size=img_size, **overrides)
    elif encoder_path is not None:  # scratch: the encoder's architecture, fresh weights
        info = read_encoder_info(encoder_path)
        encoder = create_encoder(info["name"], img_size=img_size or info["img_size"], **{**info.get("overrides", {}), **overrides})
    else:
        encoder = create_encoder(cfg.model.name, img_size=img_size, **overrides)
    return make_classifier(encoder, num_classes, cfg.model.global_pool)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(accelerator, predict, loader, mean, std, expected: int) -> dict[str, float]:
    """Top-1/top-5 over the split, each sample counted once across ranks.

    The loader pads the last rank with repeats marked index -1; those are dropped
    after the gather, and the count is checked against the manifest.
    """
    device = accelerator.device
    rows = []
    for batch in loader:
        images = normalize_batch(batch.images.to(device, non_blocking=True), mean, std)
        labels = batch.labels.to(device)
        with accelerator.autocast():
            logits = predict(images)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        correct = top5 == labels[:, None]
        rows.append(torch.stack([batch.indices.to(device), correct[:, 0].long(), correct.any(dim=1).long()], dim=1))
    table = torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long, device=device)
    table = accelerator.gather(table)
    table = table[table[:, 0] >= 0]
    count = int(torch.unique(table[:, 0]).numel())
    if count != expected or table.shape[0] != expected:
        raise RuntimeError(f"evaluation saw {table.shape[0]} predictions for {count} distinct samples, expected {expected}")
    return {"top1": 100.0 * table[:, 1].float().mean().item(), "top5": 100.0 * table[:, 2].float().mean().item(), "count": count}


# ----------------------------------------------------------------------------- main entry

def run(cfg: FinetuneConfig, run_dir: Path, resume: str | None = None) -> dict:
    """Run one protocol as `cfg` says, in `run_dir`; returns the results written to results.json."""
    quiet_libraries()
    started = time.time()
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision, project_dir=run_dir)
    console = Console(accelerator.is_main_process)
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    resume_from = rundir.resolve_resume(run_dir, resume)
    if resume is not None and (run_dir / "results.json").is_file():
        results = json.loads((run_dir / "results.json").read_text())
        console.print(f"{run_dir} is already finished: top-1 {results['best_top1']:.2f}")
        return results
    changed = rundir.check_reuse(run_dir, cfg, resume, ignore=RESUMABLE_KEYS)
    if changed:
        console.warn(f"resuming with changed config keys: {', '.join(changed)}")
    accelerator.wait_for_everyone()

    # ---- data
    encoder_path = resolve_encoder(cfg)
    info = read_encoder_info(encoder_path) if encoder_path is not None else {}
    img_size = cfg.model.img_size or info.get("img_size") or 32
    shards = cfg.data.shards or default_digits_shards(img_size, accelerator)
    manifest = read_manifest(shards)
    train_split, val_split = manifest.split(cfg.data.train_split), manifest.split(cfg.data.val_split)
    keep = None
    if cfg.data.label_fraction < 1:
        keep = balanced_subset(manifest.labels(cfg.data.train_split), cfg.data.label_fraction, cfg.train.seed)
    num_train = len(keep) if keep is not None else train_split.num_samples
    mean_values, std_values = normalisation(cfg, info)
    mean = torch.tensor(mean_values, device=accelerator.device).view(1, 3, 1, 1)
    std = torch.tensor(std_values, device=accelerator.device).view(1, 3, 1, 1)
    val_transform = eval_transform(img_size, crop_pct=cfg.data.eval_crop_pct, interpolation=cfg.data.interpolation)

    def val_loader():
        return build_loader(shards, split=cfg.data.val_split, batch_size=cfg.knn.batch_size, transform=val_transform,
                            training=False, rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                            max_skip_fraction=cfg.data.max_skip_fraction)

    model = build_model(cfg, encoder_path, manifest.num_classes, img_size)
    console.print(f"{cfg.protocol}: encoder {encoder_path or cfg.model.name}, {num_train} training images "
                  f"(label fraction {cfg.data.label_fraction}), {val_split.num_samples} validation images, "
                  f"{manifest.num_classes} classes, {world} process(es)")

    if cfg.protocol == "knn":
        from .knn import knn_classify

        model.to(accelerator.device)  # nothing trains: no DDP wrapper
        train_loader = build_loader(shards, split=cfg.data.train_split, batch_size=cfg.knn.batch_size,
                                    transform=val_transform, training=False, rank=rank, world_size=world,
                                    keep_indices=keep, num_workers=cfg.data.num_workers)
        encoder = model.encoder
        metrics = knn_classify(accelerator, lambda x: pooled_features(encoder, x, cfg.model.linear_pool),
                               train_loader, val_loader(), mean, std, manifest.num_classes, cfg.knn.k,
                               cfg.knn.temperature, expected_val=val_split.num_samples)
        results = _results(cfg, encoder_path, info, metrics, metrics, epochs=0, started=started, num_train=num_train)
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            rundir.write_config(run_dir, cfg)
            write_json_atomic(run_dir / "results.json", results)
        tracker = Tracker(accelerator, "tensorboard", flatten(cfg), None)
        tracker.scalars({"eval/top1": metrics["top1"], "eval/top5": metrics["top5"]}, step=0)
        tracker.close()
        console.print(f"knn (k={cfg.knn.k}): top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}")
        return results

    # ---- training protocols
    geometry = batch_geometry(cfg.train, world)
    steps_per_epoch = num_train // geometry.global_batch
    if steps_per_epoch < 1:
        raise UserError(f"Only {num_train} training images (label fraction {cfg.data.label_fraction}) for a global batch "
                        f"of {geometry.global_batch}; lower train.global_batch.")
    # length in epochs, or in steps (the same compute whatever the label fraction)
    total_steps = cfg.train.steps if cfg.train.steps is not None else int(round(cfg.train.epochs * steps_per_epoch))
    epochs = -(-total_steps // steps_per_epoch)
    if cfg.protocol == "linear":
        train_transform = pretrain_transform(img_size, scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip,
                                             interpolation=cfg.data.interpolation)
        optimizer = _linear_optimizer(model, cfg, peak_lr(cfg.optim, geometry.global_batch))
    else:
        train_transform = finetune_transform(img_size, auto_augment=cfg.data.auto_augment, scale=tuple(cfg.data.crop_scale),
                                             hflip=cfg.data.hflip, interpolation=cfg.data.interpolation)
        optimizer = build_optimizer(model, cfg.optim, peak_lr(cfg.optim, geometry.global_batch))
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, warmup_steps(cfg.optim, steps_per_epoch))
    mix, erase, criterion = _regularizers(cfg, manifest.num_classes, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)

    control = ControlPlane(accelerator)
    checkpointer = Checkpointer(accelerator, run_dir, cfg.log.keep_checkpoints, control, cfg.debug.checkpoint_delay_s,
                                cfg.debug.checkpoint_disk_full_at_step)
    guard = NonFiniteGuard(accelerator, optimizer, cfg.train.max_nonfinite_steps)
    step, history = 0, []
    if resume_from is not None:
        state = checkpointer.load(resume_from)
        step, history = state["step"], state["history"]
        console.print(f"resumed from {resume_from} at step {step}")
    resumed_at = step if resume_from is not None else None
    metrics_log = None
    if accelerator.is_main_process:
        rundir.write_config(run_dir, cfg)
        metrics_log = rundir.MetricsLog(run_dir, resumed_at)
    tracker = Tracker(accelerator, "tensorboard", flatten(cfg), resumed_at)
    if resumed_at is None:
        tracker.text("config", "```\n" + dump_yaml(cfg) + "```", 0)
    log = IntervalLog(accelerator, tracker, console, guard, metrics=metrics_log, total_steps=total_steps,
                      steps_per_epoch=steps_per_epoch, nonfinite_before=state["nonfinite_steps"] if resume_from else 0)
    log.last_checkpoint = checkpointer.last
    runner = StepRunner(accelerator, model, optimizer, scheduler, guard, geometry.accumulation, cfg.optim.clip_grad)
    poison_rank = cfg.debug.inject_nonfinite_rank in (None, rank)

    def forward(batch):
        images = normalize_batch(batch.images.to(accelerator.device, non_blocking=True), mean, std)
        labels = batch.labels.to(accelerator.device, non_blocking=True)
        if mix is not None:
            images, labels = mix(images, labels)
        if erase is not None:
            images = erase(images)
        return criterion(model(images), labels), None

    def save(at_step: int) -> None:
        log.flush()
        state = {"step": at_step, "epoch": at_step // steps_per_epoch, "world_size": world, "history": history,
                 "nonfinite_steps": log.nonfinite_steps(), "protocol": cfg.protocol, "time": time.time()}
        log.last_checkpoint = checkpointer.save(at_step, state)

    def evaluation_due(at_step: int) -> bool:
        if at_step == total_steps:
            return True
        if cfg.eval_every_steps is not None:
            return at_step % cfg.eval_every_steps == 0
        return at_step % steps_per_epoch == 0 and (at_step // steps_per_epoch) % cfg.eval_every == 0

    def evaluate_and_keep_best(at_step: int) -> None:
        model.eval()
        scores = evaluate(accelerator, model, val_loader(), mean, std, val_split.num_samples)
        epoch_done = at_step / steps_per_epoch
        history.append({"epoch": round(epoch_done, 2), "step": at_step, "top1": scores["top1"], "top5": scores["top5"],
                        "count": scores["count"]})
        tracker.scalars({"eval/top1": scores["top1"], "eval/top5": scores["top5"]}, step=at_step)
        best = max(history, key=lambda row: row["top1"])
        console.print(f"step {at_step}/{total_steps} (epoch {epoch_done:.1f}): top-1 {scores['top1']:.2f}  "
                      f"top-5 {scores['top5']:.2f}  (best {best['top1']:.2f} at step {best['step']})")
        if best is history[-1]:
            _save_weights(accelerator, model, run_dir / "best.safetensors")

    console.start_bar(total_steps, initial=step, desc=cfg.protocol)
    with guarded_loop(rank, console) as stop:
        while step < total_steps:
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            model.train()
            loader = build_loader(
                shards, split=cfg.data.train_split, batch_size=geometry.per_device_batch, transform=train_transform,
                training=True, epoch=epoch, seed=cfg.train.seed, rank=rank, world_size=world,
                num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, keep_indices=keep,
                batches_per_epoch=steps_per_epoch * geometry.accumulation,
                start_batch=step_in_epoch * geometry.accumulation, pin_memory=accelerator.device.type == "cuda",
                max_skip_fraction=cfg.data.max_skip_fraction,
            )
            batches = iter(loader)
            while step < min(total_steps, (epoch + 1) * steps_per_epoch):
                poison = poison_rank and step + 1 in cfg.debug.inject_nonfinite_steps
                loss, grad_norm, _ = runner.run(step, forward, log.timed(batches, geometry.accumulation), poison=poison)
                step += 1
                log.add(step, loss, grad_norm, current_lr(optimizer), geometry.per_device_batch * geometry.accumulation)
                console.update_bar(1)
                if step % cfg.log.log_every == 0:
                    log.flush()
                if control.any(stop.requested):
                    save(step)
                    console.close_bar()
                    console.print(f"stopped by {stop.signal_name or 'a signal to another rank'} at step {step}; "
                                  "continue with --resume auto")
                    tracker.close()
                    return {}
                if evaluation_due(step):
                    log.flush()
                    evaluate_and_keep_best(step)
                    save(step)
                    model.train()
            del batches, loader
            log.flush()

        console.close_bar()
        best = max(history, key=lambda row: row["top1"])
        results = _results(cfg, encoder_path, info, best, history[-1], epochs=epochs, started=started,
                           num_train=num_train, history=history)
        if accelerator.is_main_process:
            write_json_atomic(run_dir / "results.json", results)
        console.print(f"done: best top-1 {best['top1']:.2f} (step {best['step']}), last {history[-1]['top1']:.2f}; "
                      f"results: {run_dir / 'results.json'}")
        tracker.close()
        return results


# ----------------------------------------------------------------------------- pieces

def _linear_optimizer(model: LinearProbe, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """LARS on the head as MAE's linear probe: trust ratio on the weight matrix, not the bias,
    and no weight decay (timm's Lars adapts only when asked or when weight decay is set)."""
    if cfg.optim.name.lower() != "lars":
        return build_optimizer(model.head, cfg.optim, lr)
    from timm.optim import Lars

    groups = [
        {"params": [model.head.weight], "always_adapt": True},
        {"params": [model.head.bias], "always_adapt": False},
    ]
    return Lars(groups, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def _regularizers(cfg: FinetuneConfig, num_classes: int, device):
    """Mixup/cutmix, random erasing and the matching loss (finetune/scratch), else plain CE."""
    reg = cfg.regularization
    if cfg.protocol == "linear":
        return None, None, nn.CrossEntropyLoss()
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mix = None
    if reg.mixup > 0 or reg.cutmix > 0:
        mix = Mixup(mixup_alpha=reg.mixup, cutmix_alpha=reg.cutmix, prob=reg.mixup_prob, switch_prob=reg.mixup_switch_prob,
                    mode="batch", label_smoothing=reg.label_smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif reg.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=reg.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    erase = RandomErasing(probability=reg.reprob, mode="pixel", max_count=1, device=str(device)) if reg.reprob > 0 else None
    return mix, erase, criterion


def _save_weights(accelerator, model, path: Path) -> None:
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(path)


def _results(cfg, encoder_path, info, best, last, *, epochs, started, num_train, history=None) -> dict:
    return {
        "protocol": cfg.protocol,
        "encoder": str(encoder_path) if encoder_path else None,
        "encoder_info": info,
        "label_fraction": cfg.data.label_fraction,
        "train_images": num_train,
        "val_images": int(best.get("count", 0)) if isinstance(best, dict) else 0,
        "seed": cfg.train.seed,
        "epochs": epochs,
        "best_top1": best["top1"], "best_top5": best["top5"],
        "last_top1": last["top1"], "last_top5": last["top5"],
        "history": history or [],
        "wall_time_s": round(time.time() - started, 1),
    }
