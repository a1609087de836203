"""Masked autoencoders (He et al., 2022), with a timm `VisionTransformer` as the encoder.

As in MAE's reference code (option names are MAE's):

* per image, `mask_ratio` (0.75) of the patches are masked: argsort of uniform
  noise, the first int(N * (1 - mask_ratio)) are kept (`random_masking`, which
  takes the noise as an argument so tests can fix it);
* the encoder sees the visible patches plus the class token only, with MAE's
  fixed 2D sin-cos position embeddings (frozen; zero row for the class token);
* a light decoder (`decoder_depth` timm blocks of width `decoder_embed_dim`,
  `decoder_num_heads` heads, LayerNorm eps 1e-6) gets the encoded visible tokens
  projected to its width, a learnable mask token in every masked slot, the
  tokens unshuffled to their positions, and its own fixed sin-cos embeddings;
* a linear layer predicts every patch's pixels (p*p*3, ordered row, column,
  channel); the loss is the MSE over masked patches only, against the patch of
  the (normalised) input image, each target patch normalised by its own mean and
  variance when `norm_pix_loss` (default on, MAE's best setting);
* MAE's initialisation: xavier-uniform for linear layers (and the patch
  projection seen as one), N(0, 0.02) for the class and mask tokens.

`transformers.ViTMAEForPreTraining` computes the same function; the test suite
copies weights across and checks losses and reconstructions match.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.models import VisionTransformer
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torchvision.utils import make_grid

from vitmpp.common.config import param
from vitmpp.common.errors import ConfigError, UserError

from ..encoder import mae_sincos_pos_embed, patch_size_of, run_blocks, set_sincos_pos_embed
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
from ..patches import gather_tokens, patchify, unpatchify

NORM_PIX_EPS = 1e-6  # MAE's epsilon under the per-patch variance


@dataclass
class MAEConfig:
    mask_ratio: float = param(0.75, gt=0, lt=1, help="fraction of patches masked per image")
    # upper bounds: 4-8x the largest ViT's (ViT-22B: width 6144, 48 blocks, 48 heads); each is allocated
    decoder_embed_dim: int = param(512, gt=0, le=2**15, help="decoder width")
    decoder_depth: int = param(8, ge=1, le=256, help="decoder blocks")
    decoder_num_heads: int = param(16, ge=1, le=256, help="decoder attention heads")
    decoder_mlp_ratio: float = param(4.0, gt=0, le=64, help="decoder MLP width / decoder width")
    norm_pix_loss: bool = param(True, help="normalise each target patch by its mean and variance")
    init_encoder: bool = param(
        True,
        help="apply MAE's initialisation to the encoder too (model.init, when set, comes after it)",
    )

    def check(self) -> None:
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError(
                f"Key 'mae.decoder_embed_dim' ({self.decoder_embed_dim}) must be divisible by "
                f"'mae.decoder_num_heads' ({self.decoder_num_heads})."
            )
        if self.decoder_embed_dim % 4:
            raise ConfigError(
                f"Key 'mae.decoder_embed_dim' ({self.decoder_embed_dim}) must be divisible by 4 "
                "(fixed 2D sin-cos position embeddings)."
            )


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-image random masking by argsort of noise.

    x [B, N, D], noise [B, N] (uniform if None) -> (x_visible [B, N_keep, D],
    mask [B, N] float32 with 1 = masked, ids_restore [B, N] long), where
    N_keep = int(N * (1 - mask_ratio)) and the patches with the smallest noise
    are kept. `gather(shuffled, ids_restore)` puts a shuffled sequence back in order.
    """
    b, n, _ = x.shape
    keep = int(n * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(b, n, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # rank of each position in the shuffle
    x_visible = gather_tokens(x, ids_shuffle[:, :keep])
    mask = (ids_restore >= keep).to(torch.float32)  # position masked iff its rank is past the kept ones
    return x_visible, mask, ids_restore


def _xavier_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_objective("mae", MAEConfig)
class MAEObjective(Objective):
    """MAE (He et al.): encode the visible 25%, decode every patch, MSE on the masked ones."""

    title = "masked autoencoder"
    paper = 'He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"'
    arxiv = "2111.06377"
    description = (
        "75% of the patches of each image are dropped; the encoder sees the rest and a light decoder "
        "reconstructs the pixels of the dropped ones (MSE, per-patch normalised targets)."
    )
    hub_tags = ("masked-image-modeling",)

    # the CPU demo: a light decoder (the paper's 8 blocks x 512 are the config defaults and the recipes')
    embedded_options = {"decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4}

    def __init__(
        self,
        encoder: VisionTransformer,
        config: MAEConfig,
        *,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes: int | None = None,
    ):
        super().__init__(encoder, config, mean=mean, std=std, num_classes=num_classes)
        if encoder.dynamic_img_size:
            raise UserError("MAE needs an encoder with a fixed image size (dynamic_img_size=False).")
        if encoder.pos_embed is None:
            raise UserError("MAE needs an encoder with position embeddings (it was built with pos_embed='none').")
        self.patch_size = patch_size_of(encoder)
        set_sincos_pos_embed(encoder)  # MAE's encoder uses fixed sin-cos embeddings too
        dim, width = encoder.embed_dim, config.decoder_embed_dim
        prefix = encoder.num_prefix_tokens
        self.decoder_embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        table = mae_sincos_pos_embed(encoder.patch_embed.grid_size, width, prefix)
        self.decoder_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(
                    width, config.decoder_num_heads, mlp_ratio=config.decoder_mlp_ratio, qkv_bias=True, norm_layer=norm
                )
                for _ in range(config.decoder_depth)
            ]
        )
        self.decoder_norm = norm(width)
        self.decoder_pred = nn.Linear(width, self.patch_size**2 * 3)
        self._initialize(config.init_encoder)

    def _initialize(self, encoder_too: bool) -> None:
        """MAE's `initialize_weights`."""
        decoder = [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        for module in decoder:
            _xavier_linears(module)
        nn.init.normal_(self.mask_token, std=0.02)
        if encoder_too:
            enc = self.encoder
            _xavier_linears(enc)
            proj = enc.patch_embed.proj.weight
            nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))  # the patch projection is a linear layer
            if enc.cls_token is not None:
                nn.init.normal_(enc.cls_token, std=0.02)
            if enc.reg_token is not None:
                nn.init.normal_(enc.reg_token, std=0.02)

    def _own_no_weight_decay(self) -> set[str]:
        return {"mask_token", "decoder_pos_embed"}

    # ---- the model
    def _prefix_tokens(self, batch: int) -> Tensor | None:
        """Class (and register) tokens with their position embeddings: [B, P, D]."""
        enc = self.encoder
        parts = [t for t in (enc.cls_token, enc.reg_token) if t is not None]
        if not parts:
            return None
        prefix = torch.cat(parts, dim=1)
        if not enc.no_embed_class:
            prefix = prefix + enc.pos_embed[:, : enc.num_prefix_tokens]
        return prefix.expand(batch, -1, -1)

    def encode(self, images: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, 3, H, W] -> (latent [B, P + N_keep, D], mask [B, N], ids_restore [B, N])."""
        enc = self.encoder
        x = enc.patch_embed(images)
        patch_pos = enc.pos_embed if enc.no_embed_class else enc.pos_embed[:, enc.num_prefix_tokens :]
        x = x + patch_pos
        x, mask, ids_restore = random_masking(x, self.config.mask_ratio, noise)
        prefix = self._prefix_tokens(x.shape[0])
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        x = enc.norm_pre(x)
        return run_blocks(enc, x), mask, ids_restore

    def decode(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent [B, P + N_keep, D] -> predicted pixels of every patch [B, N, p*p*3]."""
        prefix = self.encoder.num_prefix_tokens
        y = self.decoder_embed(latent)
        b, n = ids_restore.shape
        masks = self.mask_token.to(y.dtype).expand(b, n - (y.shape[1] - prefix), -1)
        patches = gather_tokens(torch.cat([y[:, prefix:], masks], dim=1), ids_restore)  # unshuffle
        y = torch.cat([y[:, :prefix], patches], dim=1) + self.decoder_pos_embed
        if self.encoder.grad_checkpointing and not torch.jit.is_scripting():
            y = checkpoint_seq(self.decoder_blocks, y)
        else:
            y = self.decoder_blocks(y)
        return self.decoder_pred(self.decoder_norm(y))[:, prefix:]

    def targets(self, images: Tensor) -> Tensor:
        """[B, N, p*p*3]: the patches of the normalised input, per-patch normalised if norm_pix_loss."""
        target = patchify(images.float(), self.patch_size)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
        return target

    def forward(self, pixels: Tensor, labels: Tensor | None = None, noise: Tensor | None = None) -> ObjectiveOutput:
        """pixels [B, 3, H, W] in [0, 1]; labels ignored; noise [B, N] fixes the masks (tests)."""
        images = self.normalize(pixels)
        latent, mask, ids_restore = self.encode(images, noise)
        prediction = self.decode(latent, ids_restore).float()
        per_patch = ((prediction - self.targets(images)) ** 2).mean(dim=-1)  # [B, N]
        loss = (per_patch * mask).sum() / mask.sum()
        return ObjectiveOutput(loss=loss, extras={"prediction": prediction.detach(), "mask": mask})

    # ---- pictures
    @torch.no_grad()
    def visualize(self, pixels: Tensor, output: ObjectiveOutput, max_images: int = 8) -> Visualization:
        """Per image: image | visible patches | reconstruction | reconstruction with the visible patches pasted."""
        n = pick(pixels, max_images)
        p = self.patch_size
        image01 = pixels[:n].float()
        images = self.normalize(image01)  # the space the reconstruction is in
        _, _, h, w = images.shape
        prediction = output.extras["prediction"][:n].float().to(images.device)
        mask = output.extras["mask"][:n].to(images.device).bool()
        if self.config.norm_pix_loss:  # back to the image's own patch statistics, as MAE's demo does
            patches = patchify(images, p)
            mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
            prediction = prediction * (var + NORM_PIX_EPS) ** 0.5 + mean
        recon01 = self.denormalize(unpatchify(prediction, p, h, w))
        grey = torch.full((n, mask.shape[1], 3), 0.5, device=images.device)
        visible = paint_patches(image01, grey, mask, p)
        pasted = paint_patches(image01, patchify(recon01, p).reshape(n, -1, p, p, 3).permute(0, 1, 4, 2, 3), mask, p)
        tiles = torch.stack([image01, visible, recon01, pasted], dim=1).reshape(-1, 3, h, w)
        grid = make_grid(tiles.cpu(), nrow=4, padding=1, pad_value=1.0)
        caption = (
            f"MAE (mask ratio {self.config.mask_ratio:g}): each row is one image; columns = image | "
            "visible patches (grey: masked) | reconstruction of every patch | "
            "reconstruction with the visible patches pasted"
        )
        return Visualization(
            grid=grid.clamp(0, 1),
            caption=caption,
            columns=["image", "visible patches", "reconstruction", "reconstruction + visible"],
        )


__all__ = ["MAEConfig", "MAEObjective", "random_masking", "patchify", "unpatchify"]
