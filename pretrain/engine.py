"""The pretraining stage: what pretraining adds to the one loop (`vitmpp.common.loop`).

    shards --uint8 batches--> normalise on the device --> objective (registry: mpp | mae | simmim | ...)
        --> loss; the loop does backward, clipping, the guarded optimizer step, checkpoints and logs

Between steps: the objective's own hook (`after_optimizer_step`, e.g. an EMA
teacher), its pictures every `log.image_every` steps and the analysis figures
every `log.analysis_every`. At the end: `encoder.safetensors` + `encoder.json`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitmpp.common.loop import Plan, Run, Stage, open_run, train
from vitmpp.common.optim import build_optimizer
from vitmpp.datasets import LoaderSpec, digits_shards, normalize_batch, open_loader, pretrain_transform, read_manifest
from vitmpp.models import create_objective, encoder_from_config, flops_per_image, save_encoder

from .config import RESUMABLE_KEYS, PretrainConfig


class PretrainStage(Stage):
    """Pretrain the encoder with `cfg.objective` on the training split."""

    resumable_keys = RESUMABLE_KEYS

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
        self.mean = torch.tensor(cfg.data.mean, device=run.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=run.device).view(1, 3, 1, 1)
        return Plan(self.objective, optimizer, loader, open_loader, split.num_samples,
                    f"pretraining {cfg.objective} on {self.shards} ({split.num_samples} images)")

    def flops_per_image(self, model: torch.nn.Module) -> float | None:
        return flops_per_image(model, self.cfg.model.img_size)

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
        return False

    def log_pictures(self, step: int, images: torch.Tensor, result) -> None:
        log, tracker = self.cfg.log, self.run.tracker
        if log.image_every and step % log.image_every == 0:
            visual = self.objective.visualize(images, result)
            tracker.image(f"visual/{type(self.objective).__name__}", visual.grid, step)
            tracker.text("visual/caption", visual.caption, step)
        if log.analysis_every and step % log.analysis_every == 0:
            # the ViT paper's Figure 7 pictures of the encoder as it trains (one small forward)
            from vitmpp.analyze import training_figures

            images01 = self.objective.to_unit_range(images[:8])
            for name, figure in training_figures(self.objective.encoder, images[:8], images01).items():
                tracker.image(f"analysis/{name}", figure, step)

    def state_dict(self) -> dict:
        return {"objective": self.cfg.objective}

    def finish(self, step: int, model) -> Path:
        run = self.run
        export_encoder(run.accelerator, model, self.cfg, run.run_dir, step, self.shards)
        run.console.print(f"done: {step} steps; encoder: {run.run_dir / 'encoder.safetensors'}")
        run.console.print(f"watch: tensorboard --logdir {run.run_dir}")
        return run.run_dir


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


def export_encoder(accelerator, model, cfg: PretrainConfig, run_dir: Path, step: int, shards: str) -> None:
    """Write encoder.safetensors + encoder.json from the full (gathered) state dict.

    `get_state_dict` gathers FSDP shards too; every rank must call it.
    """
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        prefix = "encoder."
        weights = {}
        for key, value in state.items():
            key = key.replace("_orig_mod.", "")  # torch.compile's wrapper
            if key.startswith(prefix):
                weights[key[len(prefix):]] = value
        encoder = encoder_from_config(cfg.model)
        encoder.load_state_dict(weights)
        save_encoder(encoder, run_dir, objective=cfg.objective, step=step,
                     extra={"mean": list(cfg.data.mean), "std": list(cfg.data.std), "shards": str(shards)})
    accelerator.wait_for_everyone()
