"""The shard loader's contract: counts, exactly-once evaluation, determinism, resume."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import numpy as np
import pytest
import torch
from timm.data.transforms import MaybePILToTensor

from datasets_helpers import index_of_image, spec_for, write_tiny_shards
from vitmpp.common.errors import UserError
from vitmpp.datasets import (
    Batch,
    Loader,
    LoaderSpec,
    ShardLoader,
    eval_transform,
    finetune_transform,
    normalize_batch,
    open_loader,
    pretrain_transform,
    read_manifest,
)

IDENTITY = MaybePILToTensor()  # PIL -> uint8 CHW, pixels untouched


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Train shards of 10, 10, 50 and 7 samples; validation shards of 9 and 4."""
    out = tmp_path_factory.mktemp("uneven")
    write_tiny_shards(out, [10, 10, 50, 7], extra_splits={"validation": [9, 4]}, textured=True)
    return out


def check_batch_contents(batch: Batch, num_classes: int = 5) -> None:
    """Every image is the one its index names, with its label (padding repeats a real one)."""
    for image, label, index in zip(batch.images, batch.labels.tolist(), batch.indices.tolist()):
        image_index, image_label = index_of_image(image)
        assert image_label == label == image_index % num_classes
        if index >= 0:
            assert image_index == index


def run_ranks(shards, world: int, **kwargs) -> list[list[Batch]]:
    return [
        list(open_loader(spec_for(shards, rank=r, world_size=world, transform=IDENTITY, **kwargs)))
        for r in range(world)
    ]


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    "split, world, workers, batch",
    [
        ("train", 2, 2, 8),  # uneven shards, 2 ranks x 2 workers
        ("validation", 2, 2, 4),  # fewer shards (2) than ranks x workers (4)
        ("validation", 3, 2, 5),  # 13 samples over 3 ranks: 5, 5, 3
        ("validation", 8, 1, 2),  # more ranks than samples per rank can fill: some ranks are pure padding
    ],
)
def test_evaluation_sees_every_sample_exactly_once(uneven, split, world, workers, batch):
    n = read_manifest(uneven).split(split).num_samples
    ranks = run_ranks(uneven, world, split=split, batch_size=batch, training=False, num_workers=workers)
    counts = {len(batches) for batches in ranks}
    assert len(counts) == 1, f"ranks yield different batch counts {counts}"
    real = [i for batches in ranks for b in batches for i in b.indices.tolist() if i >= 0]
    assert sorted(real) == list(range(n))
    for batches in ranks:
        for b in batches:
            assert b.images.shape == (batch, 3, 16, 16) and b.images.dtype == torch.uint8
            assert b.labels.dtype == torch.int64 and b.indices.dtype == torch.int64
            assert int(b.skipped) == 0
            check_batch_contents(b)


def test_evaluation_labels_match_the_manifest(uneven):
    labels = read_manifest(uneven).labels("train")
    (batches,) = run_ranks(uneven, 1, split="train", batch_size=16, training=False, num_workers=0)
    for b in batches:
        for index, label in zip(b.indices.tolist(), b.labels.tolist()):
            if index >= 0:
                assert labels[index] == label


def test_evaluation_with_keep_indices(uneven):
    keep = [0, 3, 11, 12, 40, 76]
    ranks = run_ranks(uneven, 2, split="train", batch_size=2, training=False, num_workers=2, keep_indices=keep)
    real = sorted(i for batches in ranks for b in batches for i in b.indices.tolist() if i >= 0)
    assert real == keep
    assert (
        len(
            open_loader(
                spec_for(
                    uneven,
                    split="train",
                    batch_size=2,
                    transform=IDENTITY,
                    training=False,
                    keep_indices=keep,
                    rank=0,
                    world_size=2,
                )
            )
        )
        == 2
    )


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("world, workers", [(2, 2), (3, 2), (1, 0)])
def test_training_ranks_yield_equal_full_batches(uneven, world, workers):
    batch = 4
    ranks = run_ranks(
        uneven, world, split="train", batch_size=batch, training=True, num_workers=workers, shuffle_buffer=20
    )
    expected = 77 // (batch * world)
    for batches in ranks:
        assert len(batches) == expected
        for b in batches:
            assert b.images.shape == (batch, 3, 16, 16)
            assert (b.indices >= 0).all()
            check_batch_contents(b)


