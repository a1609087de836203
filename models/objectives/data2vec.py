"""data2vec, image setting (Baevski et al., "data2vec: A General Framework for Self-supervised
Learning in Speech, Vision and Language", ICML 2022, arXiv:2202.03555).

One network in two roles. The *student* (`encoder`, the network that is trained, exported and
evaluated) sees the image with block-wise masked patches; the *teacher* (`teacher`, a copy of the
encoder updated only as an exponential moving average of the student) sees the whole image. The
student regresses, at the masked positions, a contextualised target built from the teacher:

    y = norm_avg( (1/K) * sum over the top K blocks l of norm_block(teacher block l output) )

* Masking (paper §5.1, following BEiT): rectangular blocks of at least `min_block_patches` patches
  (BEiT: 16) with a random aspect ratio in [0.3, 1/0.3], placed until `mask_ratio` of the patches
  are masked (paper: 60%, against BEiT's 40%); the masked patch embeddings are replaced by a
  learned mask token, before the position embeddings. `blockwise_mask` draws every number from
  the global generator of the images' device in a fixed number of attempts (no host sync), so
  exact and elastic resume hold (the RNG rule of `objective.py`).
* Teacher: a copy of the encoder at initialisation, in eval mode (no dropout, no drop path),
  without gradients and outside the optimizer (its parameters have `requires_grad=False`, which
  timm's optimizer factory skips). After every optimizer step
  teacher <- tau * teacher + (1 - tau) * student, with tau rising linearly from `ema_start`
  (tau_0) to `ema_end` (tau_e) over the first `ema_anneal_fraction` of the run's steps, then
  constant (paper §3.3; ViT-B: tau_0 = 0.9998, tau_e = 0.99999 over 800 epochs; the official image
  code anneals over the whole run). The teacher is a
  submodule, so every checkpoint holds it. The whole encoder is averaged; the official image code
  averages the Transformer blocks only and shares the patch embedding (`ema_transformer_only`).
* Target (paper §3.3): the outputs of the top K blocks (residual stream, before the final norm;
  `top_k_blocks`, paper: K = 6 for ViT-B), each normalised without learned parameters
  (`block_norm`: instance norm over the patch tokens of an image, the paper's choice; or layer
  norm over the channels of a token), averaged, and for images the average normalised again
  (`average_norm`: layer norm, as the official image recipe's `layer_norm_targets`). Class and
  register tokens are not targets.
* Prediction and loss (paper §3.3): a linear head on the student's final (normed) output at the
  masked positions; Smooth L1 with beta `loss_beta` (the official image recipe: 2; 0 selects L2),
  summed over the channels and scaled by 1/sqrt(D) (the official code's default), averaged over
  the masked patches.
* Exported and evaluated: the student, the base class's default `exported_module()` and
  `feature_encoder()`, because the paper fine-tunes the student (the official code drops the
  teacher before fine-tuning). The run length arrives through `set_run_length(total_steps)`.

Values and their sources are in configs/pretrain/data2vec_vit_b16.yaml and docs/data2vec.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import VisionTransformer
from torch import Tensor, nn
from torchvision.utils import make_grid

from vitmpp.common.config import param
from vitmpp.common.errors import ConfigError

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

BLOCK_ASPECT = 0.3  # BEiT's block aspect-ratio range: [0.3, 1 / 0.3]
MASK_ATTEMPTS = 50  # blocks tried per image; fixed, so every batch draws the same amount of randomness


@dataclass
class Data2VecConfig:
    mask_ratio: float = param(0.6, gt=0, lt=1, help="fraction of patches masked per image, in blocks (paper: 0.6)")
    min_block_patches: int = param(16, ge=1, le=2**20, help="smallest masking block, in patches (BEiT: 16)")
    top_k_blocks: int = param(6, ge=1, le=256, help="teacher blocks averaged into the target (paper, ViT-B: 6)")
    block_norm: str = param(
        "instance",
        choices=("instance", "layer", "none"),
        help="normalisation of each teacher block output before averaging (paper: instance)",
    )
    average_norm: str = param(
        "layer", choices=("layer", "none"), help="normalisation of the averaged target (paper, images: layer)"
    )
    ema_start: float = param(0.9998, ge=0, le=1, help="teacher EMA rate tau_0 at the first step")
    ema_end: float = param(0.99999, ge=0, le=1, help="teacher EMA rate tau_e, reached after the annealing")
    ema_anneal_fraction: float = param(1.0, gt=0, le=1, help="fraction of the run over which tau rises linearly")
    loss_beta: float = param(2.0, ge=0, le=1e3, help="Smooth L1 beta (official image recipe: 2); 0 for L2")

    def check(self, depth: int | None = None) -> None:
        """The keys by their ranges; with the encoder's depth, that K blocks exist."""
        if self.ema_start > self.ema_end:
            raise ConfigError(
                f"Key 'data2vec.ema_start' ({self.ema_start}) must not exceed 'data2vec.ema_end' "
                f"({self.ema_end}): the teacher's rate rises during the run."
            )
        if depth is not None and self.top_k_blocks > depth:
            raise ConfigError(
                f"Key 'data2vec.top_k_blocks' ({self.top_k_blocks}) exceeds the encoder's {depth} "
                "blocks; choose at most that many."
            )


