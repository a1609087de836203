"""Position-embedding similarity and patch-embedding filters (vitmpp.analyze.embeddings), and their pictures."""

from __future__ import annotations

import pytest
import torch
from analyze_helpers import tiny_vit
from timm.layers import build_sincos2d_pos_embed

from vitmpp.analyze import (
    embedding_filters,
    filter_tiles,
    patch_position_embeddings,
    position_similarity,
    similarity_by_offset,
    similarity_tiles,
)
from vitmpp.analyze.render import SIMILARITY_CMAP, colorize
from vitmpp.common.errors import UserError


def _with_sincos(encoder, grid=(8, 8)):
    table = build_sincos2d_pos_embed(list(grid), encoder.embed_dim)
    with torch.no_grad():
        encoder.pos_embed[0, -grid[0] * grid[1] :] = table
    return encoder


def test_similarity_diagonal_is_one_and_matrix_symmetric():
    similarity = position_similarity(tiny_vit())
    assert similarity.shape == (64, 64)
    torch.testing.assert_close(similarity.diagonal(), torch.ones(64))
    torch.testing.assert_close(similarity, similarity.T)
    assert float(similarity.abs().max()) <= 1.0


def test_class_token_row_is_left_out():
    encoder = tiny_vit()
    with torch.no_grad():
        encoder.pos_embed[0, 0] = 1e3  # would dominate any similarity it took part in
    table = patch_position_embeddings(encoder)
    assert table.shape == (64, 64)
    torch.testing.assert_close(table, encoder.pos_embed[0, 1:].detach())
    # no_embed_class (DeiT-3 style) has no prefix rows; registers add prefix rows
    assert patch_position_embeddings(tiny_vit(no_embed_class=True)).shape == (64, 64)
    assert patch_position_embeddings(tiny_vit(reg_tokens=3)).shape == (64, 64)


def test_sincos_embeddings_show_row_and_column_structure():
    similarity = position_similarity(_with_sincos(tiny_vit()))
    grid = similarity.reshape(8, 8, 8, 8)  # [query row, query col, key row, key col]
    # neighbours are more similar than far positions, for every position
    for r in range(8):
        for c in range(8):
            neighbour = grid[r, c, r, c + 1] if c < 7 else grid[r, c, r, c - 1]
            far = grid[r, c, 7 - r if r < 4 else 0, 7 - c if c < 4 else 0]
            assert neighbour > far
    # the same row or column at offset d is more similar than the diagonal offset (d, d)
    for d in range(1, 8):
        assert grid[0, 0, 0, d] > grid[0, 0, d, d]
        assert grid[0, 0, d, 0] > grid[0, 0, d, d]
    stats = similarity_by_offset(similarity, (8, 8))
    assert stats["neighbours"] > stats["same_row_or_column"] > stats["other_rows_and_columns"] > stats["farthest"]


def test_random_embeddings_have_no_structure():
    stats = similarity_by_offset(position_similarity(tiny_vit()), (8, 8))
    # timm initialises the table with trunc_normal(std 0.02): nearly orthogonal rows
    assert abs(stats["neighbours"]) < 0.2 and abs(stats["farthest"]) < 0.2


def test_no_position_embedding_is_a_user_error():
    with pytest.raises(UserError, match="no position embedding"):
        position_similarity(tiny_vit(pos_embed="none"))


def test_similarity_tiles_are_laid_out_like_the_patch_grid():
    grid = (2, 3)
    similarity = torch.linspace(-1, 1, 36).reshape(6, 6)
    image = similarity_tiles(similarity, grid, min_pixels=2)  # tiles of 3 px, enlarged to 3x3 (factor 1)
    assert image.shape[0] == 3 and 0 <= float(image.min()) and float(image.max()) <= 1
    pad = 2
    for r in range(grid[0]):
        for c in range(grid[1]):
            top = pad + r * (grid[0] + pad)
            left = pad + c * (grid[1] + pad)
            tile = image[:, top : top + grid[0], left : left + grid[1]]
            expected = colorize(similarity[r * grid[1] + c].reshape(grid), SIMILARITY_CMAP, -1, 1)
            torch.testing.assert_close(tile, expected)


def test_filters_match_scikit_learn_pca():
    from sklearn.decomposition import PCA

    encoder = tiny_vit()
    filters = embedding_filters(encoder, num_components=10)
    assert filters.filters.shape == (10, 3, 4, 4)
    matrix = encoder.patch_embed.proj.weight.detach().reshape(64, -1).double().numpy()
    reference = PCA(n_components=10, svd_solver="full").fit(matrix)
    ours = filters.filters.reshape(10, -1).double()
    theirs = torch.from_numpy(reference.components_)
    # components are defined up to sign
    signs = torch.sign((ours * theirs).sum(-1))
    torch.testing.assert_close(ours, theirs * signs[:, None], rtol=1e-4, atol=1e-5)
    assert filters.explained_variance_ratio == pytest.approx(list(reference.explained_variance_ratio_), rel=1e-5)


def test_filters_recover_a_planted_pattern():
    encoder = tiny_vit()
    generator = torch.Generator().manual_seed(3)
    pattern = torch.zeros(3, 4, 4)
    pattern[0, :, :2] = 1.0  # red on the left
    pattern[2, :, 2:] = -1.0  # minus blue on the right
    pattern = pattern / pattern.norm()
    amounts = torch.randn(64, generator=generator) * 5
    noise = torch.randn(64, 3, 4, 4, generator=generator) * 0.05
    with torch.no_grad():
        encoder.patch_embed.proj.weight.copy_(amounts[:, None, None, None] * pattern + noise)
    filters = embedding_filters(encoder, num_components=28)
    assert filters.filters.shape == (28, 3, 4, 4)
    first = filters.filters[0]
    assert abs(float((first * pattern).sum())) > 0.99
    assert float(first[0, 0, 0]) > 0, "sign fixed: the largest entry is positive"
    assert filters.explained_variance_ratio[0] > 0.9
    ratios = filters.explained_variance_ratio
    assert all(a >= b for a, b in zip(ratios, ratios[1:])) and sum(ratios) <= 1 + 1e-9


def test_fewer_components_exist_than_asked():
    # 4 px patches have 48 pixel values, so at most 48 components
    assert len(embedding_filters(tiny_vit(embed_dim=128), num_components=100).filters) == 48


def test_filter_tiles_put_zero_at_grey():
    filters = torch.zeros(2, 3, 4, 4)
    filters[0, 0, 0, 0] = 2.0
    filters[1, 1, 1, 1] = -0.5
    image = filter_tiles(filters, min_pixels=4)
    assert image.shape == (3, 4 + 4, 2 * (4 + 2) + 2)
    assert float(image[0, 2, 2]) == pytest.approx(1.0)  # the positive peak
    assert float(image[1, 3, 2 + 6 + 1]) == pytest.approx(0.0)  # the negative peak
    assert float(image[2, 3, 3]) == pytest.approx(0.5)  # zero is grey
