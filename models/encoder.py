"""The shared ViT encoder: timm's `VisionTransformer`, built by name, without a head.

Every objective (mpp, mae, supervised) and every evaluation protocol uses the
same module, so an encoder state dict always loads into a plain timm
`VisionTransformer` of the same variant (and, for the standard variants, into
`timm.create_model(<timm name>, pretrained=True, pretrained_cfg_overlay=...)`).

Variants (`ENCODER_VARIANTS`):

* the paper sizes under timm's names, where timm has them: ViT-Ti/S/B/L/H at
  patch 16, 32 or 14, e.g. `vit_base_patch16_224` (12 layers, width 768, MLP
  3072, 12 heads), `vit_large_patch16_224` (24, 1024, 4096, 16) and
  `vit_huge_patch14_224` (32, 1280, 5120, 16);
* tiny variants for CPU tests and the digits demo (they are ours, not timm's):

  ==================== ===== ===== ====== ===== =====
  name                 width depth heads  patch  img
  ==================== ===== ===== ====== ===== =====
  vit_pico_patch4_16      64     2      2     4    16
  vit_pico_patch4_32      64     2      2     4    32
  vit_nano_patch4_32     128     4      4     4    32
  vit_nano_patch8_32     128     4      4     8    32
  vit_micro_patch4_32    192     6      3     4    32
  ==================== ===== ===== ====== ===== =====

Position embeddings: `pos_embed="learned"` is timm's (trunc-normal init,
trained). `pos_embed="sincos"` replaces it with MAE's fixed 2D sin-cos table
(a zero row for the class token) held in a frozen parameter: the state dict
keeps timm's key and shape, so the weights still load anywhere.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models import VisionTransformer
from timm.models._manipulate import checkpoint_seq

from vitmpp.common.config import param
from vitmpp.common.errors import ConfigError, UserError
from vitmpp.common.sections import MAX_IMAGE_SIDE

# ----------------------------------------------------------------------------- variants

# Architecture of each named variant. `timm_name` marks the variants timm knows
# under the same name (their weights load with timm.create_model); `img_size`
# is the nominal resolution. mlp_ratio is 4 everywhere, as in the paper.
_STANDARD = {
    # name: (patch, width, depth, heads)
    "vit_tiny_patch16_224": (16, 192, 12, 3),
    "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_small_patch32_224": (32, 384, 12, 6),
    "vit_base_patch16_224": (16, 768, 12, 12),
    "vit_base_patch32_224": (32, 768, 12, 12),
    "vit_large_patch14_224": (14, 1024, 24, 16),
    "vit_large_patch16_224": (16, 1024, 24, 16),
    "vit_large_patch32_224": (32, 1024, 24, 16),
    "vit_huge_patch14_224": (14, 1280, 32, 16),
}
_TINY = {
    # name: (patch, width, depth, heads, img)
    "vit_pico_patch4_16": (4, 64, 2, 2, 16),
    "vit_pico_patch4_32": (4, 64, 2, 2, 32),
    "vit_nano_patch4_32": (4, 128, 4, 4, 32),
    "vit_nano_patch8_32": (8, 128, 4, 4, 32),  # the digits recipes: 16 patches of 2x2 digit pixels
    "vit_micro_patch4_32": (4, 192, 6, 3, 32),
}

ENCODER_VARIANTS: dict[str, dict] = {
    **{
        name: dict(patch_size=p, embed_dim=d, depth=n, num_heads=h, mlp_ratio=4.0, img_size=224, timm_name=name)
        for name, (p, d, n, h) in _STANDARD.items()
    },
    **{
        name: dict(patch_size=p, embed_dim=d, depth=n, num_heads=h, mlp_ratio=4.0, img_size=s, timm_name=None)
        for name, (p, d, n, h, s) in _TINY.items()
    },
}

# Keys that define the architecture (and so the shapes of the weights); the
# others (drop rates, init) only change training and are not exported.
ARCHITECTURE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
_TRAINING_ONLY_KEYS = {
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "weight_init",
    "fix_init",
    "device",
    "dtype",
}
_POS_EMBED_CHOICES = ("learned", "sincos", "none")
_TIMM_KWARGS = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}


def _unknown_variant(name: str) -> UserError:
    hint = difflib.get_close_matches(str(name), list(ENCODER_VARIANTS), n=1, cutoff=0.5)
    tail = f" (did you mean '{hint[0]}'?)" if hint else ""
    return UserError(f"Unknown encoder '{name}'{tail}; known encoders: {', '.join(ENCODER_VARIANTS)}.")


def variant(name: str) -> dict:
    """The architecture of a named variant (a copy); UserError listing the known names if unknown."""
    if name not in ENCODER_VARIANTS:
        raise _unknown_variant(name)
    return dict(ENCODER_VARIANTS[name])


def create_encoder(name: str, img_size: int | None = None, **overrides: Any) -> VisionTransformer:
    """A headless timm `VisionTransformer` of variant `name` (random init, nothing downloaded).

    Defaults: `num_classes=0` (no head), a class token, `global_pool="token"`.
    `img_size` defaults to the variant's nominal size. `overrides` are any
    `VisionTransformer` keyword (patch_size, embed_dim, depth, num_heads,
    drop_path_rate, global_pool, ...) plus `pos_embed` in "learned" | "sincos" |
    "none" (see the module docstring). The returned module remembers how it was
    built in `encoder.vitmpp_spec` (used by `save_encoder` and `flops_per_image`).
    """
    arch = variant(name)
    arch.pop("timm_name")
    nominal = arch.pop("img_size")
    img_size = int(img_size) if img_size is not None else nominal
    pos_embed = overrides.pop("pos_embed", "learned")
    pos_embed = "learned" if pos_embed == "learn" else pos_embed
    if pos_embed not in _POS_EMBED_CHOICES:
        raise UserError(f"Encoder option pos_embed must be one of {', '.join(_POS_EMBED_CHOICES)}, got {pos_embed!r}.")
    unknown = sorted(set(overrides) - _TIMM_KWARGS)
    if unknown:
        hint = difflib.get_close_matches(unknown[0], sorted(_TIMM_KWARGS), n=1, cutoff=0.6)
        tail = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(
            f"Encoder option '{unknown[0]}' is not a timm VisionTransformer argument{tail}; "
            "see timm.models.VisionTransformer for the accepted ones."
        )
    if "num_classes" in overrides and overrides["num_classes"] != 0:
        raise UserError("Encoders have no classification head (num_classes=0); objectives and protocols add their own.")
    overrides.pop("num_classes", None)
    kwargs = {**arch, "global_pool": "token", **{k: v for k, v in overrides.items() if v is not None}}
    patch = kwargs["patch_size"]
    if img_size <= 0 or img_size % patch != 0:
        raise UserError(
            f"Encoder '{name}': the patch size {patch} must divide the image size {img_size}; "
            "choose an image size that is a multiple of the patch size."
        )
    if kwargs["embed_dim"] % kwargs["num_heads"] != 0:
        raise UserError(
            f"Encoder '{name}': embed_dim {kwargs['embed_dim']} must be divisible by num_heads {kwargs['num_heads']}."
        )
    pools = ("token", "avg", "avgmax", "max", "map", "")
    if kwargs["global_pool"] not in pools:
        raise UserError(
            f"Encoder '{name}': global_pool must be one of {', '.join(map(repr, pools))}, "
            f"got {kwargs['global_pool']!r}."
        )
    if kwargs["global_pool"] == "token" and not kwargs.get("class_token", True):
        raise UserError(
            f"Encoder '{name}': global_pool 'token' needs the class token; "
            "use global_pool 'avg' with class_token false."
        )
    timm_kwargs = dict(kwargs)
    if pos_embed == "none":
        timm_kwargs["pos_embed"] = "none"
    encoder = VisionTransformer(img_size=img_size, num_classes=0, **timm_kwargs)
    if pos_embed == "sincos":
        set_sincos_pos_embed(encoder)
    record = {k: v for k, v in overrides.items() if k not in _TRAINING_ONLY_KEYS and v is not None}
    encoder.vitmpp_spec = {"name": name, "img_size": img_size, "overrides": record, "pos_embed": pos_embed}
    return encoder


def encoder_spec(encoder: VisionTransformer) -> dict:
    """How to rebuild `encoder`'s architecture: `{"name", "img_size", "overrides", "pos_embed"}`.

    Encoders from `create_encoder`/`load_encoder` carry it; for any other timm
    `VisionTransformer` it is read off the module (the closest variant plus the
    keys that differ).
    """
    grid = encoder.patch_embed.grid_size
    patch = encoder.patch_embed.patch_size
    img_size = grid[0] * patch[0]
    spec = getattr(encoder, "vitmpp_spec", None)
    if spec is not None:
        return {
            **spec,
            "img_size": img_size,
            "overrides": dict(spec["overrides"]),
            "pos_embed": pos_embed_kind(encoder),
        }
    if patch[0] != patch[1] or grid[0] != grid[1]:
        raise UserError("Only square images and patches are supported by vitmpp encoders.")
    arch = {
        "patch_size": patch[0],
        "embed_dim": encoder.embed_dim,
        "depth": len(encoder.blocks),
        "num_heads": encoder.blocks[0].attn.num_heads,
        "mlp_ratio": encoder.blocks[0].mlp.fc1.out_features / encoder.embed_dim,
    }
    best = min(ENCODER_VARIANTS, key=lambda n: sum(ENCODER_VARIANTS[n][k] != arch[k] for k in ARCHITECTURE_KEYS))
    overrides = {k: v for k, v in arch.items() if ENCODER_VARIANTS[best][k] != v}
    if encoder.global_pool != "token":
        overrides["global_pool"] = encoder.global_pool
    if not encoder.has_class_token:
        overrides["class_token"] = False
    if encoder.blocks[0].attn.qkv.bias is None:
        overrides["qkv_bias"] = False
    return {"name": best, "img_size": img_size, "overrides": overrides, "pos_embed": pos_embed_kind(encoder)}


def standard_timm_name(encoder: VisionTransformer) -> str | None:
    """The timm model name whose architecture `encoder` has (weights load there), else None."""
    spec = encoder_spec(encoder)
    base = ENCODER_VARIANTS[spec["name"]]
    if base["timm_name"] is None:
        return None
    if any(k in spec["overrides"] and spec["overrides"][k] != base[k] for k in ARCHITECTURE_KEYS):
        return None
    # other structural changes (no class token, no qkv bias, layer scale, ...) break the match too
    structural = set(spec["overrides"]) - set(ARCHITECTURE_KEYS) - {"global_pool", "fc_norm"}
    return None if structural else base["timm_name"]


def pos_embed_kind(encoder: VisionTransformer) -> str:
    """ "sincos" for a frozen position table, "learned" for a trained one, "none" without."""
    if encoder.pos_embed is None:
        return "none"
    return "learned" if encoder.pos_embed.requires_grad else "sincos"


# ----------------------------------------------------------------------------- sin-cos position embeddings


def mae_sincos_pos_embed(grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """MAE's fixed 2D sin-cos table: [num_prefix_tokens + H*W, dim], zero rows for prefix tokens.

    Patch rows in row-major order. Each row is [sin(x) | cos(x) | sin(y) | cos(y)]
    (x the column, y the row, D/4 frequencies 1/10000^(i/(D/4)) each): MAE's code
    meshes (w, h) and so puts the column first. timm's `build_sincos2d_pos_embed`
    with interleaved sin/cos yields the same values with the row half first, so
    the halves are swapped. `transformers.ViTMAE` uses MAE's layout too (the peer
    test checks it).
    """
    if dim % 4 != 0:
        raise UserError(f"Fixed sin-cos position embeddings need a width divisible by 4, got {dim}.")
    table = build_sincos2d_pos_embed(list(grid_size), dim, interleave_sin_cos=True)  # [H*W, D], row half first
    table = torch.cat([table[:, dim // 2 :], table[:, : dim // 2]], dim=1)  # column half first, as MAE
    if num_prefix_tokens:
        table = torch.cat([table.new_zeros(num_prefix_tokens, dim), table], dim=0)
    return table


def set_sincos_pos_embed(encoder: VisionTransformer) -> VisionTransformer:
    """Replace the encoder's position embedding by MAE's fixed sin-cos table, frozen (in place)."""
    if encoder.pos_embed is None:
        raise UserError("This encoder has no position embedding to make sin-cos (it was built with pos_embed='none').")
    prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
    table = mae_sincos_pos_embed(encoder.patch_embed.grid_size, encoder.embed_dim, prefix)
    with torch.no_grad():
        if encoder.pos_embed.device.type != "meta":
            encoder.pos_embed.copy_(table.unsqueeze(0).to(encoder.pos_embed.dtype))
    encoder.pos_embed.requires_grad_(False)
    return encoder


# ----------------------------------------------------------------------------- running parts of the encoder


def encode_patch_tokens(encoder: VisionTransformer, patch_tokens: torch.Tensor) -> torch.Tensor:
    """The rest of timm's `forward_features` after `patch_embed`: [B, N, D] -> [B, prefix + N, D].

    Adds the class token and position embeddings (timm's `_pos_embed`), then the
    blocks (activation-checkpointed when `set_grad_checkpointing` is on) and the
    final norm. MPP corrupts the patch tokens between `patch_embed` and this.
    """
    x = encoder._pos_embed(patch_tokens)
    x = encoder.patch_drop(x)
    x = encoder.norm_pre(x)
    return run_blocks(encoder, x)


def run_blocks(encoder: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The encoder's blocks and final norm on a token sequence [B, T, D]."""
    if encoder.grad_checkpointing and not torch.jit.is_scripting():
        tokens = checkpoint_seq(encoder.blocks, tokens)
    else:
        tokens = encoder.blocks(tokens)
    return token_norm(encoder)(tokens)


def token_norm(encoder: VisionTransformer) -> torch.nn.Module:
    """The norm per-token objectives apply to the final tokens.

    timm puts the final LayerNorm after pooling (`fc_norm`) instead of on the
    tokens (`norm`) when `global_pool="avg"`; per-patch predictions (MPP, MAE)
    then use `fc_norm` on every token, so the exported norm is the one trained.
    """
    if isinstance(encoder.norm, torch.nn.Identity) and not isinstance(encoder.fc_norm, torch.nn.Identity):
        return encoder.fc_norm
    return encoder.norm


def patch_size_of(encoder: VisionTransformer) -> int:
    """The (square) patch size in pixels."""
    p = encoder.patch_embed.patch_size
    if p[0] != p[1]:
        raise UserError(f"Only square patches are supported, got {tuple(p)}.")
    return int(p[0])


# ----------------------------------------------------------------------------- config


@dataclass
class EncoderConfig:
    """The `model` section of stage configs: which encoder to build."""

    name: str = param(
        "vit_pico_patch4_32",
        help="encoder variant (timm name such as vit_base_patch16_224, or a tiny vit_pico/nano/micro one)",
    )
    img_size: int = param(32, gt=0, le=MAX_IMAGE_SIDE, help="input resolution in pixels (square)")
    patch_size: int | None = param(None, ge=1, le=MAX_IMAGE_SIDE, help="patch size in pixels; null: the variant's")
    drop_path_rate: float = param(0.0, ge=0, lt=1, help="stochastic depth rate")
    global_pool: str = param(
        "token", choices=("token", "avg"), help="feature pooling: class token or mean of patch tokens"
    )
    grad_checkpointing: bool = param(False, help="activation checkpointing of the blocks (timm set_grad_checkpointing)")
    pos_embed: str = param("learned", choices=("learned", "sincos"), help="learned, or MAE's fixed 2D sin-cos table")
    init: str | None = param(None, help="start from these weights: a checkpoint file or folder (docs/weights.md)")
    init_parts: str = param(
        "encoder",
        choices=("encoder", "all"),
        help="what model.init sets: the encoder, or also the objective's parts it holds",
    )

    def check(self) -> None:
        if self.name not in ENCODER_VARIANTS:
            hint = difflib.get_close_matches(self.name, list(ENCODER_VARIANTS), n=1, cutoff=0.5)
            tail = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"Key 'model.name' names an unknown encoder '{self.name}'{tail}; known: {', '.join(ENCODER_VARIANTS)}."
            )
        patch = self.patch_size if self.patch_size is not None else ENCODER_VARIANTS[self.name]["patch_size"]
        if patch <= 0 or self.img_size % patch != 0:
            raise ConfigError(
                f"Key 'model.patch_size' ({patch}) must divide 'model.img_size' ({self.img_size}); change one of them."
            )


def encoder_from_config(cfg: EncoderConfig) -> VisionTransformer:
    """The encoder a config section describes."""
    cfg.check()
    overrides: dict[str, Any] = {
        "drop_path_rate": cfg.drop_path_rate,
        "global_pool": cfg.global_pool,
        "pos_embed": cfg.pos_embed,
    }
    if cfg.patch_size is not None:
        overrides["patch_size"] = cfg.patch_size
    encoder = create_encoder(cfg.name, img_size=cfg.img_size, **overrides)
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return encoder