def test_training_batches_per_epoch_and_len(uneven):
    loader = open_loader(
        spec_for(
            uneven, split="train", batch_size=4, transform=IDENTITY, training=True, batches_per_epoch=30, num_workers=2
        ),
        start_batch=5,
    )
    assert loader.batches_per_epoch == 30 and len(loader) == 25 and loader.num_samples == 77
    assert len(list(loader)) == 25  # more than one pass over the shards: they repeat, never run dry


def test_training_with_keep_indices(uneven):
    keep = list(range(0, 77, 3))  # 26 samples
    loader = open_loader(
        spec_for(
            uneven,
            split="train",
            batch_size=4,
            transform=IDENTITY,
            training=True,
            keep_indices=keep,
            num_workers=2,
            shuffle_buffer=10,
        )
    )
    assert loader.num_samples == 26 and loader.batches_per_epoch == 6
    seen = [i for b in loader for i in b.indices.tolist()]
    assert len(seen) == 24 and set(seen) <= set(keep)


def order(shards, epoch: int = 0, **kwargs) -> list[list[int]]:
    loader = open_loader(
        spec_for(
            shards,
            split="train",
            batch_size=4,
            transform=IDENTITY,
            training=True,
            num_workers=2,
            shuffle_buffer=16,
            **kwargs,
        ),
        epoch=epoch,
    )
    return [b.indices.tolist() for b in loader]


def test_order_is_a_function_of_seed_and_epoch(uneven):
    first = order(uneven, seed=1, epoch=3)
    assert order(uneven, seed=1, epoch=3) == first
    assert order(uneven, seed=1, epoch=4) != first
    assert order(uneven, seed=2, epoch=3) != first
    # ranks differ, and neither depends on how many ranks were asked for before
    assert order(uneven, seed=1, epoch=3, rank=1, world_size=2) != order(uneven, seed=1, epoch=3, rank=0, world_size=2)


def test_a_single_epoch_covers_the_data_about_once(uneven):
    # one reader: the epoch is 76 of the 77 samples, each once (the buffer drains, it never reads ahead)
    loader = open_loader(
        spec_for(
            uneven, split="train", batch_size=4, transform=IDENTITY, training=True, num_workers=0, shuffle_buffer=16
        )
    )
    seen = Counter(i for b in loader for i in b.indices.tolist())
    assert sum(seen.values()) == 76 and max(seen.values()) == 1
    # two workers split the shards unevenly (10+50 vs 10+7 samples): some repeats, most samples seen
    seen = Counter(i for i in sum(order(uneven, seed=0, epoch=0), []))
    assert len(seen) >= 0.6 * 77


@pytest.mark.parametrize("workers, start", [(0, 5), (2, 3), (2, 4), (3, 7)])
def test_resume_at_start_batch_equals_the_rest_of_the_epoch(uneven, workers, start):
    transform = pretrain_transform(16, scale=(0.3, 1.0))  # random: the augmentations must repeat too
    spec = spec_for(
        uneven,
        split="train",
        batch_size=3,
        transform=transform,
        training=True,
        seed=5,
        rank=1,
        world_size=2,
        num_workers=workers,
        shuffle_buffer=12,
    )
    full = list(open_loader(spec, epoch=2))
    resumed = list(open_loader(spec, epoch=2, start_batch=start))
    assert len(resumed) == len(full) - start
    for a, b in zip(full[start:], resumed):
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images)


def test_random_augmentations_repeat_with_the_seed(uneven):
    transform = pretrain_transform(16)

    def make():
        return [
            b.images
            for b in open_loader(
                spec_for(uneven, split="train", batch_size=4, transform=transform, training=True, num_workers=2, seed=9)
            )
        ]

    first, second = make(), make()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_leaves_the_global_random_state_alone(uneven, workers):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = []
    for _ in range(4):  # the caller's own draws between batches, without a loader
        expected.append((torch.rand(3), random.random(), np.random.rand()))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    drawn = []
    loader = open_loader(
        spec_for(
            uneven,
            split="train",
            batch_size=4,
            transform=pretrain_transform(16),
            training=True,
            num_workers=workers,
            batches_per_epoch=4,
        )
    )
    for _ in loader:
        drawn.append((torch.rand(3), random.random(), np.random.rand()))
    assert len(drawn) == len(expected)
    for (t1, r1, n1), (t2, r2, n2) in zip(expected, drawn):
        assert torch.equal(t1, t2) and r1 == r2 and n1 == n2


