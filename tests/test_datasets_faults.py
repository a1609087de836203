"""Damaged and hostile shards: skipped and counted, named in a warning, never a crash or a hang."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import pytest
import torch
from timm.data.transforms import MaybePILToTensor

from datasets_helpers import (
    MarkerPickle,
    add_member,
    drop_member,
    empty_shard,
    index_of_image,
    keys_of,
    replace_member,
    spec_for,
    truncate_shard,
    write_tiny_shards,
)
from vitmpp.common.errors import UserError
from vitmpp.datasets import ShardWarning, open_loader, pretrain_transform

IDENTITY = MaybePILToTensor()
LENGTHS = [20, 20, 20]


@pytest.fixture
def shards(tmp_path):
    write_tiny_shards(tmp_path, LENGTHS, textured=True)
    return tmp_path


def shard(root, k: int):
    return root / f"tiny-train-{k:06d}.tar"


def evaluate(root, world=1, workers=0, **kwargs):
    """(real indices seen, total skipped, batches per rank) over all ranks of an evaluation epoch."""
    seen, skipped, counts = [], 0, []
    for rank in range(world):
        loader = open_loader(
            spec_for(
                root,
                split="train",
                batch_size=4,
                transform=IDENTITY,
                training=False,
                rank=rank,
                world_size=world,
                num_workers=workers,
                max_skip_fraction=1.0,
                **kwargs,
            )
        )
        batches = list(loader)
        assert loader.skipped_samples == sum(int(b.skipped) for b in batches)
        seen += [i for b in batches for i in b.indices.tolist() if i >= 0]
        for b in batches:
            for image, index in zip(b.images, b.indices.tolist()):
                if index >= 0:
                    assert index_of_image(image)[0] == index
        skipped += loader.skipped_samples
        counts.append(len(batches))
    return seen, skipped, counts


def train_epoch(root, workers=0, shuffle_buffer=8, **kwargs):
    loader = open_loader(
        spec_for(
            root,
            split="train",
            batch_size=4,
            transform=IDENTITY,
            training=True,
            num_workers=workers,
            shuffle_buffer=shuffle_buffer,
            max_skip_fraction=1.0,
            **kwargs,
        )
    )
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch
    return batches, loader.skipped_samples


def test_garbage_image_bytes_skip_that_sample(shards):
    replace_member(shard(shards, 1), "00000025", "png", b"\x89PNG this is not an image")
    with pytest.warns(ShardWarning, match="tiny-train-000001.tar"):
        seen, skipped, counts = evaluate(shards, world=2, workers=2)
    assert skipped == 1 and sorted(seen) == [i for i in range(60) if i != 25]
    assert len(set(counts)) == 1
    batches, skipped = train_epoch(shards, workers=2)
    assert 25 not in {i for b in batches for i in b.indices.tolist()}
    assert all(b.images.shape[0] == 4 for b in batches)  # the hole is filled by a repeat (index -1)


def test_a_missing_cls_skips_that_sample(shards):
    drop_member(shard(shards, 0), "00000003", "cls")
    with pytest.warns(ShardWarning, match="no cls member"):
        seen, skipped, _ = evaluate(shards)
    assert skipped == 1 and 3 not in seen and len(seen) == 59


def test_a_truncated_shard_charges_its_unread_samples(shards):
    path = shard(shards, 2)
    truncate_shard(path, 0.5)
    readable = 0
    try:  # how many whole samples survive, by Python's own tar reader
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    tar.extractfile(member).read()
                    readable += 1
    except tarfile.TarError:
        pass
    assert 0 < readable < 20
    with pytest.warns(ShardWarning, match="tiny-train-000002.tar (is unreadable|ends after)"):
        seen, skipped, counts = evaluate(shards, world=2, workers=2)
    assert skipped == 60 - len(seen) and len(set(seen)) == len(seen)
    assert 20 - skipped in (readable, readable - 1)  # the last, partly read sample may be lost too
    batches, skipped = train_epoch(shards, workers=2)  # (warned once per process: not again)
    assert skipped > 0


def test_a_zero_byte_shard_charges_all_its_samples(shards):
    empty_shard(shard(shards, 1))
    with pytest.warns(ShardWarning, match="tiny-train-000001.tar"):
        seen, skipped, counts = evaluate(shards, world=2, workers=2)
    assert skipped == 20 and sorted(seen) == list(range(20)) + list(range(40, 60))
    assert len(set(counts)) == 1
    batches, skipped = train_epoch(shards)
    assert not {i for b in batches for i in b.indices.tolist()} & set(range(20, 40))


def test_a_batch_of_only_bad_samples_is_filled_without_consuming_the_stream(tmp_path):
    write_tiny_shards(tmp_path, [4, 8])
    for key in keys_of(shard(tmp_path, 0)):
        replace_member(shard(tmp_path, 0), key, "png", b"garbage")
    batches, skipped = train_epoch(tmp_path, shuffle_buffer=0)  # 3 batches: shard 0 is exactly one of them
    assert skipped == 4
    assert all(b.images.shape == (4, 3, 16, 16) for b in batches)
    filled = [b for b in batches if (b.indices == -1).all()]
    assert len(filled) == 1
    # filled with the first sample that decodes (index 4, the head of shard 1)
    assert all(index_of_image(image)[0] == 4 for image in filled[0].images)
    assert sorted(i for b in batches for i in b.indices.tolist() if i >= 0) == list(range(4, 12))


def test_resume_stays_exact_around_a_bad_sample(shards):
    replace_member(shard(shards, 0), "00000007", "png", b"garbage")
    spec = spec_for(
        shards,
        split="train",
        batch_size=3,
        transform=pretrain_transform(16),
        training=True,
        seed=1,
        num_workers=2,
        shuffle_buffer=8,
        max_skip_fraction=1.0,
    )
    full = list(open_loader(spec))
    resumed_loader = open_loader(spec, start_batch=4)
    resumed = list(resumed_loader)
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
        assert int(a.skipped) == int(b.skipped)
    assert sum(int(b.skipped) for b in full[4:]) == resumed_loader.skipped_samples


def test_too_many_bad_samples_stop_with_the_shards_named(shards):
    empty_shard(shard(shards, 2))
    with pytest.raises(UserError, match=r"could not be read, .*tiny-train-000002\.tar"):
        with pytest.warns(ShardWarning):
            for _ in open_loader(
                spec_for(
                    shards,
                    split="train",
                    batch_size=4,
                    transform=IDENTITY,
                    training=False,
                    num_workers=0,
                    max_skip_fraction=0.1,
                )
            ):
                pass


def test_a_worker_s_error_reaches_the_caller_as_one_sentence(tmp_path):
    write_tiny_shards(tmp_path, [6, 6])
    for k in (0, 1):
        empty_shard(shard(tmp_path, k))
    with pytest.raises(UserError, match="without a usable sample") as caught:
        list(
            open_loader(
                spec_for(
                    tmp_path,
                    split="train",
                    batch_size=2,
                    transform=IDENTITY,
                    training=True,
                    num_workers=2,
                    max_skip_fraction=1.0,
                )
            )
        )
    assert "Traceback" not in str(caught.value) and "\n" not in str(caught.value)
    assert "tiny-train-00000" in str(caught.value)


def test_a_missing_shard_fails_before_any_batch(shards):
    os.remove(shard(shards, 1))
    with pytest.raises(UserError, match="tiny-train-000001.tar' .*does not exist"):
        open_loader(spec_for(shards, split="train", batch_size=4, transform=IDENTITY, training=True))


def test_pickle_and_torch_members_are_never_decoded(shards, tmp_path_factory):
    marker_dir = tmp_path_factory.mktemp("markers")
    pkl_marker, pth_marker = marker_dir / "pickle-ran", marker_dir / "torch-load-ran"
    add_member(shard(shards, 0), "00000002", "pkl", pickle.dumps(MarkerPickle(str(pkl_marker))))
    buf = io.BytesIO()
    torch.save(MarkerPickle(str(pth_marker)), buf)
    add_member(shard(shards, 0), "00000004", "pth", buf.getvalue())
    assert not pkl_marker.exists()
    with pytest.warns(ShardWarning, match="pkl, pth|pkl.*never decoded"):
        seen, skipped, _ = evaluate(shards)
    assert not pkl_marker.exists() and not pth_marker.exists()
    assert skipped == 0 and sorted(seen) == list(range(60))  # their samples still load (image and cls intact)
    # the proof is real: unpickling the member does create the marker
    pickle.loads(pickle.dumps(MarkerPickle(str(pkl_marker))))
    assert pkl_marker.exists()


def test_member_names_that_climb_out_are_never_files(tmp_path):
    write_tiny_shards(tmp_path / "data", [4])
    path = shard(tmp_path / "data", 0)
    with tarfile.open(path, "a") as tar:
        for name in ("../../escaped.png", "/tmp/absolute-escape.cls"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    before = set(os.listdir(tmp_path))
    seen, skipped, _ = evaluate(tmp_path / "data")
    assert sorted(seen) == [0, 1, 2, 3]
    assert set(os.listdir(tmp_path)) == before and not os.path.exists("/tmp/absolute-escape.cls")


def test_a_dead_worker_is_an_error_not_a_hang(shards):
    def dies_on_sample_30(image):
        if index_of_image(MaybePILToTensor()(image))[0] == 30:
            os._exit(1)
        return MaybePILToTensor()(image)

    loader = open_loader(
        spec_for(shards, split="train", batch_size=4, transform=dies_on_sample_30, training=False, num_workers=2)
    )
    with pytest.raises(UserError, match="worker of rank 0 died .*exited unexpectedly.*own output above"):
        list(loader)


@pytest.mark.parametrize(
    "torch_message, advice",
    [
        ("DataLoader worker (pid 41) is killed by signal: Killed. ", "out-of-memory killer"),
        ("DataLoader worker (pid 41) exited unexpectedly with exit code 1. Details are lost", "own output above"),
        ("DataLoader worker (pid(s) 41, 42) exited unexpectedly", "own output above"),
        ("DataLoader worker (pid 41) is killed by signal: Segmentation fault. ", "own output above"),
    ],
)
def test_every_wording_of_a_dead_worker_becomes_one_sentence(torch_message, advice):
    from vitmpp.common.distributed import explain_failure

    explained = explain_failure(RuntimeError(torch_message), rank=1)
    assert isinstance(explained, UserError)
    assert str(explained).startswith("A data-loading worker of rank 1 died (DataLoader worker (pid")
    assert advice in str(explained) and str(explained).endswith("rerun with --resume auto.")
    assert explain_failure(RuntimeError("CUDA out of memory"), rank=1) is None
