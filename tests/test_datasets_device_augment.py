"""Decode-only workers and the batched crop + flip (`LoaderSpec(augment_on="device")`, datasets/device_augment.py).

The device here is the CPU: the code path is the one a GPU runs, only the tensors live elsewhere."""

from __future__ import annotations

import io
import math
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_helpers import replace_member, spec_for, truncate_shard, write_tiny_shards
from vitmpp.common.errors import UserError
from vitmpp.datasets import eval_transform, finetune_transform, open_loader, pretrain_transform
from vitmpp.datasets import decoders as decoders_module
from vitmpp.datasets.order import fill_sources
from vitmpp.datasets.device_augment import CropFlip, crop_flip_batch, pack_regions
from vitmpp.datasets.decoders import BadSample, decode_array, decode_sample
from vitmpp.datasets.samples import RawSample

# the mean absolute difference, in grey levels of 0..255, allowed between the device path (roi_align)
# and the CPU path (PIL bicubic, antialiased) on the same boxes of photo-like images; measured 1.1-1.3
# (PIL's own bilinear differs from its bicubic by as much)
MEAN_TOLERANCE = 2.0


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Shards of 48 photo-like JPEGs of 200 x 150 (benchmarks/data.py's images), 4 shards."""
    from vitmpp.benchmarks.data import shards_from_folder, write_photo_folder

    root = tmp_path_factory.mktemp("photos")
    folder = write_photo_folder(root / "images", 48, (200, 150))
    return shards_from_folder(folder, root / "shards", maxcount=12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    write_tiny_shards(out, [10, 10, 50, 7], textured=True)
    return out


def photo_spec(photos, **fields):
    base = dict(
        split="train",
        batch_size=6,
        transform=pretrain_transform(64),
        training=True,
        seed=4,
        num_workers=0,
        shuffle_buffer=12,
    )
    return spec_for(photos, **{**base, **fields})


# ----------------------------------------------------------------------------- the draws


def test_crop_boxes_have_random_resized_crops_statistics():
    """Area fraction and aspect ratio of the device path's boxes against torchvision's RandomResizedCrop."""
    from torchvision.transforms import RandomResizedCrop

    crop_flip = CropFlip.of(pretrain_transform(224, scale=(0.2, 1.0)))
    width, height, n = 500, 375, 20000
    random.seed(0)
    torch.manual_seed(0)
    ours = np.array([crop_flip.draw(width, height) for _ in range(n)], dtype=np.float64)
    torch.manual_seed(1)
    image = torch.empty((0, height, width))
    theirs = np.array(
        [RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], dtype=np.float64
    )
    quantiles = np.linspace(0.05, 0.95, 19)
    for column, _name in ((2, "height"), (3, "width")):
        assert (ours[:, column] >= 1).all()

    def area(d):
        return d[:, 2] * d[:, 3] / (width * height)

    def log_ratio(d):
        return np.log(d[:, 3] / d[:, 2])

    assert np.abs(np.quantile(area(ours), quantiles) - np.quantile(area(theirs), quantiles)).max() < 0.02
    assert np.abs(np.quantile(log_ratio(ours), quantiles) - np.quantile(log_ratio(theirs), quantiles)).max() < 0.03
    # every box inside the image, and a fair flip
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    assert abs(ours[:, 4].mean() - 0.5) < 0.02


def test_only_crop_and_flip_transforms_run_on_the_device(tiny):
    assert CropFlip.of(pretrain_transform(32)).size == (32, 32)
    assert CropFlip.of(pretrain_transform(32, hflip=0.0)).hflip is None  # no flip step, no draw
    assert CropFlip.of(finetune_transform(32)) is None
    assert CropFlip.of(eval_transform(32)) is None
    with pytest.raises(UserError, match="data.augment_on"):
        open_loader(spec_for(tiny, batch_size=4, transform=finetune_transform(16), training=True, augment_on="device"))
    with pytest.raises(ValueError, match="training loaders only"):
        open_loader(spec_for(tiny, batch_size=4, transform=pretrain_transform(16), training=False, augment_on="device"))
    with pytest.raises(ValueError, match="augment_on"):
        spec_for(tiny, batch_size=4, transform=pretrain_transform(16), training=True, augment_on="gpu")


# ----------------------------------------------------------------------------- the batched op


def test_a_box_of_the_output_size_copies_its_pixels_exactly():
    """roi_align's geometry: a box of exactly size x size pixels samples their centres."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)]
    boxes = [(3, 5, 8, 8), (0, 1, 8, 8)]  # the second touches the image's top edge
    regions, rois = pack_regions(images, boxes)
    out = crop_flip_batch(torch.from_numpy(regions), torch.from_numpy(rois), torch.tensor([False, True]), (8, 8))
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 8, 8)
    assert torch.equal(out[0], torch.from_numpy(images[0][3:11, 5:13]).permute(2, 0, 1))
    assert torch.equal(out[1], torch.from_numpy(images[1][0:8, 1:9]).permute(2, 0, 1).flip(-1))


def test_regions_repeat_the_image_edge_around_boxes_that_touch_it():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    regions, rois = pack_regions([image, image[:2, :2]], [(0, 0, 4, 5), (0, 0, 1, 1)])
    assert np.array_equal(regions[0], np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge"))
    assert np.array_equal(regions[1, :3, :3], np.pad(image[:2, :2], ((1, 0), (1, 0), (0, 0)), mode="edge"))
    assert rois.tolist() == [[0, 1, 1, 6, 5], [1, 1, 1, 2, 2]]
    # two boxes of one image (two views of one decode) share one region, their union
    regions, rois = pack_regions([image, image], [(1, 1, 2, 2), (2, 3, 2, 2)])
    assert regions.shape == (1, 5, 6, 3) and np.array_equal(regions[0, :4, :5], image[0:4, 0:5])
    assert rois.tolist() == [[0, 1, 1, 3, 3], [0, 3, 2, 5, 4]]


# ----------------------------------------------------------------------------- against the CPU path


@pytest.mark.parametrize("workers", [0, 2])
def test_device_batches_match_the_pil_path_on_the_same_boxes(photos, workers):
    cpu = list(open_loader(photo_spec(photos, num_workers=workers), epoch=1))
    device = list(
        open_loader(photo_spec(photos, num_workers=workers, augment_on="device", device=torch.device("cpu")), epoch=1)
    )
    assert len(cpu) == len(device) >= 4
    for a, b in zip(cpu, device):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert b.images.dtype == torch.uint8 and b.images.shape == a.images.shape == (6, 3, 64, 64)
        difference = (a.images.float() - b.images.float()).abs()
        assert difference.mean() < MEAN_TOLERANCE
        # per image too: a wrong box or flip would differ by tens of levels
        assert difference.mean(dim=(1, 2, 3)).max() < 2 * MEAN_TOLERANCE


@pytest.mark.parametrize("workers, start", [(0, 3), (2, 3), (3, 5)])
def test_device_path_resumes_exactly(photos, tiny, workers, start):
    for spec in (
        photo_spec(photos, num_workers=workers, augment_on="device"),
        spec_for(
            tiny,
            split="train",
            batch_size=3,
            transform=pretrain_transform(16, scale=(0.3, 1.0)),
            training=True,
            seed=5,
            rank=1,
            world_size=2,
            num_workers=workers,
            shuffle_buffer=12,
            augment_on="device",
        ),
    ):
        full = list(open_loader(spec, epoch=2))
        again = list(open_loader(spec, epoch=2))
        resumed = list(open_loader(spec, epoch=2, start_batch=start))
        assert len(resumed) == len(full) - start
        assert all(torch.equal(a.images, b.images) for a, b in zip(full, again))
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)


def test_damaged_samples_are_skipped_and_counted_as_on_the_cpu_path(tmp_path):
    write_tiny_shards(tmp_path, [20, 20, 20], textured=True, fmt="jpg")
    replace_member(tmp_path / "tiny-train-000000.tar", "00000003", "jpg", b"not an image")
    truncate_shard(tmp_path / "tiny-train-000002.tar", 0.6)
    counts = {}
    for mode in ("cpu", "device"):
        spec = spec_for(
            tmp_path,
            batch_size=4,
            transform=pretrain_transform(16),
            training=True,
            num_workers=0,
            augment_on=mode,
            max_skip_fraction=0.9,
        )
        loader = open_loader(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(loader)
        counts[mode] = (loader.skipped_samples, [b.indices.tolist() for b in batches])
        for b in batches:  # a failed sample holds the label of the good sample the one fill rule names
            sources = fill_sources((b.indices < 0).tolist())
            assert sources is not None and b.labels.tolist() == [b.labels[s].item() for s in sources]
    assert counts["cpu"] == counts["device"] and counts["cpu"][0] > 1
    assert any(-1 in indices for indices in counts["cpu"][1])


# ----------------------------------------------------------------------------- decoding


def jpeg(array: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90, **options)
    return buf.getvalue()


def smooth(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx % 256, yy % 256, (xx + yy) // 3 % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("fast", [True, False])
def test_decode_array_gives_pil_s_pixels(monkeypatch, fast):
    if not fast:
        monkeypatch.setattr(decoders_module, "_SIMPLEJPEG", [None])  # without the `fast` extra
    else:  # the dev extra installs simplejpeg: its absence is a broken install, not a reason to pass
        assert decoders_module._simplejpeg() is not None, "simplejpeg (in the dev and fast extras) is not installed"
    picture = smooth(300, 400)
    cases = {
        "rgb": jpeg(picture),
        "progressive": jpeg(picture, progressive=True),
        "grey": jpeg(picture[..., 0]),
        "cmyk": _cmyk_jpeg(picture),
        "png": _png(picture),
    }
    for name, data in cases.items():
        for draft_side in (None, 64, 140, 37):
            raw = RawSample(0, "mem", {"jpg" if name != "png" else "png": data, "cls": b"2"})
            array, label = decode_array(raw, 3, draft_side)
            image, _ = decode_sample(raw, 3, draft_side)
            assert label == 2 and array.dtype == np.uint8 and array.shape[2] == 3
            assert np.array_equal(array, np.asarray(image)), (name, draft_side)


def test_decode_array_refuses_what_decode_sample_refuses():
    data = jpeg(smooth(64, 64))
    for bad in (data[: len(data) // 2], b"\xff\xd8\xff" + b"\0" * 100, b"junk"):
        raw = RawSample(0, "mem", {"jpg": bad, "cls": b"1"})
        with pytest.raises(BadSample) as ours:
            decode_array(raw, 3, None)
        with pytest.raises(BadSample) as pils:
            decode_sample(raw, 3, None)
        assert str(ours.value) == str(pils.value)


def _cmyk_jpeg(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).convert("CMYK").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def test_the_digits_pipeline_runs_on_the_device_path(tmp_path):
    """The embedded digits shards through the device path: the right shapes, labels in range."""
    from vitmpp.datasets import digits_shards

    shards = digits_shards(32)
    local = tmp_path / "digits"
    shutil.copytree(shards, local)
    spec = spec_for(
        local,
        batch_size=16,
        transform=pretrain_transform(32),
        training=True,
        num_workers=0,
        augment_on="device",
        batches_per_epoch=2,
    )
    batches = list(open_loader(spec))
    assert len(batches) == 2 and all(b.images.shape == (16, 3, 32, 32) for b in batches)
    assert all(0 <= int(b.labels.min()) and int(b.labels.max()) < 10 for b in batches)
    assert not math.isnan(float(batches[0].images.float().mean()))


# ----------------------------------------------------------------------------- several views per decode


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_views_are_consecutive_crops_of_one_decoded_image(photos, augment_on):
    one = list(open_loader(photo_spec(photos, augment_on=augment_on)))
    two = list(open_loader(photo_spec(photos, augment_on=augment_on, views_per_image=2)))
    assert len(two) == len(one)  # an epoch counts samples (views): the same steps
    for batch in two:
        pairs = batch.indices.view(-1, 2)
        assert (pairs[:, 0] == pairs[:, 1]).all() and torch.equal(
            batch.labels.view(-1, 2)[:, 0], batch.labels.view(-1, 2)[:, 1]
        )
        # each view its own crop
        assert not any(torch.equal(batch.images[k], batch.images[k + 1]) for k in range(0, len(batch.images), 2))
    images_one = {i for b in one for i in b.indices.tolist()}
    images_two = {i for b in two for i in b.indices.tolist()}
    assert len(images_two) <= len(images_one) // 2 + 1  # half the decodes


def test_views_on_the_device_match_views_on_the_cpu_and_resume_exactly(photos):
    cpu = list(open_loader(photo_spec(photos, views_per_image=3, num_workers=2), epoch=1))
    spec = photo_spec(photos, views_per_image=3, num_workers=2, augment_on="device")
    device = list(open_loader(spec, epoch=1))
    resumed = list(open_loader(spec, epoch=1, start_batch=2))
    for a, b in zip(cpu, device):
        assert torch.equal(a.indices, b.indices)
        assert (a.images.float() - b.images.float()).abs().mean() < MEAN_TOLERANCE
    assert all(
        torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices) for a, b in zip(device[2:], resumed)
    )


def test_views_must_divide_the_batch_and_apply_to_training(tiny):
    with pytest.raises(ValueError, match="multiple of views_per_image"):
        spec_for(tiny, batch_size=4, transform=pretrain_transform(16), training=True, views_per_image=3)
    with pytest.raises(ValueError, match="training loaders only"):
        open_loader(spec_for(tiny, batch_size=4, transform=pretrain_transform(16), training=False, views_per_image=2))
