"""The data layer: webdataset shards with a manifest, their writer, transforms and the loader.

Import as `vitmpp.datasets` (never as a bare `datasets`: that is Hugging Face's).
"""
from .loader import Batch, ShardLoader, ShardWarning, build_loader
from .manifest import Manifest, SplitInfo, read_manifest
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    finetune_transform,
    normalize_batch,
    pretrain_transform,
)

# make_shards is imported on first use: importing it here would make
# `python -m vitmpp.datasets.make_shards` find it already loaded (runpy's warning).
_LAZY = {"default_digits_shards", "ensure_digits_shards", "write_shards"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import make_shards

        return getattr(make_shards, name)
    raise AttributeError(f"module 'vitmpp.datasets' has no attribute '{name}'")


__all__ = [
    "Batch",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Manifest",
    "ShardLoader",
    "ShardWarning",
    "SplitInfo",
    "build_loader",
    "default_digits_shards",
    "ensure_digits_shards",
    "eval_transform",
    "finetune_transform",
    "normalize_batch",
    "pretrain_transform",
    "read_manifest",
    "write_shards",
]
