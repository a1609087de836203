"""The data layer: webdataset shards with a manifest, their writer, transforms and the loader.

Import as `vitmpp.datasets` (never as a bare `datasets`: that is Hugging Face's).

    spec = LoaderSpec(shards=..., manifest=read_manifest(...), batch_size=..., transform=..., training=...)
    loader = open_loader(spec, epoch=e, start_batch=k)    # a Loader: the contract is in spec.py
"""
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # the project's one home for them is timm
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from .loader import ShardLoader, ShardWarning, open_loader
from .manifest import Manifest, SplitInfo, read_manifest
from .spec import Batch, Loader, LoaderSpec
from .transforms import eval_transform, finetune_transform, normalize_batch, pretrain_transform

# make_shards is imported on first use: importing it here would make
# `python -m vitmpp.datasets.make_shards` find it already loaded (runpy's warning).
_LAZY = {"digits_shards", "write_shards"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import make_shards

        return getattr(make_shards, name)
    raise AttributeError(f"module 'vitmpp.datasets' has no attribute '{name}'")


__all__ = [
    "Batch",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Loader",
    "LoaderSpec",
    "Manifest",
    "ShardLoader",
    "ShardWarning",
    "SplitInfo",
    "digits_shards",
    "eval_transform",
    "finetune_transform",
    "normalize_batch",
    "open_loader",
    "pretrain_transform",
    "read_manifest",
    "write_shards",
]
