"""The cheap analysis figures, for the pretraining engine's periodic TensorBoard images."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import attention_rollout, encoder_geometry, record_attention, rollout_maps, supports_attention
from .embeddings import embedding_filters, position_similarity
from .render import filter_tiles, images_for_display, rollout_pairs, similarity_tiles

# rollout overlays drawn by `training_figures`: a few images are enough to watch them change
TRAINING_ROLLOUT_IMAGES = 8
TRAINING_FILTERS = 28


@torch.no_grad()
def training_figures(
    encoder: nn.Module,
    images_normalised: Tensor,
    images01: Tensor | None = None,
    max_images: int = TRAINING_ROLLOUT_IMAGES,
) -> dict[str, Tensor]:
    """Position-embedding similarity, embedding filters and attention-rollout overlays as images.

    `encoder`: a timm VisionTransformer (the unwrapped model; under FSDP call it
    with the full parameters gathered). `images_normalised`: [B, 3, H, W] as the
    encoder sees them; the first `max_images` are used. `images01`: the same
    images in [0, 1] for display; when None the normalised ones are stretched per
    channel (`images_for_display`).

    Returns {"position_embedding_similarity", "embedding_filters", "attention_rollout"}
    -> float [3, H, W] in [0, 1] on the CPU, for `SummaryWriter.add_image(f"analysis/{name}", image, step)`.
    A figure the encoder cannot have is left out (no position embedding; attention
    modules other than timm's; an empty batch). Runs under `torch.no_grad()` in eval
    mode and puts the encoder back in its previous train/eval mode.
    """
    figures: dict[str, Tensor] = {}
    was_training = encoder.training
    encoder.eval()
    try:
        geometry = encoder_geometry(encoder)
        if getattr(encoder, "pos_embed", None) is not None:
            figures["position_embedding_similarity"] = similarity_tiles(position_similarity(encoder),
                                                                        geometry["grid_size"])
        figures["embedding_filters"] = filter_tiles(embedding_filters(encoder, TRAINING_FILTERS).filters)
        count = min(int(max_images), len(images_normalised))
        if count > 0 and supports_attention(encoder):
            weight = encoder.patch_embed.proj.weight
            x = images_normalised[:count].to(device=weight.device, dtype=weight.dtype)
            geometry = encoder_geometry(encoder, tuple(x.shape[-2:]))
            with record_attention(encoder) as recorder:
                encoder.forward_features(x)
            maps = rollout_maps(attention_rollout(recorder.stacked()), geometry["grid_size"],
                                geometry["num_prefix_tokens"], geometry["has_class_token"])
            shown = images01[:count] if images01 is not None else images_for_display(x)
            figures["attention_rollout"] = rollout_pairs(shown.float().cpu(), maps.cpu())
    finally:
        encoder.train(was_training)
    return figures
