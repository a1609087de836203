"""Evaluate a pretrained encoder: linear probe, full fine-tuning, scratch, or kNN.

    accelerate launch finetune/main.py [--config FILE] [encoder=PATH] [key=value ...] [--resume auto]

With no arguments: a linear probe of the default pretraining run's encoder
(runs/default-mpp) on the embedded digits data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitmpp.common.config import describe, dump_yaml, load_config
from vitmpp.common.errors import cli_entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="finetune/main.py",
        description="Evaluate an encoder with a protocol: linear | finetune | scratch | knn.",
        epilog="Overrides are dotted keys, e.g. protocol=finetune encoder=runs/mae_digits data.label_fraction=0.1.",
    )
    parser.add_argument("--config", help="YAML recipe (configs/finetune/*.yaml); default: linear probe on digits")
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint of this run) or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_intermixed_args(argv)


def run_dir_for(cfg, config_path: str | None) -> Path:
    if cfg.run.name:
        return Path(cfg.run.output_dir) / cfg.run.name
    encoder = Path(cfg.encoder).name if cfg.encoder else (cfg.model.name if cfg.protocol == "scratch" and cfg.model.name else "default-mpp")
    if encoder == "encoder.safetensors":
        encoder = Path(cfg.encoder).parent.name
    return Path(cfg.run.output_dir) / f"{cfg.protocol}-{encoder}-f{cfg.data.label_fraction:g}-s{cfg.train.seed}"


@cli_entry
def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    from vitmpp.finetune.config import FinetuneConfig

    if args.help_config:
        print("\n".join(describe(FinetuneConfig)))
        return None
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return None
    from vitmpp.finetune.engine import run

    return run(cfg, run_dir_for(cfg, args.config), resume=args.resume)


if __name__ == "__main__":
    main(sys.argv[1:])
