"""The random-number rule of models/objective.py: an objective draws its masks from torch's global
generator, which the loop checkpoints, so a resumed run draws what the uninterrupted one drew."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vitmpp.models import create_encoder, create_objective
from vitmpp.models.objective import _REGISTRY, Objective, ObjectiveOutput, register_objective

from models_helpers import (
    TINY,
    assert_randomness_is_resumable,
    assert_resume_draws_the_same,
    assert_same_seed_same_forward,
    tiny_objective,
    uint8_images,
)


@pytest.mark.parametrize("name", ["mpp", "mae", "simmim", "supervised"])
def test_every_objective_draws_from_the_checkpointed_global_generator(name):
    options = {"mask_patch_size": 8} if name == "simmim" else {}
    pixels, labels = uint8_images(4), torch.tensor([0, 1, 2, 3])
    assert_randomness_is_resumable(lambda: tiny_objective(name, seed=3, **options).train(), pixels, labels)


@dataclass
class MaskedMeanConfig:
    pass


class PrivateGeneratorMasks(Objective):
    """Masks half the patch tokens at random, drawing from a `torch.Generator` of its own (the bug)."""

    def __init__(self, encoder, config, **kwargs):
        super().__init__(encoder, config, **kwargs)
        self.generator = torch.Generator().manual_seed(0)  # in no checkpoint: a resume restarts it

    def forward(self, pixels, labels=None):
        tokens = self.encoder.forward_features(self.normalize(pixels))[:, 1:]
        mask = torch.rand(tokens.shape[:2], generator=self.generator) < 0.5
        return ObjectiveOutput(loss=(tokens.float().pow(2).mean(-1) * mask).sum() / mask.sum(), extras={"mask": mask})


class GlobalGeneratorMasks(PrivateGeneratorMasks):
    """The same objective drawing its masks as the rule says."""

    def forward(self, pixels, labels=None):
        tokens = self.encoder.forward_features(self.normalize(pixels))[:, 1:]
        mask = torch.rand(tokens.shape[:2], device=pixels.device) < 0.5
        return ObjectiveOutput(loss=(tokens.float().pow(2).mean(-1) * mask).sum() / mask.sum(), extras={"mask": mask})


@pytest.fixture
def registered():
    names = []

    def register(name, cls):
        register_objective(name, MaskedMeanConfig)(cls)
        names.append(name)
        return lambda: create_objective(name, create_encoder(TINY))

    yield register
    for name in names:
        _REGISTRY.pop(name)


def test_an_objective_with_its_own_generator_breaks_resume_and_the_check_says_so(registered):
    make = registered("test_private_generator", PrivateGeneratorMasks)
    with pytest.raises(AssertionError, match="generator of its own"):
        assert_same_seed_same_forward(make(), uint8_images(2))
    with pytest.raises(AssertionError, match="no checkpoint holds"):
        assert_resume_draws_the_same(make, uint8_images(2))


def test_the_same_objective_on_the_global_generator_passes(registered):
    assert_randomness_is_resumable(registered("test_global_generator", GlobalGeneratorMasks), uint8_images(2))
