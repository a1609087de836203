"""The supervised-pretraining baseline objective and the registry."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from vitmpp.common.config import param
from vitmpp.common.errors import UserError
from vitmpp.models import (
    MAEConfig,
    MPPConfig,
    Objective,
    ObjectiveOutput,
    SupervisedConfig,
    create_encoder,
    create_objective,
    objective_config_class,
    register_objective,
)
from vitmpp.models.objective import _REGISTRY

from models_helpers import TINY, normalise, tiny_objective, uint8_images


def test_head_starts_at_zero_so_the_loss_is_log_classes():
    objective = tiny_objective("supervised", num_classes=7)
    assert torch.all(objective.head.weight == 0) and torch.all(objective.head.bias == 0)
    labels = torch.tensor([0, 3, 6, 2])
    out = objective(uint8_images(4), labels)
    assert out.loss.item() == pytest.approx(math.log(7), abs=1e-6)
    out.loss.backward()
    assert objective.head.weight.grad.abs().sum() > 0


def test_label_smoothing_and_pooling():
    for pool in ("token", "avg"):
        torch.manual_seed(0)
        encoder = create_encoder(TINY, global_pool=pool)
        plain = create_objective("supervised", encoder, num_classes=5)
        smooth = create_objective("supervised", encoder, num_classes=5, label_smoothing=0.1)
        torch.nn.init.normal_(plain.head.weight)
        smooth.head.load_state_dict(plain.head.state_dict())
        images, labels = uint8_images(4), torch.tensor([0, 1, 2, 3])
        logits = plain.logits(images)
        expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        assert smooth(images, labels).loss.item() == pytest.approx(expected.item(), rel=1e-5)
        pooled = encoder.forward_head(encoder.forward_features(normalise(images)), pre_logits=True)
        torch.testing.assert_close(logits, plain.head(pooled))


def test_needs_classes_and_labels():
    with pytest.raises(UserError, match="num_classes"):
        tiny_objective("supervised", num_classes=None)
    with pytest.raises(UserError, match="labels"):
        tiny_objective("supervised")(uint8_images(2))


def test_visualization():
    objective = tiny_objective("supervised")
    images, labels = uint8_images(3), torch.tensor([1, 2, 3])
    vis = objective.visualize(images, objective(images, labels))
    assert vis.grid.shape[0] == 3 and 0 <= vis.grid.min() and vis.grid.max() <= 1
    assert "0/1" in vis.caption  # a zero head predicts class 0


def test_registry_names_and_config_classes():
    assert objective_config_class("mpp") is MPPConfig
    assert objective_config_class("mae") is MAEConfig
    assert objective_config_class("supervised") is SupervisedConfig
    with pytest.raises(UserError) as err:
        objective_config_class("beit")  # not (yet) an objective of ours
    assert all(name in str(err.value) for name in ("mae", "mpp", "simmim", "supervised"))


def test_a_new_objective_is_one_registered_class():
    @dataclass
    class MeanFeatureConfig:
        scale: float = param(1.0, gt=0)

    @register_objective("test_mean_feature", MeanFeatureConfig)
    class MeanFeature(Objective):
        def forward(self, images, labels=None):
            return ObjectiveOutput(loss=self.config.scale * self.encoder.forward_features(images).float().pow(2).mean())

    try:
        objective = create_objective("test_mean_feature", create_encoder(TINY), scale=2.0)
        assert isinstance(objective, MeanFeature) and objective.config.scale == 2.0
        assert objective(uint8_images(2)).loss.dim() == 0
    finally:
        _REGISTRY.pop("test_mean_feature")


def test_objective_names_are_the_files_of_models_objectives_and_need_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    import vitmpp.models.objectives as package

    files = sorted(p.stem for p in Path(package.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vitmpp.models.objectives import "
            "builtin_objective_names as names; print(','.join(names()), 'torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.split() == [",".join(files), "False"]
    assert {"mae", "mpp", "simmim", "supervised"} <= set(files)
