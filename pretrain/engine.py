"""The pretraining stage: what pretraining adds to the one loop (`vitmpp.common.loop`).

    shards --uint8 batches--> pixels in [0, 1] on the device --> objective (registry: mpp | mae | simmim | ...;
        it normalises its encoder's input) --> loss; the loop does backward, clipping, the guarded optimizer
        step, checkpoints and logs

Between steps: the objective's own hook (`after_optimizer_step`, e.g. an EMA
teacher), its pictures every `log.image_every` steps and the analysis figures
every `log.analysis_every`, and every `eval.every` steps the online evaluation
(`vitmpp.evaluate.online`): kNN top-1/top-5 on the validation split and the objective's
validation loss, as `eval/...` in TensorBoard and metrics.jsonl. At the end:
`encoder.safetensors` + `encoder.json`, the same weights as a transformers folder
(`transformers/`), and the model card `README.md` (vitmpp.models.hub; docs/export.md).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from vitmpp.common.distributed import gathered_state_dict
from vitmpp.common.io import reported_writes
from vitmpp.common.loop import Plan, Run, Stage, open_run, train
from vitmpp.common.optim import build_optimizer
from vitmpp.datasets import LoaderFactory, LoaderSpec, digits_shards, pretrain_transform, read_manifest, unit_pixels
from vitmpp.datasets.transforms import TINY_IMAGE
from vitmpp.evaluate.online import EVAL_SPLIT, EvalSpecs, eval_specs, evaluate_online
from vitmpp.models import create_objective, encoder_from_config, flops_per_image, read_encoder_info, save_encoder
from vitmpp.models.card import render_card
from vitmpp.models.hub import (
    CARD_NAME,
    TRANSFORMERS_DIR,
    card_facts,
    save_transformers,
    transformers_incompatibility,
    write_card,
)
from vitmpp.models.importer import initialise_from

from .config import RESUMABLE_KEYS, PretrainConfig

EVAL_GROUP = "eval"  # its TensorBoard group and metrics.jsonl prefix: eval/knn_top1, eval/knn_top5, eval/loss


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
        self.objective = create_objective(
            cfg.objective,
            encoder_from_config(cfg.model),
            cfg.objective_config(),
            mean=cfg.data.mean,
            std=cfg.data.std,
            num_classes=manifest.num_classes,
        )
        self.init = None
        if cfg.model.init is not None and run.resume_from is None:  # a resumed run holds the weights already
            self.init = initialise_from(self.objective, cfg.model.init, parts=cfg.model.init_parts)
            self.say_init(cfg, run)
        transform = type(self.objective).training_transform(cfg.model.img_size, cfg.data) or pretrain_transform(
            cfg.model.img_size,
            scale=tuple(cfg.data.crop_scale),
            hflip=cfg.data.hflip,
            interpolation=cfg.data.interpolation,
        )
        optimizer = build_optimizer(self.objective, cfg.optim, run.peak_lr)
        loader = LoaderSpec(
            shards=self.shards,
            manifest=manifest,
            split=cfg.data.train_split,
            batch_size=run.geometry.per_device_batch,
            transform=transform,
            training=True,
            seed=cfg.train.seed,
            rank=run.rank,
            world_size=run.world,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            pin_memory=run.device.type == "cuda",
            max_skip_fraction=cfg.data.max_skip_fraction,
        )
        # Under FSDP the main process holds a shard of the encoder, which the analysis figures cannot
        # run on alone (a forward is a collective); they are drawn from the export instead.
        self.sharded = run.accelerator.distributed_type.value == "FSDP"
        if self.sharded and cfg.log.analysis_every:
            run.console.print(
                "note: no analysis figures in TensorBoard under FSDP (the encoder is sharded); draw them "
                f"from the export: python -m vitmpp.analyze --encoder {run.run_dir} --shards ... --out ..."
            )
        self.mean = torch.tensor(cfg.data.mean, device=run.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=run.device).view(1, 3, 1, 1)
        self.eval_specs = self.online_eval_specs(manifest)
        self.eval_clock: tuple[int, float] | None = None  # (step, time) the steps before the next evaluation began
        loaders = LoaderFactory.for_run(
            cfg.data, loader, run.device
        )  # data.loader's kind; evaluation keeps open_loader
        return Plan(
            self.objective,
            optimizer,
            loaders,
            split.num_samples,
            f"pretraining {cfg.objective} on {self.shards} ({split.num_samples} images)",
        )

    def flops_per_image(self, model: torch.nn.Module) -> float | None:
        return flops_per_image(model, self.cfg.model.img_size)

    def online_eval_specs(self, manifest) -> EvalSpecs | None:
        """The online evaluation's loaders (`eval_specs`), or None (with a note) when it is off or cannot run."""
        cfg, run = self.cfg, self.run
        if not cfg.eval.every:
            return None
        if self.sharded:
            run.console.print(
                "note: no online evaluation under FSDP (the encoder is sharded); evaluate the export "
                f"instead: ./launch.sh finetune protocol=knn encoder={run.run_dir}"
            )
            return None
        if EVAL_SPLIT not in manifest.splits:
            run.console.print(f"note: no online evaluation: the shards {self.shards} have no '{EVAL_SPLIT}' split")
            return None
        return eval_specs(
            self.shards,
            manifest,
            cfg.data.train_split,
            cfg.model.img_size,
            knn_images=cfg.eval.knn_images,
            loss_images=cfg.eval.loss_images,
            loss_batch=run.geometry.per_device_batch,
            seed=cfg.train.seed,
            rank=run.rank,
            world=run.world,
            num_workers=cfg.data.num_workers,
            interpolation=cfg.data.interpolation,
            max_skip_fraction=cfg.data.max_skip_fraction,
        )

    def log_evaluation(self, step: int) -> None:
        """The online evaluation of the model as it is now: TensorBoard, a metrics.jsonl row, one console line.
        Every rank takes part (`evaluate_online`)."""
        cfg, run = self.cfg, self.run
        started = time.perf_counter()
        scores = evaluate_online(
            run.accelerator,
            self.objective,
            self.eval_specs,
            self.mean,
            self.std,
            k=cfg.eval.k,
            temperature=cfg.eval.temperature,
            pool=cfg.eval.pool,
            seed=cfg.train.seed,
            fewshot_shots=tuple(cfg.eval.fewshot_shots),
        )
        seconds = time.perf_counter() - started
        cost = ""
        if self.eval_clock is not None and self.eval_clock[0] < step:  # its cost against the steps since the last
            since, budget = self.eval_clock[0], started - self.eval_clock[1]
            cost = f" = {100 * seconds / budget:.1f}% of the {budget:.1f}s of steps {since + 1}-{step}"
        fewshot = [f"fewshot_{k}shot" for k in cfg.eval.fewshot_shots]
        tagged = run.tracker.scalars(
            {name: scores[name] for name in ("knn_top1", "knn_top5", "loss", *fewshot)}, step=step, group=EVAL_GROUP
        )
        if run.metrics is not None:  # a row of its own beside the step's loss row: {"step", "eval/knn_top1", ...}
            row = {tag: value if math.isfinite(value) else None for tag, value in tagged.items()}
            run.metrics.append(
                [
                    {
                        "step": step,
                        **row,
                        f"{EVAL_GROUP}/knn_count": scores["knn_count"],
                        f"{EVAL_GROUP}/loss_count": scores["loss_count"],
                    }
                ]
            )
        shots = "".join(f"  {k}-shot {scores[f'fewshot_{k}shot']:.2f}" for k in cfg.eval.fewshot_shots)
        run.console.print(
            f"step {step}: eval kNN top-1 {scores['knn_top1']:.2f}  top-5 {scores['knn_top5']:.2f}{shots}  "
            f"validation loss {scores['loss']:.4f}  ({scores['knn_count']} validation images, bank "
            f"{scores['bank']}; {seconds:.2f}s{cost})"
        )
        self.eval_clock = (step, time.perf_counter())

    def forward(self, model, batch):
        pixels = unit_pixels(batch.images.to(self.run.device, non_blocking=True))
        output = model(pixels, batch.labels.to(self.run.device, non_blocking=True))
        return output.loss, (pixels, output)

    def begin(self, step: int, total_steps: int) -> None:
        self.objective.set_run_length(total_steps)

    def after_step(self, step: int, model, output) -> bool:
        self.objective.after_optimizer_step(step)
        log = self.cfg.log
        due = [every for every in (log.image_every, log.analysis_every) if every and step % every == 0]
        if due and self.run.accelerator.is_main_process:
            with self.run.callbacks.phase("pictures"):
                self.log_pictures(step, *output)
        if self.eval_specs is not None:
            if self.eval_clock is None:  # the first step of this process: the clock of the first cost starts here
                self.eval_clock = (step, time.perf_counter())
            if step % self.cfg.eval.every == 0:
                with self.run.callbacks.phase("eval"):
                    self.log_evaluation(step)
        return False

    def log_pictures(self, step: int, pixels: torch.Tensor, result) -> None:
        log, tracker = self.cfg.log, self.run.tracker
        if log.image_every and step % log.image_every == 0:
            # four images: the grid, under a header naming its columns, and the encoder's figures below
            # it fit TensorBoard's first screen; the caption (TEXT tab) says the rest
            visual = self.objective.visualize(pixels, result, max_images=4)
            tracker.image(tracker.picture_tag("batch", self.cfg.objective), visual.labelled(), step)
            tracker.text(tracker.picture_tag("batch", "caption"), visual.caption, step)
        if log.analysis_every and step % log.analysis_every == 0 and not self.sharded:
            # the analyze command's figures (ViT paper's Figure 7, rollout) as the encoder trains: one small forward
            from vitmpp.analyze.training import TRAINING_GROUP, TRAINING_TAGS, training_figures

            objective = self.objective
            for name, figure in training_figures(
                objective.feature_encoder(), objective.normalize(pixels[:8]), pixels[:8]
            ).items():
                tracker.image(tracker.picture_tag(TRAINING_GROUP, TRAINING_TAGS[name]), figure, step)

    def say_init(self, cfg, run: Run) -> None:
        init = self.init
        run.console.print(
            f"model.init: {', '.join(init['parts'])} from {init['path']} ({init['format']}, sha256 "
            f"{init['sha256'][:12]})"
        )
        for note in init["notes"]:
            run.console.print(f"note: {note}")
        stated = init["normalisation"]
        if stated is not None and (tuple(stated["mean"]), tuple(stated["std"])) != (
            tuple(cfg.data.mean),
            tuple(cfg.data.std),
        ):
            run.console.print(
                f"note: the checkpoint was trained with mean {tuple(stated['mean'])} and std "
                f"{tuple(stated['std'])} ({stated['from']}); this run uses data.mean {tuple(cfg.data.mean)} "
                f"and data.std {tuple(cfg.data.std)}: set them to the checkpoint's to keep its inputs"
            )

    def state_dict(self) -> dict:
        # the init's record travels with the checkpoints: a resumed run exports the same source
        return {"objective": self.cfg.objective, "init": self.init}

    def load_state_dict(self, state: dict) -> None:
        self.init = state.get("init")

    def finish(self, step: int, model) -> Path:
        run = self.run
        refusal = export_encoder(
            run.accelerator, model, self.cfg, run.run_dir, step, self.shards, facts=self.export_facts(step)
        )
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
            "uses_labels": type(self.objective).uses_labels,
            "init": self.init,  # the weights the run started from (None: random), as model.init recorded them
            "data": {
                "shards": str(self.shards),
                "name": manifest.name,
                "source": manifest.source,
                "num_classes": manifest.num_classes,
                "image_size": manifest.image_size,
                "train_split": cfg.data.train_split,
                "splits": {name: info.num_samples for name, info in manifest.splits.items()},
            },
            "train": {
                "steps": step,
                "global_batch": global_batch,
                "images_seen": images,
                "world_size": run.world,
                "epochs": images / split.num_samples if split.num_samples else None,
            },
        }
        try:
            per_image = flops_per_image(self.objective, cfg.model.img_size)
        except Exception as err:  # noqa: BLE001 - a count that fails must not cost the export
            facts["compute"] = {"how": f"FLOPs were not counted ({type(err).__name__}: {err})."}
        else:
            facts["compute"] = {
                "flops_per_image": per_image,
                "total_flops": per_image * images,
                "how": "FLOPs of one training image (forward and backward through the objective, matrix multiplies, "
                "convolutions and attention) were counted by torch's FlopCounterMode on the meta device "
                "(vitmpp.models.flops); the total is that count times the images seen.",
            }
        return facts


