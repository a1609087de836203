"""The kNN monitor (`log.knn_every`): a kNN accuracy on held-out digits in TensorBoard while
pretraining runs, higher after a short MAE run than for a random encoder; off at 0."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import TINY, python_cmd, run
from test_pretrain_engine import tensorboard_events

pytestmark = pytest.mark.slow

KNN_IMAGES = 1000  # below the 1438 training images: the bank is a seeded sample


def scalar_events(run_dir, tag):
    return {e.step: e.value for acc in tensorboard_events(run_dir) if tag in acc.Tags()["scalars"]
            for e in acc.Scalars(tag)}


def random_encoder_top1(shards) -> float:
    """The monitor's own function on a freshly initialised encoder: the same bank, queries and settings."""
    from accelerate import Accelerator
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from vitmpp.datasets import read_manifest
    from vitmpp.models import EncoderConfig, encoder_from_config
    from vitmpp.pretrain.engine import knn_monitor, knn_monitor_specs

    specs = knn_monitor_specs(str(shards), read_manifest(str(shards)), "train", KNN_IMAGES, 16, seed=0)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    torch.manual_seed(0)
    encoder = encoder_from_config(EncoderConfig(name="vit_pico_patch4_16", img_size=16))
    scores = knn_monitor(Accelerator(cpu=True), encoder, *specs, mean, std)
    assert scores["count"] == 359 and encoder.training  # every validation image; train mode given back
    return scores["top1"]


def test_knn_accuracy_is_logged_and_beats_a_random_encoder(tmp_path, digits16):
    # MAE: 40 steps lift the class token's kNN top-1 from ~37 (random) to ~55 on these digits (3 seeds)
    result = run(python_cmd("pretrain/main.py") + TINY + [
        "objective=mae", "train.steps=40", f"data.shards={digits16}", "log.log_every=20", "log.knn_every=20",
        f"log.knn_images={KNN_IMAGES}", "train.seed=0"], cwd=tmp_path)
    run_dir = tmp_path / "runs" / "default-mae"
    top1 = scalar_events(run_dir, "pretrain/knn_top1")
    top5 = scalar_events(run_dir, "pretrain/knn_top5")
    assert sorted(top1) == sorted(top5) == [20, 40]
    assert all(0 <= v <= 100 for v in [*top1.values(), *top5.values()])
    assert "step 40: kNN top-1" in result.stdout
    assert top1[40] > random_encoder_top1(digits16) + 5, top1


def test_knn_every_zero_logs_nothing(tmp_path, digits16):
    result = run(python_cmd("pretrain/main.py") + TINY + ["train.steps=4", f"data.shards={digits16}",
                                                          "log.knn_every=0"], cwd=tmp_path)
    run_dir = tmp_path / "runs" / "default-mpp"
    tags = set().union(*(acc.Tags()["scalars"] for acc in tensorboard_events(run_dir)))
    assert "pretrain/loss" in tags and not {t for t in tags if "knn" in t}
    assert "kNN" not in result.stdout
