"""`python -m vitmpp.analyze --encoder PATH --shards PATTERN --out DIR`: look inside an exported encoder.

Writes attention_rollout.png, mean_attention_distance.png,
position_embedding_similarity.png, embedding_filters.png and summary.json to
--out; with --logdir, also logs them to TensorBoard (tags "analysis/...", at the
encoder's training step).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vitmpp.common.errors import UserError, cli_entry

if TYPE_CHECKING:
    import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitmpp.analyze",
        description="Attention rollout, mean attention distance, position-embedding similarity and patch-embedding "
        "filters of an exported encoder (the ViT paper's Figure 7), as PNGs and summary.json.",
    )
    p.add_argument(
        "--encoder", required=True, help="export folder (encoder.safetensors + encoder.json) or the .safetensors file"
    )
    p.add_argument(
        "--shards", required=True, help="shard folder (with _info.json), its _info.json, or a brace pattern of shards"
    )
    p.add_argument("--out", required=True, help="folder for the PNG figures and summary.json")
    p.add_argument(
        "--split",
        default=None,
        help="split to read (default: the split the named shards belong to, "
        "else 'validation' if present, else 'train')",
    )
    p.add_argument(
        "--num-images",
        type=int,
        default=128,
        help="images to average the mean attention distance over (default 128, as the ViT paper)",
    )
    p.add_argument(
        "--num-rollout-images", type=int, default=16, help="images shown with their attention rollout (default 16)"
    )
    p.add_argument(
        "--num-filters",
        type=int,
        default=28,
        help="principal components of the embedding filters to show (default 28, as the paper)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input resolution (default: the encoder's; position embeddings are resampled)",
    )
    p.add_argument("--num-workers", type=int, default=2, help="loader worker processes (default 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--logdir", default=None, help="also log the figures to TensorBoard in this folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier analysis in --out")
    return p


def _choose_split(manifest, shards: str, requested: str | None) -> str:
    if requested is not None:
        manifest.split(requested)  # UserError listing the splits there are
        return requested
    text = os.fspath(shards)
    if not (os.path.isdir(text) or text.endswith(".json")):
        from vitmpp.datasets.manifest import expand_shard_spec

        first = os.path.basename(expand_shard_spec(text)[0])
        for name, info in manifest.splits.items():
            if first in info.filenames:
                return name
        raise UserError(
            f"Shard '{first}' is not listed in '{manifest.source}'; name shards of that folder or the folder itself."
        )
    for name in ("validation", "train"):
        if name in manifest.splits:
            return name
    if not manifest.splits:
        raise UserError(f"Manifest '{manifest.source}' lists no splits; rewrite the shards with make_shards.")
    return next(iter(manifest.splits))


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for a GPU, but torch sees none; use --device cpu.")
    return device


def _check_args(args) -> None:
    from .report import FIGURE_FILES, SUMMARY_NAME

    for flag, value in (
        ("--num-images", args.num_images),
        ("--num-rollout-images", args.num_rollout_images),
        ("--num-filters", args.num_filters),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}.")
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be 0 or more, got {args.num_workers}.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder.")
    if not args.overwrite:
        earlier = [name for name in [SUMMARY_NAME, *FIGURE_FILES.values()] if (out / name).exists()]
        if earlier:
            raise UserError(
                f"{out} already holds an analysis ({earlier[0]}); pass --overwrite to replace it "
                "or choose another --out."
            )


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from vitmpp.datasets import LoaderSpec, eval_transform, normalize_batch, open_loader, read_manifest
    from vitmpp.models import load_encoder, read_encoder_info

    from .report import SUMMARY_NAME, analyze_encoder, write_analysis

    info = read_encoder_info(args.encoder)
    encoder = load_encoder(args.encoder, img_size=args.img_size)
    device = _device(args.device)
    encoder.to(device).eval()
    img_size = int(encoder.patch_embed.img_size[0])
    # the normalisation the encoder was trained with (pretrain records it in encoder.json)
    extra = info.get("extra") or {}
    mean = tuple(extra.get("mean") or IMAGENET_DEFAULT_MEAN)
    std = tuple(extra.get("std") or IMAGENET_DEFAULT_STD)

    manifest = read_manifest(args.shards)
    split = _choose_split(manifest, args.shards, args.split)
    loader = open_loader(
        LoaderSpec(
            shards=args.shards,
            manifest=manifest,
            split=split,
            batch_size=args.batch_size,
            transform=eval_transform(img_size),
            training=False,
            num_workers=args.num_workers,
        )
    )

    def batches():
        for batch in loader:
            real = batch.indices >= 0  # the evaluation loader pads its last batch with repeats (index -1)
            if not bool(real.any()):
                continue
            images = batch.images[real].to(device)
            yield normalize_batch(images, mean, std), images.float() / 255.0

    analysis = analyze_encoder(
        encoder,
        batches(),
        num_images=args.num_images,
        num_rollout_images=args.num_rollout_images,
        num_filters=args.num_filters,
    )
    writer = None
    if args.logdir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=args.logdir)
    try:
        summary = write_analysis(
            analysis,
            args.out,
            writer=writer,
            step=int(info.get("step") or 0),
            encoder={
                "path": str(args.encoder),
                "name": info.get("name"),
                "objective": info.get("objective"),
                "step": info.get("step"),
                "depth": len(encoder.blocks),
                "num_heads": int(encoder.blocks[0].attn.num_heads),
                "embed_dim": int(encoder.embed_dim),
            },
            data={"shards": str(args.shards), "split": split, "mean": list(mean), "std": list(std)},
        )
    finally:
        if writer is not None:
            writer.close()
    per_layer = ", ".join(f"{v:.1f}" for v in summary["mean_attention_distance"]["per_layer"])
    print(
        f"analysed {analysis.num_images} images of split '{split}'; mean attention distance per layer (px): "
        f"{per_layer}; wrote {len(summary['figures'])} figures and {SUMMARY_NAME} to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
