"""The evaluation stage: linear probe, full fine-tuning and scratch run in the one loop
(`vitmpp.common.loop`); kNN trains nothing and runs on its own.

What the stage adds to the loop: the classifier (frozen encoder + BatchNorm/linear head
for `linear`, the whole encoder + head for `finetune`, fresh weights for `scratch`), its
optimizer (LARS for the probe, AdamW with layer decay otherwise), mixup/cutmix/erasing on
the device, and an evaluation every `eval_every` epochs (or `eval_every_steps`), each followed
by a checkpoint.

Selection on validation, reporting on test: every evaluation scores the validation split and
the test split; only validation is shown while training and only validation chooses (the best
evaluation, best.safetensors). results.json reports test top-1/top-5 at the last evaluation
(`test_last_*`) and at the evaluation chosen on validation (`test_selected_*`); nothing is
chosen on test. Shards without a test split (older shards, `data.test_split: null`) report
validation only, and say so.

Writes into the run directory: config.yaml, tensorboard/, checkpoints/, metrics.jsonl,
best.safetensors (weights at the best validation top-1), results.json. The result is also recorded in the
evaluated encoder's folder (evaluations.json) and its model card (`record_on_encoder`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from vitmpp.common.errors import UserError
from vitmpp.common.io import atomic_file, atomic_write_json
from vitmpp.common.loop import Plan, Run, Stage, open_run, train
from vitmpp.common.optim import build_optimizer
from vitmpp.common.rundir import check_reuse
from vitmpp.datasets import (
    LoaderFactory,
    LoaderSpec,
    digits_shards,
    eval_transform,
    finetune_transform,
    normalize_batch,
    open_loader,
    pretrain_transform,
    read_manifest,
)
from vitmpp.evaluate.accuracy import accuracy
from vitmpp.evaluate.fewshot import fewshot_evaluate
from vitmpp.evaluate.heads import LinearProbe, make_classifier, pooled_features
from vitmpp.evaluate.knn import extract, knn_classify_splits
from vitmpp.models import create_encoder
from vitmpp.models.hub import record_evaluation
from vitmpp.models.importer import encoder_description, import_weights

from .config import RESUMABLE_KEYS, FinetuneConfig
from .subset import balanced_subset

DEFAULT_ENCODER = Path("runs") / "default-mpp"


# ----------------------------------------------------------------------------- inputs


def _scratch_without_encoder(cfg: FinetuneConfig) -> bool:
    """Scratch training of an architecture named by model.name: no encoder is read."""
    return cfg.encoder is None and cfg.protocol == "scratch" and cfg.model.name is not None


def resolve_encoder(cfg: FinetuneConfig) -> Path | None:
    """The encoder to evaluate (None for scratch without an encoder): our encoder.safetensors, or any
    checkpoint file or folder vitmpp.models.importer reads (timm, transformers, Meta's MAE, .npz, torchvision)."""
    if _scratch_without_encoder(cfg):
        return None
    path = Path(cfg.encoder) if cfg.encoder is not None else DEFAULT_ENCODER
    if path.is_dir() and (path / "config.json").is_file() and not (path / "encoder.safetensors").is_file():
        return path  # a timm or transformers folder
    if path.is_dir():
        path = path / "encoder.safetensors"
    if not path.is_file():
        if cfg.encoder is None or Path(cfg.encoder) == DEFAULT_ENCODER:
            raise UserError(
                f"There is no pretrained encoder at {path} yet; run `accelerate launch pretrain/main.py` first, "
                "or pass encoder=PATH."
            )
        raise UserError(
            f"Encoder '{cfg.encoder}' not found (looked for {path}); pass a pretraining run folder, an "
            "encoder.safetensors file or a checkpoint (docs/weights.md)."
        )
    return path


def normalisation(cfg: FinetuneConfig, info: dict) -> tuple[tuple, tuple]:
    """The encoder's own normalisation (from encoder.json) unless the config overrides it."""
    extra = info.get("extra", info) if info else {}
    mean = cfg.data.mean or tuple(extra.get("mean", IMAGENET_DEFAULT_MEAN))
    std = cfg.data.std or tuple(extra.get("std", IMAGENET_DEFAULT_STD))
    return tuple(mean), tuple(std)


def build_model(
    cfg: FinetuneConfig, encoder_path: Path | None, num_classes: int, img_size: int | None, info: dict | None = None
) -> nn.Module:
    if cfg.protocol in ("linear", "knn", "fewshot"):
        encoder = import_weights(encoder_path, img_size=img_size).encoder
        return LinearProbe(encoder, num_classes, pool=cfg.model.linear_pool)
    overrides = {"drop_path_rate": cfg.model.drop_path_rate, "global_pool": cfg.model.global_pool}
    if cfg.protocol == "finetune":
        encoder = import_weights(encoder_path, img_size=img_size, **overrides).encoder
    elif encoder_path is not None:  # scratch: the encoder's architecture, fresh weights
        info = info or encoder_description(encoder_path)
        encoder = create_encoder(
            info["name"], img_size=img_size or info["img_size"], **{**info.get("overrides", {}), **overrides}
        )
    else:
        encoder = create_encoder(cfg.model.name, img_size=img_size, **overrides)
    return make_classifier(encoder, num_classes, cfg.model.global_pool)


# ----------------------------------------------------------------------------- the stage


class EvaluationData:
    """The shards, the label subset and the normalisation of one evaluation run."""

    def __init__(self, cfg: FinetuneConfig, run: Run):
        self.encoder_path = resolve_encoder(cfg)
        self.info = encoder_description(self.encoder_path)
        self.img_size = cfg.model.img_size or self.info.get("img_size") or 32
        self.shards = cfg.data.shards or digits_shards(self.img_size)
        self.manifest = read_manifest(self.shards)
        self.val_split = self.manifest.split(cfg.data.val_split)
        self.test_split = self._test_split(cfg, run)
        self.keep = None
        if cfg.data.label_fraction < 1:
            self.keep = balanced_subset(
                self.manifest.labels(cfg.data.train_split), cfg.data.label_fraction, cfg.train.seed
            )
        self.num_train = (
            len(self.keep) if self.keep is not None else self.manifest.split(cfg.data.train_split).num_samples
        )
        self._warn_unseen_classes(cfg, run)
        mean, std = normalisation(cfg, self.info)
        if "source" in self.info:  # an imported checkpoint: say what it is and what this run assumes of it
            source = self.info["source"]
            run.console.print(f"encoder: {source['path']} ({source['format']}, sha256 {source['sha256'][:12]})")
            for note in self.info.get("notes", []):
                run.console.print(f"note: {note}")
            if not self.info["extra"] and not (cfg.data.mean and cfg.data.std):
                run.console.print(
                    f"note: the checkpoint states no normalisation; this run uses mean {mean} and std "
                    f"{std} (set data.mean and data.std to change them)"
                )
        self.mean = torch.tensor(mean, device=run.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=run.device).view(1, 3, 1, 1)
        eval_tf = eval_transform(self.img_size, crop_pct=cfg.data.eval_crop_pct, interpolation=cfg.data.interpolation)
        common = dict(
            shards=self.shards,
            manifest=self.manifest,
            batch_size=cfg.knn.batch_size,
            transform=eval_tf,
            training=False,
            rank=run.rank,
            world_size=run.world,
            num_workers=cfg.data.num_workers,
            max_skip_fraction=cfg.data.max_skip_fraction,
        )
        self.val_spec = LoaderSpec(split=cfg.data.val_split, **common)
        self.test_spec = LoaderSpec(split=cfg.data.test_split, **common) if self.test_split is not None else None
        self.train_eval_spec = LoaderSpec(split=cfg.data.train_split, keep_indices=_as_tuple(self.keep), **common)

    def _test_split(self, cfg: FinetuneConfig, run: Run):
        """The manifest's test split, or None (with one console line saying what that means)."""
        if cfg.data.test_split is None:
            return None
        if cfg.data.test_split == cfg.data.val_split:
            raise UserError(
                f"data.test_split and data.val_split are both '{cfg.data.val_split}': results would be "
                "reported on the split they were chosen on; name another split, or set data.test_split=null."
            )
        if cfg.data.test_split not in self.manifest.splits:
            run.console.warn(
                f"the shards {self.shards} have no '{cfg.data.test_split}' split, so results report "
                f"'{cfg.data.val_split}' only, the split choices are made on; rewrite them with "
                "make_shards (it writes a test split), or set data.test_split=null to silence this."
            )
            return None
        return self.manifest.split(cfg.data.test_split)

    def queries(self) -> dict:
        """{split name: (loader spec, sample count)} of the evaluated splits: validation, then test."""
        splits = {"validation": (self.val_spec, self.val_split.num_samples)}
        if self.test_split is not None:
            splits["test"] = (self.test_spec, self.test_split.num_samples)
        return splits

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
        run.console.warn(
            f"validation split '{val_split}' of {self.shards} holds {len(unseen)} class(es) that "
            f"training never sees: {named}{more} ({count} of {len(val)} validation images, which no "
            f"classifier trained here can get right); rewrite the shards so that every class is in "
            f"'{train_split}'."
        )

    def summary(self, cfg: FinetuneConfig, world: int) -> str:
        test = f", {self.test_split.num_samples} test images" if self.test_split is not None else ", no test split"
        return (
            f"{cfg.protocol}: encoder {self.encoder_path or cfg.model.name}, {self.num_train} training images "
            f"(label fraction {cfg.data.label_fraction}), {self.val_split.num_samples} validation images{test}, "
            f"{self.manifest.num_classes} classes, {world} process(es)"
        )


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
        model = build_model(cfg, data.encoder_path, data.manifest.num_classes, data.img_size, data.info)
        if cfg.protocol == "linear":
            transform = pretrain_transform(
                data.img_size,
                scale=tuple(cfg.data.crop_scale),
                hflip=cfg.data.hflip,
                interpolation=cfg.data.interpolation,
            )
            optimizer = _linear_optimizer(model, cfg, run.peak_lr)
        else:
            transform = finetune_transform(
                data.img_size,
                auto_augment=cfg.data.auto_augment,
                scale=tuple(cfg.data.crop_scale),
                hflip=cfg.data.hflip,
                interpolation=cfg.data.interpolation,
            )
            optimizer = build_optimizer(model, cfg.optim, run.peak_lr)
        self.mix, self.erase, self.criterion = _regularizers(cfg, data.manifest.num_classes, run.device)
        loader = LoaderSpec(
            shards=data.shards,
            manifest=data.manifest,
            split=cfg.data.train_split,
            batch_size=run.geometry.per_device_batch,
            transform=transform,
            training=True,
            seed=cfg.train.seed,
            rank=run.rank,
            world_size=run.world,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            keep_indices=_as_tuple(data.keep),
            pin_memory=run.device.type == "cuda",
            max_skip_fraction=cfg.data.max_skip_fraction,
        )
        run.console.print(data.summary(cfg, run.world))
        # the training loaders (data.loader's kind; evaluation keeps open_loader)
        loaders = LoaderFactory.for_run(cfg.data, loader, run.device)
        return Plan(model, optimizer, loaders, data.num_train, f"{cfg.protocol} on {data.shards}")

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
        scored = {
            split: accuracy(run.accelerator, model, open_loader(spec), data.mean, data.std, count)
            for split, (spec, count) in data.queries().items()
        }
        scores = scored["validation"]
        epoch_done = step / run.schedule.steps_per_epoch
        row = {
            "epoch": round(epoch_done, 2),
            "step": step,
            "top1": scores["top1"],
            "top5": scores["top5"],
            "count": scores["count"],
        }
        if "test" in scored:  # kept for the report at the end; never shown, logged or compared while training
            row.update(
                test_top1=scored["test"]["top1"], test_top5=scored["test"]["top5"], test_count=scored["test"]["count"]
            )
        self.history.append(row)
        run.tracker.scalars(
            {"top1": scores["top1"], "top5": scores["top5"]}, step=step
        )  # linear/top1, ... (validation)
        best = max(self.history, key=lambda row: row["top1"])
        run.console.print(
            f"step {step}/{run.schedule.total_steps} (epoch {epoch_done:.1f}): validation top-1 "
            f"{scores['top1']:.2f}  top-5 {scores['top5']:.2f}  (best {best['top1']:.2f} at step {best['step']})"
        )
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
        results = _results(
            self.cfg,
            data,
            self.history,
            epochs=run.schedule.epochs,
            started=self.started,
            images_seen=run.schedule.total_steps * run.geometry.global_batch,
        )
        if run.accelerator.is_main_process:
            atomic_write_json(run.run_dir / "results.json", results)
        run.console.print(f"done: {_result_line(results)}; results: {run.run_dir / 'results.json'}")
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


def canonical_encoder(cfg: FinetuneConfig) -> FinetuneConfig:
    """`cfg` with `encoder` spelled one way for one encoder: null (the default) as runs/default-mpp, a
    run's encoder.safetensors as its folder, without './' or a trailing '/'. The run folder and its
    config then agree whichever documented spelling was used (README's `./launch.sh finetune` and the
    `encoder=runs/default-mpp` the end of pretraining prints are one probe)."""
    if _scratch_without_encoder(cfg):
        return cfg
    path = Path(os.path.normpath(cfg.encoder)) if cfg.encoder is not None else DEFAULT_ENCODER
    if path.name == "encoder.safetensors" and (path.parent / "encoder.json").is_file():
        path = path.parent
    return dataclasses.replace(cfg, encoder=str(path))


def command(cfg: FinetuneConfig, config_path: str | None, resume: str | None, allow_changes: bool = False) -> dict:
    """What `finetune/main.py` runs once its command line is parsed."""
    cfg = canonical_encoder(cfg)
    return run(cfg, run_dir_for(cfg, config_path), resume=resume, allow_changes=allow_changes)


def run(
    cfg: FinetuneConfig, run_dir: Path, resume: str | None = None, callbacks=(), allow_changes: bool = False
) -> dict:
    """Run one protocol as `cfg` says, in `run_dir`; returns the results written to results.json."""
    stage = FinetuneStage(cfg)
    finished = run_dir / "results.json"
    if resume is None and finished.is_file() and not check_reuse(run_dir, cfg, "auto", ignore=stage.resumable_keys):
        results = json.loads(finished.read_text())  # the same evaluation, already done: its results, not a refusal
        print(f"{run_dir} is already finished: {_result_line(results)} (choose another run.name to run it again)")
        return results
    evaluation = open_run(
        cfg, run_dir, resume, resumable_keys=stage.resumable_keys, allow_changes=allow_changes, callbacks=callbacks
    )
    if resume is not None and finished.is_file():
        results = json.loads(finished.read_text())
        evaluation.console.print(f"{run_dir} is already finished: {_result_line(results)}")
        return results
    if cfg.protocol == "knn":
        return run_knn(cfg, evaluation)
    if cfg.protocol == "fewshot":
        return run_fewshot(cfg, evaluation)
    return train(stage, evaluation) or {}


def run_knn(cfg: FinetuneConfig, run: Run) -> dict:
    """k-NN on frozen features: nothing trains, so no loop; results.json and one TensorBoard point."""
    started = time.time()
    data = EvaluationData(cfg, run)
    run.console.print(data.summary(cfg, run.world))
    model = build_model(cfg, data.encoder_path, data.manifest.num_classes, data.img_size, data.info).to(run.device)
    encoder = model.encoder
    scored = knn_classify_splits(
        run.accelerator,
        lambda x: pooled_features(encoder, x, cfg.model.linear_pool),
        open_loader(data.train_eval_spec),
        {split: (open_loader(spec), count) for split, (spec, count) in data.queries().items()},
        data.mean,
        data.std,
        data.manifest.num_classes,
        cfg.knn.k,
        cfg.knn.temperature,
    )
    metrics = scored["validation"]
    row = {"epoch": 0, "step": 0, "top1": metrics["top1"], "top5": metrics["top5"], "count": metrics["count"]}
    if "test" in scored:
        row.update(
            test_top1=scored["test"]["top1"], test_top5=scored["test"]["top5"], test_count=scored["test"]["count"]
        )
    results = _results(cfg, data, [row], epochs=0, started=started, images_seen=0)  # a bank is no training
    tracker, _ = run.open_records(None, cfg.protocol)
    if run.accelerator.is_main_process:
        atomic_write_json(run.run_dir / "results.json", results)
    tracker.scalars({"top1": metrics["top1"], "top5": metrics["top5"]}, step=0)  # knn/top1, knn/top5 (validation)
    tracker.close()
    run.console.print(f"knn (k={cfg.knn.k}): {_result_line(results)}")
    record_on_encoder(cfg, run, data, results)
    return results


def run_fewshot(cfg: FinetuneConfig, run: Run) -> dict:
    """Few-shot linear evaluation (ViT paper §4.1) on frozen features: every shot count and seed solved in
    closed form, the regulariser chosen on validation, test scored at it; results.json holds each (shots,
    seed) and, as its headline (`test_last_top1`...), the mean over seeds of the first of fewshot.shots."""
    started = time.time()
    data = EvaluationData(cfg, run)
    run.console.print(data.summary(cfg, run.world))
    if data.test_split is None:
        raise UserError(
            f"protocol=fewshot reports the test split, and the shards {data.shards} have none; rewrite "
            "them with make_shards (it writes one)."
        )
    model = build_model(cfg, data.encoder_path, data.manifest.num_classes, data.img_size, data.info).to(run.device)
    encoder = model.encoder

    def features(images):
        return pooled_features(encoder, images, cfg.model.linear_pool)

    splits = {"train": data.train_eval_spec, **{name: spec for name, (spec, _) in data.queries().items()}}
    extracted = {
        name: extract(
            run.accelerator,
            features,
            open_loader(dataclasses.replace(spec, batch_size=cfg.fewshot.batch_size)),
            data.mean,
            data.std,
            l2_normalise=False,
        )
        for name, spec in splits.items()
    }
    extracted = {name: (x.cpu(), y.cpu()) for name, (x, y) in extracted.items()}
    solve_started = time.perf_counter()
    per_seed = fewshot_evaluate(
        extracted["train"],
        extracted["validation"],
        extracted["test"],
        data.manifest.num_classes,
        list(cfg.fewshot.shots),
        list(cfg.fewshot.seeds),
    )
    solve_ms = 1000 * (time.perf_counter() - solve_started)
    rows = []
    for k in cfg.fewshot.shots:
        mine = [r for r in per_seed if r.shots == k]
        val, test = [r.val_top1 for r in mine], [r.test_top1 for r in mine]
        rows.append(
            {
                "epoch": 0,
                "step": 0,
                "shots": k,
                "top1": float(np.mean(val)),
                "top5": None,
                "count": len(extracted["validation"][1]),
                "test_top1": float(np.mean(test)),
                "test_top5": None,
                "test_top1_std": float(np.std(test)),
                "seeds": len(mine),
                "test_count": len(extracted["test"][1]),
            }
        )
    results = _results(cfg, data, rows[:1], epochs=0, started=started, images_seen=0)
    results.update(
        shots=list(cfg.fewshot.shots),
        by_shots=rows,
        per_seed=[dataclasses.asdict(r) for r in per_seed],
        solve_ms=round(solve_ms, 1),
        train_images=cfg.fewshot.shots[0] * data.manifest.num_classes,
    )  # the headline's training set
    tracker, _ = run.open_records(None, cfg.protocol)
    if run.accelerator.is_main_process:
        atomic_write_json(run.run_dir / "results.json", results)
    tracker.scalars({f"top1_{row['shots']}shot": row["top1"] for row in rows}, step=0)  # validation, as knn's
    tracker.close()
    line = ", ".join(f"{row['shots']}-shot {row['test_top1']:.2f} ± {row['test_top1_std']:.2f}" for row in rows)
    run.console.print(
        f"fewshot (test top-1, mean ± std over seeds {', '.join(map(str, cfg.fewshot.seeds))}; "
        f"regulariser chosen on validation): {line}; the solves took {solve_ms:.0f} ms after "
        f"extracting the features of {sum(len(y) for _, y in extracted.values())} images"
    )
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
        "run": str(run.run_dir.resolve()),
        "protocol": cfg.protocol,
        "label_fraction": cfg.data.label_fraction,
        "seed": cfg.train.seed,
        "dataset": data.manifest.name,
        "shards": str(data.shards),
        "img_size": data.img_size,
        # the last evaluation on test (validation only when the shards have none): nothing was chosen on it
        **(
            {
                "split": cfg.data.test_split,
                "top1": results["test_last_top1"],
                "top5": results["test_last_top5"],
                "test_selected_top1": results["test_selected_top1"],
                "test_images": results["test_images"],
            }
            if results["test_last_top1"] is not None
            else {"split": cfg.data.val_split, "top1": results["val_last_top1"], "top5": results["val_last_top5"]}
        ),
        "train_images": results["train_images"],
        "val_images": results["val_images"],
        "epochs": results["epochs"],
    }
    if cfg.protocol == "knn":
        record["k"] = cfg.knn.k
    if cfg.protocol == "fewshot":
        record.update(shots=results["shots"][0], seeds=len(cfg.fewshot.seeds))
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
        mix = Mixup(
            mixup_alpha=reg.mixup,
            cutmix_alpha=reg.cutmix,
            prob=reg.mixup_prob,
            switch_prob=reg.mixup_switch_prob,
            mode="batch",
            label_smoothing=reg.label_smoothing,
            num_classes=num_classes,
        )
        criterion = SoftTargetCrossEntropy()
    elif reg.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=reg.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    erase = (
        RandomErasing(probability=reg.reprob, mode="pixel", max_count=1, device=str(device)) if reg.reprob > 0 else None
    )
    return mix, erase, criterion


