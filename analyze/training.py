"""The analysis figures as the pretraining engine logs them to TensorBoard while it trains."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import encoder_geometry, supports_attention
from .embeddings import embedding_filters, position_similarity
from .figures import embedding_filters_figure, figure_to_array, position_similarity_figure
from .render import images_for_display
from .report import analysis_figures, analyze_encoder

# rollout overlays drawn by `training_figures`: a few images are enough to watch them change
TRAINING_ROLLOUT_IMAGES = 8
TRAINING_FILTERS = 28

# The figures' names in TensorBoard while pretraining, by figure name: one `encoder` group of pictures
# (`<stage>_encoder/<name>`, common.tracking.picture_tag), in an order (TensorBoard sorts by tag) that
# puts the mean-distance plot first.
TRAINING_GROUP = "encoder"
TRAINING_TAGS = {
    "mean_attention_distance": "attention_distance",
    "attention_rollout": "attention_rollout",
    "embedding_filters": "patch_filters",
    "position_embedding_similarity": "position_similarity",
}


@torch.no_grad()
def training_figures(
    encoder: nn.Module,
    images_normalised: Tensor,
    images01: Tensor | None = None,
    max_images: int = TRAINING_ROLLOUT_IMAGES,
) -> dict[str, Tensor]:
    """The `analyze` command's figures of the encoder on a few images, rendered as images.

    The same matplotlib figures (axes, colour bars, labels) as the PNGs `python -m
    vitmpp.analyze` writes, measured on the first `max_images` of this batch:
    attention rollout, mean attention distance, position-embedding similarity and the
    embedding filters. `encoder`: a timm VisionTransformer (the unwrapped model; under
    FSDP call it with the full parameters gathered). `images_normalised`: [B, 3, H, W] as
    the encoder sees them. `images01`: the same images in [0, 1] for display; when None
    the normalised ones are stretched per channel (`images_for_display`).

    Returns {name: float [3, H, W] in [0, 1] on the CPU}, the names of `analyze.FIGURE_FILES`
    (the engine logs each under `TRAINING_TAGS[name]`). Without attention to record (attention modules
    other than timm's, an empty batch) only the figures of the weights are drawn; without
    a position embedding, no similarity. Runs in eval mode under `torch.no_grad()` and
    puts the encoder back in its previous train/eval mode.
    """
    count = min(int(max_images), len(images_normalised))
    if count > 0 and supports_attention(encoder):
        weight = encoder.patch_embed.proj.weight
        x = images_normalised[:count].to(device=weight.device, dtype=weight.dtype)
        shown = images01[:count] if images01 is not None else images_for_display(x)
        analysis = analyze_encoder(
            encoder, [(x, shown)], num_images=count, num_rollout_images=count, num_filters=TRAINING_FILTERS
        )
        figures = analysis_figures(analysis)
    else:
        figures = {}
        if getattr(encoder, "pos_embed", None) is not None:
            figures["position_embedding_similarity"] = position_similarity_figure(
                position_similarity(encoder).cpu(), encoder_geometry(encoder)["grid_size"]
            )
        filters = embedding_filters(encoder, TRAINING_FILTERS)
        figures["embedding_filters"] = embedding_filters_figure(filters.filters, filters.explained_variance_ratio)
    return {name: _as_image(figure) for name, figure in figures.items()}


def _as_image(figure) -> Tensor:
    """A rendered matplotlib figure as float [3, H, W] in [0, 1]."""
    return torch.from_numpy(figure_to_array(figure)).permute(2, 0, 1).float().div_(255.0)
