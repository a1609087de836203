"""The evaluation stage: linear probe, full fine-tuning and scratch run in the one loop
(`vitmpp.common.loop`); kNN trains nothing and runs on its own.

What the stage adds to the loop: the classifier (frozen encoder + BatchNorm/linear head
for `linear`, the whole encoder + head for `finetune`, fresh weights for `scratch`), its
optimizer (LARS for the probe, AdamW with layer decay otherwise), mixup/cutmix/erasing on
the device, and an evaluation on the validation split every `eval_every` epochs (or
`eval_every_steps`), each followed by a checkpoint.

Writes into the run directory: config.yaml, tensorboard/, checkpoints/, metrics.jsonl,
best.safetensors (weights at the best top-1), results.json. The result is also recorded in the
evaluated encoder's folder (evaluations.json) and its model card (`record_on_encoder`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from vitmpp.common.io import atomic_file, atomic_write_json
from vitmpp.common.loop import Plan, Run, Stage, open_run, train
from vitmpp.common.optim import build_optimizer
from vitmpp.common.errors import UserError
from vitmpp.datasets import (
    LoaderSpec,
    digits_shards,
    eval_transform,
    finetune_transform,
    normalize_batch,
    open_loader,
    pretrain_transform,
    read_manifest,
)
from vitmpp.models import create_encoder, load_encoder, read_encoder_info
from vitmpp.models.hub import record_evaluation

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
    mean = cfg.data.mean or tuple(extra.get("mean", IMAGENET_DEFAULT_MEAN))
    std = cfg.data.std or tuple(extra.get("std", IMAGENET_DEFAULT_STD))
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


# ----------------------------------------------------------------------------- the stage

class EvaluationData:
    """The shards, the label subset and the normalisation of one evaluation run."""

    def __init__(self, cfg: FinetuneConfig, run: Run):
        self.encoder_path = resolve_encoder(cfg)
        self.info = read_encoder_info(self.encoder_path) if self.encoder_path is not None else {}
        self.img_size = cfg.model.img_size or self.info.get("img_size") or 32
        self.shards = cfg.data.shards or digits_shards(self.img_size)
        self.manifest = read_manifest(self.shards)
        self.val_split = self.manifest.split(cfg.data.val_split)
        self.keep = None
        if cfg.data.label_fraction < 1:
            self.keep = balanced_subset(self.manifest.labels(cfg.data.train_split), cfg.data.label_fraction, cfg.train.seed)
        self.num_train = len(self.keep) if self.keep is not None else self.manifest.split(cfg.data.train_split).num_samples
        self._warn_unseen_classes(cfg, run)
        mean, std = normalisation(cfg, self.info)
        self.mean = torch.tensor(mean, device=run.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=run.device).view(1, 3, 1, 1)
        eval_tf = eval_transform(self.img_size, crop_pct=cfg.data.eval_crop_pct, interpolation=cfg.data.interpolation)
        common = dict(shards=self.shards, manifest=self.manifest, batch_size=cfg.knn.batch_size, transform=eval_tf,
                      training=False, rank=run.rank, world_size=run.world, num_workers=cfg.data.num_workers,
                      max_skip_fraction=cfg.data.max_skip_fraction)
        self.val_spec = LoaderSpec(split=cfg.data.val_split, **common)
        self.train_eval_spec = LoaderSpec(split=cfg.data.train_split, keep_indices=_as_tuple(self.keep), **common)

    def _warn_unseen_classes(self, cfg: FinetuneConfig, run: Run) -> None:
        """Validation classes that training never shows are scored as errors whatever the encoder
        is worth: say which ones (manifests without label files cannot be checked)."""
        train_split, val_split = cfg.data.train_split, cfg.data.val_split
        if not (self.manifest.split(train_split).labels_file and self.val_split.labels_file):
            return
        train = self.manifest.labels_array(train_split)  # a label subset keeps every class: no need to narrow
        val = self.manifest.labels_array(val_split)
        unseen = sorted(set(val.tolist()) - set(train.tolist()))
        if not unseen:
            return
        names = self.manifest.class_names
        named = ", ".join(repr(names[c]) if c < len(names) else str(c) for c in unseen[:10])
        more = f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""
        count = int(np.isin(val, unseen).sum())
        run.console.warn(f"validation split '{val_split}' of {self.shards} holds {len(unseen)} class(es) that "
                         f"training never sees: {named}{more} ({count} of {len(val)} validation images, which no "
                         f"classifier trained here can get right); rewrite the shards so that every class is in "
                         f"'{train_split}'.")

    def summary(self, cfg: FinetuneConfig, world: int) -> str:
        return (f"{cfg.protocol}: encoder {self.encoder_path or cfg.model.name}, {self.num_train} training images "
                f"(label fraction {cfg.data.label_fraction}), {self.val_split.num_samples} validation images, "
                f"{self.manifest.num_classes} classes, {world} process(es)")


class FinetuneStage(Stage):
    """Train a classifier (`linear`, `finetune` or `scratch`) and evaluate it on the validation split."""

    resumable_keys = RESUMABLE_KEYS

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.name = cfg.protocol
        self.history: list[dict] = []
        self.started = time.time()

    def setup(self, run: Run) -> Plan:
        cfg = self.cfg
        self.run = run
        self.data = data = EvaluationData(cfg, run)
        model = build_model(cfg, data.encoder_path, data.manifest.num_classes, data.img_size)
        if cfg.protocol == "linear":
            transform = pretrain_transform(data.img_size, scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip,
                                           interpolation=cfg.data.interpolation)
            optimizer = _linear_optimizer(model, cfg, run.peak_lr)
        else:
            transform = finetune_transform(data.img_size, auto_augment=cfg.data.auto_augment,
                                           scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip,
                                           interpolation=cfg.data.interpolation)
            optimizer = build_optimizer(model, cfg.optim, run.peak_lr)
        self.mix, self.erase, self.criterion = _regularizers(cfg, data.manifest.num_classes, run.device)
        loader = LoaderSpec(
            shards=data.shards, manifest=data.manifest, split=cfg.data.train_split,
            batch_size=run.geometry.per_device_batch, transform=transform, training=True, seed=cfg.train.seed,
            rank=run.rank, world_size=run.world, num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer, keep_indices=_as_tuple(data.keep),
            pin_memory=run.device.type == "cuda", max_skip_fraction=cfg.data.max_skip_fraction)
        run.console.print(data.summary(cfg, run.world))
        return Plan(model, optimizer, loader, open_loader, data.num_train, f"{cfg.protocol} on {data.shards}")

    def forward(self, model, batch):
        device = self.run.device
        images = normalize_batch(batch.images.to(device, non_blocking=True), self.data.mean, self.data.std)
        labels = batch.labels.to(device, non_blocking=True)
        if self.mix is not None:
            images, labels = self.mix(images, labels)
        if self.erase is not None:
            images = self.erase(images)
        return self.criterion(model(images), labels), None

    def after_step(self, step: int, model, output) -> bool:
        if not self.evaluation_due(step):
            return False
        model.eval()
        run, data = self.run, self.data
        scores = evaluate(run.accelerator, model, open_loader(data.val_spec), data.mean, data.std,
                          data.val_split.num_samples)
        epoch_done = step / run.schedule.steps_per_epoch
        self.history.append({"epoch": round(epoch_done, 2), "step": step, "top1": scores["top1"],
                             "top5": scores["top5"], "count": scores["count"]})
        run.tracker.scalars({"top1": scores["top1"], "top5": scores["top5"]}, step=step)  # linear/top1, ...
        best = max(self.history, key=lambda row: row["top1"])
        run.console.print(f"step {step}/{run.schedule.total_steps} (epoch {epoch_done:.1f}): top-1 {scores['top1']:.2f}  "
                          f"top-5 {scores['top5']:.2f}  (best {best['top1']:.2f} at step {best['step']})")
        if best is self.history[-1]:
            _save_weights(run.accelerator, model, run.run_dir / "best.safetensors")
        return True  # a checkpoint after every evaluation keeps history and best.safetensors in step

    def evaluation_due(self, step: int) -> bool:
        schedule = self.run.schedule
        if step == schedule.total_steps:
            return True
        if self.cfg.eval_every_steps is not None:
            return step % self.cfg.eval_every_steps == 0
        return step % schedule.steps_per_epoch == 0 and (step // schedule.steps_per_epoch) % self.cfg.eval_every == 0

    def state_dict(self) -> dict:
        return {"history": self.history, "protocol": self.cfg.protocol}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]

    def finish(self, step: int, model) -> dict:
        run, data = self.run, self.data
        best = max(self.history, key=lambda row: row["top1"])
        results = _results(self.cfg, data.encoder_path, data.info, best, self.history[-1],
                           epochs=run.schedule.epochs, started=self.started, num_train=data.num_train,
                           history=self.history)
        if run.accelerator.is_main_process:
            atomic_write_json(run.run_dir / "results.json", results)
        run.console.print(f"done: best top-1 {best['top1']:.2f} (step {best['step']}), last {self.history[-1]['top1']:.2f}; "
                          f"results: {run.run_dir / 'results.json'}")
        record_on_encoder(self.cfg, run, data, results)
        return results


def run_dir_for(cfg: FinetuneConfig, config_path: str | None) -> Path:
    """runs/<run.name>, else runs/<protocol>-<encoder>-f<label fraction>-s<seed>."""
    if cfg.run.name:
        return Path(cfg.run.output_dir) / cfg.run.name
    if cfg.encoder:
        encoder = Path(cfg.encoder)
        encoder = encoder.parent.name if encoder.suffix == ".safetensors" else encoder.name
    else:
        encoder = cfg.model.name if cfg.protocol == "scratch" and cfg.model.name else "default-mpp"
    return Path(cfg.run.output_dir) / f"{cfg.protocol}-{encoder}-f{cfg.data.label_fraction:g}-s{cfg.train.seed}"


def command(cfg: FinetuneConfig, config_path: str | None, resume: str | None, allow_changes: bool = False) -> dict:
    """What `finetune/main.py` runs once its command line is parsed."""
    return run(cfg, run_dir_for(cfg, config_path), resume=resume, allow_changes=allow_changes)


def run(cfg: FinetuneConfig, run_dir: Path, resume: str | None = None, callbacks=(), allow_changes: bool = False) -> dict:
    """Run one protocol as `cfg` says, in `run_dir`; returns the results written to results.json."""
    stage = FinetuneStage(cfg)
    evaluation = open_run(cfg, run_dir, resume, resumable_keys=stage.resumable_keys, allow_changes=allow_changes,
                          callbacks=callbacks)
    finished = run_dir / "results.json"
    if resume is not None and finished.is_file():
        results = json.loads(finished.read_text())
        evaluation.console.print(f"{run_dir} is already finished: top-1 {results['best_top1']:.2f}")
        return results
    if cfg.protocol == "knn":
        return run_knn(cfg, evaluation)
    return train(stage, evaluation) or {}


def run_knn(cfg: FinetuneConfig, run: Run) -> dict:
    """k-NN on frozen features: nothing trains, so no loop; results.json and one TensorBoard point."""
    from .knn import knn_classify

    started = time.time()
    data = EvaluationData(cfg, run)
    run.console.print(data.summary(cfg, run.world))
    model = build_model(cfg, data.encoder_path, data.manifest.num_classes, data.img_size).to(run.device)
    encoder = model.encoder
    metrics = knn_classify(run.accelerator, lambda x: pooled_features(encoder, x, cfg.model.linear_pool),
                           open_loader(data.train_eval_spec), open_loader(data.val_spec), data.mean, data.std,
                           data.manifest.num_classes, cfg.knn.k, cfg.knn.temperature,
                           expected_val=data.val_split.num_samples)
    results = _results(cfg, data.encoder_path, data.info, metrics, metrics, epochs=0, started=started,
                       num_train=data.num_train)
    tracker, _ = run.open_records(None, cfg.protocol)
    if run.accelerator.is_main_process:
        atomic_write_json(run.run_dir / "results.json", results)
    tracker.scalars({"top1": metrics["top1"], "top5": metrics["top5"]}, step=0)  # knn/top1, knn/top5
    tracker.close()
    run.console.print(f"knn (k={cfg.knn.k}): top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}")
    record_on_encoder(cfg, run, data, results)
    return results


def record_on_encoder(cfg: FinetuneConfig, run: Run, data: EvaluationData, results: dict) -> None:
    """Add this run's result to the evaluated encoder's folder (evaluations.json) and regenerate its model
    card (vitmpp.models.hub.record_evaluation). Scratch trains no pretrained weight and is not recorded;
    a folder that cannot be written is named in one console line and the run goes on."""
    path = data.encoder_path
    if cfg.protocol == "scratch" or path is None or not run.accelerator.is_main_process:
        return
    if path.name != "encoder.safetensors" or not (path.parent / "encoder.json").is_file():
        return  # a weights file outside an export folder has no card to add to
    record = {
        "run": str(run.run_dir.resolve()), "protocol": cfg.protocol, "label_fraction": cfg.data.label_fraction,
        "seed": cfg.train.seed, "split": cfg.data.val_split, "dataset": data.manifest.name, "shards": str(data.shards),
        # the last evaluation, not the best: the best over the run's evaluations is chosen on the very
        # split it reports (results.json keeps both)
        "img_size": data.img_size, "top1": results["last_top1"], "top5": results["last_top5"],
        "best_top1": results["best_top1"], "train_images": results["train_images"],
        "val_images": results["val_images"], "epochs": results["epochs"],
    }
    if cfg.protocol == "knn":
        record["k"] = cfg.knn.k
    try:
        card = record_evaluation(path.parent, record)
    except (OSError, UserError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        run.console.print(f"note: the result is not recorded in {path.parent} ({reason}); its model card is unchanged")
        return
    run.console.print(f"model card: {card} (this result added)")


def _as_tuple(indices) -> tuple[int, ...] | None:
    return None if indices is None else tuple(int(i) for i in indices)


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
        with atomic_file(path) as tmp:
            save_file({k.replace("_orig_mod.", ""): v.contiguous() for k, v in state.items()}, str(tmp))


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