# ----------------------------------------------------------------------------- inputs


def test_shards_may_be_named_by_json_pattern_or_list(uneven):
    whole = open_loader(spec_for(uneven, split="validation", batch_size=4, transform=IDENTITY, training=False))
    by_json = open_loader(
        spec_for(uneven / "_info.json", split="validation", batch_size=4, transform=IDENTITY, training=False)
    )
    pattern = str(uneven / "tiny-validation-{000000..000001}.tar")
    by_pattern = open_loader(spec_for(pattern, split="validation", batch_size=4, transform=IDENTITY, training=False))
    assert whole.num_samples == by_json.num_samples == by_pattern.num_samples == 13
    # a subset of the shards: indices stay those of the split
    one = open_loader(
        spec_for(
            [str(uneven / "tiny-validation-000001.tar")],
            split="validation",
            batch_size=4,
            transform=IDENTITY,
            training=False,
            num_workers=0,
        )
    )
    assert one.num_samples == 4
    assert sorted(i for b in one for i in b.indices.tolist() if i >= 0) == [9, 10, 11, 12]


def test_a_shard_of_another_split_is_refused(uneven):
    with pytest.raises(UserError, match="tiny-train-000000.tar' is not in split 'validation'"):
        open_loader(
            spec_for(
                [str(uneven / "tiny-train-000000.tar")],
                split="validation",
                batch_size=4,
                transform=IDENTITY,
                training=False,
            )
        )


def test_too_small_a_split_for_one_global_batch_is_a_user_error(uneven):
    with pytest.raises(UserError, match="fewer than one global batch"):
        open_loader(spec_for(uneven, split="validation", batch_size=8, world_size=2, transform=IDENTITY, training=True))


# ----------------------------------------------------------------------------- the spec and the contract


def test_open_loader_returns_a_loader_and_len_is_known_before_iterating(uneven):
    loader = open_loader(
        spec_for(uneven, split="train", batch_size=4, transform=IDENTITY, training=True, num_workers=0)
    )
    assert isinstance(loader, Loader) and isinstance(loader, ShardLoader)
    assert len(loader) == 77 // 4 and loader.skipped_samples == 0
    assert len(list(loader)) == len(loader)
    assert not isinstance(object(), Loader)


def test_one_spec_serves_every_epoch_without_rereading_the_manifest(tmp_path):
    write_tiny_shards(tmp_path, [10, 10, 12])
    spec = spec_for(
        tmp_path, split="train", batch_size=4, transform=IDENTITY, training=True, num_workers=0, shuffle_buffer=8
    )
    (tmp_path / "_info.json").write_text("not json any more")  # reading it now would fail
    epochs = [[b.indices.tolist() for b in open_loader(spec, epoch=e)] for e in range(2)]
    assert len(epochs[0]) == len(epochs[1]) == 8 and epochs[0] != epochs[1]
    assert [b.indices.tolist() for b in open_loader(spec, epoch=1, start_batch=3)] == epochs[1][3:]


def test_the_spec_is_frozen_and_normalises_its_inputs(uneven):
    manifest = read_manifest(uneven)
    spec = LoaderSpec(
        shards=uneven, manifest=manifest, batch_size=4, transform=IDENTITY, training=True, keep_indices=np.arange(5)
    )
    assert spec.shards == str(uneven) and spec.keep_indices == (0, 1, 2, 3, 4) and spec.split == "train"
    assert LoaderSpec(
        shards=[uneven / "a.tar"], manifest=manifest, batch_size=1, transform=IDENTITY, training=False
    ).shards == (str(uneven / "a.tar"),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.batch_size = 8
    assert dataclasses.replace(spec, split="validation").manifest is manifest
    with pytest.raises(TypeError, match="Manifest"):
        LoaderSpec(shards=uneven, manifest=str(uneven), batch_size=4, transform=IDENTITY, training=True)
    with pytest.raises(TypeError):
        LoaderSpec(uneven, manifest, 4, IDENTITY, True)  # keyword-only: 16 fields are never positional


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"batch_size": 0}, "bad geometry"),
        ({"rank": 2, "world_size": 2}, "bad geometry"),
        ({"world_size": 0}, "bad geometry"),
        ({"num_workers": -1}, "bad geometry"),
        ({"batches_per_epoch": 0}, "batches_per_epoch"),
        ({"max_skip_fraction": 1.5}, "max_skip_fraction"),
        ({"prefetch_factor": 0}, "prefetch_factor"),
    ],
)
def test_an_impossible_geometry_is_refused_by_the_spec(uneven, fields, message):
    with pytest.raises(ValueError, match=message):
        spec_for(uneven, **{"batch_size": 4, "transform": IDENTITY, "training": True, **fields})


