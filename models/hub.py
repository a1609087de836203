"""An exported encoder as a Hugging Face `transformers` folder, its model card, and the
evaluation records the card shows.

    export_transformers(RUN, OUT)   OUT/config.json + model.safetensors + preprocessor_config.json + README.md
    write_card(RUN)                 RUN/README.md (and RUN/transformers/README.md) from the folder's files
    record_evaluation(RUN, record)  one evaluation result into RUN/evaluations.json, then the card again

`transformers.AutoModel.from_pretrained(OUT)` gives a `ViTModel` whose `last_hidden_state`
equals timm's `forward_features` on the same pixels (the tests hold it to 1e-4), and
`AutoImageProcessor.from_pretrained(OUT)` the pixels our evaluation transform gives. The
files are written here as plain JSON and safetensors: exporting needs neither
`transformers` nor the network, only loading needs `transformers`.

Choices, and why:

* **ViTModel for every objective, MAE included.** timm's ViT and transformers' ViTModel
  are the same network (pre-norm blocks, fused-then-split q/k/v, exact GELU, a class
  token, learned position embeddings, a final LayerNorm). MAE's encoder is that network
  with a fixed sin-cos position table, which ViTModel holds as ordinary weights.
  `ViTMAEModel` is not used: its embeddings mask tokens at random (`mask_ratio`) and,
  even at mask ratio 0, shuffle them unless a `noise` tensor is passed, so its
  `last_hidden_state` is neither deterministic nor in patch order; and
  `ViTForImageClassification` builds on ViTModel, so fine-tuning in transformers starts
  from these weights unchanged.
* **The pooler is the identity.** ViTModel has a pooler (dense + tanh on the class
  token) that timm's ViT lacks. It is exported as an identity matrix, a zero bias and
  `pooler_act: "linear"` (transformers >= 4.41 reads `pooler_act`), so `pooler_output`
  is timm's class-token feature and nothing loads as "newly initialized".
  `ViTForImageClassification` has no pooler and ignores it.
* **Layouts that do not map are refused** with one sentence: no class token (ViTModel
  always prepends one), timm's `fc_norm` layout (`global_pool="avg"` built from the
  start: the final LayerNorm acts on the pooled feature, not on the tokens), layer scale,
  q/k norms, register tokens, a norm before the blocks, biasless projections. An
  encoder with average pooling whose final norm is on the tokens maps exactly; its
  timm feature is then the mean of `last_hidden_state[:, 1:]` (the card says so).
* **Key names are those of the checkpoints on the Hub** (`encoder.layer.N.attention.
  attention.query`, ...), which every transformers version loads (5.x renames them on
  load).
* **The image processor is `BitImageProcessor`**, not `ViTImageProcessor`: our
  evaluation transform (timm's) resizes the shorter side to `img_size / crop_pct` and
  centre-crops `img_size`, which BiT's processor does (`shortest_edge` + `crop_size`),
  while ViT's squashes any image to a square. Interpolation, mean and std are the run's.
  (torchvision's centre crop rounds a half-pixel offset to even, transformers' floors it:
  when the resized image exceeds the crop by 3, 7, 11, ... pixels the crops start one
  pixel apart; otherwise the pixels agree within one 8-bit level.)

Evaluation records: a fine-tuning, linear-probe or kNN run whose encoder is a vitmpp
export folder appends one record to that folder's `evaluations.json` (under a lock file,
`.evaluations.lock`, since `compare` runs cells in parallel; the file is rewritten
atomically) and regenerates the card; a record of the same run folder replaces the old
one. Records carry the encoder's export time, so a card lists only the results of the
weights it describes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from vitmpp.common.errors import UserError
from vitmpp.common.io import atomic_dir, atomic_write, atomic_write_json, reported_writes

from .card import render_card

if TYPE_CHECKING:
    import torch
    from timm.models import VisionTransformer

TRANSFORMERS_DIR = "transformers"
CARD_NAME = "README.md"
EVALUATIONS_NAME = "evaluations.json"
EVALUATIONS_LOCK = ".evaluations.lock"
EVALUATIONS_FORMAT = "vitmpp-evaluations/1"
CONFIG_NAME = "config.yaml"
# the rule of vitmpp.datasets.eval_transform(crop_pct=None), for exports that did not record theirs
_TINY_IMAGE = 64
# PIL's resampling filters (Image.Resampling), as transformers' preprocessor_config.json stores them
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


# ----------------------------------------------------------------------------- what maps


def transformers_incompatibility(encoder: VisionTransformer) -> str | None:
    """Why `encoder` cannot be a transformers ViTModel with identical outputs, or None when it can."""
    import torch.nn as nn

    def is_id(module) -> bool:
        return module is None or isinstance(module, nn.Identity)

    if not encoder.has_class_token or encoder.cls_token is None:
        return "it has no class token, and transformers' ViTModel always prepends one"
    if not is_id(encoder.fc_norm):
        return (
            "it uses timm's fc_norm layout (global_pool 'avg' from the start: the final LayerNorm acts on the "
            "pooled feature, not on the tokens), which ViTModel cannot express"
        )
    if is_id(encoder.norm):
        return "it has no final LayerNorm on the tokens, which ViTModel always applies"
    if getattr(encoder, "num_reg_tokens", 0) or getattr(encoder, "reg_token", None) is not None:
        return "it has register tokens, which ViTModel lacks"
    if encoder.pos_embed is None or getattr(encoder, "no_embed_class", False):
        return "its position embedding is absent or leaves out the class token, unlike ViTModel's"
    if not is_id(encoder.norm_pre) or not is_id(getattr(encoder.patch_embed, "norm", None)):
        return "it normalises the patch embeddings before the blocks, which ViTModel does not"
    if getattr(encoder, "attn_pool", None) is not None:
        return "it pools with attention (global_pool 'map'), which ViTModel lacks"
    if encoder.patch_embed.proj.bias is None:
        return "its patch embedding has no bias, unlike ViTModel's"
    patch = tuple(encoder.patch_embed.patch_size)
    grid = tuple(encoder.patch_embed.grid_size)
    if patch[0] != patch[1] or grid[0] != grid[1]:
        return "its patches or images are not square"
    width = encoder.embed_dim
    eps = {m.eps for m in encoder.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        return f"its LayerNorms use different epsilons {sorted(eps)}, and ViTModel has one layer_norm_eps"
    for index, block in enumerate(encoder.blocks):
        attn, mlp = block.attn, block.mlp
        where = f"block {index}"
        if not (is_id(block.ls1) and is_id(block.ls2)):
            return f"{where} uses layer scale, which ViTModel lacks"
        if not (
            is_id(getattr(attn, "q_norm", None))
            and is_id(getattr(attn, "k_norm", None))
            and is_id(getattr(attn, "norm", None))
            and getattr(attn, "gate", None) is None
        ):
            return f"{where} normalises or gates its attention, which ViTModel does not"
        if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
            return f"{where} does not use LayerNorm"
        if getattr(attn, "qkv", None) is None or attn.qkv.out_features != 3 * width or attn.proj.bias is None:
            return (
                f"{where} has an attention layout other than ViTModel's (fused q/k/v of the model width, biased output)"
            )
        if (
            type(mlp).__name__ != "Mlp"
            or not is_id(getattr(mlp, "norm", None))
            or mlp.fc1.bias is None
            or mlp.fc2.bias is None
        ):
            return f"{where} has an MLP other than ViTModel's (two biased linear layers)"
        if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            return f"{where}'s MLP activation is not the exact GELU ViTModel uses"
    return None


def transformers_config(encoder: VisionTransformer) -> dict:
    """config.json of a ViTModel with `encoder`'s architecture (see the module docstring on the pooler)."""
    import torch.nn as nn

    block = encoder.blocks[0]
    width = int(encoder.embed_dim)
    eps = next(m.eps for m in encoder.modules() if isinstance(m, nn.LayerNorm))
    patch = int(encoder.patch_embed.patch_size[0])
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": width,
        "num_hidden_layers": len(encoder.blocks),
        "num_attention_heads": int(block.attn.num_heads),
        "intermediate_size": int(block.mlp.fc1.out_features),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(eps),
        "image_size": int(encoder.patch_embed.grid_size[0]) * patch,
        "patch_size": patch,
        "num_channels": int(encoder.patch_embed.proj.in_channels),
        "qkv_bias": block.attn.qkv.bias is not None,
        "encoder_stride": patch,
        "pooler_output_size": width,
        "pooler_act": "linear",
        "torch_dtype": "float32",
    }


