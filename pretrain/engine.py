"""The pretraining stage: what pretraining adds to the one loop (`vitmpp.common.loop`).

    shards --uint8 batches--> normalise on the device --> objective (registry: mpp | mae | simmim | ...)
        --> loss; the loop does backward, clipping, the guarded optimizer step, checkpoints and logs

Between steps: the objective's own hook (`after_optimizer_step`, e.g. an EMA
teacher), its pictures every `log.image_every` steps and the analysis figures
every `log.analysis_every`, and a kNN accuracy on the validation split every
`log.knn_every` (`knn_monitor`). At the end: `encoder.safetensors` + `encoder.json`, the same
weights as a transformers folder (`transformers/`), and the model card `README.md`
(vitmpp.models.hub; docs/export.md).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitmpp.common.distributed import gathered_state_dict
from vitmpp.common.io import reported_writes
from vitmpp.common.loop import Plan, Run, Stage, open_run, train
from vitmpp.common.optim import build_optimizer
from vitmpp.datasets import (LoaderSpec, digits_shards, eval_transform, normalize_batch, open_loader, pretrain_transform,
                             read_manifest)
from vitmpp.datasets.transforms import TINY_IMAGE
from vitmpp.models import create_objective, encoder_from_config, flops_per_image, read_encoder_info, save_encoder
from vitmpp.models.card import render_card
from vitmpp.models.hub import (CARD_NAME, TRANSFORMERS_DIR, card_facts, save_transformers,
                               transformers_incompatibility, write_card)

from .config import RESUMABLE_KEYS, PretrainConfig

KNN_VAL_SPLIT = "validation"  # the kNN monitor's queries: the split the evaluation stages score on


class PretrainStage(Stage):
    """Pretrain the encoder with `cfg.objective` on the training split."""

    resumable_keys = RESUMABLE_KEYS
    namespace = "pretrain"  # TensorBoard: every objective's curves under pretrain/ (the bar says which objective)

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.name = cfg.objective

    def setup(self, run: Run) -> Plan:
        cfg = self.cfg
        self.run = run
        self.shards = cfg.data.shards or digits_shards(cfg.model.img_size)
        manifest = read_manifest(self.shards)
        split = manifest.split(cfg.data.train_split)
        self.objective = create_objective(cfg.objective, encoder_from_config(cfg.model), mean=cfg.data.mean,
                                          std=cfg.data.std, num_classes=manifest.num_classes, **cfg.objective_options())
        transform = type(self.objective).training_transform(cfg.model.img_size, cfg.data) or pretrain_transform(
            cfg.model.img_size, scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip,
            interpolation=cfg.data.interpolation)
        optimizer = build_optimizer(self.objective, cfg.optim, run.peak_lr)
        loader = LoaderSpec(
            shards=self.shards, manifest=manifest, split=cfg.data.train_split, batch_size=run.geometry.per_device_batch,
            transform=transform, training=True, seed=cfg.train.seed, rank=run.rank, world_size=run.world,
            num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
            pin_memory=run.device.type == "cuda", max_skip_fraction=cfg.data.max_skip_fraction)
        # Under FSDP the main process holds a shard of the encoder, which the analysis figures cannot
        # run on alone (a forward is a collective); they are drawn from the export instead.
        self.sharded = run.accelerator.distributed_type.value == "FSDP"
        if self.sharded and cfg.log.analysis_every:
            run.console.print("note: no analysis figures in TensorBoard under FSDP (the encoder is sharded); draw them "
                              f"from the export: python -m vitmpp.analyze --encoder {run.run_dir} --shards ... --out ...")
        self.mean = torch.tensor(cfg.data.mean, device=run.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=run.device).view(1, 3, 1, 1)
        self.knn_specs = self.knn_monitor_specs(manifest)
        return Plan(self.objective, optimizer, loader, open_loader, split.num_samples,
                    f"pretraining {cfg.objective} on {self.shards} ({split.num_samples} images)")

    def flops_per_image(self, model: torch.nn.Module) -> float | None:
        return flops_per_image(model, self.cfg.model.img_size)

    def knn_monitor_specs(self, manifest) -> tuple[LoaderSpec, LoaderSpec, int] | None:
        """The kNN monitor's two eval loaders and its query count, or None (with a note) when it cannot run."""
        cfg, run = self.cfg, self.run
        if not cfg.log.knn_every:
            return None
        if self.sharded:
            run.console.print("note: no kNN monitor under FSDP (the encoder is sharded); evaluate the export instead: "
                              f"./launch.sh finetune protocol=knn encoder={run.run_dir}")
            return None
        if KNN_VAL_SPLIT not in manifest.splits:
            run.console.print(f"note: no kNN monitor: the shards {self.shards} have no '{KNN_VAL_SPLIT}' split")
            return None
        return knn_monitor_specs(self.shards, manifest, cfg.data.train_split, cfg.log.knn_images, cfg.model.img_size,
                                 seed=cfg.train.seed, rank=run.rank, world=run.world, num_workers=cfg.data.num_workers,
                                 interpolation=cfg.data.interpolation, max_skip_fraction=cfg.data.max_skip_fraction)

    def log_knn(self, step: int) -> None:
        """kNN top-1/top-5 of the encoder as it is now; every rank takes part (the features are gathered)."""
        run = self.run
        started = time.perf_counter()
        scores = knn_monitor(run.accelerator, self.objective.encoder, *self.knn_specs, self.mean, self.std)
        seconds = time.perf_counter() - started
        run.tracker.scalars({"knn_top1": scores["top1"], "knn_top5": scores["top5"]}, step=step)  # pretrain/knn_top1
        run.console.print(f"step {step}: kNN top-1 {scores['top1']:.2f}  top-5 {scores['top5']:.2f}  "
                          f"({scores['count']} validation images, {seconds:.1f}s)")

    def forward(self, model, batch):
        images = normalize_batch(batch.images.to(self.run.device, non_blocking=True), self.mean, self.std)
        output = model(images, batch.labels.to(self.run.device, non_blocking=True))
        return output.loss, (images, output)

    def after_step(self, step: int, model, output) -> bool:
        self.objective.after_optimizer_step(step)
        log = self.cfg.log
        due = [every for every in (log.image_every, log.analysis_every) if every and step % every == 0]
        if due and self.run.accelerator.is_main_process:
            with self.run.callbacks.phase("pictures"):
                self.log_pictures(step, *output)
        if self.knn_specs is not None and step % log.knn_every == 0:
            self.log_knn(step)
        return False

    def log_pictures(self, step: int, images: torch.Tensor, result) -> None:
        log, tracker = self.cfg.log, self.run.tracker
        if log.image_every and step % log.image_every == 0:
            # four images: the grid, under a header naming its columns, and the encoder's figures below
            # it fit TensorBoard's first screen; the caption (TEXT tab) says the rest
            visual = self.objective.visualize(images, result, max_images=4)
            tracker.image(f"batch/{self.cfg.objective}", visual.labelled(), step)
            tracker.text("batch/caption", visual.caption, step)
        if log.analysis_every and step % log.analysis_every == 0 and not self.sharded:
            # the analyze command's figures (ViT paper's Figure 7, rollout) as the encoder trains: one small forward
            from vitmpp.analyze.training import TRAINING_TAGS, training_figures

            images01 = self.objective.to_unit_range(images[:8])
            for name, figure in training_figures(self.objective.encoder, images[:8], images01).items():
                tracker.image(TRAINING_TAGS[name], figure, step)

    def state_dict(self) -> dict:
        return {"objective": self.cfg.objective}

    def finish(self, step: int, model) -> Path:
        run = self.run
        refusal = export_encoder(run.accelerator, model, self.cfg, run.run_dir, step, self.shards,
                                 facts=self.export_facts(step))
        run.console.print(f"done: {step} steps; encoder: {run.run_dir / 'encoder.safetensors'}")
        if refusal:
            run.console.print(f"no transformers export: {refusal}")
        else:
            run.console.print(f"transformers: {run.run_dir / TRANSFORMERS_DIR}")
        run.console.print(f"model card: {run.run_dir / CARD_NAME}")
        run.console.print(f"watch: tensorboard --logdir {run.run_dir}")
        for line in next_commands(run.run_dir, self.cfg):
            run.console.print(line)
        return run.run_dir

    def export_facts(self, step: int) -> dict:
        """What the model card says about the data, the run's length and its compute (encoder.json `extra`)."""
        cfg, run = self.cfg, self.run
        manifest = read_manifest(self.shards)
        split = manifest.split(cfg.data.train_split)
        global_batch = run.geometry.global_batch
        images = step * global_batch
        facts: dict[str, Any] = {
            "interpolation": cfg.data.interpolation,
            # what eval_transform(img_size) crops by default: the transformers image processor repeats it
            "eval_crop_pct": 1.0 if cfg.model.img_size < TINY_IMAGE else 0.875,
            "uses_labels": cfg.objective == "supervised",
            "data": {"shards": str(self.shards), "name": manifest.name, "source": manifest.source,
                     "num_classes": manifest.num_classes, "image_size": manifest.image_size,
                     "train_split": cfg.data.train_split,
                     "splits": {name: info.num_samples for name, info in manifest.splits.items()}},
            "train": {"steps": step, "global_batch": global_batch, "images_seen": images, "world_size": run.world,
                      "epochs": images / split.num_samples if split.num_samples else None},
        }
        try:
            per_image = flops_per_image(self.objective, cfg.model.img_size)
        except Exception as err:  # noqa: BLE001 - a count that fails must not cost the export
            facts["compute"] = {"how": f"FLOPs were not counted ({type(err).__name__}: {err})."}
        else:
            facts["compute"] = {
                "flops_per_image": per_image, "total_flops": per_image * images,
                "how": "FLOPs of one training image (forward and backward through the objective, matrix multiplies, "
                       "convolutions and attention) were counted by torch's FlopCounterMode on the meta device "
                       "(vitmpp.models.flops); the total is that count times the images seen.",
            }
        return facts