def next_commands(run_dir: Path, cfg: PretrainConfig) -> list[str]:
    """The last lines of a pretraining run: how to evaluate the encoder it wrote."""
    import shlex

    name = shlex.quote(str(run_dir))
    data = f" data.shards={shlex.quote(cfg.data.shards)}" if cfg.data.shards else ""
    overrides = f" {shlex.quote(f'overrides=[data.shards={cfg.data.shards}]')}" if cfg.data.shards else ""
    # this encoder against a random one and scratch, in place of the recipes the config pretrains itself
    encoders = (
        shlex.quote(f"encoders={{{cfg.objective}: {run_dir}, random: random}}")
        + " "
        + shlex.quote("pretraining.recipes={}")
    )
    return [
        f"next, a linear probe:  ./launch.sh finetune encoder={name}{data}",
        f"or the comparison:     python -m vitmpp.experiments.compare --config configs/compare/digits.yaml {encoders} "
        f"output_dir={shlex.quote(f'runs/compare/{run_dir.name}')}{overrides}",
    ]


def run_dir_for(cfg: PretrainConfig, config_path: str | None) -> Path:
    """runs/<run.name>, else runs/<config stem>, else runs/default-<objective>."""
    name = cfg.run.name or (Path(config_path).stem if config_path else f"default-{cfg.objective}")
    return Path(cfg.run.output_dir) / name