def test_the_position_is_checked_when_opening(uneven):
    train = spec_for(uneven, batch_size=4, transform=IDENTITY, training=True, batches_per_epoch=5)
    with pytest.raises(ValueError, match="outside the epoch"):
        open_loader(train, start_batch=6)
    with pytest.raises(ValueError, match="must not be negative"):
        open_loader(train, epoch=-1)
    evaluation = dataclasses.replace(train, training=False, batches_per_epoch=None)
    with pytest.raises(ValueError, match="training loaders only"):
        open_loader(evaluation, start_batch=1)


def test_one_way_to_open_a_loader_and_imagenet_constants_are_timm_s():
    import timm.data

    import vitmpp.datasets as datasets

    assert not hasattr(datasets, "build_loader")
    assert datasets.IMAGENET_MEAN is timm.data.IMAGENET_DEFAULT_MEAN
    assert datasets.IMAGENET_STD is timm.data.IMAGENET_DEFAULT_STD


# ----------------------------------------------------------------------------- transforms


def test_transforms_give_uint8_chw_and_normalisation_happens_on_the_batch():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for transform, size in (
        (pretrain_transform(32), 32),
        (finetune_transform(32), 32),
        (eval_transform(32), 32),
        (eval_transform(224), 224),
    ):
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == (3, size, size)
        assert transform.decode_min_side >= size
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = (batch.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalize_batch(batch, mean, std), expected, atol=1e-5)
    as_tensors = normalize_batch(batch, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std))
    assert torch.allclose(as_tensors, expected, atol=1e-5) and as_tensors.dtype == torch.float32


def test_eval_transform_of_tiny_images_keeps_the_whole_image():
    from PIL import Image

    image = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    assert torch.equal(eval_transform(32)(image), torch.from_numpy(np.array(image)).permute(2, 0, 1))


def test_pipe_urls_are_passed_to_webdataset_with_the_manifest_given(uneven):
    urls = [f"pipe:cat {uneven / f'tiny-validation-{k:06d}.tar'}" for k in (0, 1)]
    loader = open_loader(
        spec_for(
            urls, manifest=uneven, split="validation", batch_size=4, transform=IDENTITY, training=False, num_workers=0
        )
    )
    assert sorted(i for b in loader for i in b.indices.tolist() if i >= 0) == list(range(13))


