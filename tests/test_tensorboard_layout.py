"""What `tensorboard --logdir runs` shows: stage-namespaced scalar tags (a pretraining run and a
linear probe in one logdir share no chart; pretraining's online evaluation in its own `eval`
group), the config in each run's own event file (no timestamp-named sub-runs), and objective
pictures whose columns are labelled inside the image."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from engine_helpers import TINY, python_cmd, run
from models_helpers import normalise, tiny_objective, uint8_images
from vitmpp.common.tracking import SYSTEM_GROUP, scalar_tag
from vitmpp.models.objective import Visualization, label_columns, objective_class, objective_names

HPARAMS_TAG = "_hparams_/session_start_info"


def natural_key(tag: str) -> list:
    """TensorBoard's tag order: characters compared one by one, a run of digits as one number."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", tag)]


def time_series_first_screen(scalar_tags: set[str], image_tags: set[str]) -> list[tuple[str, set[str]]]:
    """The groups TIME SERIES (the dashboard TensorBoard opens on) shows expanded, as tensorboard 2.21's
    webfiles build them: every tag sorted (`natural_key`), grouped by its first component in that order,
    the first two groups expanded. Returns (group, the kinds of cards in it) for those two."""
    groups: dict[str, set[str]] = {}
    kinds = {**{tag: "images" for tag in image_tags}, **{tag: "scalars" for tag in scalar_tags}}
    for tag in sorted(kinds, key=natural_key):
        groups.setdefault(tag.split("/", 1)[0], set()).add(kinds[tag])
    return list(groups.items())[:2]


