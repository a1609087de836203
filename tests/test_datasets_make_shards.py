"""make_shards: digits round trip, timm interop, the four sources, never leaving a half-written folder,
and the embedded digits shards written once per filesystem however many processes ask at once."""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import MaybePILToTensor

from datasets_helpers import spec_for
from vitmpp.common.errors import UserError
from vitmpp.datasets import digits_shards, open_loader, read_manifest, write_shards
from vitmpp.datasets import digits_cache
from vitmpp.datasets import make_shards as make_shards_module
from vitmpp.datasets import writer as writer_module
from vitmpp.datasets.sources import digits_source
from vitmpp.datasets.splits import split_three_ways

IDENTITY = MaybePILToTensor()


@pytest.fixture(scope="module")
def digits_png(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("d") / "digits", "digits", maxcount=300, progress=False)


def expected_digit_images(val_fraction=0.1, seed=0, image_size=32):
    """The writer's order, rebuilt: index k of a split is source item order[k] (digits: a fixed 20% test split)."""
    source = digits_source(image_size)
    return source, split_three_ways([it.label for it in source.items], val_fraction, 0.2, seed, test_seed=0)


def load_all(root, split):
    out = {}
    for batch in open_loader(
        spec_for(root, split=split, batch_size=128, transform=IDENTITY, training=False, num_workers=0)
    ):
        for image, label, index in zip(batch.images, batch.labels.tolist(), batch.indices.tolist()):
            if index >= 0:
                out[index] = (image, label)
    return out


# ----------------------------------------------------------------------------- digits round trip


def test_digits_round_trip_png_is_exact(digits_png):
    manifest = digits_png
    assert sum(info.num_samples for info in manifest.splits.values()) == 1797
    assert manifest.num_classes == 10 and manifest.image_size == 32
    source, order = expected_digit_images()
    for split in ("train", "validation", "test"):
        loaded = load_all(manifest.base, split)
        assert sorted(loaded) == list(range(manifest.split(split).num_samples))
        assert [loaded[i][1] for i in sorted(loaded)] == manifest.labels(split)
        for index, (image, label) in loaded.items():
            item = source.items[order[split][index]]
            assert label == item.label
            assert torch.equal(image, torch.from_numpy(np.array(item.load().image)).permute(2, 0, 1))


def test_digits_round_trip_jpeg_within_tolerance(tmp_path):
    manifest = write_shards(tmp_path / "dj", "digits", fmt="jpg", progress=False)
    source, order = expected_digit_images()
    total, errors = 0, []
    for split in ("train", "validation", "test"):
        for index, (image, label) in load_all(manifest.base, split).items():
            item = source.items[order[split][index]]
            assert label == item.label
            reference = torch.from_numpy(np.array(item.load().image)).permute(2, 0, 1)
            errors.append((image.float() - reference.float()).abs().mean().item())
            total += 1
    assert total == 1797
    assert max(errors) < 1.5 and np.mean(errors) < 1.0  # quality 95: about half a grey level per pixel


def test_stratified_splits_keep_class_proportions(digits_png):
    train, val, test = (
        np.bincount(digits_png.labels(split), minlength=10) for split in ("train", "validation", "test")
    )
    whole = train + val + test
    assert np.all(np.abs(val - 0.1 * whole) <= 1) and np.all(np.abs(test - 0.2 * whole) <= 1)


def test_the_digits_test_split_is_the_same_for_every_seed(digits_png, tmp_path):
    other = write_shards(tmp_path / "seed5", "digits", seed=5, maxcount=300, progress=False)
    assert other.split("test").num_samples == digits_png.split("test").num_samples == 359
    # the write order is seeded; the members are what must agree
    ours = {tuple(np.asarray(img).ravel()) for img, _ in load_all(digits_png.base, "test").values()}
    theirs = {tuple(np.asarray(img).ravel()) for img, _ in load_all(other.base, "test").values()}
    assert ours == theirs
    assert load_all(other.base, "validation").keys() and other.labels("validation") != digits_png.labels("validation")
    with pytest.raises(UserError, match="fixed test split"):
        write_shards(tmp_path / "x", "digits", test_fraction=0.3, progress=False)


def test_three_fractions_of_a_pool_and_the_manifest_says_how(tmp_path):
    manifest = write_shards(
        tmp_path / "s",
        "synthetic",
        count=200,
        num_classes=4,
        val_fraction=0.1,
        test_fraction=0.2,
        seed=3,
        progress=False,
    )
    counts = {split: manifest.split(split).num_samples for split in manifest.splits}
    assert counts == {"train": 140, "validation": 20, "test": 40}  # both fractions of the whole: 5 and 10 per class
    made = manifest.extra["vitmpp"]["splits_made_by"]
    assert made["test"] == "a class-stratified --test-fraction 0.2 (seed 3)"
    assert "--val-fraction 0.1" in made["validation"] and "--test-fraction 0.2" in made["train"]
    with pytest.raises(UserError, match="leave nothing for training"):
        write_shards(tmp_path / "y", "synthetic", count=20, val_fraction=0.5, test_fraction=0.5, progress=False)


