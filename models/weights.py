"""Exported encoders: `encoder.safetensors` (a timm VisionTransformer state dict) + `encoder.json`.

The state dict has timm's keys and no head, so it loads

* with `load_encoder(path)` (architecture from encoder.json, position
  embeddings resampled in 2D when another image size is asked for);
* into a plain `timm.models.VisionTransformer` of the same architecture;
* for the standard variants (`info["timm_name"]` is not null), into timm's
  factory, offline::

      timm.create_model(info["timm_name"], pretrained=True, num_classes=K,
                        pretrained_cfg_overlay=dict(file="run/encoder.safetensors", num_classes=0))

  (`num_classes=0` in the overlay tells timm the file has no head, so any K,
  1000 included, gets a new one; timm resamples the position embeddings if the
  model's `img_size` differs from the export's).

Loading never unpickles: weights are read with safetensors only. The JSON
description is also stored in the safetensors metadata (key "vitmpp"), so a
weights file copied alone still describes itself.

The same weights for Hugging Face `transformers` and the model card are vitmpp.models.hub's
(docs/export.md), which builds on this module; the command line that writes them for any run
or export folder is vitmpp.models.export.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitmpp.common.errors import UserError
from vitmpp.common.io import atomic_file, atomic_write, reported_writes

if TYPE_CHECKING:
    from timm.models import VisionTransformer

# torch, safetensors and timm are imported inside the functions that use them, so that
# `python -m vitmpp.models.export --help` answers at once.

WEIGHTS_NAME = "encoder.safetensors"
INFO_NAME = "encoder.json"
FORMAT = "vitmpp-encoder/1"
_METADATA_KEY = "vitmpp"


def describe_encoder(encoder: VisionTransformer) -> dict:
    """The architecture part of encoder.json."""
    from .encoder import encoder_spec, pos_embed_kind, standard_timm_name

    spec = encoder_spec(encoder)
    block = encoder.blocks[0]
    return {
        "name": spec["name"],
        "timm_name": standard_timm_name(encoder),
        "img_size": spec["img_size"],
        "patch_size": int(encoder.patch_embed.patch_size[0]),
        "embed_dim": int(encoder.embed_dim),
        "depth": len(encoder.blocks),
        "num_heads": int(block.attn.num_heads),
        "mlp_ratio": block.mlp.fc1.out_features / encoder.embed_dim,
        "global_pool": encoder.global_pool,
        "class_token": bool(encoder.has_class_token),
        "num_prefix_tokens": int(encoder.num_prefix_tokens),
        "pos_embed": pos_embed_kind(encoder),
        "num_params": sum(p.numel() for p in encoder.parameters()),
        "overrides": spec["overrides"],
    }


def save_encoder(
    encoder: VisionTransformer,
    out_dir: str | os.PathLike,
    *,
    objective: str | None = None,
    step: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Write out_dir/encoder.safetensors + out_dir/encoder.json (each atomically); returns the weights path.

    The JSON holds the architecture (`describe_encoder`), `objective`, `step`,
    `extra` (e.g. the normalisation mean/std the encoder was trained with) and
    library versions. The JSON is renamed into place first and the weights last, so a
    present encoder.safetensors always comes with its description; a write the disk
    refuses (whatever safetensors raised) is one sentence, and no temporary file is left.
    """
    import timm
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    info: dict[str, Any] = {
        "format": FORMAT,
        **describe_encoder(encoder),
        "objective": objective,
        "step": step,
        "extra": dict(extra or {}),
        "timm_version": timm.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    text = json.dumps(info, indent=2, sort_keys=False, default=str) + "\n"
    # contiguous CPU copies: safetensors refuses shared or strided storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    advice = (
        "the previous export there, if any, is as it was; free space and export again "
        "(a finished pretraining run exports again with --resume auto)"
    )
    with reported_writes(f"the encoder export in {out}", advice, out):
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / WEIGHTS_NAME) as weights:
            save_file(tensors, str(weights), metadata={"format": "pt", _METADATA_KEY: json.dumps(info, default=str)})
            atomic_write(out / INFO_NAME, text)  # before the weights are renamed; a failure here removes them
    return out / WEIGHTS_NAME


def _weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"No encoder at {path}; pass a folder holding {WEIGHTS_NAME} or the .safetensors file itself.")
    if path.suffix != ".safetensors":
        raise UserError(f"Encoder weights must be a .safetensors file (never a pickle), got {path}.")
    return path


