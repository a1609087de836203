"""Console output for multi-process runs: everything is printed by rank 0 only.

A tqdm bar shows progress with the latest loss and images/s; one summary line is
written per logging interval (through `tqdm.write`, so it does not break the bar).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tqdm.auto import tqdm


def quiet_libraries() -> None:
    """Silence library chatter that would otherwise be printed by every rank."""
    for name in ("accelerate", "torch.distributed", "timm", "webdataset"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="timm")


class Console:
    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.bar: tqdm | None = None

    def print(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def warn(self, message: str, *, every_rank: bool = False) -> None:
        """Warnings about this rank's own data are printed by the rank that saw them."""
        if not (self.is_main or every_rank):
            return
        rank = os.environ.get("RANK", "0")
        prefix = "warning" if self.is_main else f"warning (rank {rank})"
        text = f"{prefix}: {message}"
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def start_bar(self, total: int, initial: int = 0, desc: str = "train") -> None:
        if self.is_main:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                dynamic_ncols=True,
                file=sys.stdout,
                disable=os.environ.get("VITMPP_NO_BAR") == "1",
            )

    def update_bar(self, steps: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
