"""The full analysis of an encoder over a set of images, its figures and `summary.json`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitmpp.common.errors import UserError
from vitmpp.common.io import atomic_write_json

from .attention import (
    encoder_geometry,
    mean_attention_distance,
    patch_distances,
    record_attention,
    rollout_maps,
    rollout_step,
)
from .embeddings import EmbeddingFilters, embedding_filters, position_similarity, similarity_by_offset

# file names of the figures, by figure name (also the TensorBoard tags, under "analysis/")
FIGURE_FILES = {
    "attention_rollout": "attention_rollout.png",
    "mean_attention_distance": "mean_attention_distance.png",
    "position_embedding_similarity": "position_embedding_similarity.png",
    "embedding_filters": "embedding_filters.png",
}
SUMMARY_NAME = "summary.json"


@dataclass
class Analysis:
    """What `analyze_encoder` measured.

    `mean_distance`: float64 [L, H] pixels; `rollout_images01` [n, 3, H, W] in [0, 1]
    and `rollout_maps` [n, gh, gw] (each summing to 1) for the first n images;
    `position_similarity` [P, P] (None without position embeddings); `filters`;
    `geometry` (grid_size, patch_size, num_prefix_tokens, has_class_token);
    `image_size` (H, W); `num_images` measured.
    """

    mean_distance: Tensor
    rollout_images01: Tensor
    rollout_maps: Tensor
    position_similarity: Tensor | None
    filters: EmbeddingFilters
    geometry: dict
    image_size: tuple[int, int]
    num_images: int
    mean_rollout_map: Tensor  # [gh, gw]: the rollout map averaged over all num_images images


class _BlockReducer:
    """Consumes one block's attention [B, H, N, N] at a time (in block order) for one batch:
    the rollout so far and each block's mean attention distance [H], summed over the batch."""

    def __init__(self, geometry: dict):
        self.geometry = geometry
        self.rollout: Tensor | None = None
        self.distance_sums: list[Tensor] = []

    def __call__(self, index: int, attention: Tensor) -> None:
        if index != len(self.distance_sums):
            raise RuntimeError(f"attention of block {index} arrived out of order")
        g = self.geometry
        per_image = mean_attention_distance(attention, g["grid_size"], g["patch_size"], g["num_prefix_tokens"])
        self.distance_sums.append(per_image[0].cpu() * attention.shape[0])
        self.rollout = rollout_step(self.rollout, attention)


@torch.no_grad()
def analyze_encoder(
    encoder: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_images: int = 128,
    num_rollout_images: int = 16,
    num_filters: int = 28,
) -> Analysis:
    """Measure `encoder` on up to `num_images` images.

    `batches` yields (images_normalised [B, 3, H, W] on the encoder's device,
    images01 [B, 3, H, W] in [0, 1]); it is read only until `num_images` images
    have been seen. Each block's attention is reduced (rollout step, distances) as
    soon as it is computed, so memory holds one block's [B, H, N, N] maps, whatever
    the depth and `num_images`. The encoder runs in eval mode; its mode is restored.
    """
    if num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {num_images}.")
    was_training = encoder.training
    encoder.eval()
    try:
        distance_total = None
        shown_images: list[Tensor] = []
        shown_maps: list[Tensor] = []
        map_sum = None
        seen = 0
        geometry = None
        image_size = None
        for images_normalised, images01 in batches:
            take = min(len(images_normalised), num_images - seen)
            if take <= 0:
                break
            x = images_normalised[:take]
            if geometry is None:
                image_size = tuple(int(s) for s in x.shape[-2:])
                geometry = encoder_geometry(encoder, image_size)
            reducer = _BlockReducer(geometry)
            with record_attention(encoder, callback=reducer):
                encoder.forward_features(x)
            batch_distance = torch.stack(reducer.distance_sums)  # [L, H], summed over the batch
            distance_total = batch_distance if distance_total is None else distance_total + batch_distance
            maps = rollout_maps(
                reducer.rollout, geometry["grid_size"], geometry["num_prefix_tokens"], geometry["has_class_token"]
            ).cpu()
            map_sum = maps.sum(0) if map_sum is None else map_sum + maps.sum(0)
            room = num_rollout_images - sum(len(m) for m in shown_maps)
            if room > 0:
                shown_images.append(images01[:take][:room].float().cpu())
                shown_maps.append(maps[:room])
            seen += take
            if seen >= num_images:
                break
        if seen == 0:
            raise UserError("No images came from the shards to analyse; check --shards and --split.")
        has_pos = getattr(encoder, "pos_embed", None) is not None
        return Analysis(
            mean_distance=distance_total / seen,
            rollout_images01=torch.cat(shown_images),
            rollout_maps=torch.cat(shown_maps),
            position_similarity=position_similarity(encoder).cpu() if has_pos else None,
            filters=embedding_filters(encoder, num_filters),
            geometry=geometry,
            image_size=image_size,
            num_images=seen,
            mean_rollout_map=map_sum / seen,
        )
    finally:
        encoder.train(was_training)