def command(cfg: PretrainConfig, config_path: str | None, resume: str | None, allow_changes: bool = False) -> Any:
    """What `pretrain/main.py` runs once its command line is parsed."""
    return pretrain(cfg, run_dir_for(cfg, config_path), resume=resume, allow_changes=allow_changes)


def pretrain(
    cfg: PretrainConfig, run_dir: Path, resume: str | None = None, callbacks=(), allow_changes: bool = False
) -> Any:
    """Pretrain an encoder as `cfg` says, in `run_dir`; returns `run_dir` (None when stopped early)."""
    stage = PretrainStage(cfg)
    return train(
        stage,
        open_run(
            cfg, run_dir, resume, resumable_keys=stage.resumable_keys, allow_changes=allow_changes, callbacks=callbacks
        ),
    )


def export_encoder(
    accelerator, model, cfg: PretrainConfig, run_dir: Path, step: int, shards: str, facts: dict | None = None
) -> str | None:
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
        trained = accelerator.unwrap_model(model)
        trained = getattr(trained, "_orig_mod", trained)  # torch.compile's wrapper
        encoder = encoder_from_config(cfg.model)
        encoder.load_state_dict(trained.exported_state_dict(state))  # the objective's exported_module()
        trained_pos = trained.exported_module().pos_embed
        if trained_pos is not None and encoder.pos_embed is not None and not trained_pos.requires_grad:
            # a table the objective fixed (MAE's sin-cos): the export records it as such, not as learned
            encoder.pos_embed.requires_grad_(False)
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
        with reported_writes(
            f"the model card in {run_dir}",
            "the encoder export is complete; write the card again "
            f"with python -m vitmpp.models.export {run_dir} --card",
            run_dir,
        ):
            write_card(run_dir, info=info)
    accelerator.wait_for_everyone()
    return refusal if accelerator.is_main_process else None