def ema_rate(step: int, total_steps: int, start: float, end: float, anneal_fraction: float = 1.0) -> float:
    """tau after optimizer step `step` (1-based): linear from `start` (step 0) to `end` at
    `anneal_fraction * total_steps`, then `end`."""
    anneal = max(1.0, anneal_fraction * total_steps)
    return end if step >= anneal else start + (end - start) * step / anneal


def blockwise_mask(
    batch: int,
    grid_h: int,
    grid_w: int,
    num_masked: int,
    min_block: int,
    device: torch.device | str | None = None,
    attempts: int = MASK_ATTEMPTS,
) -> Tensor:
    """BEiT-style block-wise masks: bool [batch, grid_h * grid_w], row-major, True = masked.

    Per image and attempt: a rectangle of area uniform in [min_block, still to mask] and log aspect
    ratio uniform in [log 0.3, log 1/0.3], at a uniform position, strictly smaller than the grid on
    each side; it is added when it masks at least one new patch and no more than are still to mask
    (BEiT's rule). An image ends with at most `num_masked` patches masked (BEiT's count is also an
    upper bound). Every image draws 4 uniform numbers per attempt from the global generator of
    `device`, whatever was accepted: the draw is the same for every batch.
    """
    rows = torch.arange(grid_h, device=device).view(1, grid_h, 1)
    cols = torch.arange(grid_w, device=device).view(1, 1, grid_w)
    mask = torch.zeros(batch, grid_h, grid_w, dtype=torch.bool, device=device)
    log_low, log_high = math.log(BLOCK_ASPECT), math.log(1 / BLOCK_ASPECT)
    for _ in range(attempts):
        remaining = num_masked - mask.sum(dim=(1, 2))  # [B]
        u = torch.rand(batch, 4, device=device)
        area = min_block + u[:, 0] * (remaining.float() - min_block)  # uniform between min_block and remaining
        aspect = torch.exp(log_low + u[:, 1] * (log_high - log_low))
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (h < grid_h) & (w < grid_w)
        top = (u[:, 2] * (grid_h - h + 1).clamp(min=1)).long().view(-1, 1, 1)
        left = (u[:, 3] * (grid_w - w + 1).clamp(min=1)).long().view(-1, 1, 1)
        block = (rows >= top) & (rows < top + h.view(-1, 1, 1)) & (cols >= left) & (cols < left + w.view(-1, 1, 1))
        new = (block & ~mask).sum(dim=(1, 2))
        accept = fits & (new > 0) & (new <= remaining)
        mask |= block & accept.view(-1, 1, 1)
    return mask.view(batch, grid_h * grid_w)


