"""Data config -> each epoch's training loader: the one owner of that step.

A stage builds a `LoaderFactory` once, at setup, from its data config (datasets/config.py) and the
spec of what it reads; a data key that cannot work on this run (data.decode=gpu without CUDA,
data.views_per_image that does not divide the batch) fails then, not when an epoch opens. The
loop asks the factory for each epoch's spec and loader and never reads the data config.

Loader kinds are registered by name (`data.loader=<kind>`): a kind is a function
`(spec, *, epoch, start_batch, max_worker_processes=None) -> Loader` (datasets/spec.py states the
contract). A new kind is one function and one `register_loader_kind` call, made before the config
is read (docs/architecture.md shows one).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from vitmpp.common.errors import ConfigError

# kind -> its opener, or "module:function" of a built-in one, imported when first used (DALI is optional)
LOADER_KINDS: dict[str, Callable[..., Any] | str] = {
    "shards": "vitmpp.datasets.loader:open_loader",  # every guarantee of datasets/loader.py
    "dali": "vitmpp.datasets.dali_loader:open_dali_loader",  # NVIDIA DALI's GPU pipeline (docs/dali.md)
}


def register_loader_kind(name: str, opener: Callable[..., Any]) -> None:
    """Make `data.loader=name` open its training loaders with `opener` (module docstring)."""
    LOADER_KINDS[name] = opener


def loader_opener(kind: str) -> Callable[..., Any]:
    opener = LOADER_KINDS[kind]
    if isinstance(opener, str):
        module, function = opener.split(":")
        opener = getattr(importlib.import_module(module), function)
    return opener


@dataclass(frozen=True)
class LoaderFactory:
    """The training loaders of one run: `spec` with the data config's mode applied, and the kind's opener."""

    spec: Any  # a LoaderSpec (datasets/spec.py)
    kind: str = "shards"

    @classmethod
    def for_run(cls, data, spec, device) -> LoaderFactory:
        """The factory of data config `data` (a datasets.config.DataConfig) over `spec` on `device`, the
        run's training device (where augment_on=device, decode=gpu and DALI make the batches)."""
        fields: dict[str, Any] = {"device": device}
        if data.augment_on != "cpu":
            fields.update(augment_on=data.augment_on)
        if data.decode == "gpu":  # JPEGs decoded by nvJPEG on the run's device, in the main process
            if device.type != "cuda":
                raise ConfigError(
                    f"Key 'data.decode' is 'gpu', but this run has no CUDA device (device "
                    f"{device}); set data.decode=cpu."
                )
            fields.update(decode_on="device")
        if data.views_per_image != 1:  # k crops per decoded image (epochs count the crops)
            if spec.batch_size % data.views_per_image:
                raise ConfigError(
                    f"Key 'data.views_per_image' is {data.views_per_image}, which does not divide the "
                    f"per-process batch of {spec.batch_size}; choose a divisor of it."
                )
            fields.update(views_per_image=data.views_per_image)
        return cls(replace(spec, **fields), data.loader)

    @property
    def num_workers(self) -> int:
        return self.spec.num_workers

    def identity(self) -> dict:
        return self.spec.identity()

    def epoch_spec(self, **fields) -> Any:
        """The spec with an epoch's geometry (`batches_per_epoch`, `num_workers`, a hosted `rank`, ...)."""
        return replace(self.spec, **fields)

    def open(self, spec, *, epoch: int, start_batch: int, **options) -> Any:
        """The kind's `Loader` of `spec` (from `epoch_spec`, maybe changed by a loop hook)."""
        return loader_opener(self.kind)(spec, epoch=epoch, start_batch=start_batch, **options)