def transformers_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """`encoder`'s weights under ViTModel's (Hub checkpoint) names; the pooler is the identity."""
    import torch

    state = {k: v.detach().to("cpu", torch.float32) for k, v in encoder.state_dict().items()}
    width = int(encoder.embed_dim)
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
        "pooler.dense.weight": torch.eye(width),
        "pooler.dense.bias": torch.zeros(width),
    }
    for i in range(len(encoder.blocks)):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}layernorm_before.{part}"] = state[f"{src}norm1.{part}"]
            out[f"{dst}layernorm_after.{part}"] = state[f"{src}norm2.{part}"]
            out[f"{dst}attention.output.dense.{part}"] = state[f"{src}attn.proj.{part}"]
            out[f"{dst}intermediate.dense.{part}"] = state[f"{src}mlp.fc1.{part}"]
            out[f"{dst}output.dense.{part}"] = state[f"{src}mlp.fc2.{part}"]
            if f"{src}attn.qkv.{part}" in state:  # timm stacks q, k, v along the output dimension
                query, key, value = state[f"{src}attn.qkv.{part}"].chunk(3, dim=0)
                for name, tensor in (("query", query), ("key", key), ("value", value)):
                    out[f"{dst}attention.attention.{name}.{part}"] = tensor
    return {k: v.contiguous().clone() for k, v in out.items()}


