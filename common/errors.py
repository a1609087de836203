"""User-facing errors and the wrapper every command-line entry point runs under.

A `UserError` is a problem with what the user gave us (a config key, a file, a
shard, an argument). It is printed as one sentence, without a traceback, and the
process exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C (128 + SIGINT)

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with the user's input, described in one sentence.

    `same_on_every_rank` marks errors that every process of a distributed run
    hits identically (a bad config): only rank 0 prints those.
    """

    same_on_every_rank = False


class ConfigError(UserError, ValueError):
    """A config file, key, value or override is wrong."""

    same_on_every_rank = True


class Interrupted(SystemExit):
    """Ctrl-C stopped the run cleanly (its checkpoint is written): exit 130 like a Ctrl-C, with no
    traceback, so that a script or scheduler around the run does not take it for a success."""

    def __init__(self) -> None:
        super().__init__(EXIT_INTERRUPTED)


def _rank() -> int:
    # Set by torchrun/accelerate for every process of a distributed launch.
    return int(os.environ.get("RANK", "0"))


def report_user_error(error: UserError) -> None:
    """Print `error` once: rank 0 always, other ranks only for rank-local errors."""
    if _rank() == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    elif not error.same_on_every_rank:
        print(f"error (rank {_rank()}): {error}", file=sys.stderr, flush=True)


def cli_entry(main: F) -> F:
    """Decorate a `main(argv=None)` so a UserError becomes one line and exit code 2, Ctrl-C exit code 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            report_user_error(error)
            raise SystemExit(EXIT_USAGE) from None
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (which stops cleanly: Interrupted)
            print("interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]