def test_large_jpegs_are_decoded_at_a_reduced_scale_when_the_transform_allows(tmp_path):
    import io

    from PIL import Image

    from vitmpp.datasets.decoders import decode_sample
    from vitmpp.datasets.samples import RawSample

    yy, xx = np.mgrid[0:512, 0:512]
    smooth = np.stack([xx // 2, yy // 2, (xx + yy) // 4], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    raw = RawSample(0, "mem", {"jpg": buf.getvalue(), "cls": b"1"})
    transform = eval_transform(32)
    drafted, label = decode_sample(raw, 2, transform.decode_min_side)
    full, _ = decode_sample(raw, 2, None)
    assert label == 1 and full.size == (512, 512)
    assert drafted.size == (64, 64)  # 1/8 scale is still at least the 32 pixels the transform needs
    difference = (transform(drafted).float() - transform(full).float()).abs().mean()
    assert difference < 2.0


def test_finetune_transform_survives_zero_bit_posterize():
    """RandAugment's increasing posterize reaches 0 bits at the top magnitude; Pillow 13 refuses it."""
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from vitmpp.datasets import finetune_transform

    transform = finetune_transform(16, auto_augment="rand-m10-n1-inc1")
    augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    augment.ops = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    augment.ops[0].prob = 1.0
    out = transform(Image.new("RGB", (16, 16), (200, 100, 50)))
    assert out.dtype == torch.uint8 and int(out.max()) == 0


# ----------------------------------------------------------------------------- workers kept across epochs


def _pool_pids() -> list[set[int]]:
    from vitmpp.datasets.pool import kept_worker_pids

    return kept_worker_pids()


def test_workers_are_kept_across_epochs_and_give_the_batches_of_fresh_ones(uneven):
    """Epochs 1 and 2 come from passes the kept workers started ahead; a resume asks for another."""
    from vitmpp.datasets.loader import close_idle_workers

    close_idle_workers()
    spec = spec_for(
        uneven,
        split="train",
        batch_size=3,
        transform=pretrain_transform(16, scale=(0.3, 1.0)),
        training=True,
        seed=5,
        num_workers=2,
        shuffle_buffer=12,
        batches_per_epoch=7,
    )
    try:
        epochs = {}
        for epoch in range(3):
            epochs[epoch] = list(open_loader(spec, epoch=epoch))
            assert len(_pool_pids()) == 1
            if epoch == 0:
                pids = _pool_pids()[0]
            assert _pool_pids()[0] == pids  # the same two processes served every epoch
        resumed = list(open_loader(spec, epoch=1, start_batch=4))
        evaluation_spec = dataclasses.replace(spec, training=False, split="validation")
        evaluation = [b.indices for b in open_loader(evaluation_spec)]
        assert _pool_pids()[0] == pids and len(_pool_pids()) == 2  # evaluation has its own pool
        again = [b.indices for b in open_loader(evaluation_spec)]  # the pass its workers started ahead
        assert len(again) == len(evaluation) and all(torch.equal(a, b) for a, b in zip(evaluation, again))
        close_idle_workers()
        assert _pool_pids() == []
        for epoch, batches in epochs.items():  # fresh workers, epoch by epoch
            fresh = list(open_loader(spec, epoch=epoch))
            close_idle_workers()
            assert all(
                torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices) for a, b in zip(batches, fresh)
            )
        assert all(torch.equal(a.images, b.images) for a, b in zip(epochs[1][4:], resumed))
        assert sorted(i for b in evaluation for i in b.tolist() if i >= 0) == list(range(13))
        # a pass stopped before its last batch ends its workers; another spec gets its own
        for _ in open_loader(spec, epoch=0):
            break
        assert _pool_pids() == []
        list(open_loader(dataclasses.replace(spec, seed=6)))
        list(open_loader(spec))
        assert len(_pool_pids()) == 2
    finally:
        close_idle_workers()


def test_a_test_that_leaves_loader_workers_running_fails(tmp_path):
    """tests/conftest.py's autouse fixture: a loader left open with live workers fails its test, one that
    is read to the end passes (its kept workers are closed when the test ends)."""
    import subprocess
    import sys
    import textwrap

    from pathlib import Path

    tests = Path(__file__).parent
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(tests)!r})
        spec = importlib.util.spec_from_file_location("suite_conftest", {str(tests / "conftest.py")!r})
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        loader_workers_released = suite.loader_workers_released  # the fixture under test
    """)
    )
    (tmp_path / "test_leak.py").write_text(
        textwrap.dedent("""
        from datasets_helpers import spec_for, write_tiny_shards
        from vitmpp.datasets import eval_transform, open_loader

        def spec(shards):
            return spec_for(shards.base, manifest=shards, batch_size=4, num_workers=2, transform=eval_transform(16),
                            training=False)

        OPEN = []

        def test_reads_to_the_end(tmp_path):
            shards = write_tiny_shards(tmp_path / "s", [8, 8])
            assert sum(len(b.labels) for b in open_loader(spec(shards))) == 16

        def test_leaves_workers_running(tmp_path):
            shards = write_tiny_shards(tmp_path / "s", [8, 8])
            batches = iter(open_loader(spec(shards)))
            next(batches)
            OPEN.append(batches)  # never finished nor closed
    """)
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert "2 passed, 1 error" in result.stdout, result.stdout[-3000:]  # the error: the leaking test's teardown
    assert "loader worker processes still running after the test" in result.stdout