def knn_monitor_specs(shards, manifest, train_split: str, images: int, img_size: int, *, seed: int = 0, rank: int = 0,
                      world: int = 1, num_workers: int = 0, interpolation: str = "bicubic",
                      max_skip_fraction: float = 0.1, batch_size: int = 256) -> tuple[LoaderSpec, LoaderSpec, int]:
    """Eval loaders over at most `images` training images (the memory bank) and as many validation images
    (the queries), each a seeded random sample, the same at every evaluation; and the query count."""
    def sample(split: str) -> tuple[int, ...] | None:
        total = manifest.split(split).num_samples
        if total <= images:
            return None
        return tuple(np.sort(np.random.default_rng(seed).choice(total, size=images, replace=False)).tolist())

    train_keep, val_keep = sample(train_split), sample(KNN_VAL_SPLIT)
    common = dict(shards=shards, manifest=manifest, batch_size=batch_size, training=False, rank=rank,
                  world_size=world, num_workers=num_workers, max_skip_fraction=max_skip_fraction,
                  transform=eval_transform(img_size, interpolation=interpolation))
    expected = len(val_keep) if val_keep is not None else manifest.split(KNN_VAL_SPLIT).num_samples
    return (LoaderSpec(split=train_split, keep_indices=train_keep, **common),
            LoaderSpec(split=KNN_VAL_SPLIT, keep_indices=val_keep, **common), expected)