def eval_crop_pct(info: dict) -> float:
    """The evaluation crop fraction the export recorded, else vitmpp.datasets.eval_transform's default."""
    recorded = (info.get("extra") or {}).get("eval_crop_pct")
    if recorded is not None:
        return float(recorded)
    return 1.0 if int(info["img_size"]) < _TINY_IMAGE else 0.875


def image_processor_config(info: dict) -> dict:
    """preprocessor_config.json: timm's evaluation transform (shorter side to img_size / crop_pct,
    centre crop, /255, the run's mean and std) as transformers' BitImageProcessor."""
    import math

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    extra = info.get("extra") or {}
    size = int(info["img_size"])
    interpolation = str(extra.get("interpolation", "bicubic"))
    if interpolation not in PIL_RESAMPLE:
        raise UserError(
            f"Interpolation {interpolation!r} of the export has no PIL equivalent; "
            f"use one of {', '.join(PIL_RESAMPLE)}."
        )
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": math.floor(size / eval_crop_pct(info))},
        "resample": PIL_RESAMPLE[interpolation],
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in extra.get("mean", IMAGENET_DEFAULT_MEAN)],
        "image_std": [float(v) for v in extra.get("std", IMAGENET_DEFAULT_STD)],
    }


# ----------------------------------------------------------------------------- writing the folder


def save_transformers(encoder: VisionTransformer, out: str | os.PathLike, info: dict, card: str | None = None) -> Path:
    """Write `out` (config.json, model.safetensors, preprocessor_config.json, README.md) as one folder:
    it appears complete or not at all, and an older one is replaced only then."""
    from safetensors.torch import save_file

    why = transformers_incompatibility(encoder)
    if why is not None:
        raise UserError(f"Encoder '{info.get('name')}' cannot be exported to transformers: {why}.")
    out = Path(out)
    config = transformers_config(encoder)
    processor = image_processor_config(info)
    tensors = transformers_state_dict(encoder)
    advice = "the previous transformers export there, if any, is as it was; free space and export again"
    with reported_writes(f"the transformers export in {out}", advice, out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out) as tmp:
            save_file(
                tensors,
                str(tmp / "model.safetensors"),
                metadata={"format": "pt", "vitmpp": json.dumps(info, default=str)},
            )
            atomic_write_json(tmp / "config.json", config)
            atomic_write_json(tmp / "preprocessor_config.json", processor)
            if card is not None:
                atomic_write(tmp / CARD_NAME, card)
    return out


