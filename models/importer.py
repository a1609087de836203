"""Weights from elsewhere as our encoder: one importer for every public ViT checkpoint format.

    imported = import_weights("mae_pretrain_vit_base.pth")         # format and architecture found
    imported.encoder         # a headless timm VisionTransformer, as create_encoder builds them
    imported.decoder         # MAE decoder weights under our (= Meta's) names, or None
    imported.source          # {"path", "sha256", "format"}: what the card and encoder.json record
    imported.mean, .std      # the checkpoint's own normalisation, or None where it states none

Formats (`FORMATS`), found from the files themselves:

* `vitmpp`: our own export (`encoder.safetensors` + `encoder.json`), as `load_encoder` reads it;
* `timm`: a `VisionTransformer` state dict (`.safetensors`, `.pth`, `.bin`), or a timm Hub folder
  (`config.json` with `architecture` and `pretrained_cfg`, beside `model.safetensors`);
* `transformers`: a `ViTModel`, `ViTMAEModel` or `ViTMAEForPreTraining` folder (`config.json`
  with `model_type` vit / vit_mae); the latter's decoder becomes our MAE decoder;
* `mae`: Meta's MAE release, `{"model": state_dict}` with timm's key names (`mae_pretrain_vit_*.pth`
  holds the encoder; the visualisation checkpoints add `decoder_*` keys, kept as the decoder);
* `npz`: the ViT paper's own release format (Google's `.npz`, big_vision / vision_transformer
  layout), read by timm's `VisionTransformer.load_pretrained`;
* `torchvision`: a `torchvision.models.VisionTransformer` state dict (`vit_b_16` and its family).

Nothing is unpickled beyond tensors: `.pth`/`.bin` go through `torch.load(weights_only=True)`
(PyTorch's restricted unpickler, which builds tensors and containers and refuses anything
else) and `.npz` through `numpy.load(allow_pickle=False)`; a file that needs more is refused in
one sentence. What our encoder cannot hold (no class token, register tokens, layer scale,
qk-norm, a pooled-feature norm) is refused by name, as the export refuses it the other way.

Written here rather than taken from a library: timm converts npz and its own checkpoints,
transformers its own, but none maps the others' layouts into one model with the checks above.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitmpp.common.errors import UserError

if TYPE_CHECKING:
    import torch
    from timm.models import VisionTransformer

FORMATS = ("vitmpp", "timm", "transformers", "mae", "npz", "torchvision")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# What a release states about its normalisation when its files do not: Meta's MAE and
# torchvision's ViT weights use ImageNet's mean and std (MAE's main_pretrain.py, torchvision's
# ImageClassification transform); Google's ViT checkpoints map pixels to [-1, 1] (mean 0.5,
# std 0.5, the vision_transformer repository's input pipeline).
RELEASE_NORMALISATION = {
    "mae": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "torchvision": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "npz": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass
class ImportedWeights:
    """An imported checkpoint: `encoder` (timm VisionTransformer, no head), `decoder` (MAE decoder
    state under our names, or None), `source` {"path", "sha256", "format"}, `mean`/`std` (RGB, for
    pixels in [0, 1]) with `normalisation_from` saying where they come from ("checkpoint config",
    "release", or None when neither states them)."""

    encoder: VisionTransformer
    source: dict
    decoder: dict[str, torch.Tensor] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalisation_from: str | None = None
    notes: list[str] = field(default_factory=list)


def sha256_of(path: Path) -> str:
    """The sha256 of a file, or of a folder's weight and config files in name order."""
    digest = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(
            p for p in path.iterdir() if p.is_file() and (p.suffix in (".json", ".safetensors", ".bin", ".npz"))
        )
    )
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading files