def normalise_blocks(blocks: list[Tensor], block_norm: str, average_norm: str) -> Tensor:
    """The data2vec target from teacher block outputs, each [B, N, D] (patch tokens): every block
    normalised (`block_norm`), averaged, the average normalised (`average_norm`); float32 [B, N, D]."""
    normed = []
    for x in blocks:
        x = x.float()
        if block_norm == "instance":  # each channel over the tokens of one image
            x = F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
        elif block_norm == "layer":  # each token over its channels
            x = F.layer_norm(x, x.shape[-1:])
        normed.append(x)
    target = sum(normed) / len(normed)
    if average_norm == "layer":
        target = F.layer_norm(target, target.shape[-1:])
    return target


@register_objective("data2vec", Data2VecConfig)
class Data2VecObjective(Objective):
    """data2vec (Baevski et al.): regress an EMA teacher's averaged top-block outputs at block-masked patches."""

    title = "data2vec"
    paper = (
        'Baevski et al. 2022, "data2vec: A General Framework for Self-supervised Learning in Speech, Vision '
        'and Language" (image setting)'
    )
    arxiv = "2202.03555"
    description = (
        "60% of the patches, in blocks, are replaced by a learned mask token in the student's input; a "
        "linear head regresses the mean of the normalised top-block outputs of an EMA teacher that sees "
        "the whole image. The student is exported."
    )
    hub_tags = ("masked-image-modeling",)

    # the CPU demo (vit_nano_patch8_32: 4 blocks, a 4x4 grid): K scaled with the depth (paper: 6 of 12),
    # blocks of 2+ patches (BEiT's 16 of 196 is 1.3 of 16), tau scaled to a run of ~1000 steps (docs/data2vec.md)
    embedded_options = {"top_k_blocks": 2, "min_block_patches": 2, "ema_start": 0.9, "ema_end": 0.995}

    def __init__(
        self,
        encoder: VisionTransformer,
        config: Data2VecConfig,
        *,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes: int | None = None,
    ):
        super().__init__(encoder, config, mean=mean, std=std, num_classes=num_classes)
        self.require_every_patch("data2vec", "predicts every masked patch")
        config.check(depth=len(encoder.blocks))
        self.patch_size = patch_size_of(encoder)
        self.grid_h, self.grid_w = (int(g) for g in encoder.patch_embed.grid_size)
        self.num_masked = int(round(config.mask_ratio * self.grid_h * self.grid_w))
        if config.min_block_patches > self.num_masked:
            raise ConfigError(
                f"Key 'data2vec.min_block_patches' ({config.min_block_patches}) exceeds the "
                f"{self.num_masked} patches to mask of this encoder's {self.grid_h}x{self.grid_w} grid; "
                "choose a smaller block."
            )
        dim = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.mask_token, std=0.02)  # as the official code's mask embedding
        self.head = nn.Linear(dim, dim)
        self.teacher = copy.deepcopy(encoder).requires_grad_(False).eval()
        self.total_steps: int | None = None

    # ---- the run and the teacher
    def set_run_length(self, total_steps: int) -> None:
        """The run's optimizer steps, which the EMA schedule anneals over."""
        self.total_steps = int(total_steps)

    def ema_rate(self, step: int) -> float:
        """tau applied after optimizer step `step` (1-based)."""
        if self.total_steps is None:
            raise RuntimeError("data2vec's EMA schedule needs the run length: call set_run_length(total_steps) first")
        cfg = self.config
        return ema_rate(step, self.total_steps, cfg.ema_start, cfg.ema_end, cfg.ema_anneal_fraction)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """teacher <- tau * teacher + (1 - tau) * student, parameter by parameter (buffers copied)."""
        tau = self.ema_rate(step)
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters()):
            t.lerp_(s.detach().to(t.dtype), 1.0 - tau)
        for t, s in zip(self.teacher.buffers(), self.encoder.buffers()):
            t.copy_(s)

    def train(self, mode: bool = True) -> Data2VecObjective:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops anything
        return self

    def _own_no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def _stem_patterns(self) -> list[str]:
        return [r"^mask_token"]  # an input embedding, like the patch projection

    # ---- the objective
    def sample_mask(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """bool [batch, N]: this objective's block-wise masks, from the global generator of `device`."""
        return blockwise_mask(batch, self.grid_h, self.grid_w, self.num_masked, self.config.min_block_patches, device)

    @torch.no_grad()
    def targets(self, images: Tensor) -> Tensor:
        """float32 [B, N, D]: the teacher's normalised, averaged top-K block outputs on the whole image
        (`images`: the encoder's input, `normalize(pixels)`)."""
        teacher = self.teacher
        x = teacher.norm_pre(teacher.patch_drop(teacher._pos_embed(teacher.patch_embed(images))))
        outputs = []
        for block in teacher.blocks:
            x = block(x)
            outputs.append(x[:, teacher.num_prefix_tokens :])
        cfg = self.config
        return normalise_blocks(outputs[-cfg.top_k_blocks :], cfg.block_norm, cfg.average_norm)

    def predict(self, images: Tensor, mask: Tensor) -> Tensor:
        """[B, N, D]: the linear head on the student's output (`images`: `normalize(pixels)`), the masked
        patches given the mask token."""
        tokens = self.encoder.patch_embed(images)
        tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        out = encode_patch_tokens(self.encoder, tokens)[:, self.encoder.num_prefix_tokens :]
        return self.head(out)

    def forward(self, pixels: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> ObjectiveOutput:
        """pixels [B, 3, H, W] in [0, 1]; labels ignored; mask bool [B, N] fixes the masks (tests)."""
        images = self.normalize(pixels)
        if mask is None:
            mask = self.sample_mask(images.shape[0], images.device)
        mask = mask.to(device=images.device, dtype=torch.bool)
        target = self.targets(images)
        prediction = self.predict(images, mask).float()
        beta = self.config.loss_beta
        if beta == 0:
            per_value = F.mse_loss(prediction, target, reduction="none")
        else:
            per_value = F.smooth_l1_loss(prediction, target, reduction="none", beta=beta)
        per_patch = per_value.sum(dim=-1) / math.sqrt(prediction.shape[-1])  # [B, N]
        weight = mask.float()
        loss = (per_patch * weight).sum() / weight.sum().clamp(min=1.0)
        return ObjectiveOutput(loss=loss, extras={"mask": mask, "per_patch": per_patch.detach()})

    # ---- pictures
    @torch.no_grad()
    def visualize(self, pixels: Tensor, output: ObjectiveOutput, max_images: int = 8) -> Visualization:
        """Per image: image | student input (masked patches grey) | the loss of each masked patch (darker: larger)."""
        n = pick(pixels, max_images)
        p = self.patch_size
        images01 = pixels[:n].float()
        _, _, h, w = images01.shape
        mask = output.extras["mask"][:n].to(images01.device).bool()
        loss = output.extras["per_patch"][:n].float().to(images01.device)
        scale = loss[mask].max().clamp(min=1e-12) if mask.any() else torch.ones((), device=loss.device)
        shade = (1.0 - loss / scale).clamp(0, 1).unsqueeze(-1).expand(-1, -1, 3)
        grey = torch.full((n, mask.shape[1], 3), 0.5, device=images01.device)
        shown = paint_patches(images01, grey, mask, p)
        errors = paint_patches(images01, shade, mask, p)
        tiles = torch.stack([images01, shown, errors], dim=1).reshape(-1, 3, h, w)
        grid = make_grid(tiles.float().cpu(), nrow=3, padding=1, pad_value=1.0)
        cfg = self.config
        caption = (
            f"data2vec, block-wise masks of {self.num_masked} patches at most (ratio {cfg.mask_ratio:g}, blocks of "
            f"{cfg.min_block_patches}+ patches): each row is one image; columns = image | student input (grey: "
            f"[mask] token) | each masked patch's loss against the mean of the teacher's top {cfg.top_k_blocks} "
            "normalised block outputs, white = 0, black = the largest in the picture"
        )
        return Visualization(
            grid=grid.clamp(0, 1), caption=caption, columns=["image", "student input", "loss per masked patch"]
        )


__all__ = ["Data2VecConfig", "Data2VecObjective", "blockwise_mask", "ema_rate", "normalise_blocks"]
