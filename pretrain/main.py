"""Pretrain a ViT encoder.

    accelerate launch pretrain/main.py [--config FILE] [key=value ...] [--resume auto|PATH]

With no arguments: the embedded default (the ViT paper's masked patch prediction
on scikit-learn's digits, tiny ViT, a few minutes on a CPU). `objective=mae` or
`objective=supervised` switch the objective. `--help-config` lists every key.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitmpp.common.config import describe, dump_yaml, load_config
from vitmpp.common.errors import cli_entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain/main.py",
        description="Pretrain a ViT encoder (mpp | mae | supervised) on webdataset shards.",
        epilog="Overrides are dotted keys, e.g. objective=mae train.steps=1000 optim.base_lr=1.5e-4. "
        "See --help-config for every key.",
    )
    parser.add_argument("--config", help="YAML recipe (configs/pretrain/*.yaml); default: the embedded digits demo")
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint of this run) or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_intermixed_args(argv)


def run_dir_for(cfg, config_path: str | None) -> Path:
    name = cfg.run.name or (Path(config_path).stem if config_path else f"default-{cfg.objective}")
    return Path(cfg.run.output_dir) / name


@cli_entry
def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    from vitmpp.pretrain.config import PretrainConfig

    if args.help_config:
        print("\n".join(describe(PretrainConfig)))
        return None
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return None
    from vitmpp.pretrain.engine import train

    return train(cfg, run_dir_for(cfg, args.config), resume=args.resume)


if __name__ == "__main__":
    main(sys.argv[1:])
