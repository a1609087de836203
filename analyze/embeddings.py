"""What the embeddings learned: position-embedding similarity and patch-embedding filters.

Both read weights only (no images), so they are cheap enough to compute during
pretraining. They reproduce the ViT paper's Figure 7, left and centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitmpp.common.errors import UserError


def patch_position_embeddings(encoder: nn.Module) -> Tensor:
    """The position embeddings of the patch tokens: float32 [gh·gw, D] in row-major patch order.

    timm keeps a row per prefix token in front unless `no_embed_class`; those rows
    have no place in the image and are left out. UserError if the encoder has no
    position embedding (`pos_embed="none"`).
    """
    pos_embed = getattr(encoder, "pos_embed", None)
    if pos_embed is None:
        raise UserError("This encoder has no position embedding (pos_embed 'none'), so there is no similarity to show.")
    gh, gw = (int(g) for g in encoder.patch_embed.grid_size)
    table = pos_embed.detach().reshape(-1, pos_embed.shape[-1])
    if table.shape[0] < gh * gw:
        raise UserError(
            f"The position embedding has {table.shape[0]} rows for a {gh}x{gw} patch grid; "
            "the encoder is inconsistent, re-export it."
        )
    return table[-gh * gw :].float()


def position_similarity(encoder_or_embeddings: nn.Module | Tensor) -> Tensor:
    """Cosine similarity between the position embeddings of all patch pairs: [gh·gw, gh·gw] in [-1, 1].

    Pass an encoder (its patch positions are taken) or a [P, D] table. Row i,
    reshaped to the patch grid, is the heat map of patch i (Figure 7 centre).
    """
    if isinstance(encoder_or_embeddings, Tensor):
        table = encoder_or_embeddings.detach().float()
    else:
        table = patch_position_embeddings(encoder_or_embeddings)
    if table.dim() != 2:
        raise ValueError(f"position embeddings must be [P, D], got {tuple(table.shape)}")
    unit = torch.nn.functional.normalize(table, dim=-1, eps=1e-12)
    similarity = unit @ unit.T
    # an all-zero row has no direction: call it similar to itself only
    similarity.diagonal().fill_(1.0)
    return similarity.clamp(-1.0, 1.0)


def similarity_by_offset(similarity: Tensor, grid_size: tuple[int, int]) -> dict[str, float]:
    """Summary numbers of a position similarity: mean cosine similarity of grid neighbours
    (4-neighbourhood), of positions in the same row or column (not themselves), of the
    others, and of the pairs farthest apart (largest Euclidean grid distance)."""
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_rows = (rows[:, None] - rows[None, :]).abs()
    d_cols = (cols[:, None] - cols[None, :]).abs()
    eye = torch.eye(gh * gw, dtype=torch.bool)
    neighbours = (d_rows + d_cols) == 1
    same_line = ((d_rows == 0) | (d_cols == 0)) & ~eye
    others = ~((d_rows == 0) | (d_cols == 0))
    squared = d_rows**2 + d_cols**2
    farthest = squared == squared.max()
    sim = similarity.double()

    def mean_of(mask: Tensor) -> float | None:
        return float(sim[mask].mean()) if bool(mask.any()) else None

    return {
        "neighbours": mean_of(neighbours),
        "same_row_or_column": mean_of(same_line),
        "other_rows_and_columns": mean_of(others),
        "farthest": mean_of(farthest & ~eye),
    }


@dataclass
class EmbeddingFilters:
    """Principal components of the patch-embedding filters.

    `filters`: float32 [k, C, P, P] (unit-norm components, in the input's normalised
    colour space); `explained_variance_ratio`: float [k], the share of the filters'
    variance each component explains.
    """

    filters: Tensor
    explained_variance_ratio: list[float]


def embedding_filters(encoder: nn.Module, num_components: int = 28) -> EmbeddingFilters:
    """The first principal components of the patch-embedding weights (ViT paper, Figure 7 left).

    The patch embedding is D filters of C×P×P pixels (timm's `patch_embed.proj`
    convolution weight [D, C, P, P]). PCA treats the D filters as samples of a
    C·P·P-dimensional vector; each component is a filter-shaped pattern. The paper
    shows the first 28; at most min(D, C·P·P) exist. Each component's sign is fixed
    so that its largest-magnitude entry is positive, so repeated calls draw the same
    pictures.

    Written with `torch.linalg.svd` rather than scikit-learn's PCA (which gives the
    same components, see the tests) because importing scikit-learn takes seconds,
    too long for the pretraining engine's periodic figures; PCA is one SVD of the
    centred matrix.
    """
    proj = getattr(getattr(encoder, "patch_embed", None), "proj", None)
    weight = getattr(proj, "weight", None)
    if weight is None or weight.dim() != 4:
        raise UserError(
            "The encoder has no convolutional patch embedding (patch_embed.proj); "
            "embedding filters need a timm VisionTransformer."
        )
    if num_components < 1:
        raise ValueError(f"num_components must be positive, got {num_components}")
    dim, channels, ph, pw = weight.shape
    k = min(num_components, dim, channels * ph * pw)
    matrix = weight.detach().double().cpu().reshape(dim, -1)
    centred = matrix - matrix.mean(dim=0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:k]
    peaks = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * torch.where(peaks < 0, -1.0, 1.0).to(components.dtype)
    variance = singular**2
    ratio = variance[:k] / variance.sum().clamp_min(1e-300)
    return EmbeddingFilters(components.float().reshape(k, channels, ph, pw), [float(v) for v in ratio])
