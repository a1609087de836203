"""Fault injection for the reliability tests (driven by a config's `debug` section).

Nothing here runs unless a `debug.*` key asks for it; each piece reproduces a
failure a long run meets in practice: a data-loading worker killed, a disk
that fills up during a checkpoint save.
"""
from __future__ import annotations

import errno
import os


class ExitAfterCalls:
    """Wraps a per-sample transform; the worker process calling it exits hard after `calls` calls.

    `os._exit` skips every handler, as the kernel's OOM killer does."""

    def __init__(self, transform, calls: int):
        self.transform = transform
        self.calls = calls
        self.count = 0

    def __call__(self, image):
        self.count += 1
        if self.count > self.calls and os.environ.get("VITMPP_FAULT_IN_WORKER_ONLY", "1") == "1":
            from torch.utils.data import get_worker_info

            if get_worker_info() is not None:
                os._exit(1)
        return self.transform(image)

    def __getattr__(self, name):
        # the loader reads attributes such as `decode_min_side` from the transform
        if name == "transform":
            raise AttributeError(name)
        return getattr(self.transform, name)


def disk_full(path) -> OSError:
    """The error a write raises when the filesystem is full."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
