"""Sample-order planning (datasets/order.py) on its own: no worker process, no shard read.

The shards named here are empty files: planning only asks whether they exist."""

from __future__ import annotations

from collections import Counter

import pytest

from vitmpp.datasets import LoaderSpec
from vitmpp.datasets.manifest import Manifest, SplitInfo
from vitmpp.datasets.order import evaluation_slots, fill_sources, plan_epoch, shard_order, worker_processes


def manifest_of(tmp_path, lengths) -> Manifest:
    names = [f"s-{k:06d}.tar" for k in range(len(lengths))]
    for name in names:
        (tmp_path / name).touch()
    split = SplitInfo("train", sum(lengths), names, list(lengths))
    return Manifest(
        root=tmp_path,
        name="s",
        splits={"train": split, "validation": split},
        num_classes=2,
        class_names=["a", "b"],
        image_size=8,
    )


def spec(tmp_path, lengths, **kw) -> LoaderSpec:
    return LoaderSpec(
        **{
            "shards": str(tmp_path),
            "manifest": manifest_of(tmp_path, lengths),
            "batch_size": 3,
            "transform": None,
            "training": True,
            **kw,
        }
    )


def test_evaluation_slots_hold_every_real_sample_once_over_ranks_and_workers(tmp_path):
    seen, batches = Counter(), set()
    for rank in range(3):
        plan = plan_epoch(
            spec(tmp_path, [7, 0, 5, 9], training=False, split="validation", rank=rank, world_size=3, num_workers=2),
            0,
            0,
        )
        slots = [slot for w in range(plan.workers) for slot in evaluation_slots(plan, w)]
        assert len(slots) == plan.batches_per_epoch * plan.batch_size
        seen.update(index for index, real in slots if real)
        batches.add(plan.batches_per_epoch)
    assert seen == Counter(range(21)) and len(batches) == 1  # every rank the same count of batches


def test_the_workers_of_all_ranks_take_every_shard_of_a_pass_once(tmp_path):
    plans = [plan_epoch(spec(tmp_path, [4] * 12, rank=r, world_size=2, num_workers=3), 5, 0) for r in range(2)]
    first_pass = []
    for plan in plans:
        for worker in range(plan.workers):
            order = shard_order(plan, worker)
            first_pass += [next(order) for _ in range(2)]  # 12 shards / (2 ranks x 3 workers)
    assert sorted(first_pass) == list(range(12))
    again = plan_epoch(spec(tmp_path, [4] * 12, rank=0, world_size=2, num_workers=3), 5, 0)
    assert [next(shard_order(again, w)) for w in range(3)] == [next(shard_order(plans[0], w)) for w in range(3)]


def test_the_logical_workers_batches_make_the_epoch_and_a_resume_starts_at_its_batch(tmp_path):
    plan = plan_epoch(spec(tmp_path, [10] * 4, num_workers=3, batches_per_epoch=8), 0, 5)
    assert sum(plan.worker_batches(w) for w in range(3)) == 8
    assert sum(plan.batches_before_start(w) for w in range(3)) == 5
    assert plan.logical_worker(0) == 5 % 3  # torch's round-robin starts at process 0: it makes batch 5
    assert sorted(w for p in range(3) for w in plan.played_by(p, 3)) == [0, 1, 2]
    assert worker_processes(6, 4) == 3 and worker_processes(6, None) == 6 and worker_processes(5, 0) == 0


def test_the_fill_rule_takes_good_positions_in_turn():
    assert fill_sources([False, True, False, True, True]) == [0, 2, 2, 2, 0]
    assert fill_sources([False, False]) == [0, 1] and fill_sources([True, True]) is None


def test_a_resume_past_the_epoch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="outside the epoch"):
        plan_epoch(spec(tmp_path, [9], batches_per_epoch=2), 0, 3)