def analysis_figures(analysis: Analysis) -> dict:
    """The four matplotlib figures by name (see FIGURE_FILES); position similarity only with position embeddings."""
    from .figures import embedding_filters_figure, mean_distance_figure, position_similarity_figure, rollout_figure

    figures = {
        "attention_rollout": rollout_figure(analysis.rollout_images01, analysis.rollout_maps),
        "mean_attention_distance": mean_distance_figure(
            analysis.mean_distance,
            max(analysis.image_size),
            uniform=_uniform_distance(tuple(analysis.geometry["grid_size"]), analysis.geometry["patch_size"]),
        ),
    }
    if analysis.position_similarity is not None:
        figures["position_embedding_similarity"] = position_similarity_figure(
            analysis.position_similarity, analysis.geometry["grid_size"]
        )
    figures["embedding_filters"] = embedding_filters_figure(
        analysis.filters.filters, analysis.filters.explained_variance_ratio
    )
    return figures


def _rounded(values: Any, digits: int = 4) -> Any:
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, float):
        return round(values, digits)
    if isinstance(values, (list, tuple)):
        return [_rounded(v, digits) for v in values]
    if isinstance(values, dict):
        return {k: _rounded(v, digits) for k, v in values.items()}
    return values


def analysis_summary(analysis: Analysis, **about: Any) -> dict:
    """The JSON-ready summary: per-layer (and per-head) mean attention distances in pixels,
    position-similarity statistics, explained variance of the filters, and `about`
    (the encoder, the data, the figures written)."""
    distance = analysis.mean_distance
    gh, gw = analysis.geometry["grid_size"]
    patch = analysis.geometry["patch_size"]
    summary: dict[str, Any] = dict(about)
    summary.update(
        {
            "num_images": analysis.num_images,
            "image_size": list(analysis.image_size),
            "patch_size": list(patch),
            "grid_size": [gh, gw],
            "num_prefix_tokens": analysis.geometry["num_prefix_tokens"],
            "mean_attention_distance": {
                "unit": "pixels",
                "prefix_tokens": "excluded as queries and keys; each query's weights renormalised over patches",
                "per_layer": _rounded(distance.mean(dim=1)),
                "per_layer_min": _rounded(distance.min(dim=1).values),
                "per_layer_max": _rounded(distance.max(dim=1).values),
                "per_head": _rounded(distance),
                # what uniform attention over the grid would give, for scale
                "uniform_attention": _rounded(float(_uniform_distance((gh, gw), patch))),
            },
            "attention_rollout": {
                "num_images_shown": len(analysis.rollout_maps),
                "token": "class token" if analysis.geometry["has_class_token"] else "mean of patch tokens",
                "mean_map": _rounded(analysis.mean_rollout_map, 6),
            },
            "embedding_filters": {
                "num_components": len(analysis.filters.filters),
                "explained_variance_ratio": _rounded(analysis.filters.explained_variance_ratio),
            },
        }
    )
    if analysis.position_similarity is not None:
        summary["position_embedding_similarity"] = {
            "mean_cosine": _rounded(similarity_by_offset(analysis.position_similarity, (gh, gw))),
        }
    else:
        summary["position_embedding_similarity"] = None
    return summary


def _uniform_distance(grid_size: tuple[int, int], patch_size: tuple[int, int]) -> float:
    """Mean pixel distance between all pairs of patch centres (uniform attention, self included)."""
    return float(patch_distances(grid_size, patch_size).mean())


def write_analysis(analysis: Analysis, out_dir: str | os.PathLike, writer=None, step: int = 0, **about: Any) -> dict:
    """Save the figures as PNGs and `summary.json` in `out_dir`; with a TensorBoard `writer`
    (`SummaryWriter`), also log each figure as image "analysis/<name>" and the per-layer
    mean attention distances as scalars. Returns the summary."""
    from .figures import figure_to_array, save_figure

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"Could not create the output folder {out}: {err.strerror or err}.") from None
    written = {}
    for name, figure in analysis_figures(analysis).items():
        written[name] = save_figure(figure, out / FIGURE_FILES[name]).name
        if writer is not None:
            writer.add_image(f"analysis/{name}", figure_to_array(figure), step, dataformats="HWC")
    summary = analysis_summary(analysis, **about, figures=written)
    if writer is not None:
        for layer, value in enumerate(summary["mean_attention_distance"]["per_layer"], start=1):
            writer.add_scalar(f"analysis/mean_attention_distance/layer_{layer:02d}", value, step)
        writer.flush()
    try:
        atomic_write_json(out / SUMMARY_NAME, summary)
    except OSError as err:
        raise UserError(
            f"Could not write {out / SUMMARY_NAME}: {err.strerror or err}; check the folder is writable and has space."
        ) from None
    return summary
