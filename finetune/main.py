"""Evaluate a pretrained encoder: linear probe, full fine-tuning, scratch, or kNN.

    accelerate launch finetune/main.py [--config FILE] [encoder=PATH] [key=value ...] [--resume auto]

With no arguments: a linear probe of the default pretraining run's encoder
(runs/default-mpp) on the embedded digits data.
"""
from __future__ import annotations

import sys
from pathlib import Path

from vitmpp.common.cli import stage_main


def run_dir_for(cfg, config_path: str | None) -> Path:
    """runs/<run.name>, else runs/<protocol>-<encoder>-f<label fraction>-s<seed>."""
    if cfg.run.name:
        return Path(cfg.run.output_dir) / cfg.run.name
    if cfg.encoder:
        encoder = Path(cfg.encoder)
        encoder = encoder.parent.name if encoder.suffix == ".safetensors" else encoder.name
    else:
        encoder = cfg.model.name if cfg.protocol == "scratch" and cfg.model.name else "default-mpp"
    return Path(cfg.run.output_dir) / f"{cfg.protocol}-{encoder}-f{cfg.data.label_fraction:g}-s{cfg.train.seed}"


def _schema():
    from vitmpp.finetune.config import FinetuneConfig

    return FinetuneConfig


def _run(cfg, config_path, resume):
    from vitmpp.finetune.engine import run

    return run(cfg, run_dir_for(cfg, config_path), resume=resume)


main = stage_main(
    "finetune/main.py", "Evaluate an encoder with a protocol: linear | finetune | scratch | knn.",
    "Overrides are dotted keys, e.g. protocol=finetune encoder=runs/mae_digits data.label_fraction=0.1.", _schema, _run)

if __name__ == "__main__":
    main(sys.argv[1:])