def knn_monitor(accelerator, encoder: torch.nn.Module, train_spec: LoaderSpec, val_spec: LoaderSpec, expected: int,
                mean: torch.Tensor, std: torch.Tensor, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """DINO's kNN monitor: `encoder`'s class-token features (eval mode, no gradients; its train/eval mode
    is restored) of the training sample vote, with their labels, for the validation sample's classes
    (vitmpp.finetune.knn). Every rank must call it (the features are gathered)."""
    from vitmpp.finetune.heads import pooled_features
    from vitmpp.finetune.knn import knn_classify

    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return knn_classify(accelerator, lambda x: pooled_features(encoder, x, "token"), open_loader(train_spec),
                                open_loader(val_spec), mean, std, train_spec.manifest.num_classes, k, temperature,
                                expected_val=expected)
    finally:
        encoder.train(was_training)


def next_commands(run_dir: Path, cfg: PretrainConfig) -> list[str]:
    """The last lines of a pretraining run: how to evaluate the encoder it wrote."""
    import shlex

    name = shlex.quote(str(run_dir))
    data = f" data.shards={shlex.quote(cfg.data.shards)}" if cfg.data.shards else ""
    overrides = f" {shlex.quote(f'overrides=[data.shards={cfg.data.shards}]')}" if cfg.data.shards else ""
    encoders = shlex.quote(f"encoders={{{cfg.objective}: {run_dir}, random: random}}")
    return [
        f"next, a linear probe:  ./launch.sh finetune encoder={name}{data}",
        f"or the comparison:     python -m vitmpp.finetune.compare --config configs/compare/digits.yaml {encoders} "
        f"output_dir={shlex.quote(f'runs/compare/{run_dir.name}')}{overrides}",
    ]


def run_dir_for(cfg: PretrainConfig, config_path: str | None) -> Path:
    """runs/<run.name>, else runs/<config stem>, else runs/default-<objective>."""
    name = cfg.run.name or (Path(config_path).stem if config_path else f"default-{cfg.objective}")
    return Path(cfg.run.output_dir) / name


def command(cfg: PretrainConfig, config_path: str | None, resume: str | None, allow_changes: bool = False) -> Any:
    """What `pretrain/main.py` runs once its command line is parsed."""
    return pretrain(cfg, run_dir_for(cfg, config_path), resume=resume, allow_changes=allow_changes)


def pretrain(cfg: PretrainConfig, run_dir: Path, resume: str | None = None, callbacks=(), allow_changes: bool = False) -> Any:
    """Pretrain an encoder as `cfg` says, in `run_dir`; returns `run_dir` (None when stopped early)."""
    stage = PretrainStage(cfg)
    return train(stage, open_run(cfg, run_dir, resume, resumable_keys=stage.resumable_keys,
                                 allow_changes=allow_changes, callbacks=callbacks))


def export_encoder(accelerator, model, cfg: PretrainConfig, run_dir: Path, step: int, shards: str,
                   facts: dict | None = None) -> str | None:
    """Write encoder.safetensors + encoder.json from the full (gathered) state dict, then the
    transformers folder (run_dir/transformers, when the encoder maps onto a ViTModel) and the
    model card README.md (vitmpp.models.hub). `facts`: the card's data, length and compute.
    Returns why there is no transformers folder (main process), else None.

    Every rank must call it: under FSDP the shards are gathered (a collective) into one full
    state dict on the main process, which alone writes; the others wait for it.
    """
    state = gathered_state_dict(accelerator, model)
    refusal = None
    if accelerator.is_main_process:
        prefix = "encoder."
        weights = {}
        for key, value in state.items():
            key = key.replace("_orig_mod.", "")  # torch.compile's wrapper
            if key.startswith(prefix):
                weights[key[len(prefix):]] = value
        encoder = encoder_from_config(cfg.model)
        encoder.load_state_dict(weights)
        extra = {"mean": list(cfg.data.mean), "std": list(cfg.data.std), "shards": str(shards), **(facts or {})}
        refusal = transformers_incompatibility(encoder)
        if refusal is not None:
            extra["transformers_refusal"] = f"this encoder cannot be a transformers ViTModel: {refusal}"
        save_encoder(encoder, run_dir, objective=cfg.objective, step=step, extra=extra)
        info = read_encoder_info(run_dir)
        hf = run_dir / TRANSFORMERS_DIR
        if refusal is None:
            card = render_card({**card_facts(run_dir, info=info), "flavour": "transformers", "path": str(hf)})
            save_transformers(encoder, hf, info, card=card)
        with reported_writes(f"the model card in {run_dir}", "the encoder export is complete; write the card again "
                             f"with python -m vitmpp.models.export {run_dir} --card", run_dir):
            write_card(run_dir, info=info)
    accelerator.wait_for_everyone()
    return refusal if accelerator.is_main_process else None
