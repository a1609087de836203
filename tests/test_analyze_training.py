"""`training_figures` (the analyze command's figures, for the pretraining engine) and the labelled figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analyze_helpers import random_images, tiny_vit

from vitmpp.analyze import FIGURE_FILES, analysis_figures, analyze_encoder, training_figures
from vitmpp.analyze.render import images_for_display
from vitmpp.analyze.training import TRAINING_FILTERS, TRAINING_TAGS
from vitmpp.analyze.figures import (
    embedding_filters_figure,
    figure_to_array,
    mean_distance_figure,
    position_similarity_figure,
    rollout_figure,
    save_figure,
)

NAMES = {"position_embedding_similarity", "embedding_filters", "attention_rollout", "mean_attention_distance"}


def _check_image(image: torch.Tensor) -> None:
    assert image.dim() == 3 and image.shape[0] == 3 and min(image.shape[1:]) >= 32
    assert image.dtype == torch.float32 and image.device.type == "cpu"
    assert not image.requires_grad
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_figures_shapes_ranges_and_mode(mode):
    encoder = tiny_vit(drop_path_rate=0.3).train(mode == "train")
    images = random_images(12)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    figures = training_figures(encoder, images)
    assert set(figures) == NAMES == set(FIGURE_FILES)
    for image in figures.values():
        _check_image(image)
    assert encoder.training == (mode == "train")
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters())
    assert all(not block.attn._forward_pre_hooks for block in encoder.blocks)
    # eval mode inside: the same pictures every call, even with drop path on
    again = training_figures(encoder, images)
    assert all(torch.equal(figures[k], again[k]) for k in NAMES)


def test_training_figures_are_the_analyze_commands_renderings():
    """Axes, colour bars and labels included: the PNGs of `python -m vitmpp.analyze` on the same 8 images."""
    encoder = tiny_vit()
    images = random_images(12)
    figures = training_figures(encoder, images)
    analysis = analyze_encoder(
        encoder,
        [(images[:8], images_for_display(images[:8]))],
        num_images=8,
        num_rollout_images=8,
        num_filters=TRAINING_FILTERS,
    )
    for name, figure in analysis_figures(analysis).items():
        expected = torch.from_numpy(figure_to_array(figure)).permute(2, 0, 1).float() / 255
        assert torch.equal(figures[name], expected), name
    # every figure has its own name in one `encoder` group of pictures, the one with axes sorting first
    assert set(TRAINING_TAGS) == NAMES and len(set(TRAINING_TAGS.values())) == len(NAMES)
    assert min(TRAINING_TAGS.values()) == TRAINING_TAGS["mean_attention_distance"]


def test_training_figures_shows_the_given_images():
    encoder = tiny_vit()
    images01 = torch.zeros(2, 3, 32, 32)
    images01[:, 1] = 1.0  # pure green
    rollout = training_figures(encoder, random_images(2), images01, max_images=2)["attention_rollout"]
    green = (rollout[1] > 0.9) & (rollout[0] < 0.1) & (rollout[2] < 0.1)
    assert int(green.sum()) > 2 * 40 * 40  # the two images, drawn next to their overlays


def test_training_figures_without_class_token_or_position_embedding():
    encoder = tiny_vit(class_token=False, global_pool="avg", pos_embed="none")
    figures = training_figures(encoder, random_images(3))
    assert set(figures) == {"embedding_filters", "attention_rollout", "mean_attention_distance"}
    for image in figures.values():
        _check_image(image)


def test_training_figures_with_an_empty_batch_draws_the_weights_only():
    figures = training_figures(tiny_vit(), torch.zeros(0, 3, 32, 32))
    assert set(figures) == {"position_embedding_similarity", "embedding_filters"}


def test_training_figures_follow_the_encoder_dtype():
    encoder = tiny_vit().to(torch.bfloat16)
    figures = training_figures(encoder, random_images(2))
    assert set(figures) == NAMES
    for image in figures.values():
        _check_image(image)


def test_mean_distance_figure_has_one_dot_per_head_at_its_layer():
    distances = torch.arange(12, dtype=torch.float64).reshape(3, 4)  # 3 layers, 4 heads
    figure = mean_distance_figure(distances, image_size=32)
    (ax,) = figure.axes
    dots = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(dots) == 12
    assert sorted(map(tuple, dots.tolist())) == sorted(
        (layer + 1, float(4 * layer + h)) for layer in range(3) for h in range(4)
    )
    assert "pixels" in ax.get_ylabel() and "layer" in ax.get_xlabel()
    assert not [line for line in ax.get_lines() if line.get_label() == "uniform attention"]


def test_mean_distance_figure_draws_the_uniform_attention_reference():
    from vitmpp.analyze.report import _uniform_distance

    uniform = _uniform_distance((4, 4), (8, 8))  # a 32 px image in 8 px patches
    figure = mean_distance_figure(torch.full((2, 3), 5.0, dtype=torch.float64), image_size=32, uniform=uniform)
    (ax,) = figure.axes
    (line,) = [line for line in ax.get_lines() if line.get_label() == "uniform attention"]
    assert np.allclose(line.get_ydata(), uniform) and 10 < uniform < 20  # ~16 px between two random patch centres
    assert ax.get_ylim()[1] >= uniform


def test_figures_render_and_save(tmp_path):
    encoder = tiny_vit()
    figures = {
        "rollout": rollout_figure(torch.rand(5, 3, 32, 32), torch.rand(5, 8, 8), columns=4),
        "similarity": position_similarity_figure(torch.eye(64), (8, 8)),
        "filters": embedding_filters_figure(encoder.patch_embed.proj.weight.detach()[:6], [0.1] * 6),
    }
    for name, figure in figures.items():
        array = figure_to_array(figure)
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
        assert array.std() > 0, f"{name} is blank"
        path = save_figure(figure, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filters.png", "rollout.png", "similarity.png"]
