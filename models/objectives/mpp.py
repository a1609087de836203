"""Masked patch prediction, exactly as the ViT paper's appendix B.1.2 (Dosovitskiy et al., 2021).

What the paper specifies, and how this module does it:

* "We corrupt 50% of patch embeddings": per image, exactly
  K = round(corrupt_ratio * N) patch positions, chosen uniformly at random (the
  first K of an argsort of uniform noise, so every image has the same K and the
  gathers keep static shapes).
* "by either replacing their embeddings with a learnable [mask] embedding (80%),
  a random other patch embedding (10%) or just keeping them as is (10%)": each
  corrupted position draws its fate independently with these probabilities, as
  BERT does for tokens. The [mask] embedding is a learnable vector of the
  encoder's width D. The random other patch is the embedding of a patch drawn
  uniformly from the whole batch, never the position itself.
* Corruption acts on the patch embeddings, i.e. the output of the linear patch
  projection, before the class token is prepended and before position
  embeddings are added: a corrupted position still receives its position
  embedding, so the model knows where the patch it must describe is.
* Target: "the 3-bit mean colour (i.e., 512 colours in total) of every corrupted
  patch", predicted from that patch's final representation by a linear head,
  cross-entropy over corrupted patches only. The paper's alternatives are
  options: `downsampled` (a 4x4 downsized patch, 16 predictions of 512 colours)
  and `pixels` (L2 regression on the full patch); `corrupt_ratio=0.15` is the
  lower rate it also tried.
* Targets come from pixels in [0, 1]: the objective is given them and
  normalises only the encoder's input.

How this differs from lucidrains' `vit-pytorch` MPP (`vit_pytorch/mpp.py`):
that implementation corrupts *pixels*: it replaces masked patches of the input
image by a fixed mask value in pixel space (and random patches by other pixel
patches) before the patch embedding, and draws the number of masked patches per
image at random. Here the `[mask]` token lives in embedding space (a learnable
vector of width D, `MPPObjective.mask_token`), corruption happens after the
patch projection, and every image has exactly K corrupted patches. The paper's
wording ("replacing their embeddings with a learnable [mask] embedding")
describes the embedding-space version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import VisionTransformer
from torch import Tensor, nn
from torchvision.utils import make_grid

from vitmpp.common.config import param
from vitmpp.common.errors import ConfigError, UserError

from ..encoder import encode_patch_tokens, patch_size_of
from ..objective import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Objective,
    ObjectiveOutput,
    Visualization,
    paint_patches,
    pick,
    register_objective,
)
from ..patches import gather_tokens, patchify

# A mean exactly on a bin edge k/2^bits belongs to bin k. Arithmetic noise (a
# mean of p*p pixels in float32) can put it a few ulps below the
# edge, so edges are moved down by this fraction of a bin (1e-4 of a bin is
# 1.2e-5 in pixel value at 3 bits, far below one 8-bit grey level, 3.9e-3).
_EDGE_TOLERANCE = 1e-4
DOWNSAMPLED_CELLS = 4  # the paper's "4x4 downsized patch"


@dataclass
class MPPConfig:
    corrupt_ratio: float = param(
        0.5, gt=0, lt=1, help="fraction of patches corrupted per image (paper: 0.5; 0.15 also tried)"
    )
    mask_prob: float = param(0.8, ge=0, le=1, help="share of corrupted patches replaced by the [mask] embedding")
    random_prob: float = param(0.1, ge=0, le=1, help="share replaced by a random other patch's embedding")
    keep_prob: float = param(0.1, ge=0, le=1, help="share kept unchanged (still predicted)")
    target: str = param(
        "mean_color",
        choices=("mean_color", "downsampled", "pixels"),
        help="mean_color: 3-bit mean colour (512 classes); downsampled: 4x4 cells of it; pixels: L2 on the patch",
    )
    bits: int = param(3, ge=1, le=5, help="bits per colour channel of the colour classes")
    head: str = param(
        "linear",
        choices=("linear", "mlp"),
        help="prediction head: linear (paper) or BERT-style dense+GELU+LayerNorm+linear",
    )

    def check(self) -> None:
        total = self.mask_prob + self.random_prob + self.keep_prob
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"Keys 'mpp.mask_prob' + 'mpp.random_prob' + 'mpp.keep_prob' must sum to 1, got "
                f"{self.mask_prob} + {self.random_prob} + {self.keep_prob} = {total:g}."
            )


# ----------------------------------------------------------------------------- targets


def quantize_colors(rgb01: Tensor, bits: int = 3) -> Tensor:
    """Colours [..., 3] in [0, 1] -> class r*L^2 + g*L + b (long), L = 2^bits levels per channel.

    Channel level = floor(value * L), clamped to L-1 (so 1.0 is the top level):
    level k holds [k/L, (k+1)/L); a value on an edge k/L is in level k.
    """
    levels = 2**bits
    q = torch.floor(rgb01.float() * levels + _EDGE_TOLERANCE).clamp_(0, levels - 1).long()
    return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]


def class_colors(classes: Tensor, bits: int = 3) -> Tensor:
    """Colour classes (long) -> [..., 3] the centre colour of each bin, in [0, 1] (for pictures)."""
    levels = 2**bits
    r = torch.div(classes, levels * levels, rounding_mode="floor")
    g = torch.div(classes, levels, rounding_mode="floor") % levels
    b = classes % levels
    return (torch.stack([r, g, b], dim=-1).float() + 0.5) / levels


def mean_color_target(images01: Tensor, patch_size: int, bits: int = 3) -> Tensor:
    """The paper's default target: images [B, 3, H, W] in [0, 1] -> LongTensor [B, N] of colour classes.

    Class of a patch = its mean RGB, each channel quantised to `bits` bits
    (`quantize_colors`); patches in row-major order. Pure red -> 7*64 = 448.
    """
    means = F.avg_pool2d(images01.float(), patch_size)  # [B, 3, H/p, W/p]
    return quantize_colors(means.flatten(2).transpose(1, 2), bits)


def downsampled_color_target(
    images01: Tensor, patch_size: int, bits: int = 3, cells: int = DOWNSAMPLED_CELLS
) -> Tensor:
    """The paper's 4x4 variant: [B, 3, H, W] in [0, 1] -> LongTensor [B, N, cells*cells].

    Each patch is area-averaged down to cells x cells, each cell a colour class
    (cells row-major within the patch).
    """
    if patch_size % cells:
        raise UserError(f"The downsampled MPP target needs a patch size divisible by {cells}, got {patch_size}.")
    means = F.avg_pool2d(images01.float(), patch_size // cells)  # [B, 3, H*cells/p, W*cells/p]
    grid = images01.shape[-1] // patch_size
    per_patch = means.reshape(means.shape[0], 3, -1, cells, grid, cells).permute(0, 2, 4, 3, 5, 1)
    return quantize_colors(per_patch.reshape(means.shape[0], -1, cells * cells, 3), bits)


# ----------------------------------------------------------------------------- the objective


class Corruption(NamedTuple):
    """Which patches were corrupted and how. All [B, K] long.

    `ids`: patch positions (distinct within an image); `kind`: 0 = [mask],
    1 = random other patch, 2 = kept; `source`: for kind 1, the flat index
    b*N + n of the patch whose embedding was copied in (never the position itself).
    """

    ids: Tensor
    kind: Tensor
    source: Tensor


MASK, RANDOM, KEEP = 0, 1, 2


@register_objective("mpp", MPPConfig)
class MPPObjective(Objective):
    """Masked patch prediction (ViT appendix B.1.2): corrupt patch embeddings, predict their colours."""

    title = "masked patch prediction"
    paper = (
        'Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words: Transformers for Image Recognition at '
        'Scale", appendix B.1.2'
    )
    arxiv = "2010.11929"
    description = (
        "50% of the patch embeddings of each image are corrupted (80% replaced by a learned [mask] "
        "embedding, 10% by another patch's, 10% kept); the encoder predicts the 3-bit mean colour of each "
        "corrupted patch (512 classes) with a cross-entropy loss."
    )
    hub_tags = ("masked-image-modeling",)

    def __init__(
        self,
        encoder: VisionTransformer,
        config: MPPConfig,
        *,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes: int | None = None,
    ):
        super().__init__(encoder, config, mean=mean, std=std, num_classes=num_classes)
        self.require_every_patch("MPP", "predicts every corrupted patch")
        self.patch_size = patch_size_of(encoder)
        dim = encoder.embed_dim
        self.num_colors = 2 ** (3 * config.bits)
        if config.target == "mean_color":
            out = self.num_colors
        elif config.target == "downsampled":
            if self.patch_size % DOWNSAMPLED_CELLS:
                raise UserError(
                    f"MPP target 'downsampled' needs a patch size divisible by {DOWNSAMPLED_CELLS}, "
                    f"but the encoder's is {self.patch_size}; use target mean_color or another patch size."
                )
            out = DOWNSAMPLED_CELLS**2 * self.num_colors
        else:
            out = self.patch_size * self.patch_size * 3
        # The learnable [mask] embedding lives in embedding space (width D): it
        # replaces the output of the patch projection, like BERT's [MASK] token.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.mask_token, std=0.02)
        if config.head == "linear":
            self.head = nn.Linear(dim, out)
        else:
            self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out))
        for module in self.head.modules() if isinstance(self.head, nn.Sequential) else [self.head]:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def _own_no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def _stem_patterns(self) -> list[str]:
        return [r"^mask_token"]  # an input embedding, like the patch projection

    def num_corrupted(self, num_patches: int) -> int:
        """K = round(corrupt_ratio * N), at least 1."""
        return expected_corrupted(num_patches, self.config.corrupt_ratio)

    def corrupt(self, patch_tokens: Tensor) -> tuple[Tensor, Corruption]:
        """Corrupt K patch embeddings per image: [B, N, D] -> ([B, N, D], Corruption).

        Static shapes and no host syncs: every image gets exactly K positions;
        each position's fate is drawn independently (mask / random / keep).
        """
        b, n, d = patch_tokens.shape
        k = self.num_corrupted(n)
        device = patch_tokens.device
        ids = torch.argsort(torch.rand(b, n, device=device), dim=1)[:, :k]
        draw = torch.rand(b, k, device=device)
        cfg = self.config
        kind = (draw >= cfg.mask_prob).long() + (draw >= cfg.mask_prob + cfg.random_prob).long()
        total = b * n
        own = ids + torch.arange(b, device=device).unsqueeze(1) * n  # flat index of each corrupted patch
        if total > 1:
            # uniform over the other total-1 patches of the batch: a non-zero offset, modulo the batch
            source = (own + torch.randint(1, total, (b, k), device=device)) % total
        else:
            source = own  # a batch of one patch has no other patch to draw
        original = gather_tokens(patch_tokens, ids)
        random_other = patch_tokens.reshape(total, d)[source]
        mask = self.mask_token.to(patch_tokens.dtype).expand(b, k, d)
        fate = kind.unsqueeze(-1)
        replaced = torch.where(fate == MASK, mask, torch.where(fate == RANDOM, random_other, original))
        corrupted = patch_tokens.scatter(1, ids.unsqueeze(-1).expand(-1, -1, d), replaced)
        return corrupted, Corruption(ids, kind, source)

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor, Corruption]:
        """Patch embeddings, corrupted: ([B, N, D] clean, [B, N, D] corrupted, Corruption)."""
        clean = self.encoder.patch_embed(images)
        corrupted, corruption = self.corrupt(clean)
        return clean, corrupted, corruption

    def targets(self, pixels: Tensor, normalized: Tensor) -> Tensor:
        """Per-patch targets of the whole batch: [B, N] classes, [B, N, 16] classes or [B, N, p*p*3] pixels."""
        if self.config.target == "pixels":
            # the paper's L2 variant regresses the patch as the model sees it (normalised pixels)
            return patchify(normalized, self.patch_size)
        if self.config.target == "mean_color":
            return mean_color_target(pixels, self.patch_size, self.config.bits)
        return downsampled_color_target(pixels, self.patch_size, self.config.bits)

    def forward(self, pixels: Tensor, labels: Tensor | None = None) -> ObjectiveOutput:
        """pixels [B, 3, H, W] in [0, 1]; labels ignored."""
        images = self.normalize(pixels)
        _, corrupted, corruption = self.embed(images)
        tokens = encode_patch_tokens(self.encoder, corrupted)[:, self.encoder.num_prefix_tokens :]  # [B, N, D]
        prediction = self.head(gather_tokens(tokens, corruption.ids)).float()  # [B, K, out]
        target = gather_tokens(self.targets(pixels, images), corruption.ids)
        extras: dict[str, Tensor] = {"ids": corruption.ids, "kind": corruption.kind, "source": corruption.source}
        if self.config.target == "pixels":
            loss = F.mse_loss(prediction, target)
            extras["prediction"] = prediction.detach()
        else:
            logits = prediction.reshape(*target.shape, self.num_colors)
            loss = F.cross_entropy(logits.reshape(-1, self.num_colors), target.reshape(-1))
            predicted = logits.detach().argmax(dim=-1)
            extras["prediction"] = predicted
            extras["accuracy"] = (predicted == target).float().mean()
        extras["target"] = target.detach()
        return ObjectiveOutput(loss=loss, extras=extras)

    # ---- pictures
    @torch.no_grad()
    def visualize(self, pixels: Tensor, output: ObjectiveOutput, max_images: int = 8) -> Visualization:
        """Per image, four columns: image | corrupted input | target of the corrupted patches | prediction."""
        n = pick(pixels, max_images)
        p = self.patch_size
        images01 = pixels[:n].float()
        ex = {k: v[:n] for k, v in output.extras.items() if v.dim() > 0}
        b, _, h, w = images01.shape
        num = (h // p) * (w // p)
        ids, kind = ex["ids"].to(images01.device), ex["kind"].to(images01.device)
        corrupted = torch.zeros(b, num, dtype=torch.bool, device=images01.device).scatter(1, ids, True)

        def scatter_patches(values: Tensor) -> Tensor:
            """[b, K, ...] per corrupted patch -> [b, N, ...] (zeros elsewhere)."""
            full = values.new_zeros(b, num, *values.shape[2:])
            index = ids.reshape(b, -1, *([1] * (values.dim() - 2))).expand_as(values)
            return full.scatter(1, index, values)

        # what the encoder was given: grey for [mask], the source patch's pixels for random, unchanged for keep
        all01 = pixels.float()  # sources may come from any image of the batch
        pix = patchify(all01, p).reshape(-1, p, p, 3).permute(0, 3, 1, 2)  # [B*N, 3, p, p]
        source_pixels = pix[ex["source"].to(pix.device).reshape(-1)].reshape(b, -1, 3, p, p)
        shown = paint_patches(
            images01, scatter_patches(source_pixels), scatter_patches((kind == RANDOM).long()).bool(), p
        )
        shown = paint_patches(
            shown,
            torch.full((b, num, 3), 0.5, device=images01.device),
            scatter_patches((kind == MASK).long()).bool(),
            p,
        )
        dim = 0.35 * images01  # uncorrupted patches are dimmed in the target/prediction columns
        target_img = paint_patches(dim, scatter_patches(self._patch_pictures(ex["target"])), corrupted, p)
        pred_img = paint_patches(dim, scatter_patches(self._patch_pictures(ex["prediction"])), corrupted, p)
        tiles = torch.stack([images01, shown, target_img, pred_img], dim=1).reshape(-1, 3, h, w)
        grid = make_grid(tiles.float().cpu(), nrow=4, padding=1, pad_value=1.0)
        cfg = self.config
        what = {
            "mean_color": f"{cfg.bits}-bit mean colour",
            "downsampled": f"{DOWNSAMPLED_CELLS}x{DOWNSAMPLED_CELLS} {cfg.bits}-bit colours",
            "pixels": "pixels (L2)",
        }[cfg.target]
        acc = output.extras.get("accuracy")
        tail = f"; colour accuracy on this batch {100 * float(acc):.1f}%" if acc is not None else ""
        caption = (
            f"MPP, target {what}: each row is one image; columns = image | encoder input "
            f"(grey: [mask] embedding, {cfg.mask_prob:.0%}; other patch: random swap, {cfg.random_prob:.0%}; "
            f"unchanged, {cfg.keep_prob:.0%}) | target of the {ids.shape[1]} corrupted patches | prediction{tail}"
        )
        return Visualization(
            grid=grid.clamp(0, 1), caption=caption, columns=["image", "encoder input", "target", "prediction"]
        )

    def _patch_pictures(self, values: Tensor) -> Tensor:
        """Per-corrupted-patch targets/predictions -> pictures [b, K, 3, p, p] in [0, 1]."""
        p = self.patch_size
        b, k = values.shape[:2]
        if self.config.target == "mean_color":
            return class_colors(values, self.config.bits)[..., None, None].expand(-1, -1, -1, p, p)
        if self.config.target == "downsampled":
            c = DOWNSAMPLED_CELLS
            cells = class_colors(values, self.config.bits).reshape(b, k, c, c, 3).permute(0, 1, 4, 2, 3)
            return cells.repeat_interleave(p // c, dim=-2).repeat_interleave(p // c, dim=-1)
        patches = values.float().reshape(b, k, p, p, 3).permute(0, 1, 4, 2, 3)  # normalised pixels
        return (
            patches * self.pixel_std.view(1, 1, 3, 1, 1).to(patches.device)
            + self.pixel_mean.view(1, 1, 3, 1, 1).to(patches.device)
        ).clamp(0, 1)


def expected_corrupted(num_patches: int, corrupt_ratio: float = 0.5) -> int:
    """K, the patches corrupted per image out of N: round(ratio * N) (Python's round), at least 1."""
    return max(1, min(num_patches, round(corrupt_ratio * num_patches)))


__all__ = [
    "MPPConfig",
    "MPPObjective",
    "Corruption",
    "mean_color_target",
    "downsampled_color_target",
    "quantize_colors",
    "class_colors",
    "expected_corrupted",
    "MASK",
    "RANDOM",
    "KEEP",
]
