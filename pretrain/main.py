"""Pretrain a ViT encoder.

    accelerate launch pretrain/main.py [--config FILE] [key=value ...] [--resume auto|PATH]

With no arguments: the embedded default (the ViT paper's masked patch prediction
on scikit-learn's digits, tiny ViT, a few minutes on a CPU). `objective=mae` or
`objective=supervised` switch the objective. `--help-config` lists every key.
"""
from __future__ import annotations

import sys
from pathlib import Path

from vitmpp.common.cli import stage_main


def run_dir_for(cfg, config_path: str | None) -> Path:
    """runs/<run.name>, else runs/<config stem>, else runs/default-<objective>."""
    name = cfg.run.name or (Path(config_path).stem if config_path else f"default-{cfg.objective}")
    return Path(cfg.run.output_dir) / name


def _schema():
    from vitmpp.pretrain.config import PretrainConfig

    return PretrainConfig


def _run(cfg, config_path, resume):
    from vitmpp.pretrain.engine import train

    return train(cfg, run_dir_for(cfg, config_path), resume=resume)


main = stage_main(
    "pretrain/main.py", "Pretrain a ViT encoder (mpp | mae | supervised) on webdataset shards.",
    "Overrides are dotted keys, e.g. objective=mae train.steps=1000 optim.base_lr=1.5e-4.", _schema, _run)

if __name__ == "__main__":
    main(sys.argv[1:])
