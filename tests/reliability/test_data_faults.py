"""Damaged, missing and uneven data under the real pretraining command."""

from __future__ import annotations

import json
import time

import pytest

from datasets_helpers import (
    MarkerPickle,
    add_member,
    drop_member,
    empty_shard,
    keys_of,
    replace_member,
    truncate_shard,
    write_tiny_shards,
)
from engine_helpers import TINY, accelerate_cmd, python_cmd, run

pytestmark = pytest.mark.slow
TRAIN = TINY + ["train.global_batch=16", "data.max_skip_fraction=0.6", "log.image_every=0"]


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars(tag)]
    return values


def damage(kind, shards):
    """Apply one kind of damage to the second shard; returns the shard's file name."""
    target = sorted(shards.glob("*-train-*.tar"))[1]
    keys = keys_of(target)
    if kind == "truncated tar":
        truncate_shard(target, 0.4)
    elif kind == "zero-byte shard":
        empty_shard(target)
    elif kind == "garbage image bytes":
        for key in keys[:6]:
            replace_member(target, key, "jpg", b"\xff\xd8\xff\xe0 this is not a jpeg" * 20)
    elif kind == "member missing its cls":
        for key in keys[:6]:
            drop_member(target, key, "cls")
    return target.name


@pytest.mark.fault("damaged shard (truncated tar, zero-byte shard, garbage JPEG bytes, missing cls)", expect="survived")
@pytest.mark.parametrize("kind", ["truncated tar", "zero-byte shard", "garbage image bytes", "member missing its cls"])
def test_training_skips_and_counts_damaged_samples(tmp_path, kind):
    shards = tmp_path / "shards"
    write_tiny_shards(shards, [24, 24, 24, 24], fmt="jpg", textured=True)
    name = damage(kind, shards)
    started = time.monotonic()
    result = run(
        python_cmd("pretrain/main.py") + TRAIN + ["train.steps=8", f"data.shards={shards}"], cwd=tmp_path, timeout=180
    )
    assert time.monotonic() - started < 180
    run_dir = tmp_path / "runs" / "default-mpp"
    assert (run_dir / "encoder.safetensors").is_file()
    assert name in result.stderr, result.stderr[-2000:]  # the warning names the shard
    skipped = tensorboard_scalars(run_dir, "system/pretrain/skipped_samples")
    assert skipped and max(skipped) > 0


@pytest.mark.fault("shard listed in the manifest but missing on disk", expect="clear error")
def test_missing_shard_fails_before_the_first_step(tmp_path):
    shards = tmp_path / "shards"
    write_tiny_shards(shards, [24, 24, 24])
    missing = sorted(shards.glob("*.tar"))[2]
    missing.unlink()
    result = run(
        python_cmd("pretrain/main.py") + TRAIN + ["train.steps=4", f"data.shards={shards}"],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2
    assert missing.name in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "default-mpp" / "metrics.jsonl").exists()  # no step ran


@pytest.mark.fault("too many damaged samples (above data.max_skip_fraction)", expect="clear error")
def test_mostly_broken_data_aborts_with_a_message(tmp_path):
    shards = tmp_path / "shards"
    write_tiny_shards(shards, [24, 24])
    for tar in shards.glob("*.tar"):
        truncate_shard(tar, 0.05)
    result = run(
        python_cmd("pretrain/main.py") + TINY + ["train.global_batch=8", "train.steps=4", f"data.shards={shards}"],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2 and "max_skip_fraction" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.fault("uneven shards (10/10/50 samples) over 2 ranks", expect="survived")
def test_uneven_shards_over_two_ranks(tmp_path):
    shards = tmp_path / "shards"
    write_tiny_shards(shards, [10, 10, 50])
    # 70 samples / global batch 16 = 4 steps per epoch; 10 steps = 2.5 epochs
    run(
        accelerate_cmd("pretrain/main.py", processes=2)
        + TINY
        + [
            "train.global_batch=16",
            "train.steps=10",
            f"data.shards={shards}",
            "data.num_workers=2",
            "debug.record_samples=true",
        ],
        cwd=tmp_path,
        timeout=240,
    )
    run_dir = tmp_path / "runs" / "default-mpp"
    ranks = [json.loads((run_dir / f"debug-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["samples"]) == len(ranks[1]["samples"]) == 10 * 8
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]


@pytest.mark.fault("shard member that would run code when unpickled (.pkl/.pth)", expect="survived")
def test_pickled_members_are_never_decoded(tmp_path):
    import pickle

    shards = tmp_path / "shards"
    write_tiny_shards(shards, [16, 16])
    marker = tmp_path / "pwned"
    tar = sorted(shards.glob("*.tar"))[0]
    for key in keys_of(tar)[:3]:
        add_member(tar, key, "pkl", pickle.dumps(MarkerPickle(str(marker))))
        add_member(tar, key, "pth", pickle.dumps(MarkerPickle(str(marker))))
    run(python_cmd("pretrain/main.py") + TRAIN + ["train.steps=3", f"data.shards={shards}"], cwd=tmp_path)
    assert not marker.exists()


@pytest.mark.fault("tar member named ../escape.png or /abs.png", expect="survived")
def test_path_traversal_members_are_never_written(tmp_path):
    import io
    import tarfile

    shards = tmp_path / "data" / "shards"
    write_tiny_shards(shards, [16, 16], fmt="png")
    tar = sorted(shards.glob("*.tar"))[0]
    data = tar.read_bytes()
    with tarfile.open(tar, "a") as handle:
        for name in ("../escape.png", "/tmp/vitmpp-abs-escape.png"):
            info = tarfile.TarInfo(name)
            info.size = len(data[:64])
            handle.addfile(info, io.BytesIO(data[:64]))
    run(python_cmd("pretrain/main.py") + TRAIN + ["train.steps=3", f"data.shards={shards}"], cwd=tmp_path)
    assert not (shards.parent / "escape.png").exists() and not (tmp_path / "escape.png").exists()
    from pathlib import Path

    assert not Path("/tmp/vitmpp-abs-escape.png").exists()


@pytest.mark.fault("a data-loading worker dies (os._exit in the worker), 2 ranks", expect="clear error")
def test_dead_worker_stops_every_rank(tmp_path, digits16):
    started = time.monotonic()
    result = run(
        accelerate_cmd("pretrain/main.py", processes=2)
        + TINY
        + ["train.steps=20", f"data.shards={digits16}", "data.num_workers=1", "debug.kill_worker_after_samples=40"],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert time.monotonic() - started < 60 + 30  # 60 s budget after a ~20 s start-up
    assert result.returncode != 0
    assert "data-loading worker of rank" in result.stderr and "died" in result.stderr