def _save_weights(accelerator, model, path: Path) -> None:
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with atomic_file(path) as tmp:
            save_file({k.replace("_orig_mod.", ""): v.contiguous() for k, v in state.items()}, str(tmp))


def _results(
    cfg: FinetuneConfig, data: EvaluationData, history: list[dict], *, epochs, started, images_seen: int
) -> dict:
    """results.json: validation at the last and the best evaluation (choices are made there), test at the
    last evaluation and at the one chosen on validation top-1 (None without a test split)."""
    last = history[-1]
    chosen = max(history, key=lambda row: row["top1"])  # the first of equal bests: earlier is cheaper
    has_test = "test_top1" in last
    return {
        "protocol": cfg.protocol,
        "encoder": str(data.encoder_path) if data.encoder_path else None,
        "encoder_info": data.info,
        "label_fraction": cfg.data.label_fraction,
        "train_images": data.num_train,
        "val_images": int(last.get("count", 0)),
        "test_images": int(last["test_count"]) if has_test else 0,
        "seed": cfg.train.seed,
        "epochs": epochs,
        "images_seen": images_seen,  # training images this run went through (steps x global batch)
        "val_last_top1": last["top1"],
        "val_last_top5": last["top5"],
        "val_best_top1": chosen["top1"],
        "val_best_top5": chosen["top5"],
        "selected_step": chosen["step"],
        "test_last_top1": last["test_top1"] if has_test else None,
        "test_last_top5": last["test_top5"] if has_test else None,
        "test_selected_top1": chosen.get("test_top1") if has_test else None,
        "test_selected_top5": chosen.get("test_top5") if has_test else None,
        "history": history,
        "wall_time_s": round(time.time() - started, 1),
    }


def _result_line(results: dict) -> str:
    """One line for the console: test at the last and the validation-chosen evaluation, else validation."""
    if results.get("test_last_top1") is not None:
        return (
            f"test top-1 {results['test_last_top1']:.2f} (last), {results['test_selected_top1']:.2f} (at step "
            f"{results['selected_step']}, chosen on validation: {results['val_best_top1']:.2f})"
        )
    return (
        f"validation top-1 {results['val_last_top1']:.2f} (last), best {results['val_best_top1']:.2f} at step "
        f"{results['selected_step']} (no test split: both are from the split choices are made on)"
    )
