"""Attention weights of a timm ViT, attention rollout and mean attention distance.

timm's `Attention` calls `F.scaled_dot_product_attention` (fused), which never
materialises the attention matrix. For analysis we recompute it from the block's
own projections: a forward pre-hook on every `block.attn` sees the module's input
(the output of `norm1`), and we evaluate softmax(q kᵀ · scale) with the module's
`qkv`, `q_norm`, `k_norm` and `scale`. The hooks exist only inside
`record_attention` (removed on exit), nothing of timm is patched, and the fused
training path runs unchanged and at full speed.

Why not `timm.utils.AttentionExtract`: it reads the weights at `attn_drop` (or the
fx `softmax` node), which only exist on the unfused path, so it needs
`fused_attn=False` set on the modules, a change to the model we would then have to
undo; recomputing costs one extra `qkv` projection, only while analysing.

Shapes: B images, L blocks, H heads, N = prefix tokens (class token, registers) +
patch tokens; attention matrices are [B, H, N, N] with rows (queries) summing to 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from timm.layers import Attention
from torch import Tensor, nn

from vitmpp.common.errors import UserError

# Attributes of timm's `Attention` the recomputation reads.
_ATTENTION_PARTS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")


def _is_plain_attention(attn: nn.Module) -> bool:
    # timm's `Attention` (or a subclass) only: look-alikes such as `AttentionRope` have the same
    # attributes but rotate q and k first, which this recomputation would silently leave out
    return isinstance(attn, Attention) and all(hasattr(attn, name) for name in _ATTENTION_PARTS)


def check_attention_module(attn: nn.Module, where: str = "block.attn") -> None:
    """UserError unless `attn` is timm's standard `Attention` (fused qkv projection, no rotary embedding)."""
    if not _is_plain_attention(attn):
        raise UserError(
            f"{where} is a {type(attn).__name__}; attention analysis supports timm's standard Attention "
            "(VisionTransformer blocks with a fused qkv projection and no rotary position embedding)."
        )


