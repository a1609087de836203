"""SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022).

What the paper specifies, and how this module does it (official code:
github.com/microsoft/SimMIM, `data/data_simmim.py` and `models/simmim.py`):

* Masking (patch-aligned random masking; abstract: "random masking of
  the input image with a moderately large masked patch size (e.g., 32)"; the
  ablations' default is 32 px at ratio 0.6): the image is cut
  into square *mask patches* of `mask_patch_size` pixels, a multiple of the ViT
  patch size, and a random subset of them is masked; a mask patch covers
  (mask_patch_size / patch_size)^2 ViT patches, all masked together. Count: as
  the official `MaskGenerator`, exactly K = int(ceil(U * mask_ratio)) of the U
  mask patches per image (U = 49 and K = 30 for ViT-B/16 at 224 px), the first K
  of a random permutation (`simmim_mask`: argsort of uniform noise, on the device).
  The expression is the official one, float rounding included (100 * 0.55 is
  55.00000000000001, so 56 of 100).
* Mask token (a learnable mask token vector replaces each masked patch
  embedding, with the width of the visible patch embeddings): a vector of the
  encoder width that replaces the output of the patch projection, before the
  class token is prepended and the position embeddings are added, as in the
  official `VisionTransformerForSimMIM.forward`. Its init is the official one for
  ViT: N(0, 0.02) truncated at +-0.02.
* Prediction head (abstract: "the prediction head can be as light as a
  linear layer"): one linear layer from each output token to its patch's p*p*3
  pixels, ordered (row, column, channel) like `patchify`. The official head is a
  1x1 convolution to p*p*3 channels and a PixelShuffle, the same function with
  another output order; PyTorch's default init of `nn.Linear` equals that of the
  1x1 `nn.Conv2d` (uniform in +-1/sqrt(D)).
* Loss (L = ||y_M - x_M||_1 / Omega(x_M)): L1 over the masked
  pixels only, the mean over every masked pixel and channel (the official code
  divides the masked sum by the masked pixel count and by 3). At least one mask
  patch is always masked, so no epsilon is needed.
* Target: raw pixels (abstract: "predicting raw pixels of RGB values by
  direct regression"), i.e. RGB values regressed directly: no tokenizer, no colour
  clustering or discretisation, no per-patch normalisation (unlike MAE's
  norm_pix_loss). Of the two readings -- pixels in [0, 1] or the normalised
  image -- this module uses the *normalised image*, exactly what the encoder is
  given, because the official code does (its transform ends with
  `Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)` and the loss compares
  with that tensor). Per pixel this is the [0, 1] L1 weighted by 1/std of each
  channel, so the minimiser is the same, and the loss scale matches the
  released recipes' learning rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.layers import trunc_normal_
from timm.models import VisionTransformer
from torch import Tensor, nn
from torchvision.utils import make_grid

from vitmpp.common.config import param
from vitmpp.common.errors import ConfigError
from vitmpp.common.sections import MAX_IMAGE_SIDE

from ..encoder import encode_patch_tokens, patch_size_of
from ..objective import (
    Objective,
    ObjectiveOutput,
    Visualization,
    paint_patches,
    pick,
    register_objective,
)
from ..patches import patchify


@dataclass
class SimMIMConfig:
    mask_ratio: float = param(
        0.6, gt=0, lt=1, help="fraction of mask patches masked per image, rounded up (paper: 0.6)"
    )
    mask_patch_size: int = param(
        32, gt=0, le=MAX_IMAGE_SIDE, help="side of a mask patch in pixels, a multiple of the ViT patch size (paper: 32)"
    )

    def check(self, patch_size: int | None = None, img_size: tuple[int, int] | None = None) -> None:
        """The keys alone are checked by their ranges; with the encoder's patch and image size, their fit."""
        m = self.mask_patch_size
        if patch_size is not None and m % patch_size:
            raise ConfigError(
                f"Key 'simmim.mask_patch_size' ({m}) must be a multiple of the encoder's patch size {patch_size}."
            )
        if img_size is not None and (img_size[0] % m or img_size[1] % m):
            raise ConfigError(
                f"Key 'simmim.mask_patch_size' ({m}) must divide the image size {img_size[0]}x{img_size[1]}."
            )


