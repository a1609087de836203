"""JPEGs decoded in the main process on the device (`LoaderSpec(decode_on="device")`, `data.decode=gpu`).

The device here is the CPU: `torchvision.io.decode_jpeg` runs libjpeg-turbo instead of nvJPEG, and the
rest of the path (header-only workers, one decode call per batch, regions, the batched crop + flip) is
the one a GPU runs. Against the decode-only workers (`augment_on="device"`, decode_on="worker") the
batches are bit-identical here (measured: max difference 0 grey levels over every test below but the
draft one); the tests allow 1 level, what another libjpeg-turbo build could round differently."""

from __future__ import annotations

import io
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_helpers import add_member, drop_member, keys_of, replace_member, spec_for, truncate_shard
from engine_helpers import TINY, python_cmd, run
from vitmpp.datasets import decoders as decoders_module
from vitmpp.datasets import open_loader, pretrain_transform
from vitmpp.datasets import strategies as strategies_module
from vitmpp.datasets.decoders import EncodedJpeg, decode_array, device_jpeg_size, read_for_device
from vitmpp.datasets.samples import RawSample, Tally, read_shard

# the largest difference, in grey levels of 0..255, allowed between the two decoders' batches (measured 0)
PIXEL_TOLERANCE = 1

# torchvision 0.29 deprecates its image decoders (for TorchCodec's) at every call; outside tests Python hides it
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line of a refused command (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Shards of 48 photo-like JPEGs of 200 x 150 (benchmarks/data.py's images), 4 shards of 12."""
    from vitmpp.benchmarks.data import shards_from_folder, write_photo_folder

    root = tmp_path_factory.mktemp("photos")
    folder = write_photo_folder(root / "images", 48, (200, 150))
    return shards_from_folder(folder, root / "shards", maxcount=12)


def photo_spec(photos, **fields):
    base = dict(
        split="train",
        batch_size=6,
        transform=pretrain_transform(64),
        training=True,
        seed=4,
        num_workers=0,
        shuffle_buffer=12,
        augment_on="device",
    )
    return spec_for(photos, **{**base, **fields})


def both(photos, epoch: int = 1, **fields):
    """(worker-decode batches, device-decode batches) of the same spec otherwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damaged shards are noted; the tests count instead
        worker = list(open_loader(photo_spec(photos, **fields), epoch=epoch))
        device = list(open_loader(photo_spec(photos, decode_on="device", **fields), epoch=epoch))
    assert len(worker) == len(device) >= 4
    return worker, device


def max_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def count_decodes(monkeypatch) -> tuple[Counter, Counter]:
    """Counters of every pixel decode a worker can make (simplejpeg's path and PIL's)."""
    fast, pil = Counter(decoders_module._fast_jpeg), Counter(decoders_module.decode_sample)
    monkeypatch.setattr(decoders_module, "_fast_jpeg", fast)
    monkeypatch.setattr(decoders_module, "decode_sample", pil)
    return fast, pil


# ----------------------------------------------------------------------------- against the worker decode


@pytest.mark.parametrize("views, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_device_decode_gives_the_worker_decode_batches(photos, views, workers):
    worker, device = both(photos, views_per_image=views, num_workers=workers)
    for a, b in zip(worker, device):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels) and int(b.skipped) == 0
        assert b.images.dtype == torch.uint8 and b.images.shape == a.images.shape == (6, 3, 64, 64)
        assert max_difference(a.images, b.images) <= PIXEL_TOLERANCE


def test_workers_decode_no_jpeg_and_the_main_process_decodes_each_batch_in_one_call(photos, monkeypatch):
    import torchvision.io

    fast, pil = count_decodes(monkeypatch)
    calls = Counter(torchvision.io.decode_jpeg)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", calls)
    batches = list(open_loader(photo_spec(photos, decode_on="device")))
    assert (fast.calls, pil.calls) == (0, 0)  # num_workers=0: the workers' code ran in this process
    assert calls.calls == len(batches) == 8  # one call per batch, with all its JPEGs
    list(open_loader(photo_spec(photos)))  # the counters do count the worker decode: every decode_array call
    assert fast.calls == 48


def test_draft_sized_jpegs_are_decoded_whole_and_averaged_to_the_same_size(photos):
    """A 32 px crop of at least half the area needs 53 px: 200 x 150 JPEGs are drawn on and decoded at half
    size (PIL's draft, libjpeg's DCT scaling) in the workers; on the device whole, then 2 x 2 averaged."""
    transform = pretrain_transform(32, scale=(0.5, 1.0))
    raw = next(read_shard(str(sorted(photos.glob("*.tar"))[0]), 0, 12, None, Tally()))
    encoded, _ = read_for_device(raw, 0, transform.decode_min_side)
    assert encoded.scale == 2 and encoded.shape == decode_array(raw, 0, transform.decode_min_side)[0].shape == (
        75,
        100,
        3,
    )
    worker, device = both(photos, transform=transform)
    differences = []
    for a, b in zip(worker, device):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)  # the same draws
        differences.append(float((a.images.float() - b.images.float()).abs().mean()))
    # measured 0.58 on average (per batch at most 0.63; single pixels up to 12): a block average against
    # libjpeg's DCT scaling, on the same boxes
    assert max(differences) < 1.5


def _convert(shards, position: int, how: str) -> None:
    """Rewrite the sample at `position` of every shard: `png` (a .png member), `grey` (a grey JPEG),
    `cmyk` (a CMYK JPEG, which PIL decodes in the worker), `png-as-jpg` (PNG bytes in the .jpg member)."""
    for path in sorted(shards.glob("*.tar")):
        key = keys_of(path)[position]
        with tarfile.open(path) as tar:
            data = tar.extractfile(f"{key}.jpg").read()
        image = Image.open(io.BytesIO(data))
        buf = io.BytesIO()
        if how in ("png", "png-as-jpg"):
            image.save(buf, format="PNG")  # the very pixels the JPEG decodes to
        else:
            image.convert("L" if how == "grey" else "CMYK").save(buf, format="JPEG", quality=90)
        if how == "png":
            drop_member(path, key, "jpg")
            add_member(path, key, "png", buf.getvalue())
        else:
            replace_member(path, key, "jpg", buf.getvalue())


def test_a_shard_mixing_png_and_jpeg_gives_the_worker_decode_batches(photos, tmp_path, monkeypatch):
    mixed = tmp_path / "mixed"
    shutil.copytree(photos, mixed)
    for position, how in ((1, "png"), (4, "grey"), (7, "cmyk"), (10, "png-as-jpg")):
        _convert(mixed, position, how)
    for views in (1, 2):
        worker, device = both(mixed, views_per_image=views)
        for a, b in zip(worker, device):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
            assert max_difference(a.images, b.images) <= PIXEL_TOLERANCE
    fast, pil = count_decodes(monkeypatch)
    list(open_loader(photo_spec(mixed, decode_on="device")))
    # the whole split is read once: only the 3 samples per shard that are not YCbCr/grey JPEGs are decoded
    assert pil.calls == 3 * 4


# ----------------------------------------------------------------------------- determinism and resume


@pytest.mark.parametrize("workers, start", [(0, 3), (2, 3), (3, 5)])
def test_device_decode_resumes_exactly(photos, workers, start):
    for views in (1, 2):
        spec = photo_spec(photos, num_workers=workers, decode_on="device", views_per_image=views)
        full = list(open_loader(spec, epoch=2))
        again = list(open_loader(spec, epoch=2))
        resumed = list(open_loader(spec, epoch=2, start_batch=start))
        assert len(resumed) == len(full) - start
        assert all(torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices) for a, b in zip(full, again))
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.images, b.images)


# ----------------------------------------------------------------------------- damaged JPEGs


def _undecodable(data: bytes) -> bytes:
    """A JPEG whose header reads well but whose first component names quantisation table 3, which it
    does not define: libjpeg (PIL, torchvision) refuses to decode it."""
    data = bytearray(data)
    sof = data.find(b"\xff\xc0")
    data[sof + 4 + 6 + 2] = 3  # marker, length, precision, height, width, components; then id, sampling, table
    return bytes(data)


@pytest.mark.parametrize("views", [1, 2])
def test_damaged_jpegs_are_skipped_and_counted_as_by_the_workers(photos, tmp_path, views):
    """A truncated JPEG (no EOI marker) is decoded, and refused, in the worker as before; one whose
    header is good fails the device's batched decode, which then decodes the batch's files one by one
    to find it: both are skipped, counted and noted, their samples repeats of good ones (index -1)."""
    damaged = tmp_path / "damaged"
    shutil.copytree(photos, damaged)
    shards = sorted(damaged.glob("*.tar"))
    for path, position, how in (
        (shards[0], 2, "truncated"),
        (shards[1], 5, "undecodable"),
        (shards[3], 0, "undecodable"),
    ):
        key = keys_of(path)[position]
        with tarfile.open(path) as tar:
            data = tar.extractfile(f"{key}.jpg").read()
        replace_member(path, key, "jpg", data[: len(data) // 2] if how == "truncated" else _undecodable(data))
        assert (device_jpeg_size(_undecodable(data)) is not None) and device_jpeg_size(data[: len(data) // 2]) is None
    truncate_shard(shards[2], 0.6)
    loaders = {}
    for decode_on in ("worker", "device"):
        loader = open_loader(photo_spec(damaged, decode_on=decode_on, max_skip_fraction=0.9, views_per_image=views))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaders[decode_on] = (loader, list(loader))
    (worker_loader, worker), (device_loader, device) = loaders["worker"], loaders["device"]
    assert device_loader.skipped_samples == worker_loader.skipped_samples > 3
    assert sorted(device_loader.bad_shards) == sorted(worker_loader.bad_shards)
    assert len(worker_loader.bad_shards) == (
        4 if views == 1 else 2
    )  # 2 views: half the images, not every shard's bad one
    for a, b in zip(worker, device):
        assert torch.equal(a.indices, b.indices) and int(a.skipped) == int(b.skipped)
        real = a.indices >= 0  # all images are 200 x 150: a replaced sample shifts no later draw
        assert max_difference(a.images[real], b.images[real]) <= PIXEL_TOLERANCE


def test_a_batch_whose_jpegs_all_fail_on_the_device_is_filled_like_the_workers_fill_it(photos, monkeypatch):
    """No sample of a batch decoded: every one becomes the first decodable sample of the shards, whole."""
    original = strategies_module.decode_regions
    first = []

    def fail_the_first_batch(encoded, device):
        regions, failed = original(encoded, device)
        if not first:
            first.append(len(encoded.names))
            failed = list(range(len(encoded.names)))
        return regions, failed

    monkeypatch.setattr(strategies_module, "decode_regions", fail_the_first_batch)
    loader = open_loader(photo_spec(photos, decode_on="device", max_skip_fraction=0.9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert first == [6] and int(batches[0].skipped) == 6 == loader.skipped_samples
    assert (batches[0].indices == -1).all() and all((b.indices >= 0).all() for b in batches[1:])
    assert all(torch.equal(image, batches[0].images[0]) for image in batches[0].images)
    assert any("cannot be decoded on cpu" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- the header reader


def _jpeg(array: np.ndarray, mode: str | None = None, **options) -> bytes:
    image = Image.fromarray(array)
    buf = io.BytesIO()
    (image.convert(mode) if mode else image).save(buf, format="JPEG", quality=90, **options)
    return buf.getvalue()


def test_the_header_reader_gives_the_size_of_what_the_device_may_decode():
    picture = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for good in (_jpeg(picture), _jpeg(picture, progressive=True), _jpeg(picture, "L"), _jpeg(picture, subsampling=0)):
        assert device_jpeg_size(good) == (37, 53)
    data = _jpeg(picture)
    png = io.BytesIO()
    Image.fromarray(picture).save(png, format="PNG")
    sof = data.find(b"\xff\xc0")
    twelve_bit = data[: sof + 4] + b"\x0c" + data[sof + 5 :]
    lossless = data[: sof + 1] + b"\xc3" + data[sof + 2 :]
    adobe_rgb = (
        data[:2] + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00" + data[2:].replace(b"JFIF\0", b"JFIX\0", 1)
    )
    for bad in (
        _jpeg(picture, "CMYK"),
        data[:-2],
        data[: len(data) // 2],
        data + b"\0",
        png.getvalue(),
        b"",
        twelve_bit,
        lossless,
        adobe_rgb,
        data[: data.find(b"\xff\xda")] + b"\xff\xd9",
    ):
        assert device_jpeg_size(bad) is None
    assert device_jpeg_size(
        adobe_rgb.replace(b"Adobe\x00\x64\x00\x00\x00\x00\x00", b"Adobe\x00\x64\x00\x00\x00\x00\x01")
    ) == (37, 53)  # Adobe transform 1: YCbCr
    raw = RawSample(7, "mem", {"jpg": data, "cls": b"2", "__key__": "k"})
    encoded, label = read_for_device(raw, 3, None)
    assert isinstance(encoded, EncodedJpeg) and label == 2 and encoded.data is data and encoded.shape == (37, 53, 3)
    array, _ = read_for_device(RawSample(7, "mem", {"jpg": _jpeg(picture, "CMYK"), "cls": b"2"}), 3, None)
    assert isinstance(array, np.ndarray) and array.shape == (37, 53, 3)


def test_decode_on_is_checked_by_the_spec(photos):
    with pytest.raises(ValueError, match="decode_on must be"):
        photo_spec(photos, decode_on="gpu")
    with pytest.raises(ValueError, match="needs augment_on='device'"):
        photo_spec(photos, decode_on="device", augment_on="cpu")


# ----------------------------------------------------------------------------- the config


def test_data_decode_gpu_needs_augment_on_device(tmp_path):
    result = run(
        python_cmd("pretrain/main.py") + TINY + ["train.steps=1", "data.decode=gpu"],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "data.decode" in line and "data.augment_on=device" in line and "data.decode=cpu" in line, line


def test_data_decode_gpu_needs_a_cuda_device(tmp_path, digits16):
    # ACCELERATE_USE_CPU: a run on the CPU also where a GPU exists, so the refusal is tried on every machine
    result = run(
        python_cmd("pretrain/main.py")
        + TINY
        + ["train.steps=1", "data.decode=gpu", "data.augment_on=device", f"data.shards={digits16}"],
        cwd=tmp_path,
        check=False,
        timeout=300,
        ACCELERATE_USE_CPU="1",
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert line == (
        "error: Key 'data.decode' is 'gpu', but this run has no CUDA device (device cpu); set data.decode=cpu."
    ), line
    assert not list((tmp_path / "runs").glob("*/checkpoints/step-*")), "no training step ran"