def test_timm_reads_our_shards(digits_png):
    from timm.data import create_dataset

    for split in ("train", "validation"):
        dataset = create_dataset(f"wds/{digits_png.name}", root=digits_png.base, split=split)
        labels = [int(target) for _, target in dataset]
        assert labels == digits_png.labels(split)
        image, _ = next(iter(dataset))
        assert image.size == (32, 32) and image.mode == "RGB"


def test_shards_are_named_keyed_and_typed_as_documented(digits_png):
    info = digits_png.split("train")
    assert info.filenames[0] == "digits-train-000000.tar" and info.shard_lengths[0] == 300
    with tarfile.open(Path(digits_png.base) / info.filenames[0]) as tar:
        names = tar.getnames()[:2]
    assert names == ["00000000.cls", "00000000.png"]


def test_digits_shards_is_idempotent(tmp_path):
    folder = digits_shards(16, cache=tmp_path / "cache")
    assert Path(folder) == tmp_path / "cache" / "digits-16px"
    first = read_manifest(folder)
    stamp = os.stat(Path(folder) / "_info.json").st_mtime_ns
    again = read_manifest(digits_shards(16, cache=tmp_path / "cache"))
    assert os.stat(Path(folder) / "_info.json").st_mtime_ns == stamp
    assert again.splits == first.splits
    # a damaged cache is rewritten
    os.remove(Path(first.shard_urls("train")[0]))
    digits_shards(16, cache=tmp_path / "cache")
    assert os.path.isfile(first.shard_urls("train")[0])
    assert read_manifest(digits_shards(24, cache=tmp_path / "cache")).image_size == 24
    # nothing but the folders and their lock files in the cache: no partial copies left behind
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        ".digits-16px.lock",
        ".digits-24px.lock",
        "digits-16px",
        "digits-24px",
    ]


def test_digits_shards_default_to_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VITMPP_CACHE", str(tmp_path / "vitmpp-cache"))
    folder = digits_shards(16)
    assert Path(folder) == tmp_path / "vitmpp-cache" / "digits-16px"
    assert digits_cache.shards_complete(read_manifest(folder))


def _ask_for_digits(cache: str, log: str, barrier, answer: str) -> None:
    """One process (a rank) with its own cache setting: counts its writes in `log`, waits for
    the others at `barrier`, asks for the digits shards and records what it got in `answer`."""
    os.environ["VITMPP_CACHE"] = cache
    real = writer_module.write_shards

    def counted(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"start {os.getpid()} {time.time()}\n")
        time.sleep(1.0)  # hold the lock long enough that another process surely waits for it
        try:
            return real(*args, **kwargs)
        finally:
            with open(log, "a") as f:
                f.write(f"end {os.getpid()} {time.time()}\n")

    writer_module.write_shards = counted  # in this forked child only
    barrier.wait(timeout=60)
    folder = digits_cache.digits_shards(16)
    Path(answer).write_text(json.dumps({"pid": os.getpid(), "folder": folder, "returned": time.time()}))