def masked_count(units: int, mask_ratio: float) -> int:
    """K, the mask patches masked per image out of U: int(ceil(U * ratio)), as the official MaskGenerator."""
    return int(math.ceil(units * mask_ratio))


def simmim_mask(
    batch: int,
    grid_h: int,
    grid_w: int,
    mask_patch_in_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """SimMIM's random masks: bool [batch, grid_h * grid_w] over the ViT patches, row-major, True = masked.

    The grid of ViT patches is tiled by mask patches of `mask_patch_in_patches`^2
    ViT patches each; per image exactly `masked_count(U, mask_ratio)` of the U
    mask patches (the first ones of a random permutation) are masked, each as a
    whole block. `generator` fixes the draw (the noise is drawn on its device);
    `device` is where the mask is returned.
    """
    s = int(mask_patch_in_patches)
    if s < 1 or grid_h % s or grid_w % s:
        raise ValueError(f"simmim_mask: mask patches of {s} ViT patches must tile the {grid_h}x{grid_w} grid")
    if not 0 < mask_ratio < 1:
        raise ValueError(f"simmim_mask: mask_ratio must be in (0, 1), got {mask_ratio}")
    uh, uw = grid_h // s, grid_w // s
    units = uh * uw
    k = masked_count(units, mask_ratio)
    noise = torch.rand(batch, units, generator=generator, device=generator.device if generator is not None else device)
    ids = torch.argsort(noise, dim=1)[:, :k]  # a uniformly random permutation's first k
    per_unit = torch.zeros(batch, units, dtype=torch.bool, device=noise.device).scatter_(1, ids, True)
    mask = per_unit.view(batch, uh, 1, uw, 1).expand(batch, uh, s, uw, s).reshape(batch, grid_h * grid_w)
    return mask if device is None else mask.to(device)


@register_objective("simmim", SimMIMConfig)
class SimMIMObjective(Objective):
    """SimMIM (Xie et al.): mask 60% of 32 px blocks with a [mask] token, L1 on their pixels from a linear head."""

    title = "SimMIM"
    paper = 'Xie et al. 2021, "SimMIM: A Simple Framework for Masked Image Modeling"'
    arxiv = "2111.09886"
    description = (
        "60% of 32-pixel blocks are replaced by a learned mask token in the encoder input; a linear head "
        "predicts their raw pixels (L1 loss)."
    )
    hub_tags = ("masked-image-modeling",)

    # The CPU demo (vit_nano_patch8_32 at 32 px): a 32 px mask patch is the whole image (1 unit, always
    # masked). 8 px, one ViT patch per unit, keeps the paper's scale best: 16 units, 10 masked (62.5%,
    # near 0.6) and a mask patch 1/4 of the side (paper: 32 of 224 px, 1/7). 16 px would leave 4 units,
    # 3 masked (75%): one visible quarter of a digit.
    embedded_options = {"mask_patch_size": 8}

    def __init__(
        self,
        encoder: VisionTransformer,
        config: SimMIMConfig,
        *,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes: int | None = None,
    ):
        super().__init__(encoder, config, mean=mean, std=std, num_classes=num_classes)
        self.require_every_patch("SimMIM", "predicts every masked patch")
        self.patch_size = p = patch_size_of(encoder)
        self.grid_h, self.grid_w = (int(g) for g in encoder.patch_embed.grid_size)
        config.check(patch_size=p, img_size=(self.grid_h * p, self.grid_w * p))
        self.mask_patch_in_patches = config.mask_patch_size // p
        dim = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # the official ViT's init
        self.head = nn.Linear(dim, p * p * 3)  # default init, as the official 1x1 conv

    def _own_no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def _stem_patterns(self) -> list[str]:
        return [r"^mask_token"]  # an input embedding, like the patch projection

    @property
    def num_mask_units(self) -> int:
        """U, the mask patches per image."""
        return (self.grid_h // self.mask_patch_in_patches) * (self.grid_w // self.mask_patch_in_patches)

    def sample_mask(
        self, batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """bool [batch, N]: this objective's random masks over the ViT patches."""
        return simmim_mask(
            batch,
            self.grid_h,
            self.grid_w,
            self.mask_patch_in_patches,
            self.config.mask_ratio,
            generator,
            device=device,
        )

    def embed(self, images: Tensor, mask: Tensor) -> Tensor:
        """Patch embeddings [B, N, D] with the masked ones replaced by the mask token (no position yet)."""
        tokens = self.encoder.patch_embed(images)
        return torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)

    def targets(self, images: Tensor) -> Tensor:
        """[B, N, p*p*3]: the patches of the normalised input image (the official target)."""
        return patchify(images.float(), self.patch_size)

    def forward(self, pixels: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> ObjectiveOutput:
        """pixels [B, 3, H, W] in [0, 1]; labels ignored; mask bool [B, N] fixes the masks (tests)."""
        images = self.normalize(pixels)
        if mask is None:
            mask = self.sample_mask(images.shape[0], images.device)
        mask = mask.to(device=images.device, dtype=torch.bool)
        tokens = encode_patch_tokens(self.encoder, self.embed(images, mask))[:, self.encoder.num_prefix_tokens :]
        prediction = self.head(tokens).float()  # [B, N, p*p*3], every patch
        per_patch = (prediction - self.targets(images)).abs().mean(dim=-1)  # [B, N]
        weight = mask.float()
        loss = (per_patch * weight).sum() / weight.sum()  # the mean over masked pixels: all patches have p*p*3
        return ObjectiveOutput(loss=loss, extras={"mask": mask, "prediction": prediction.detach()})

    # ---- pictures
    @torch.no_grad()
    def visualize(self, pixels: Tensor, output: ObjectiveOutput, max_images: int = 8) -> Visualization:
        """Per image: image | encoder input (masked patches grey) | prediction pasted into the masked patches."""
        n = pick(pixels, max_images)
        p = self.patch_size
        images01 = pixels[:n].float()
        _, _, h, w = images01.shape
        mask = output.extras["mask"][:n].to(images01.device).bool()
        patches = output.extras["prediction"][:n].float().to(images01.device)
        patches = patches.reshape(n, -1, p, p, 3).permute(0, 1, 4, 2, 3)  # [n, N, 3, p, p], normalised
        std, mean = self.pixel_std.view(1, 1, 3, 1, 1), self.pixel_mean.view(1, 1, 3, 1, 1)
        recon01 = (patches * std.to(patches.device) + mean.to(patches.device)).clamp(0, 1)
        grey = torch.full((n, mask.shape[1], 3), 0.5, device=images01.device)
        shown = paint_patches(images01, grey, mask, p)
        pasted = paint_patches(images01, recon01, mask, p)
        tiles = torch.stack([images01, shown, pasted], dim=1).reshape(-1, 3, h, w)
        grid = make_grid(tiles.float().cpu(), nrow=3, padding=1, pad_value=1.0)
        cfg, units = self.config, self.num_mask_units
        k = masked_count(units, cfg.mask_ratio)
        caption = (
            f"SimMIM, {k} of {units} mask patches of {cfg.mask_patch_size} px masked (ratio {cfg.mask_ratio:g}, "
            f"rounded up): each row is one image; columns = image | encoder input (grey: [mask] token) | "
            "the linear head's pixels pasted into the masked patches (the L1 loss covers only those)"
        )
        return Visualization(
            grid=grid.clamp(0, 1),
            caption=caption,
            columns=["image", "encoder input", "prediction in the masked patches"],
        )


__all__ = ["SimMIMConfig", "SimMIMObjective", "simmim_mask", "masked_count"]