def events(run_dir: Path):
    """The run's one event folder, read whole (and a check that no other folder holds events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(run_dir.rglob("events.out.tfevents.*"))
    assert files and {f.parent for f in files} == {run_dir / "tensorboard"}, files  # no timestamp-named sub-run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ----------------------------------------------------------------------------- tags


def test_scalar_tags_put_the_stage_first_and_the_system_series_in_a_later_group():
    assert scalar_tag("pretrain", "loss") == "pretrain/loss"
    assert scalar_tag("linear", "top1") == "linear/top1"
    assert scalar_tag("pretrain", "images_per_sec") == "system/pretrain/images_per_sec"
    assert scalar_tag("linear", "skipped_samples") == "system/linear/skipped_samples"
    assert scalar_tag("pretrain", "retries") == "system/pretrain/retries"
    # TensorBoard sorts its groups by name: the system group comes after every stage's (and eval's)
    assert all(SYSTEM_GROUP > stage for stage in ("pretrain", "linear", "finetune", "scratch", "knn", "eval"))


# ----------------------------------------------------------------------------- pictures


def _tile_columns(vis: Visualization) -> int:
    width = vis.grid.shape[-1]
    columns = len(vis.columns)
    assert columns > 0 and (width - vis.padding) % columns == 0, (width, vis.columns)
    return columns


@pytest.mark.parametrize("name", objective_names())
def test_every_objective_labels_the_columns_of_its_picture(name):
    objective = tiny_objective(name, **objective_class(name).embedded_options)  # the CPU demo's options fit 16 px
    images = normalise(uint8_images(3))
    labels = torch.tensor([1, 2, 3])
    vis = objective.visualize(images, objective(images, labels), max_images=2)
    _tile_columns(vis)
    assert all(label.strip() for label in vis.columns)
    bare = vis.grid
    picture = vis.labelled(min_tile_pixels=96)
    # enlarged by a whole factor, with a header row above the enlarged grid
    factor = picture.shape[-1] // bare.shape[-1]
    assert factor >= 1 and picture.shape[-1] == factor * bare.shape[-1]
    header = picture.shape[-2] - factor * bare.shape[-2]
    assert header >= 10
    enlarged = bare.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
    assert torch.equal(picture[:, header:], enlarged)
    assert 0 <= float(picture.min()) and float(picture.max()) <= 1


def test_each_label_is_drawn_over_its_own_column():
    grid = torch.ones(3, 1 + 2 * 101, 1 + 3 * 101)  # 2 rows of 3 white 100 px tiles, 1 px padding
    picture = label_columns(grid, ["image", "", "prediction"], padding=1)
    header = picture[:, : picture.shape[-2] - grid.shape[-2]]
    ink = (header.mean(dim=0) < 0.5).any(dim=0)  # columns of pixels with dark text
    assert ink[1:101].any() and not ink[102:202].any() and ink[203:303].any()


def test_a_picture_without_column_labels_is_the_bare_grid():
    grid = torch.rand(3, 35, 69)
    assert torch.equal(Visualization(grid, "caption").labelled(), grid)


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_pretraining_and_linear_probe_in_one_logdir(tmp_path, digits16):
    run(
        python_cmd("pretrain/main.py")
        + TINY
        + [
            "train.steps=2",
            f"data.shards={digits16}",
            "run.name=pre",
            "log.image_every=2",
            "eval.every=2",
            "eval.knn_images=100",
        ],
        cwd=tmp_path,
    )
    pretrain_dir = tmp_path / "runs" / "pre"
    run(
        python_cmd("finetune/main.py")
        + [
            "train.global_batch=32",
            "data.num_workers=0",
            "log.log_every=1",
            "train.steps=2",
            "protocol=linear",
            f"encoder={pretrain_dir}",
            f"data.shards={digits16}",
            "run.name=probe",
        ],
        cwd=tmp_path,
    )
    pretrain, probe = events(pretrain_dir), events(tmp_path / "runs" / "probe")

    pretrain_tags, probe_tags = set(pretrain.Tags()["scalars"]), set(probe.Tags()["scalars"])
    assert {
        "pretrain/loss",
        "pretrain/lr",
        "system/pretrain/images_per_sec",
        "system/pretrain/skipped_samples",
        "system/pretrain/nonfinite_steps",
        "system/pretrain/grad_norm",
    } <= pretrain_tags
    assert {"eval/knn_top1", "eval/knn_top5", "eval/loss"} <= pretrain_tags  # the online evaluation
    assert {"linear/loss", "linear/lr", "linear/top1", "linear/top5", "system/linear/images_per_sec"} <= probe_tags
    assert all(t.startswith(("pretrain/", "system/pretrain/", "eval/")) for t in pretrain_tags), pretrain_tags
    assert all(t.startswith(("linear/", "system/linear/")) for t in probe_tags), probe_tags
    assert not pretrain_tags & probe_tags
    # the loss is the first chart of the first group TensorBoard shows for each run; a pretraining run
    # that evaluates opens with its few-shot and kNN accuracies (eval/ sorts first), the loss group beside it
    assert min(pretrain_tags) == "eval/fewshot_5shot" and min(probe_tags) == "linear/loss"
    assert min(t for t in pretrain_tags if not t.startswith("eval/")) == "pretrain/loss"
    # TIME SERIES, the dashboard TensorBoard opens on, mixes pictures and curves in one tag order and
    # expands two groups: they are the curves (the pictures' groups sort after the stage's own)
    assert time_series_first_screen(pretrain_tags, set(pretrain.Tags()["images"])) == [
        ("eval", {"scalars"}),
        ("pretrain", {"scalars"}),
    ]
    # without the online evaluation the loss group still comes first, the objective's picture beside it
    no_eval = {t for t in pretrain_tags if not t.startswith("eval/")}
    assert time_series_first_screen(no_eval, set(pretrain.Tags()["images"]))[0] == ("pretrain", {"scalars"})
    assert time_series_first_screen(probe_tags, set()) == [("linear", {"scalars"}), ("system", {"scalars"})]

    # the config is the HPARAMS tab's session of each run, in the run's own event file
    for acc in (pretrain, probe):
        assert HPARAMS_TAG in acc.PluginTagToContent("hparams")

    # the objective's picture: the 16 px grid of 4 columns, enlarged, under a header of labels
    (image,) = pretrain.Images("pretrain_batch/mpp")
    bare = 4 * 17 + 1, 4 * 17 + 1  # 4 rows (images) x 4 columns of 16 px tiles, 1 px padding
    factor = math.ceil(96 / 16)  # tiles enlarged to at least 96 px
    assert image.width == factor * bare[1]
    assert image.height > factor * bare[0]
