"""The command line shared by the stage entry points (pretrain/main.py, finetune/main.py):

    [--config FILE] [key=value ...] [--resume auto|PATH [--allow-changes]] [--print-config] [--help-config]

`parse_stage_command` is the same parsing for code that runs a stage itself (the
benchmarks, which add their own loop callbacks).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .config import describe, dump_yaml, load_config
from .errors import UserError, cli_entry


def stage_parser(prog: str, description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--config", help="YAML recipe (see configs/); default: the embedded digits demo")
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint of this run) or a checkpoint folder")
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: continue under changed keys that alter the computation (optimizer, model, "
        "data, batch, seeds); the run folder's config-history/ records which steps ran under which",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with the value this command line would use, and exit",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def parse_stage_command(schema: type, argv: list[str] | None, prog: str = "stage") -> tuple[Any, argparse.Namespace]:
    """(resolved config, parsed arguments) of a stage command line."""
    args = stage_parser(prog).parse_intermixed_args(argv)
    return load_config(schema, args.config, args.overrides), args


def stage_main(prog: str, doc: str, *, schema: str, command: str, epilog: str) -> Callable[[list[str] | None], Any]:
    """Build `main(argv)` for a stage: parse, validate the config, then
    `command(cfg, config_path, resume, allow_changes=...)`.

    `schema` and `command` are "module:name" paths, imported only once the arguments are
    parsed, so `--help` answers without importing torch. `doc`: the entry point's docstring
    (its first line is the description)."""

    @cli_entry
    def main(argv: list[str] | None = None):
        args = stage_parser(prog, doc.strip().splitlines()[0], epilog).parse_intermixed_args(argv)
        cfg = load_config(_imported(schema), args.config, args.overrides)
        if args.help_config:
            # the resolved values (defaults, the file, the overrides): exactly what --print-config shows
            print("\n".join(describe(cfg)))
            return None
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return None
        if args.allow_changes and args.resume is None:
            raise UserError(
                "--allow-changes continues a run under a changed config; it needs --resume auto (or a checkpoint)."
            )
        try:
            return _imported(command)(cfg, args.config, args.resume, allow_changes=args.allow_changes)
        finally:
            release_process_group()

    return main


def release_process_group() -> None:
    """Destroy the distributed process group, if this process made one, before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads can be torn down while still joinable, and
    the C++ runtime aborts the process ("terminate called without an active exception", SIGABRT) after
    all its work is done, often enough on a loaded machine to turn a finished run (or a one-sentence
    refusal) into a killed rank. Local to this process: no collective, so it is safe on an error path."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the process is ending; a failed teardown must not replace its outcome
        pass


def _imported(path: str) -> Any:
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
