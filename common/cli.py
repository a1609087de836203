"""The command line shared by the stage entry points (pretrain/main.py, finetune/main.py):

    [--config FILE] [key=value ...] [--resume auto|PATH] [--print-config] [--help-config]
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from .config import describe, dump_yaml, load_config
from .errors import cli_entry


def stage_main(prog: str, description: str, epilog: str, load_schema: Callable[[], type],
               run: Callable[[Any, str | None, str | None], Any]) -> Callable[[list[str] | None], Any]:
    """Build `main(argv)` for a stage: parse, validate the config, then `run(cfg, config_path, resume)`.

    `load_schema` is called lazily so `--help` does not import torch."""

    @cli_entry
    def main(argv: list[str] | None = None):
        parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
        parser.add_argument("--config", help="YAML recipe (see configs/); default: the embedded digits demo")
        parser.add_argument("--resume", help="'auto' (newest complete checkpoint of this run) or a checkpoint folder")
        parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        parser.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        args = parser.parse_intermixed_args(argv)
        schema = load_schema()
        if args.help_config:
            print("\n".join(describe(schema)))
            return None
        cfg = load_config(schema, args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return None
        return run(cfg, args.config, args.resume)

    return main


