"""The optional DALI training loader (`data.loader=dali`, datasets/dali_loader.py, docs/dali.md).

Every pipeline test here runs DALI's CPU pipeline (`dali_device="cpu"`: the same reader, seeds and ops as the
GPU one, with a CPU decode and crop), so it runs on machines without a GPU; the GPU pipeline itself
is not exercised here."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import tarfile

import numpy as np
import pytest
import torch


def _has_dali() -> bool:
    try:
        importlib.import_module("nvidia.dali")
    except ImportError:
        return False
    return True


HAS_DALI = _has_dali()
# the pipeline tests need the [dali] extra (not in dev: CI runs the config, wiring and install-message tests)
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")

from datasets_helpers import index_of_image, spec_for, write_tiny_shards  # noqa: E402
from engine_helpers import TINY, python_cmd, run  # noqa: E402
from vitmpp.common.config import load_config  # noqa: E402
from vitmpp.common.errors import ConfigError, UserError  # noqa: E402
from vitmpp.datasets import eval_transform, pretrain_transform  # noqa: E402
from vitmpp.datasets.dali_loader import open_dali_loader  # noqa: E402

LENGTHS = [7, 5, 9]  # uneven on purpose: 21 samples


def cpu_loader(spec, **kwargs):
    return open_dali_loader(spec, dali_device="cpu", **kwargs)


def collect(loader):
    return [(b.images.clone(), b.labels.clone(), b.indices.clone()) for b in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """Flat images that carry their own index and label in their colour (exact through any crop)."""
    out = tmp_path_factory.mktemp("dali_coded")
    write_tiny_shards(out, LENGTHS)
    return out


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """Noisy images, so different crops and flips give different pixels."""
    out = tmp_path_factory.mktemp("dali_textured")
    write_tiny_shards(out, LENGTHS, textured=True)
    return out


@needs_dali
def test_batches_follow_the_contract_and_labels_match_the_manifest(coded):
    spec = spec_for(coded, batch_size=4, transform=pretrain_transform(8), training=True, seed=3, num_workers=1)
    loader = cpu_loader(spec)
    assert len(loader) == 21 // 4
    labels_of = spec.manifest.labels_array("train")
    seen = []
    for batch in loader:
        assert batch.images.shape == (4, 3, 8, 8) and batch.images.dtype == torch.uint8
        assert batch.images.device == torch.device("cpu")
        assert batch.labels.dtype == torch.int64 and batch.indices.dtype == torch.int64
        assert batch.skipped.dtype == torch.int64 and batch.skipped.ndim == 0 and int(batch.skipped) == 0
        assert (batch.indices >= 0).all() and (batch.indices < 21).all()
        # the label read from the sample's .cls is the manifest's label of the index found from source_info
        assert batch.labels.tolist() == labels_of[batch.indices.numpy()].tolist()
        # ... and the image is that sample's (its colour encodes its index and label)
        assert [index_of_image(im) for im in batch.images] == list(zip(batch.indices.tolist(), batch.labels.tolist()))
        seen += batch.indices.tolist()
    assert len(seen) == len(set(seen)) == 20, "one epoch reads distinct samples"
    assert loader.skipped_samples == 0


@needs_dali
def test_pixel_statistics_are_those_of_the_data(digits16):
    from vitmpp.datasets import read_manifest
    from vitmpp.datasets.decoders import decode_array
    from vitmpp.datasets.samples import Tally, read_shard

    manifest = read_manifest(digits16)
    spec = spec_for(
        digits16,
        manifest=manifest,
        batch_size=64,
        transform=pretrain_transform(16, scale=(0.9, 1.0)),
        training=True,
        seed=0,
        num_workers=1,
    )
    images = torch.cat([b.images for b in cpu_loader(spec)]).float()
    info = manifest.split("train")
    originals = np.stack(
        [
            decode_array(raw, manifest.num_classes, None)[0]
            for raw in read_shard(manifest.shard_urls("train")[0], 0, info.shard_lengths[0], None, Tally())
        ]
    ).astype(np.float64)
    # nearly whole crops of the same digits: the same mean brightness and spread, per channel
    assert abs(images.mean().item() - originals.mean()) < 0.05 * 255, (images.mean().item(), originals.mean())
    assert abs(images.std().item() - originals.std()) < 0.15 * originals.std()
    assert images.amax().item() >= 250 and images.amin().item() <= 5, "the full range of the digits"


@needs_dali
def test_flip_probability_one_mirrors_the_same_crops(textured):
    plain = spec_for(textured, batch_size=4, transform=pretrain_transform(8, hflip=0.0), training=True, seed=1)
    flipped = spec_for(textured, batch_size=4, transform=pretrain_transform(8, hflip=1.0), training=True, seed=1)
    a, b = collect(cpu_loader(plain)), collect(cpu_loader(flipped))
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a, b)), "same samples"
    assert all(torch.equal(x[0].flip(-1), y[0]) for x, y in zip(a, b)), "the same crops, mirrored"
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


@needs_dali
@pytest.mark.parametrize("batches_per_epoch", [None, 7])
def test_ranks_yield_equal_counts_of_disjoint_samples(coded, batches_per_epoch):
    loaders = [
        cpu_loader(
            spec_for(
                coded,
                batch_size=2,
                transform=pretrain_transform(8),
                training=True,
                seed=5,
                rank=r,
                world_size=2,
                batches_per_epoch=batches_per_epoch,
            )
        )
        for r in range(2)
    ]
    expected = batches_per_epoch or 21 // (2 * 2)
    assert [len(loader) for loader in loaders] == [expected, expected]
    indices = [torch.cat([b.indices for b in loader]).tolist() for loader in loaders]
    assert [len(i) for i in indices] == [2 * expected] * 2, "every rank yields exactly its count"
    assert not set(indices[0]) & set(indices[1]), "the ranks read disjoint samples"
    if batches_per_epoch is None:
        assert all(len(set(i)) == len(i) for i in indices)


@needs_dali
def test_resume_at_start_batch_equals_the_rest_of_the_epoch(textured):
    spec = spec_for(textured, batch_size=3, transform=pretrain_transform(8), training=True, seed=2, batches_per_epoch=6)
    whole = collect(cpu_loader(spec, epoch=1))
    for k in (1, 4, 6):
        resumed = cpu_loader(spec, epoch=1, start_batch=k)
        assert len(resumed) == 6 - k
        assert same(collect(resumed), whole[k:]), f"start_batch={k}"
    assert not same(whole[1:], whole[:-1])


@needs_dali
def test_order_and_augmentation_are_a_function_of_seed_epoch_and_rank(textured):
    def batches(seed=0, epoch=0, rank=0):
        return collect(
            cpu_loader(
                spec_for(
                    textured,
                    batch_size=4,
                    transform=pretrain_transform(8),
                    training=True,
                    seed=seed,
                    rank=rank,
                    world_size=2,
                ),
                epoch=epoch,
            )
        )

    first = batches()
    assert same(first, batches()), "same seed, epoch and rank: the same batches, bit for bit"
    loader = cpu_loader(
        spec_for(textured, batch_size=4, transform=pretrain_transform(8), training=True, seed=0, world_size=2)
    )
    assert same(collect(loader), collect(loader)), "iterating again replays the epoch"
    for other in (batches(epoch=1), batches(seed=1)):
        assert not same(first, other)
        assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))


@needs_dali
def test_crops_are_drawn_anew_each_epoch_and_seed_on_the_same_order(tmp_path):
    write_tiny_shards(tmp_path, [12], textured=True)  # one shard, no shuffle buffer: the order never changes

    def batches(seed=0, epoch=0):
        return collect(
            cpu_loader(
                spec_for(
                    tmp_path, batch_size=4, transform=pretrain_transform(8), training=True, seed=seed, shuffle_buffer=1
                ),
                epoch=epoch,
            )
        )

    first = batches()
    for other in (batches(epoch=1), batches(seed=1)):
        assert all(torch.equal(a[2], b[2]) for a, b in zip(first, other)), "the same samples in the same order"
        assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, other)), "other crops and flips"


def damage_png(path, nth: int) -> str:
    """Overwrite all but the signature of the nth PNG member of a real tar, in place; returns its name."""
    with tarfile.open(path) as tar:
        member = [m for m in tar if m.name.endswith(".png")][nth]
    with open(path, "r+b") as f:
        f.seek(member.offset_data + 8)
        f.write(b"\xff" * (member.size - 8))
    return member.name


@needs_dali
def test_a_corrupt_image_stops_with_a_user_error_naming_shard_and_member(tmp_path):
    write_tiny_shards(tmp_path, LENGTHS)
    shard = tmp_path / "tiny-train-000001.tar"
    member = damage_png(shard, 2)
    spec = spec_for(tmp_path, batch_size=4, transform=pretrain_transform(8), training=True, seed=0)
    with pytest.raises(UserError) as err:
        list(cpu_loader(spec))
    text = str(err.value)
    assert f"'{member}'" in text and f"'{shard}'" in text, text
    assert "data.loader=shards" in text and "make_shards" in text and "\n" not in text


@needs_dali
def test_streamed_shards_are_refused(coded):
    spec = spec_for(
        ["http://example.invalid/tiny-train-000000.tar"],
        manifest=coded,
        batch_size=4,
        transform=pretrain_transform(8),
        training=True,
    )
    with pytest.raises(
        UserError,
        match=r"^data.loader=dali reads local shards only, and 'http://example.invalid/"
        r"tiny-train-000000.tar' is streamed; [^.]*data.loader=shards\.$",
    ):
        cpu_loader(spec)


@needs_dali
def test_what_the_backend_cannot_do_is_refused_in_one_sentence(coded):
    base = dict(batch_size=4, training=True, transform=pretrain_transform(8))
    with pytest.raises(UserError, match=r"runs only RandomResizedCrop \+ flip .*data.loader=shards for this stage\.$"):
        cpu_loader(spec_for(coded, **{**base, "transform": eval_transform(8)}))
    with pytest.raises(UserError, match=r"data.label_fraction < 1.*data.loader=shards\.$"):
        cpu_loader(spec_for(coded, keep_indices=tuple(range(10)), **base))
    with pytest.raises(UserError, match=r"data.views_per_image=1"):
        cpu_loader(spec_for(coded, views_per_image=2, **base))
    with pytest.raises(ValueError, match="evaluation uses the shard loader"):
        cpu_loader(spec_for(coded, **{**base, "training": False}))


@needs_dali
def test_public_path_refuses_without_cuda_in_one_sentence(coded, monkeypatch):
    """Refused on every machine: a run on the CPU device (as ACCELERATE_USE_CPU makes it), and a machine
    whose torch sees no CUDA (this one; elsewhere torch is told so)."""
    spec = spec_for(coded, batch_size=4, transform=pretrain_transform(8), training=True)
    sentence = (
        "Key 'data.loader' is 'dali', which decodes and crops on a CUDA GPU, but this run has none ({}); "
        "set data.loader=shards."
    )
    with pytest.raises(UserError) as err:
        open_dali_loader(dataclasses.replace(spec, device="cpu"))
    assert str(err.value) == sentence.format("device cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as err:
        open_dali_loader(spec)
    assert str(err.value) == sentence.format("no CUDA device")


def test_without_dali_installed_the_error_says_how_to_install(coded, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails as if not installed
    spec = spec_for(coded, batch_size=4, transform=pretrain_transform(8), training=True)
    with pytest.raises(UserError, match=r"^data.loader=dali needs NVIDIA DALI, .*pip install -e '\.\[dali\]'"):
        open_dali_loader(spec)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["data.decode=gpu", "data.augment_on=device"], "data.augment_on is 'device' and data.decode is 'gpu'"),
        (["data.augment_on=device"], "data.augment_on is 'device'"),
        (["data.views_per_image=2"], "data.views_per_image is 2"),
    ],
)
def test_config_refuses_dali_with_device_augmentation_or_views(overrides, expected):
    from vitmpp.pretrain.config import PretrainConfig

    assert load_config(PretrainConfig, None, ["data.loader=dali"]).data.loader == "dali"
    with pytest.raises(ConfigError, match="^Key 'data.loader' is 'dali'") as err:
        load_config(PretrainConfig, None, ["data.loader=dali", *overrides])
    assert expected in str(err.value) and str(err.value).endswith("data.loader=shards.")


def test_config_refuses_dali_with_a_label_fraction():
    from vitmpp.finetune.config import FinetuneConfig

    with pytest.raises(ConfigError, match=r"^Key 'data.loader' is 'dali', .*data.label_fraction is 0.5"):
        load_config(FinetuneConfig, None, ["data.loader=dali", "data.label_fraction=0.5"])
    load_config(FinetuneConfig, None, ["data.label_fraction=0.5"])  # the shard loader keeps subsets


def test_pretraining_with_data_loader_dali_opens_the_dali_loader(tmp_path, digits16):
    # ACCELERATE_USE_CPU: a run on the CPU also where a GPU exists, so the refusal (from open_dali_loader,
    # reached only through the engine's wiring) is tried on every machine
    result = run(
        python_cmd("pretrain/main.py") + TINY + ["train.steps=1", "data.loader=dali", f"data.shards={digits16}"],
        cwd=tmp_path,
        check=False,
        timeout=300,
        ACCELERATE_USE_CPU="1",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    expected = (
        "error: Key 'data.loader' is 'dali', which decodes and crops on a CUDA GPU, but this run has none "
        "(device cpu); set data.loader=shards."
        if HAS_DALI
        else "error: data.loader=dali needs NVIDIA DALI, which is not installed; run pip install -e '.[dali]' "
        "(on a CUDA 13 machine) or set data.loader=shards."
    )
    assert "Traceback" not in result.stderr and lines == [expected], result.stderr[-3000:]