def read_tensors(file: Path) -> dict[str, Any]:
    """The tensors of a weights file, by name, never unpickling code (see the module docstring)."""
    import torch

    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as err:
            raise UserError(f"Weights {file} are not a readable safetensors file ({err}).") from None
    if file.suffix in PICKLE_SUFFIXES:
        import pickle

        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError) as err:
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise UserError(
                f"Weights {file} hold more than tensors, and vitmpp reads {file.suffix} files only with "
                f"torch.load(weights_only=True) ({first}); save just the state dict, or convert it to "
                ".safetensors."
            ) from None
        return _unwrap(loaded, file)
    raise UserError(f"Weights {file} have an unknown suffix; pass .safetensors, .pth, .bin or .npz, or a folder.")


def _unwrap(loaded: Any, file: Path) -> dict[str, Any]:
    """The state dict inside a checkpoint: itself, or its "model" (MAE, DeiT) / "state_dict" entry."""
    import torch

    if isinstance(loaded, dict):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), dict) and any(isinstance(v, torch.Tensor) for v in loaded[key].values()):
                return {**loaded[key], "__wrapped__": key}
        if any(isinstance(v, torch.Tensor) for v in loaded.values()):
            return loaded
    raise UserError(f"Weights {file} hold no state dict of tensors (nor one under 'model' or 'state_dict').")


def _read_json(file: Path) -> dict:
    from vitmpp.common.io import UnreadableFile, read_regular_file

    try:
        data = json.loads(read_regular_file(file, limit=1 << 20))
    except UnreadableFile as err:
        raise UserError(f"{file} {err.reason}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a JSON object.")
    return data


def _folder_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} has a config.json but none of {', '.join(WEIGHT_FILES)} beside it.")


# ----------------------------------------------------------------------------- layouts → timm names