def read_encoder_info(path: str | os.PathLike) -> dict:
    """The description of an exported encoder (dir or .safetensors): encoder.json, else the file's metadata."""
    from safetensors import SafetensorError, safe_open

    weights = _weights_path(path)
    candidates = [weights.with_suffix(".json")]
    if weights.name == WEIGHTS_NAME:
        candidates.append(weights.parent / INFO_NAME)
    for candidate in candidates:
        if candidate.is_file():
            try:
                info = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(
                    f"Encoder description {candidate} is not valid JSON ({err}); re-export the encoder."
                ) from None
            return _checked(info, candidate)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"Encoder weights {weights} are not a readable safetensors file ({err}); re-export the encoder."
        ) from None
    if _METADATA_KEY not in metadata:
        raise UserError(
            f"Encoder {weights} has no {INFO_NAME} next to it and no vitmpp metadata; export it with save_encoder."
        )
    return _checked(json.loads(metadata[_METADATA_KEY]), weights)


def _checked(info: Any, source: Path) -> dict:
    if not isinstance(info, dict) or "name" not in info or "img_size" not in info:
        raise UserError(
            f"Encoder description {source} lacks 'name'/'img_size'; re-export the encoder with save_encoder."
        )
    info.setdefault("overrides", {})
    return info


def load_encoder(path: str | os.PathLike, img_size: int | None = None, **overrides: Any) -> VisionTransformer:
    """A timm VisionTransformer with the exported weights (no head).

    `path`: an export folder or its .safetensors file. `img_size`: resample the
    position embeddings in 2D (timm's `resample_abs_pos_embed`, bicubic) to this
    resolution; default the export's. `overrides`: training-time options such as
    `drop_path_rate` or `global_pool` (architecture keys that change weight
    shapes fail with a UserError). A different `global_pool` keeps the trained
    final norm on the tokens (timm's `reset_classifier`), so no weight is left
    out. The position embedding comes back learnable, as MAE fine-tunes it;
    pass `pos_embed="sincos"` to keep it fixed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = _weights_path(path)
    info = read_encoder_info(weights)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"Encoder weights {weights} are not a readable safetensors file ({err}); re-export the encoder."
        ) from None
    return encoder_from_state(
        state,
        info["name"],
        info["img_size"],
        info.get("overrides", {}),
        overrides,
        where=f"Encoder weights {weights}",
        img_size=img_size,
    )


def encoder_from_state(
    state: dict,
    name: str,
    state_img_size: int,
    built_with: dict,
    options: dict,
    *,
    where: str,
    img_size: int | None = None,
) -> VisionTransformer:
    """Variant `name` as the weights were built (`built_with`: the recorded architecture overrides) plus
    the requested training `options`, at the state's resolution, holding `state`; then resampled to
    `img_size`, pooled and position-embedded as `options` ask (see `load_encoder`). The one path every
    encoder file goes through, ours and imported ones."""
    import torch

    from .encoder import create_encoder, set_sincos_pos_embed

    options = dict(options)
    sincos = options.pop("pos_embed", "learned") == "sincos"
    # The pooling is switched after loading: timm moves the final LayerNorm from the tokens
    # (`norm`) to the pooled feature (`fc_norm`) when built with global_pool="avg", which would
    # leave the trained norm unused. `reset_classifier` changes the pooling and keeps the norm.
    pool = options.pop("global_pool", None)
    encoder = create_encoder(name, img_size=state_img_size, **{**built_with, **options})
    missing, unexpected = _diff_keys(encoder, state)
    if missing or unexpected:
        raise UserError(
            f"{where} do not match architecture '{name}' from its description "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "the weights and encoder.json do not belong together."
        )
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[-1].strip()
        raise UserError(
            f"{where} do not fit the requested architecture ({first}); drop the architecture overrides."
        ) from None
    if img_size is not None and int(img_size) != state_img_size:
        patch = encoder.patch_embed.patch_size[0]
        if int(img_size) % patch:
            raise UserError(f"Image size {img_size} is not a multiple of the encoder's patch size {patch}.")
        encoder.set_input_size(img_size=(int(img_size), int(img_size)))  # resample_abs_pos_embed in 2D
        encoder.vitmpp_spec["img_size"] = int(img_size)
    if pool is not None and pool != encoder.global_pool:
        if pool == "token" and not encoder.has_class_token:
            raise UserError(f"{where} have no class token, so global_pool 'token' is impossible; use 'avg'.")
        encoder.reset_classifier(0, global_pool=pool)
        # recorded so that a re-export of this encoder rebuilds the same layout
        encoder.vitmpp_spec["overrides"].update(
            global_pool=pool, fc_norm=not isinstance(encoder.fc_norm, torch.nn.Identity)
        )
    if sincos:
        set_sincos_pos_embed(encoder)
    return encoder


def _diff_keys(encoder: VisionTransformer, state: dict) -> tuple[list[str], list[str]]:
    expected = set(encoder.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)