def supports_attention(encoder: nn.Module) -> bool:
    """True when every block of `encoder` has an attention module the recomputation understands."""
    blocks = getattr(encoder, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return False
    return all(_is_plain_attention(getattr(block, "attn", None)) for block in blocks)


def recompute_attention(attn: nn.Module, x: Tensor) -> Tensor:
    """softmax(q kᵀ · scale) of timm `Attention` module `attn` for its input `x` [B, N, C].

    Returns float32 [B, H, N, N] (rows are queries, summing to 1). Computed in
    float32 whatever the input dtype, so bf16 activations give usable maps.
    """
    check_attention_module(attn)
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    return logits.softmax(dim=-1)


class AttentionRecorder:
    """Holds the attention matrices of one or more forward passes, one list entry per block."""

    def __init__(self, num_blocks: int, keep_on: torch.device | str | None = None):
        self.maps: list[list[Tensor]] = [[] for _ in range(num_blocks)]
        self.keep_on = keep_on

    def add(self, index: int, weights: Tensor) -> None:
        self.maps[index].append(weights if self.keep_on is None else weights.to(self.keep_on))

    def clear(self) -> None:
        for entries in self.maps:
            entries.clear()

    def stacked(self) -> Tensor:
        """[L, B, H, N, N]: every block's weights, the passes since the last `clear` concatenated on B."""
        if any(len(entries) == 0 for entries in self.maps):
            raise RuntimeError("no attention was recorded: run the encoder inside record_attention()")
        return torch.stack([torch.cat(entries, dim=0) for entries in self.maps])


@contextmanager
def record_attention(
    encoder: nn.Module,
    keep_on: torch.device | str | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Iterator[AttentionRecorder]:
    """Within the block, every forward pass of `encoder` records each block's attention weights.

    `keep_on`: move the recorded [B, H, N, N] maps there (e.g. "cpu") as they are made.
    `callback(block_index, weights)`: called instead of storing, in block order, so a
    reduction (rollout, distances) can consume each block's maps and drop them: memory
    then holds one block's attention, not all L (the recorder stays empty).
    The hooks are removed on exit, also after an error.
    """
    blocks = getattr(encoder, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise UserError(
            f"{type(encoder).__name__} has no transformer blocks to analyse; pass a timm VisionTransformer."
        )
    for index, block in enumerate(blocks):
        check_attention_module(block.attn, f"blocks[{index}].attn")
    recorder = AttentionRecorder(len(blocks), keep_on)
    consume = callback if callback is not None else recorder.add
    handles = []

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # Block.forward passes attn_mask/is_causal by keyword; the encoder's own
            # forward over whole images passes neither, and masked weights would need
            # the mask applied here too.
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal", False):
                raise RuntimeError("record_attention does not support attention masks or causal attention")
            x = args[0] if args else kwargs["x"]
            consume(index, recompute_attention(module, x))

        return hook

    try:
        for index, block in enumerate(blocks):
            handles.append(block.attn.register_forward_pre_hook(hook_for(index), with_kwargs=True))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_weights(encoder: nn.Module, images: Tensor) -> Tensor:
    """Every block's attention weights for normalised `images` [B, 3, H, W]: float32 [L, B, H, N, N].

    Runs `encoder.forward_features` once in eval mode (dropout, drop path off) and
    restores the encoder's train/eval mode afterwards.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        with record_attention(encoder) as recorder:
            encoder.forward_features(images)
        return recorder.stacked()
    finally:
        encoder.train(was_training)


# ----------------------------------------------------------------------------- rollout


def rollout_step(rollout: Tensor | None, attention: Tensor, residual: bool = True) -> Tensor:
    """One layer of attention rollout: Â @ rollout, Â = row_normalise(mean_h attention + I); [B, N, N].

    `attention` [B, H, N, N]; `rollout` None before the first layer.
    """
    if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention maps must be [B, H, N, N], got {tuple(attention.shape)}")
    fused = attention.float().mean(dim=1)
    if residual:
        fused = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    fused = fused / fused.sum(dim=-1, keepdim=True)
    return fused if rollout is None else fused @ rollout


def attention_rollout(attentions: Tensor | Sequence[Tensor], residual: bool = True) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): [L, B, H, N, N] (or a list of L [B, H, N, N]) -> [B, N, N].

    Per layer the heads are averaged and, for the residual connection, the identity
    is added and rows renormalised: Â_l = row_normalise(mean_h A_l + I). The rollout
    is Â_L ··· Â_2 Â_1 (the first block acts first, on the right), so row i says how
    much each input token flows into output token i. `residual=False` drops the
    identity (the raw product of head-mean attention).
    """
    layers = list(attentions.unbind(0)) if isinstance(attentions, Tensor) else list(attentions)
    if not layers:
        raise ValueError("attention_rollout needs at least one layer")
    rollout = None
    for attention in layers:
        rollout = rollout_step(rollout, attention, residual)
    return rollout


def rollout_maps(rollout: Tensor, grid_size: tuple[int, int], num_prefix_tokens: int, has_class_token: bool) -> Tensor:
    """Spatial maps of a rollout [B, N, N]: [B, gh, gw], each summing to 1 over the patches.

    With a class token: its row (what the class token gathered from each patch).
    Without one (global average pooling): the mean of the patch tokens' rows, which
    is what the pooled feature gathered. Weight that stayed on prefix tokens is
    dropped and the rest renormalised, so maps of different images are comparable.
    """
    gh, gw = grid_size
    if rollout.shape[-1] != num_prefix_tokens + gh * gw:
        raise ValueError(f"rollout has {rollout.shape[-1]} tokens, expected {num_prefix_tokens} + {gh}x{gw}")
    if has_class_token:
        rows = rollout[:, 0, num_prefix_tokens:]
    else:
        rows = rollout[:, num_prefix_tokens:, num_prefix_tokens:].mean(dim=1)
    rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows.reshape(-1, gh, gw)


# ----------------------------------------------------------------------------- mean attention distance


def patch_distances(grid_size: tuple[int, int], patch_size: tuple[int, int] | int) -> Tensor:
    """Pixel distances between patch centres: float64 [gh·gw, gh·gw], patches in row-major order."""
    gh, gw = grid_size
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    # patch centres sit at ((r + 1/2) ph, (c + 1/2) pw); the 1/2 cancels in differences
    centres = torch.stack([rows.flatten() * ph, cols.flatten() * pw], dim=-1)
    return torch.cdist(centres, centres)


def mean_attention_distance(
    attentions: Tensor,
    grid_size: tuple[int, int],
    patch_size: tuple[int, int] | int,
    num_prefix_tokens: int,
) -> Tensor:
    """Mean attention distance in pixels (ViT paper, Figure 7 right): [L, B, H, N, N] -> float64 [L, H].

    For each query patch, sum over key patches of attention weight × the pixel
    distance between the two patch centres; averaged over query patches and images.

    Prefix tokens (class token, registers) have no position in the image, so they
    are left out both as queries and as keys, and each query's weights over the
    patch keys are renormalised to sum to 1 (the distance is then "where among the
    patches this head looks"). Without renormalising, a head that sends most of its
    weight to the class token would look local only because that weight counts as
    distance 0. Each query patch counts equally.
    """
    if attentions.dim() == 4:
        attentions = attentions.unsqueeze(0)
    gh, gw = grid_size
    patches = attentions[..., num_prefix_tokens:, num_prefix_tokens:].double()
    if patches.shape[-1] != gh * gw:
        raise ValueError(f"attention has {patches.shape[-1]} patch tokens, expected a {gh}x{gw} grid")
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    distances = patch_distances(grid_size, patch_size).to(patches.device)
    per_query = (patches * distances).sum(dim=-1)  # [L, B, H, Q]
    return per_query.mean(dim=(1, 3))


def encoder_geometry(encoder: nn.Module, image_hw: tuple[int, int] | None = None) -> dict:
    """Grid, patch size and prefix tokens of a timm ViT (for images of `image_hw`, default its own size)."""
    patch = tuple(int(p) for p in encoder.patch_embed.patch_size)
    if image_hw is None:
        grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
    else:
        grid = tuple(int(g) for g in encoder.patch_embed.dynamic_feat_size(tuple(image_hw)))
    return {
        "grid_size": grid,
        "patch_size": patch,
        "num_prefix_tokens": int(getattr(encoder, "num_prefix_tokens", 1)),
        "has_class_token": bool(getattr(encoder, "has_class_token", True)),
    }