def _from_transformers(state: dict, config: dict) -> tuple[dict, dict | None]:
    """ViTModel / ViTMAE* names → timm's encoder names, and the ViTMAE decoder → our MAE decoder's."""
    import torch

    prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
    get = lambda key: state[prefix + key]  # noqa: E731 - a short local lookup
    encoder = {
        "cls_token": get("embeddings.cls_token"),
        "pos_embed": get("embeddings.position_embeddings"),
        "patch_embed.proj.weight": get("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": get("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": get("layernorm.weight"),
        "norm.bias": get("layernorm.bias"),
    }
    for i in range(int(config["num_hidden_layers"])):
        encoder.update(_layer_to_timm(state, f"{prefix}encoder.layer.{i}.", f"blocks.{i}."))
    decoder = None
    if "decoder.decoder_embed.weight" in state:
        decoder = {
            "decoder_embed.weight": state["decoder.decoder_embed.weight"],
            "decoder_embed.bias": state["decoder.decoder_embed.bias"],
            "mask_token": state["decoder.mask_token"],
            "decoder_norm.weight": state["decoder.decoder_norm.weight"],
            "decoder_norm.bias": state["decoder.decoder_norm.bias"],
            "decoder_pred.weight": state["decoder.decoder_pred.weight"],
            "decoder_pred.bias": state["decoder.decoder_pred.bias"],
        }
        if "decoder.decoder_pos_embed" in state:
            decoder["decoder_pos_embed"] = state["decoder.decoder_pos_embed"]
        # the Hub's ViTMAE checkpoints name the decoder's blocks decoder_layers.<i>; transformers 5's
        # save_pretrained writes decoder_encoder.layer.<i>
        layers = (
            "decoder.decoder_layers."
            if any(k.startswith("decoder.decoder_layers.") for k in state)
            else "decoder.decoder_encoder.layer."
        )
        for i in range(int(config["decoder_num_hidden_layers"])):
            decoder.update(_layer_to_timm(state, f"{layers}{i}.", f"decoder_blocks.{i}."))
    return {k: torch.as_tensor(v) for k, v in encoder.items()}, decoder


def _layer_to_timm(state: dict, src: str, dst: str) -> dict:
    import torch

    out = {}
    for part in ("weight", "bias"):
        out[f"{dst}norm1.{part}"] = state[f"{src}layernorm_before.{part}"]
        out[f"{dst}norm2.{part}"] = state[f"{src}layernorm_after.{part}"]
        out[f"{dst}attn.proj.{part}"] = state[f"{src}attention.output.dense.{part}"]
        out[f"{dst}mlp.fc1.{part}"] = state[f"{src}intermediate.dense.{part}"]
        out[f"{dst}mlp.fc2.{part}"] = state[f"{src}output.dense.{part}"]
        names = [f"{src}attention.attention.{n}.{part}" for n in ("query", "key", "value")]
        if all(n in state for n in names):  # timm stacks q, k, v along the output dimension
            out[f"{dst}attn.qkv.{part}"] = torch.cat([state[n] for n in names], dim=0)
    return out


def _from_torchvision(state: dict) -> dict:
    """torchvision `VisionTransformer` names → timm's (torchvision's in_proj is timm's fused qkv)."""
    out = {
        "cls_token": state["class_token"],
        "pos_embed": state["encoder.pos_embedding"],
        "patch_embed.proj.weight": state["conv_proj.weight"],
        "patch_embed.proj.bias": state["conv_proj.bias"],
        "norm.weight": state["encoder.ln.weight"],
        "norm.bias": state["encoder.ln.bias"],
    }
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        # torchvision < 0.12 named the MLP's layers linear_1 / linear_2, later 0 / 3 (its load hook maps them)
        fc1, fc2 = ("mlp.0", "mlp.3") if f"{src}mlp.0.weight" in state else ("mlp.linear_1", "mlp.linear_2")
        for part in ("weight", "bias"):
            out[f"{dst}norm1.{part}"] = state[f"{src}ln_1.{part}"]
            out[f"{dst}norm2.{part}"] = state[f"{src}ln_2.{part}"]
            out[f"{dst}attn.qkv.{part}"] = state[f"{src}self_attention.in_proj_{part}"]
            out[f"{dst}attn.proj.{part}"] = state[f"{src}self_attention.out_proj.{part}"]
            out[f"{dst}mlp.fc1.{part}"] = state[f"{src}{fc1}.{part}"]
            out[f"{dst}mlp.fc2.{part}"] = state[f"{src}{fc2}.{part}"]
    return out


def _split_timm(state: dict) -> tuple[dict, dict | None]:
    """A timm-named state (timm, Meta's MAE): encoder keys, and the `decoder_*`/`mask_token` keys if any.
    A classification head (`head.*`, `fc_norm` of a fine-tuned model) is not part of an encoder."""
    decoder_keys = {k for k in state if k.startswith("decoder_") or k == "mask_token"}
    encoder = {
        k: v for k, v in state.items() if k not in decoder_keys and not k.startswith("head.") and k != "__wrapped__"
    }
    decoder = {k: state[k] for k in sorted(decoder_keys)} or None
    return encoder, decoder


# ----------------------------------------------------------------------------- architecture


def refusal(state: dict) -> str | None:
    """Why a timm-named encoder state cannot be our encoder, or None."""
    keys = set(state)
    if "cls_token" not in keys:
        return "it has no class token, which every vitmpp objective and protocol reads"
    if "reg_token" in keys:
        return "it has register tokens, which vitmpp's encoder lacks"
    if any(re.match(r"blocks\.\d+\.ls\d\.", k) for k in keys):
        return "it uses layer scale, which vitmpp's encoder lacks"
    if any(re.match(r"blocks\.\d+\.attn\.(q_norm|k_norm|norm)\.", k) for k in keys):
        return "it normalises queries and keys (qk-norm), which vitmpp's encoder lacks"
    if "fc_norm.weight" in keys and "norm.weight" not in keys:
        return "its final norm acts on the pooled feature (fc_norm), not on the tokens"
    if "pos_embed" not in keys or "patch_embed.proj.weight" not in keys:
        return "it has no patch embedding or no position embedding under timm's names"
    return None


def infer_architecture(state: dict, *, heads: int | None = None) -> dict:
    """patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias and img_size of a timm-named state.

    The head count is not in any weight's shape (q, k and v are one matrix); it comes from
    `heads`, else from the named variant with the same shapes, else the ViT convention of 64
    channels per head (ViT-Ti/S/B/L/H all have it)."""
    from .encoder import ENCODER_VARIANTS

    width, channels, patch, _ = state["patch_embed.proj.weight"].shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width
    tokens = state["pos_embed"].shape[1] - 1
    side = round(tokens**0.5)
    if side * side != tokens:
        raise UserError(f"the position embedding has {tokens} patch rows, not a square grid")
    arch = {"patch_size": int(patch), "embed_dim": int(width), "depth": depth, "mlp_ratio": float(mlp_ratio)}
    heads_from = None
    if heads is None:
        same = [
            n
            for n, v in ENCODER_VARIANTS.items()
            if all(v[k] == arch[k] for k in ("patch_size", "embed_dim", "depth", "mlp_ratio"))
        ]
        if same:
            heads, heads_from = ENCODER_VARIANTS[same[0]]["num_heads"], f"those of {same[0]}, the variant of its shapes"
        elif width % 64 == 0:
            heads, heads_from = width // 64, "64 channels per head, the ViT convention"
    if heads is None:
        raise UserError(f"the number of attention heads of a width-{width} encoder is not in its weights")
    if heads_from:
        arch["heads_from"] = heads_from
    arch.update(
        num_heads=int(heads),
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        img_size=side * int(patch),
        in_chans=int(channels),
    )
    return arch


def build_encoder(state: dict, arch: dict, where: str, name: str | None = None) -> VisionTransformer:
    """Our encoder with `arch`, holding `state`; a mismatch names the first key and both shapes."""
    from .encoder import ARCHITECTURE_KEYS, ENCODER_VARIANTS, create_encoder

    if name is None:  # the closest named variant, with the keys that differ as overrides
        name = min(ENCODER_VARIANTS, key=lambda n: sum(ENCODER_VARIANTS[n][k] != arch[k] for k in ARCHITECTURE_KEYS))
    base = ENCODER_VARIANTS.get(name)
    if base is None:
        from .encoder import variant

        variant(name)  # the UserError listing the known names
    overrides = {k: arch[k] for k in ARCHITECTURE_KEYS if base[k] != arch[k]}
    if not arch.get("qkv_bias", True):
        overrides["qkv_bias"] = False
    if arch.get("in_chans", 3) != 3:
        raise UserError(f"{where} takes {arch['in_chans']}-channel images; vitmpp's encoder reads RGB.")
    encoder = create_encoder(name, img_size=arch["img_size"], **overrides)
    expected = encoder.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise UserError(
                f"{where} do not fit a {_describe(arch)} encoder: they have no '{key}' "
                f"(expected shape {tuple(value.shape)})."
            )
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(
                f"{where} do not fit a {_describe(arch)} encoder: '{key}' has shape "
                f"{tuple(state[key].shape)}, the encoder's is {tuple(value.shape)}."
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{where} hold weights vitmpp's encoder has no place for, e.g. '{extra[0]}'.")
    encoder.load_state_dict({k: state[k].float() for k in expected}, strict=True)
    return encoder


def _describe(arch: dict) -> str:
    return f"patch-{arch['patch_size']} width-{arch['embed_dim']} depth-{arch['depth']} {arch['num_heads']}-head"


# ----------------------------------------------------------------------------- the importer


def detect_format(path: Path) -> str:
    """Which of FORMATS the file or folder at `path` is (UserError when none)."""
    if path.is_dir():
        if (path / "encoder.json").is_file() or (path / "encoder.safetensors").is_file():
            return "vitmpp"
        if (path / "config.json").is_file():
            config = _read_json(path / "config.json")
            if config.get("model_type") in ("vit", "vit_mae"):
                return "transformers"
            if "architecture" in config:
                return "timm"
        raise UserError(
            f"{path} holds no encoder vitmpp can read: no encoder.json (a vitmpp export) and no "
            "config.json of a timm or transformers ViT."
        )
    if not path.is_file():
        raise UserError(f"No weights at {path}; pass an existing file or folder.")
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        from .weights import _METADATA_KEY

        with safe_open(str(path), framework="pt") as handle:
            if _METADATA_KEY in (handle.metadata() or {}):
                return "vitmpp"
    state = read_tensors(path)
    return _state_format(state, path)


def _state_format(state: dict, path: Path) -> str:
    if "conv_proj.weight" in state and "class_token" in state:
        return "torchvision"
    if state.get("__wrapped__") == "model" or any(k.startswith("decoder_") for k in state):
        return "mae"
    if "patch_embed.proj.weight" in state:
        return "timm"
    if any(k.startswith(("embeddings.", "vit.embeddings.")) for k in state):
        raise UserError(f"{path} has transformers' key names; pass its folder (with config.json) instead.")
    first = next((k for k in state if k != "__wrapped__"), "nothing")
    raise UserError(
        f"{path} is not a ViT checkpoint vitmpp knows (its first key is '{first}'); formats: {', '.join(FORMATS)}."
    )


def import_weights(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    heads: int | None = None,
    img_size: int | None = None,
    **options: Any,
) -> ImportedWeights:
    """The checkpoint at `path` (file or folder, any of FORMATS) as our encoder (module docstring).

    `name`: the architecture by variant name (`vit_base_patch16_224`), where the shapes alone
    leave it open; `heads`: the attention heads, likewise; `img_size`: resample the position
    embeddings to this resolution (2D, bicubic, as fine-tuning does); `options`: training-time
    encoder options (`drop_path_rate`, `global_pool`, `pos_embed`), as `load_encoder` takes them."""
    from .encoder import ARCHITECTURE_KEYS, ENCODER_VARIANTS, variant

    path = Path(path)
    fmt = detect_format(path)
    model_args: dict = {}
    where = f"Weights {path} ({fmt})"
    mean = std = None
    normalisation_from = None
    decoder = None
    notes: list[str] = []
    if fmt == "vitmpp":
        from .weights import load_encoder, read_encoder_info

        encoder = load_encoder(path, img_size=img_size, **options)
        info = read_encoder_info(path)
        extra = info.get("extra") or {}
        if "mean" in extra and "std" in extra:
            mean, std, normalisation_from = tuple(extra["mean"]), tuple(extra["std"]), "checkpoint config"
    elif fmt == "npz":
        encoder = _import_npz(path, name)
    else:
        if fmt == "transformers":
            config = _read_json(path / "config.json")
            state, decoder = _from_transformers(read_tensors(_folder_weights(path)), config)
            heads = heads or int(config["num_attention_heads"])
            preprocessor = path / "preprocessor_config.json"
            if preprocessor.is_file():
                pre = _read_json(preprocessor)
                if "image_mean" in pre and "image_std" in pre:
                    mean, std = tuple(pre["image_mean"]), tuple(pre["image_std"])
                    normalisation_from = "checkpoint config"
            if config.get("qkv_bias") is False:
                notes.append("no q/k/v biases")
        elif fmt == "timm" and path.is_dir():
            config = _read_json(path / "config.json")
            state, decoder = _split_timm(read_tensors(_folder_weights(path)))
            name = name or (config["architecture"] if config["architecture"] in ENCODER_VARIANTS else None)
            model_args = {k: v for k, v in (config.get("model_args") or {}).items() if k in ARCHITECTURE_KEYS}
            pretrained = config.get("pretrained_cfg") or {}
            if "mean" in pretrained and "std" in pretrained:
                mean, std = tuple(pretrained["mean"]), tuple(pretrained["std"])
                normalisation_from = "checkpoint config"
        else:
            raw = read_tensors(path)
            state, decoder = (_from_torchvision(raw), None) if fmt == "torchvision" else _split_timm(raw)
        reason = refusal(state)
        if reason is not None:
            raise UserError(f"{where} cannot be vitmpp's encoder: {reason}.")
        named = variant(name) if name is not None else None  # (an unknown name: the sentence listing them)
        try:
            arch = infer_architecture(state, heads=heads or (named["num_heads"] if named else None))
        except UserError as err:
            raise UserError(f"{where}: {err}; name the architecture (model.name=...).") from None
        if named is not None:  # a named architecture is what the weights must fit, not what they suggest
            side = arch["img_size"] // arch["patch_size"]
            arch.pop("heads_from", None)
            arch.update({k: named[k] for k in ARCHITECTURE_KEYS}, **model_args)
            arch["img_size"] = side * arch["patch_size"]
            if heads is not None:
                arch["num_heads"] = heads
        if "heads_from" in arch:  # not in the weights: a guess a user should be able to see and override
            notes.append(
                f"{arch['num_heads']} attention heads assumed ({arch.pop('heads_from')}); "
                "name the architecture where it has others"
            )
        encoder = build_encoder(state, arch, where, name=name)
    if mean is None and fmt in RELEASE_NORMALISATION:
        mean, std = RELEASE_NORMALISATION[fmt]
        normalisation_from = "release"
    if fmt != "vitmpp" and (options or img_size is not None):  # the one path our own files take too
        from .weights import encoder_from_state

        spec = encoder.vitmpp_spec
        encoder = encoder_from_state(
            encoder.state_dict(),
            spec["name"],
            spec["img_size"],
            spec["overrides"],
            options,
            where=where,
            img_size=img_size,
        )
    source = {"path": str(path.resolve()), "sha256": sha256_of(path), "format": fmt}
    return ImportedWeights(
        encoder=encoder,
        source=source,
        decoder=decoder,
        mean=mean,
        std=std,
        normalisation_from=normalisation_from,
        notes=notes,
    )


def _import_npz(path: Path, name: str | None) -> VisionTransformer:
    """Google's .npz: the architecture from its shapes, the weights through timm's own npz reader."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            shapes = {k: npz[k].shape for k in npz.files}
    except (ValueError, OSError) as err:
        raise UserError(f"Weights {path} are not a readable .npz file ({err}).") from None
    # the vision_transformer repository's layout (one `encoderblock_<i>` per block) or big_vision's
    # (`encoderblock` with the blocks stacked on a leading axis), under one of their prefixes
    prefix = next((p for p in ("", "opt/target/", "params/", "params/img/") if f"{p}embedding/kernel" in shapes), None)
    if prefix is None:
        raise UserError(f"Weights {path} are not a ViT .npz (no 'embedding/kernel').")
    if f"{prefix}cls" not in shapes:
        raise UserError(f"Weights {path} (npz) cannot be vitmpp's encoder: it has no class token.")
    patch, _, channels, width = shapes[f"{prefix}embedding/kernel"]
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in shapes
    if stacked:
        block = f"{prefix}Transformer/encoderblock/"
        depth = shapes[f"{block}LayerNorm_0/scale"][0]
        query = shapes[f"{block}MultiHeadDotProductAttention_0/query/kernel"][1:]
        mlp = shapes[f"{block}MlpBlock_0/Dense_0/kernel"][2]
    else:
        block = f"{prefix}Transformer/encoderblock_0/"
        depth = len({int(m.group(1)) for k in shapes if (m := re.search(r"encoderblock_(\d+)/", k))})
        query = shapes[f"{block}MultiHeadDotProductAttention_1/query/kernel"]  # [width, heads, head_dim]
        mlp = shapes[f"{block}MlpBlock_3/Dense_0/kernel"][1]
    pos = shapes.get(f"{prefix}pos_embedding") or shapes[f"{prefix}Transformer/posembed_input/pos_embedding"]
    tokens = pos[1] - 1
    side = round(tokens**0.5)
    arch = {
        "patch_size": int(patch),
        "embed_dim": int(width),
        "depth": int(depth),
        "num_heads": int(query[1]),
        "mlp_ratio": mlp / width,
        "qkv_bias": True,
        "img_size": side * int(patch),
        "in_chans": int(channels),
    }
    from .encoder import ARCHITECTURE_KEYS, ENCODER_VARIANTS, create_encoder

    if name is None:
        name = min(ENCODER_VARIANTS, key=lambda n: sum(ENCODER_VARIANTS[n][k] != arch[k] for k in ARCHITECTURE_KEYS))
    overrides = {k: arch[k] for k in ARCHITECTURE_KEYS if ENCODER_VARIANTS[name][k] != arch[k]}
    encoder = create_encoder(name, img_size=arch["img_size"], **overrides)
    try:
        encoder.load_pretrained(str(path), prefix=prefix)  # timm's reader of these layouts (numpy, no pickle)
    except (KeyError, ValueError, RuntimeError) as err:
        raise UserError(f"Weights {path} (npz) do not fit a {_describe(arch)} encoder ({err}).") from None
    return encoder


def encoder_description(path: str | os.PathLike | None) -> dict:
    """What evaluation needs to know of an encoder file or folder: our encoder.json, or for an imported
    checkpoint its architecture (`describe_encoder`), the normalisation it states (`extra`), where it came
    from (`source`) and what was assumed (`notes`). {} for None."""
    if path is None:
        return {}
    from .weights import describe_encoder, read_encoder_info

    path = Path(path)
    if detect_format(path) == "vitmpp":
        return read_encoder_info(path)
    imported = import_weights(path)
    stated = {"mean": list(imported.mean), "std": list(imported.std)} if imported.mean is not None else {}
    return {**describe_encoder(imported.encoder), "extra": stated, "source": imported.source, "notes": imported.notes}


def initialise_from(objective, path: str | os.PathLike, *, parts: str = "encoder") -> dict:
    """Set `objective`'s encoder (and with `parts="all"` its own parts the checkpoint holds, e.g. a MAE
    decoder) from the checkpoint at `path`; position embeddings are resampled to the encoder's grid.

    Returns what the run records: the checkpoint's `source`, `parts` set, `normalisation` it states
    (or None) and `notes`. A mismatch is one sentence naming the first key and both shapes."""
    encoder = objective.encoder
    imported = import_weights(path, img_size=int(encoder.patch_embed.img_size[0]))
    where = f"model.init {path} ({imported.source['format']})"
    _load_into(encoder, imported.encoder.state_dict(), where, "encoder")
    notes = list(imported.notes)
    loaded = ["encoder"]
    if parts == "all":
        own = {k: v for k, v in objective.state_dict().items() if not k.startswith("encoder.")}
        given = {k: v for k, v in (imported.decoder or {}).items() if k in own}
        if not given:
            raise UserError(
                f"model.init_parts=all: {where} holds no weights for the {type(objective).__name__}'s own "
                f"parts ({', '.join(sorted({k.split('.')[0] for k in own})) or 'none'}); use "
                "model.init_parts=encoder."
            )
        missing = sorted(set(own) - set(given))
        _load_into(objective, given, where, "objective", strict=False)
        loaded.append("decoder" if any(k.startswith("decoder") for k in given) else "head")
        if missing:
            notes.append(
                f"not in the checkpoint, left at their initial values: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
    stated = (
        {"mean": list(imported.mean), "std": list(imported.std), "from": imported.normalisation_from}
        if imported.mean is not None
        else None
    )
    return {**imported.source, "parts": loaded, "normalisation": stated, "notes": notes}


def _load_into(module, state: dict, where: str, what: str, strict: bool = True) -> None:
    expected = module.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise UserError(f"{where} has '{key}', which the {what} lacks; check model.name and the objective.")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{where} does not fit this run's {what}: '{key}' has shape {tuple(value.shape)}, the "
                f"{what}'s is {tuple(expected[key].shape)}; set model.name (and model.patch_size) to the "
                "checkpoint's architecture."
            )
    if strict:
        absent = sorted(set(expected) - set(state))
        if absent:
            raise UserError(f"{where} lacks '{absent[0]}' of this run's {what}; set model.name to its architecture.")
    import torch

    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value.to(expected[key].dtype))