def _ask_at_once(tmp_path, caches: list[Path]) -> tuple[list[dict], list[list[str]]]:
    """One forked process per cache folder, all asking at once; (their answers, the write log's lines)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # separate processes (separate flocks), no re-import
    log = tmp_path / "writes.log"
    barrier = ctx.Barrier(len(caches))
    answers = [tmp_path / f"answer-{k}.json" for k in range(len(caches))]
    children = [
        ctx.Process(target=_ask_for_digits, args=(str(cache), str(log), barrier, str(answer)))
        for cache, answer in zip(caches, answers)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0
    lines = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return [json.loads(a.read_text()) for a in answers], lines


def test_two_processes_on_one_cache_write_the_digits_shards_once(tmp_path):
    cache = tmp_path / "cache"
    answers, lines = _ask_at_once(tmp_path, [cache, cache])
    starts = [line for line in lines if line[0] == "start"]
    assert len(starts) == 1  # exactly one process wrote
    writer = int(starts[0][1])
    assert {a["pid"] for a in answers} >= {writer}
    assert answers[0]["folder"] == answers[1]["folder"] == str(cache / "digits-16px")
    # the other one waited for the writer to finish instead of reading a half-written folder
    ended = float(next(line for line in lines if line[0] == "end")[2])
    (waiter,) = [a for a in answers if a["pid"] != writer]
    assert waiter["returned"] >= ended
    manifest = read_manifest(answers[0]["folder"])
    assert digits_cache.shards_complete(manifest)
    assert sum(info.num_samples for info in manifest.splits.values()) == 1797
    assert sorted(p.name for p in cache.iterdir()) == [".digits-16px.lock", "digits-16px"]


def test_two_nodes_with_their_own_cache_both_get_the_digits_shards(tmp_path):
    caches = [tmp_path / "node0", tmp_path / "node1"]
    answers, lines = _ask_at_once(tmp_path, caches)
    assert len([line for line in lines if line[0] == "start"]) == 2  # one writer per filesystem
    for answer, cache in zip(answers, caches):
        assert answer["folder"] == str(cache / "digits-16px")
        manifest = read_manifest(answer["folder"])
        assert digits_cache.shards_complete(manifest)
        assert sum(info.num_samples for info in manifest.splits.values()) == 1797


# ----------------------------------------------------------------------------- other sources


def test_synthetic_is_deterministic_by_seed(tmp_path):
    def shard_bytes(out, seed):
        m = write_shards(
            out, "synthetic", count=40, image_size=24, num_classes=4, seed=seed, maxcount=16, progress=False
        )
        return m, [Path(u).read_bytes() for u in m.shard_urls("train")]

    m1, a = shard_bytes(tmp_path / "a", 3)
    _, b = shard_bytes(tmp_path / "b", 3)
    _, c = shard_bytes(tmp_path / "c", 4)
    assert a == b and a != c
    assert m1.num_classes == 4 and m1.image_size == 24
    assert sum(i.num_samples for i in m1.splits.values()) == 40
    images = [
        b.images
        for b in open_loader(
            spec_for(
                m1.base, manifest=m1, split="train", batch_size=8, transform=IDENTITY, training=False, num_workers=0
            )
        )
    ]
    assert images[0].float().std() > 20  # drawn, not blank


@pytest.fixture
def image_tree(tmp_path):
    """Two classes of small images, plus a text file, a corrupt JPEG and a stray file."""
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for _label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (40 + 8 * i, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cat" / "notes.txt").write_text("not an image")
    good = (root / "dog" / "0.jpg").read_bytes()
    (root / "dog" / "broken.jpg").write_bytes(good[: len(good) // 3])
    (root / "readme.md").write_text("stray")
    return root


def test_imagefolder_skips_and_lists_bad_files(image_tree, tmp_path):
    manifest = write_shards(
        tmp_path / "out", "imagefolder", root=image_tree, fmt="jpg", val_fraction=0.2, progress=False
    )
    assert manifest.class_names == ["cat", "dog"]
    assert sum(i.num_samples for i in manifest.splits.values()) == 10
    skipped = {s["path"]: s["reason"] for s in manifest.extra["vitmpp"]["skipped_inputs"]}
    assert set(skipped) == {"cat/notes.txt", "dog/broken.jpg", "readme.md"}
    assert skipped["cat/notes.txt"] == "not an image" and skipped["dog/broken.jpg"].startswith("corrupt image")
    assert manifest.extra["vitmpp"]["num_skipped_inputs"] == 3
    assert manifest.image_size is None  # sizes differ
    # a JPEG input written as jpg keeps its bytes; its json member names the file
    url = manifest.shard_urls("train")[0]
    with tarfile.open(url) as tar:
        members = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:3]}
    origin = json.loads(members["json"])["source"]
    if origin.endswith(".jpg"):
        assert members["jpg"] == (image_tree / origin).read_bytes()


def test_max_size_bounds_the_shorter_side(image_tree, tmp_path):
    manifest = write_shards(
        tmp_path / "small", "imagefolder", root=image_tree, max_size=20, val_fraction=0, progress=False
    )
    assert list(manifest.splits) == ["test", "train"]  # no validation split when val_fraction is 0
    shapes = set()
    for batch in open_loader(
        spec_for(
            manifest.base,
            manifest=manifest,
            split="train",
            batch_size=1,
            transform=IDENTITY,
            training=False,
            num_workers=0,
        )
    ):
        shapes.add(tuple(batch.images.shape[2:]))
    # inputs are (40..72) x 64 (h x w): the shorter side becomes 20, the aspect ratio stays
    assert shapes == {(20, round(64 * 20 / h)) if h <= 64 else (round(h * 20 / 64), 20) for h in (40, 48, 56, 64, 72)}


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian dims after a type/ndim magic)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_set_on_disk_keeps_its_own_split(tmp_path):
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 12)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    manifest = write_shards(
        tmp_path / "mnist", "torchvision", dataset="MNIST", root=tmp_path / "tv", val_fraction=0.34, progress=False
    )
    # its own test set is `test`; validation is carved from its train set
    counts = {split: manifest.split(split).num_samples for split in manifest.splits}
    assert counts == {"train": 20, "validation": 10, "test": 12}  # 3 training images per class: 1 to validation
    assert manifest.num_classes == 10 and manifest.class_names[0].startswith("0")
    assert sorted(manifest.labels("test")) == sorted((np.arange(12) % 10).tolist())
    made = manifest.extra["vitmpp"]["splits_made_by"]
    assert made["test"] == "the data set's own torchvision split" and made["validation"].startswith("carved from train")
    with pytest.raises(UserError, match="not on disk under"):
        write_shards(tmp_path / "cifar", "torchvision", dataset="CIFAR10", root=tmp_path / "nothing", progress=False)
    with pytest.raises(UserError, match="not a torchvision data set"):
        write_shards(tmp_path / "x", "torchvision", dataset="os", root=tmp_path, progress=False)


# ----------------------------------------------------------------------------- never lose or fake anything


def test_a_new_source_is_one_registered_function_whose_parameters_are_its_options(tmp_path, monkeypatch):
    from vitmpp.datasets import sources

    def stripes(width: int = 8, classes: int = 3) -> sources.SourceData:
        def load(k: int):
            pixels = np.zeros((width, width, 3), dtype=np.uint8)
            pixels[:, k % width] = 40 * (k % classes) + 1
            return lambda: sources.Loaded(Image.fromarray(pixels))

        items = [sources.Item(k % classes, f"stripes[{k}]", load(k)) for k in range(30)]
        return sources.SourceData("stripes", [str(c) for c in range(classes)], items=items)

    monkeypatch.setitem(sources.SOURCES, "stripes", sources.Source("stripes", stripes))
    manifest = write_shards(tmp_path / "s", "stripes", width=12, val_fraction=0.2, test_fraction=0.2, progress=False)
    assert manifest.num_classes == 3 and manifest.image_size == 12
    assert sum(info.num_samples for info in manifest.splits.values()) == 30
    writer = manifest.extra["vitmpp"]["writer"]
    assert (writer["source"], writer["width"], writer["classes"]) == ("stripes", 12, 3)
    with pytest.raises(UserError, match="Unknown option --height for --source stripes; it takes --width, --classes"):
        write_shards(tmp_path / "t", "stripes", height=4, progress=False)


def test_an_existing_output_folder_is_refused(digits_png, tmp_path, capsys):
    with pytest.raises(UserError, match="already exists"):
        write_shards(digits_png.base, "digits", progress=False)
    with pytest.raises(SystemExit) as exit_info:
        make_shards_module.main(["--source", "digits", "--out", digits_png.base, "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Output folder") and "--overwrite" in err and err.count("\n") == 1


def test_overwrite_replaces_shards_but_never_other_files(tmp_path):
    out = tmp_path / "s"
    write_shards(out, "synthetic", count=20, progress=False)
    replaced = write_shards(out, "synthetic", count=30, overwrite=True, progress=False)
    assert sum(i.num_samples for i in replaced.splits.values()) == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (out / "my-notes.txt").write_text("mine")
    with pytest.raises(UserError, match="my-notes.txt"):
        write_shards(out, "synthetic", count=10, overwrite=True, progress=False)
    assert (out / "my-notes.txt").read_text() == "mine"


def test_an_interrupted_write_leaves_no_manifest(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = writer_module._load_sample

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "_load_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path / "out", "synthetic", count=100, maxcount=10, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its partial copy


def test_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "encode_image", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        write_shards(tmp_path / "out", "synthetic", count=10, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "pictures"}, "Unknown --source"),
        ({"source": "digits", "fmt": "gif"}, "Unknown --format"),
        ({"source": "digits", "val_fraction": 1.0}, "--val-fraction"),
        ({"source": "digits", "maxcount": 0}, "--maxcount"),
        ({"source": "digits", "count": 5}, "--count applies to the synthetic source only"),
        ({"source": "imagefolder", "image_size": 32}, "--image-size applies"),
        ({"source": "imagefolder"}, "needs --root"),
        ({"source": "synthetic", "name": "my.data"}, "no dots"),
    ],
)
def test_bad_arguments_are_one_sentence_errors(tmp_path, kwargs, message):
    source = kwargs.pop("source")
    with pytest.raises(UserError, match=message):
        write_shards(tmp_path / "o", source, progress=False, **kwargs)
    assert not (tmp_path / "o").exists()