def source_encoder(source: str | os.PathLike) -> tuple[Path, dict]:
    """(the export folder, its description) for a run folder, an export folder or an encoder.safetensors."""
    from .weights import WEIGHTS_NAME, read_encoder_info

    path = Path(source)
    if not path.exists():
        raise UserError(f"No run or encoder export at {path}; pass a pretraining run folder or an encoder.safetensors.")
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise UserError(f"{path} holds no {WEIGHTS_NAME}; pass a finished pretraining run folder or an encoder export.")
    return weights.parent, read_encoder_info(weights)


def export_transformers(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the encoder of `source` (run folder, export folder or .safetensors) as a transformers folder `out`."""
    from .weights import load_encoder

    folder, info = source_encoder(source)
    out = Path(out)
    if out.exists() and not (out / "config.json").is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise UserError(
                f"{out} exists and is not a transformers export; choose a new folder (nothing is overwritten)."
            )
    encoder = load_encoder(source).eval()  # the stored weights as they are (a sin-cos table included)
    facts = card_facts(folder, info=info)
    card = render_card({**facts, "flavour": "transformers", "path": str(out)})
    return save_transformers(encoder, out, info, card=card)


# ----------------------------------------------------------------------------- the card


def card_facts(folder: str | os.PathLike, info: dict | None = None) -> dict:
    """What the model card of export folder `folder` says, read from its files only:
    encoder.json (architecture, objective, data, steps, compute), config.yaml (the resolved
    config of the run), evaluations.json (results recorded by evaluation runs); what the
    objective is comes from its class (`objective_facts`)."""
    from .objective import objective_facts
    from .weights import read_encoder_info

    folder = Path(folder)
    info = info if info is not None else read_encoder_info(folder)
    config_text = None
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        try:
            config_text = config_path.read_text()
        except (OSError, UnicodeDecodeError):
            config_text = None
    records = read_evaluations(folder)
    current = [r for r in records if r.get("encoder_created") == info.get("created")]
    return {
        "folder": folder.name or str(folder),
        "path": str(folder),
        "info": info,
        "objective": objective_facts(str(info.get("objective") or "")),  # its class's words, None if unknown
        "config_yaml": config_text,
        "evaluations": current,
        "older_evaluations": len(records) - len(current),
        "transformers": (folder / TRANSFORMERS_DIR / "config.json").is_file(),
        "transformers_refusal": (info.get("extra") or {}).get("transformers_refusal"),
        "flavour": "timm",
    }


def write_card(folder: str | os.PathLike, info: dict | None = None) -> list[Path]:
    """(Re)write folder/README.md, and folder/transformers/README.md where that export exists."""
    folder = Path(folder)
    facts = card_facts(folder, info=info)
    written = [atomic_write(folder / CARD_NAME, render_card(facts))]
    hf = folder / TRANSFORMERS_DIR
    if (hf / "config.json").is_file():
        written.append(atomic_write(hf / CARD_NAME, render_card({**facts, "flavour": "transformers", "path": str(hf)})))
    return written


# ----------------------------------------------------------------------------- evaluation records


def read_evaluations(folder: str | os.PathLike) -> list[dict]:
    """The records of folder/evaluations.json (none when absent; unreadable: none, the file is left as it is)."""
    path = Path(folder) / EVALUATIONS_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    records = data.get("records") if isinstance(data, dict) else None
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive POSIX record lock on folder/.evaluations.lock (released when the block ends)."""
    import fcntl

    fd = os.open(folder / EVALUATIONS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # waits for another evaluation's read-modify-write (milliseconds)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def record_evaluation(folder: str | os.PathLike, record: dict) -> Path:
    """Add `record` (one evaluation of the encoder in `folder`) to folder/evaluations.json and rewrite
    the card; a record of the same `run` replaces the earlier one. Returns the card's path.
    OSError (a folder that is not writable) passes to the caller, which decides how loud to be."""
    from .weights import read_encoder_info

    folder = Path(folder)
    info = read_encoder_info(folder)
    record = {
        **record,
        "encoder_step": info.get("step"),
        "encoder_created": info.get("created"),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with _locked(folder):
        records = [r for r in read_evaluations(folder) if r.get("run") != record.get("run")]
        records.append(record)
        atomic_write_json(folder / EVALUATIONS_NAME, {"format": EVALUATIONS_FORMAT, "records": records})
        return write_card(folder, info=info)[0]
