"""The data layer: webdataset shards with a manifest, their writer, transforms and the loader.

Import as `vitmpp.datasets` (never as a bare `datasets`: that is Hugging Face's).

    spec = LoaderSpec(shards=..., manifest=read_manifest(...), batch_size=..., transform=..., training=...)
    loader = open_loader(spec, epoch=e, start_batch=k)    # a Loader: the contract is in spec.py
"""

from vitmpp.common.lazy import lazy_exports

# Imported on first use (common/lazy.py): `make_shards --help` must not wait for torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        # the project's one home for ImageNet's mean and std is timm
        "IMAGENET_MEAN": "timm.data:IMAGENET_DEFAULT_MEAN",
        "IMAGENET_STD": "timm.data:IMAGENET_DEFAULT_STD",
        "ShardLoader": ".loader",
        "ShardWarning": ".loader",
        "open_loader": ".loader",
        "open_dali_loader": ".dali_loader",  # the optional DALI training loader (data.loader=dali, docs/dali.md)
        "Manifest": ".manifest",
        "SplitInfo": ".manifest",
        "read_manifest": ".manifest",
        "Batch": ".spec",
        "Loader": ".spec",
        "LoaderSpec": ".spec",
        "LoaderFactory": ".factory",
        "register_loader_kind": ".factory",
        "eval_transform": ".transforms",
        "finetune_transform": ".transforms",
        "normalize_batch": ".transforms",
        "unit_pixels": ".transforms",
        "pretrain_transform": ".transforms",
        "digits_shards": ".digits_cache",
        "write_shards": ".writer",
    },
)
