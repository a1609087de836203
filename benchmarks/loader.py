"""Rows: the data loader.

* our shard loader against torchvision `ImageFolder` + `DataLoader` on the same
  JPEGs, same transform (MAE's RandomResizedCrop + flip to uint8), same batch and
  workers, epochs alternating;
* decode + RandomResizedCrop + flip per core (one process, one thread, bytes
  already in memory): ImageNet-like 500 x 375 JPEGs -> 224, the same after
  `make_shards --max-size`, and 32 px images -> 32; plus the levers measured on
  the same bytes (PIL draft decoding, resize with a reducing gap);
* worker scaling of our loader;
* decode-only workers (`LoaderSpec(augment_on="device")`, issue 15): per core, the decode
  (simplejpeg, and PIL without the `fast` extra) + box draw + region packing against the PIL
  transform path on the same bytes, full-size and `--max-size` shards, with the tar parsing
  (our lean reader against tarfile) and the batched crop's cost on this CPU; then whole
  loaders, 2 workers: worker CPU per image of the PIL path, the decode-only path and
  ImageFolder + DataLoader with the same transform, on both kinds of shards;
* JPEGs decoded on the device (`LoaderSpec(decode_on="device")`, `data.decode=gpu`): per core,
  the header-only worker (header parse + box/flip draw + packing of the bytes; the decode itself
  moves to the device) beside the decode-only rows, and the main process's side run on this CPU
  (the batched `decode_jpeg` (libjpeg-turbo here), region cut and crop + flip; on a GPU that is
  nvJPEG and device time, measured by benchmarks/gpu_check.sh part 2, not here).

Goals (issue 7): loader / ImageFolder >= 1.0 per core; >= 300 images/s/core at
224 from full JPEGs, >= 1,000 from pre-resized shards, >= 3,000 at 32 px;
worker scaling >= 0.9 x N. Issue 15, decode-only: >= 600 images/s/core from 500 x 375
JPEG shards, >= 1,200 from pre-resized ones, shard loader >= 1.0 x ImageFolder. An H100
at 50% MFU eats ~8,400 MAE-B images/s, ~530/s per core of a 16-core host.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from vitmpp.datasets import LoaderSpec, open_loader, pretrain_transform, read_manifest
from vitmpp.datasets import pool as pool_module
from vitmpp.datasets.decoders import decode_array, decode_sample, read_for_device, use_fast_jpeg
from vitmpp.datasets.device_augment import CropFlip, crop_flip_batch, decode_regions, encode_regions, pack_regions
from vitmpp.datasets.pool import close_idle_workers
from vitmpp.datasets.samples import Tally, read_shard

from .data import folder_bytes, folder_from_shards, shards_from_folder, synthetic_shards, write_photo_folder
from .harness import Row, Settings, fmt_ratio, median, speed_ratio, verdict

H100_NEED_PER_CORE = 530  # images/s per core of a 16-core host feeding an H100 at 50% MFU (MAE-B)


def cpu_seconds() -> float:
    """CPU seconds used by this process and by its finished (reaped) children, e.g. loader workers.

    On a machine shared with other work, wall time measures the neighbours too; CPU
    time is what the loader itself spent, so images per CPU-second is its per-core rate.
    """
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def epoch_seconds(make_iter, batches: int) -> tuple[float, float]:
    """(wall, CPU) seconds to pull `batches` batches from a fresh iterator, worker start-up and exit included
    (the shard loader's kept workers are ended after every epoch, so each epoch starts its own)."""
    import gc

    cpu, start = cpu_seconds(), time.perf_counter()
    n = 0
    iterator = make_iter()
    for _ in iterator:
        n += 1
        if n == batches:
            break
    wall = time.perf_counter() - start
    del iterator
    gc.collect()
    close_idle_workers()  # the workers are joined (and their CPU time reaped): ours are kept for a next pass
    return wall, cpu_seconds() - cpu


def our_loader(
    shards: Path, transform, batch: int, workers: int, batches: int, epoch: int = 0, augment_on: str = "cpu"
):
    spec = LoaderSpec(
        shards=str(shards),
        manifest=read_manifest(shards),
        batch_size=batch,
        transform=transform,
        training=True,
        num_workers=workers,
        shuffle_buffer=4 * batch,
        batches_per_epoch=batches,
        augment_on=augment_on,
    )
    return open_loader(spec, epoch=epoch)


def split_cpu_seconds() -> tuple[float, float]:
    """(this process, its finished children) CPU seconds: the main process and the loader workers apart."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def epoch_split_seconds(make_iter, batches: int) -> tuple[float, float, int]:
    """(main-process CPU s, worker CPU s, images delivered) to pull up to `batches` batches from a fresh
    iterator, worker start and exit included (workers reaped); an ImageFolder epoch may hold fewer."""
    import gc

    main, workers = split_cpu_seconds()
    n = images = 0
    iterator = make_iter()
    for batch in iterator:
        n += 1
        images += len(batch[0])
        if n == batches:
            break
    del iterator
    gc.collect()
    close_idle_workers()
    main_after, workers_after = split_cpu_seconds()
    return main_after - main, workers_after - workers, images


def imagefolder_loader(root: Path, transform, batch: int, workers: int):
    """torchvision's ImageFolder + DataLoader: the usual baseline (PIL open + convert, default collate)."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=transform)
    kwargs = {"prefetch_factor": 2} if workers else {}
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=False, **kwargs
    )


def raw_samples(shards: Path, limit: int) -> list:
    """The first `limit` undecoded samples of the shards, in memory."""
    manifest = read_manifest(str(shards))
    info = manifest.split("train")
    out, tally = [], Tally()
    for url, offset, length in zip(manifest.shard_urls("train"), info.offsets, info.shard_lengths):
        for raw in read_shard(url, offset, length, None, tally):
            out.append(raw)
            if len(out) >= limit:
                return out
    return out


def per_core_seconds(raws: list, transform, draft_side: int | None) -> float:
    """CPU seconds per image of decode + transform on this thread, bytes already in memory.

    Thread CPU time, not wall time: on a shared machine it leaves out the time other
    processes held the core, so 1 / this is the rate of one core of our own."""
    start = time.thread_time()
    for raw in raws:
        image, _ = decode_sample(raw, 0, draft_side)
        out = transform(image)
        if not isinstance(out, (np.ndarray, torch.Tensor)):
            raise TypeError("transform must return an array")
    return (time.thread_time() - start) / len(raws)


class ReducingGapRandomResizedCrop:
    """A lever, measured here: MAE's RandomResizedCrop + flip done as ONE PIL `resize(box=...,
    reducing_gap=...)` call, then uint8 CHW.

    timm/torchvision crop first and resize the crop with a full bicubic filter; PIL's
    `reducing_gap` first shrinks by an integer factor with a cheap box filter (or, for
    JPEGs, could even decode smaller) and only then resamples, which is several times
    faster for large downscales; Pillow documents gap >= 3 as indistinguishable from
    full resampling in most cases, so 3 is the default. The crop
    parameters are drawn exactly as torchvision draws them.
    """

    def __init__(
        self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, reducing_gap: float = 3.0
    ):
        from PIL import Image

        self.size, self.scale, self.ratio, self.hflip, self.gap = size, scale, ratio, hflip, reducing_gap
        self.bicubic = Image.Resampling.BICUBIC

    def __call__(self, image):
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop

        top, left, h, w = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        out = image.resize(
            (self.size, self.size), self.bicubic, box=(left, top, left + w, top + h), reducing_gap=self.gap
        )
        if random.random() < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


def prepare(settings: Settings) -> dict[str, Path]:
    scratch = Path(settings.scratch)
    w, h = settings.photo_size
    photos = write_photo_folder(
        scratch / f"photos-{w}x{h}-{settings.photo_count}", settings.photo_count, settings.photo_size
    )
    return {
        "photos": photos,
        "photo_shards": shards_from_folder(photos, scratch / f"photo-shards-{settings.photo_count}"),
        "resized_shards": shards_from_folder(
            photos, scratch / f"photo-shards-{settings.photo_count}-max{settings.max_size}", max_size=settings.max_size
        ),
        "small_shards": synthetic_shards(scratch / f"synthetic32-{settings.small_count}", settings.small_count, 32),
    }


def loader_rows(settings: Settings) -> list[Row]:
    torch.set_num_threads(1)  # the per-core rows: PIL is single-threaded, so should torch be
    paths = prepare(settings)
    rows: list[Row] = []
    # These rows measure whole epochs, worker start included: the shard loader's kept workers are
    # ended after every epoch (close_idle_workers) and must not start the next epoch ahead meanwhile.
    run_ahead, pool_module.RUN_AHEAD = pool_module.RUN_AHEAD, False
    try:
        rows += _versus_imagefolder(settings, paths)
        rows += _per_core(settings, paths)
        rows += _worker_scaling(settings, paths)
        rows += _decode_only_per_core(settings, paths)
        rows += _decode_only_loaders(settings, paths)
        rows += _short_epochs(settings, paths)
    finally:
        pool_module.RUN_AHEAD = run_ahead
    return rows


def _versus_imagefolder(settings: Settings, paths: dict) -> list[Row]:
    transform = pretrain_transform(settings.photo_crop)
    batch = settings.loader_batch
    batches = settings.photo_count // batch
    workers = max(settings.loader_workers)
    files, size = folder_bytes(paths["photos"])
    wall: dict[str, list[float]] = {"ours": [], "theirs": []}
    cpu: dict[str, list[float]] = {"ours": [], "theirs": []}
    images = batches * batch
    for r in range(min(settings.rounds, 3) + 1):  # round 0 warms the page cache and is dropped
        pair = [
            ("ours", lambda r=r: our_loader(paths["photo_shards"], transform, batch, workers, batches, epoch=r)),
            ("theirs", lambda: imagefolder_loader(paths["photos"], transform, batch, workers)),
        ]
        for name, make in pair if r % 2 == 0 else pair[::-1]:
            w_s, c_s = epoch_seconds(make, batches)
            if r:
                wall[name].append(w_s / images)
                cpu[name].append(c_s / images)
    ratio = speed_ratio(wall["ours"], wall["theirs"])
    cpu_ratio = speed_ratio(cpu["ours"], cpu["theirs"])
    ours_rate, theirs_rate = 1 / median(wall["ours"]), 1 / median(wall["theirs"])
    ours_core, theirs_core = 1 / median(cpu["ours"]), 1 / median(cpu["theirs"])
    w, h = settings.photo_size
    return [
        Row(
            "data loader",
            "shard loader / ImageFolder+DataLoader (wall)",
            ratio[0],
            "x",
            f"{files} JPEGs {w}x{h} (mean {size / files / 1024:.0f} KiB) -> RandomResizedCrop {settings.photo_crop} + "
            f"flip, batch {batch}, {workers} workers, whole epochs (worker start included); "
            f"ours {ours_rate:.0f} img/s, "
            f"ImageFolder {theirs_rate:.0f} img/s; {fmt_ratio(ratio)}; {verdict(ratio[0], 1.0)}",
            {
                "ours_images_per_sec": ours_rate,
                "imagefolder_images_per_sec": theirs_rate,
                "workers": workers,
                "rounds": list(ratio),
                "wall": wall,
            },
        ),
        Row(
            "data loader",
            "shard loader / ImageFolder+DataLoader (per core)",
            cpu_ratio[0],
            "x",
            f"images per CPU-second (main process + workers): ours {ours_core:.0f}, ImageFolder {theirs_core:.0f}; "
            f"{fmt_ratio(cpu_ratio)}; {verdict(cpu_ratio[0], 1.0)}",
            {"ours_images_per_cpu_second": ours_core, "imagefolder_images_per_cpu_second": theirs_core, "cpu": cpu},
        ),
    ]


def _per_core(settings: Settings, paths: dict) -> list[Row]:
    rows = []
    limit = min(settings.photo_count, 640)  # enough per round; a larger set only serves the loader rows
    rounds = min(settings.rounds, 3)
    w, h = settings.photo_size
    crop = settings.photo_crop
    full = raw_samples(paths["photo_shards"], limit)
    resized = raw_samples(paths["resized_shards"], limit)
    small = raw_samples(paths["small_shards"], settings.small_count)
    standard = pretrain_transform(crop)
    cases = [
        (
            f"{w}x{h} JPEG -> {crop}",
            full,
            standard,
            standard.decode_min_side,
            300,
            "PIL decode (draft inactive: the smallest 0.2-area crop needs the full image) + timm RRC",
        ),
        (
            f"--max-size {settings.max_size} shards -> {crop}",
            resized,
            standard,
            standard.decode_min_side,
            1000,
            "pre-resized on write; the rest as above",
        ),
        (
            "32 px JPEG -> 32",
            small,
            pretrain_transform(32),
            pretrain_transform(32).decode_min_side,
            3000,
            "32 px synthetic shards",
        ),
        (
            f"{w}x{h} JPEG -> {crop}, lever: reducing-gap RRC",
            full,
            ReducingGapRandomResizedCrop(crop),
            None,
            300,
            "one PIL resize(box, reducing_gap=3) instead of crop + full bicubic",
        ),
        (
            f"--max-size {settings.max_size} -> {crop}, lever: reducing-gap RRC",
            resized,
            ReducingGapRandomResizedCrop(crop),
            None,
            1000,
            "pre-resized and reducing-gap RRC",
        ),
        (
            f"{w}x{h} JPEG -> {crop}, lever: bilinear",
            full,
            pretrain_transform(crop, interpolation="bilinear"),
            standard.decode_min_side,
            300,
            "data.interpolation=bilinear instead of MAE's bicubic",
        ),
        (
            f"--max-size {settings.max_size} -> {crop}, lever: bilinear",
            resized,
            pretrain_transform(crop, interpolation="bilinear"),
            standard.decode_min_side,
            1000,
            "pre-resized and bilinear",
        ),
    ]
    # interleaved: every case once per round, the order reversed every other round
    random.seed(0)
    seconds: list[list[float]] = [[] for _ in cases]
    order = list(range(len(cases)))
    for r in range(rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            _, raws, transform, draft, _, _ = cases[k]
            seconds[k].append(per_core_seconds(raws, transform, draft))
    for (name, raws, _transform, _draft, goal, how), series in zip(cases, seconds):
        rate = 1 / median(series)
        all_rates = [1 / s for s in series]
        need = f"; an H100 needs ~{H100_NEED_PER_CORE}/core" if str(crop) in name.split("->")[-1] else ""
        rows.append(
            Row(
                "decode+RRC+flip per core",
                name,
                rate,
                "img/s/core",
                f"{how}; images per CPU-second of one thread; {len(raws)} images x {rounds} rounds "
                f"(min {min(all_rates):.0f}, max "
                f"{max(all_rates):.0f}); {verdict(rate, goal)}{need}",
                {"rates": all_rates, "goal": goal},
            )
        )
    for lever, base, what in (
        (1, 0, "pre-resized shards (--max-size)"),
        (3, 0, "reducing-gap RRC"),
        (4, 0, "pre-resized + reducing-gap"),
        (5, 0, "bilinear"),
        (6, 0, "pre-resized + bilinear"),
    ):
        ratio = speed_ratio(seconds[lever], seconds[base])
        rows.append(
            Row(
                "decode+RRC+flip per core",
                f"lever speed-up: {what}",
                ratio[0],
                "x",
                f"vs {cases[base][0]}, same rounds; {fmt_ratio(ratio)}",
                {"rounds": list(ratio)},
            )
        )
    return rows


def _worker_scaling(settings: Settings, paths: dict) -> list[Row]:
    transform = pretrain_transform(settings.photo_crop)
    batch = settings.loader_batch
    batches = settings.photo_count // batch
    counts = list(settings.loader_workers)
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    cpu: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(min(settings.rounds, 3) + 1):
        for n in counts if r % 2 == 0 else counts[::-1]:
            wall_s, cpu_s = epoch_seconds(
                lambda n=n, r=r: our_loader(paths["photo_shards"], transform, batch, n, batches, epoch=r), batches
            )
            if r:
                seconds[n].append(wall_s)
                cpu[n].append(cpu_s)
    base_n = counts[0]
    base = median(seconds[base_n])
    rows = []
    for n in counts[1:]:
        speedup = base / median(seconds[n])
        ideal = max(n, 1) / max(base_n, 1)
        efficiency = speedup / ideal
        rows.append(
            Row(
                "data loader",
                f"worker scaling {base_n} -> {n}",
                efficiency,
                "of ideal",
                f"speed-up {speedup:.2f}x for {ideal:g}x the workers ({batches * batch} images "
                f"{settings.photo_size[0]}x{settings.photo_size[1]} -> {settings.photo_crop}, batch {batch}); "
                f"CPU per image {1000 * median(cpu[n]) / (batches * batch):.1f} ms vs "
                f"{1000 * median(cpu[base_n]) / (batches * batch):.1f} ms with {base_n} "
                "(equal: the work divides well, a "
                "shortfall is cores taken by other processes); "
                f"{os.cpu_count()} cores on this machine; {verdict(efficiency, 0.9)}",
                {"seconds": {str(k): v for k, v in seconds.items()}, "cpu": {str(k): v for k, v in cpu.items()}},
            )
        )
    return rows


# ----------------------------------------------------------------------------- decode-only workers (issue 15)

DECODE_ONLY_GOALS = {"full": 600, "resized": 1200}  # images/s per core, issue 15 (worker side)
HEADER_ONLY = "header-only (decode on device)"  # the worker of decode_on="device"
DEVICE_DECODE = "device decode+crop+flip on this CPU"  # its main process's side, run on the CPU


def decode_only_seconds(raws: list, crop_flip: CropFlip, draft_side: int | None, batch: int) -> float:
    """CPU seconds per image of a decode-only worker on this thread, bytes in memory: decode to an array,
    draw the box and flip, pack each batch's regions (what `augment_on="device"` leaves to the CPU)."""
    start = time.thread_time()
    for k in range(0, len(raws), batch):
        images = [decode_array(raw, 0, draft_side)[0] for raw in raws[k : k + batch]]
        boxes = [crop_flip.draw(image.shape[1], image.shape[0])[:4] for image in images]
        pack_regions(images, boxes)
    return (time.thread_time() - start) / len(raws)


def device_crop_seconds(raws: list, crop_flip: CropFlip, draft_side: int | None, batch: int) -> float:
    """CPU seconds per image of the batched crop + flip (`crop_flip_batch`) run on this CPU, one thread:
    what the device does instead of the workers (on a GPU it costs no host CPU)."""
    batches = []
    for k in range(0, len(raws) - batch + 1, batch):
        images = [decode_array(raw, 0, draft_side)[0] for raw in raws[k : k + batch]]
        boxes = [crop_flip.draw(image.shape[1], image.shape[0])[:4] for image in images]
        regions, rois = pack_regions(images, boxes)
        batches.append((torch.from_numpy(regions), torch.from_numpy(rois), torch.rand(len(images)) < 0.5))
    start = time.thread_time()
    for regions, rois, flips in batches:
        crop_flip_batch(regions, rois, flips, crop_flip.size)
    return (time.thread_time() - start) / max(1, len(batches) * batch)


HEADER_ONLY_PASSES = 10  # one pass over 640 images is ~20 ms of CPU here: too short to time on a shared machine


def header_only_seconds(
    raws: list, crop_flip: CropFlip, draft_side: int | None, batch: int, passes: int = HEADER_ONLY_PASSES
) -> float:
    """CPU seconds per image of a worker of `decode_on="device"` on this thread, bytes in memory: read each
    JPEG's header (`read_for_device`: no pixel decoded; any other image would be decoded as before), draw
    the box and flip on its size, pack each batch's bytes (`encode_regions`); `passes` times over `raws`.
    The decode is left out: it moves to the device (`device_decode_seconds` runs it on this CPU)."""
    start = time.thread_time()
    for _ in range(passes):
        for k in range(0, len(raws), batch):
            images = [read_for_device(raw, 0, draft_side)[0] for raw in raws[k : k + batch]]
            boxes = [crop_flip.draw(image.shape[1], image.shape[0])[:4] for image in images]
            encode_regions(images, boxes)
    return (time.thread_time() - start) / (passes * len(raws))


def device_decode_seconds(
    raws: list, crop_flip: CropFlip, draft_side: int | None, batch: int, crop_share: list | None = None
) -> float:
    """CPU seconds per image of the main process's side of `decode_on="device"` run on this CPU, one thread:
    the batched `decode_jpeg` (libjpeg-turbo on the CPU), the draft averaging and region cut
    (`decode_regions`), then `crop_flip_batch`, on batches the header-only workers made (untimed). What a
    machine without a GPU would pay; on a GPU it is nvJPEG and device time. `crop_share` gets the seconds
    per image of `crop_flip_batch` alone."""
    batches = []
    for k in range(0, len(raws) - batch + 1, batch):
        images = [read_for_device(raw, 0, draft_side)[0] for raw in raws[k : k + batch]]
        draws = [crop_flip.draw(image.shape[1], image.shape[0]) for image in images]
        encoded, rois = encode_regions(images, [d[:4] for d in draws])
        batches.append((encoded, rois, torch.tensor([d[4] for d in draws], dtype=torch.bool)))
    cpu = torch.device("cpu")
    crop_seconds = 0.0
    start = time.thread_time()
    for encoded, rois, flips in batches:
        regions, failed = decode_regions(encoded, cpu)
        if failed:
            raise RuntimeError(f"{len(failed)} JPEGs of the benchmark shards failed to decode on the CPU")
        cut = time.thread_time()
        crop_flip_batch(regions, rois, flips, crop_flip.size)
        crop_seconds += time.thread_time() - cut
    images = max(1, len(batches) * batch)
    if crop_share is not None:
        crop_share.append(crop_seconds / images)
    return (time.thread_time() - start) / images


def tar_seconds(shards: Path, lean: bool) -> float:
    """CPU seconds per sample to read the members of the train shards and group them by key
    (no decoding): our lean reader (tarmembers.py) or tarfile through webdataset."""
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import tar_file_iterator

    from vitmpp.datasets.samples import _samples
    from vitmpp.datasets.tarmembers import read_members

    manifest = read_manifest(str(shards))
    urls = manifest.shard_urls("train")
    start, count = time.thread_time(), 0
    for url in urls:
        with open(url, "rb") as stream:
            files = (
                read_members(stream, url)
                if lean
                else (dict(f, __url__=url) for f in tar_file_iterator(stream, handler=reraise_exception))
            )
            count += sum(1 for _ in _samples(files))
    return (time.thread_time() - start) / max(1, count)


def _decode_only_per_core(settings: Settings, paths: dict) -> list[Row]:
    limit = min(settings.photo_count, 640)
    rounds = min(settings.rounds, 3)
    crop = settings.photo_crop
    batch = settings.loader_batch
    standard = pretrain_transform(crop)
    crop_flip, draft = CropFlip.of(standard), standard.decode_min_side
    fast = use_fast_jpeg(True)  # whether simplejpeg (the `fast` extra) is installed here
    kinds = {"full": raw_samples(paths["photo_shards"], limit), "resized": raw_samples(paths["resized_shards"], limit)}
    w, h = settings.photo_size
    title = {"full": f"{w}x{h} JPEG -> {crop}", "resized": f"--max-size {settings.max_size} -> {crop}"}

    def decode_only(raws, with_fast: bool) -> float:
        use_fast_jpeg(with_fast)
        try:
            return decode_only_seconds(raws, crop_flip, draft, batch)
        finally:
            use_fast_jpeg(True)

    crop_share: dict[str, list[float]] = {kind: [] for kind in kinds}  # DEVICE_DECODE: crop_flip_batch's part
    cases = []  # (kind, name, measure)
    for kind, raws in kinds.items():
        cases.append((kind, "PIL transform", lambda raws=raws: per_core_seconds(raws, standard, draft)))
        if fast:
            cases.append((kind, "decode-only (simplejpeg)", lambda raws=raws: decode_only(raws, True)))
        cases.append((kind, "decode-only (PIL decode)", lambda raws=raws: decode_only(raws, False)))
        cases.append(
            (kind, "device crop+flip on this CPU", lambda raws=raws: device_crop_seconds(raws, crop_flip, draft, batch))
        )
        cases.append((kind, HEADER_ONLY, lambda raws=raws: header_only_seconds(raws, crop_flip, draft, batch)))
        cases.append(
            (
                kind,
                DEVICE_DECODE,
                lambda raws=raws, kind=kind: device_decode_seconds(raws, crop_flip, draft, batch, crop_share[kind]),
            )
        )
    cases.append(("tar", "tar parsing, lean reader", lambda: tar_seconds(paths["photo_shards"], lean=True)))
    cases.append(("tar", "tar parsing, tarfile (webdataset)", lambda: tar_seconds(paths["photo_shards"], lean=False)))
    seconds: list[list[float]] = [[] for _ in cases]
    order = list(range(len(cases)))
    random.seed(0)
    torch.manual_seed(0)
    for r in range(rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            seconds[k].append(cases[k][2]())
    rows = []
    by_name = {}
    for (kind, name, _), series in zip(cases, seconds):
        by_name[(kind, name)] = series
        if kind == "tar":
            rows.append(
                Row(
                    "decode+RRC+flip per core",
                    name,
                    1e6 * median(series),
                    "us/sample",
                    f"members read and grouped by key, no decode; {settings.photo_count} 500x375 JPEG samples "
                    f"(3 members each); {rounds} rounds (min {1e6 * min(series):.0f}, max {1e6 * max(series):.0f})",
                    {"seconds": series},
                )
            )
            continue
        rate = 1 / median(series)
        goal = DECODE_ONLY_GOALS[kind] if name.startswith(("decode-only", "header-only")) else None
        what = {
            "PIL transform": "today's worker: PIL decode + timm RRC (bicubic) + flip",
            "decode-only (simplejpeg)": "worker of augment_on=device: simplejpeg decode, box/flip draw, region packing",
            "decode-only (PIL decode)": "the same without the `fast` extra: PIL decode",
            "device crop+flip on this CPU": f"crop_flip_batch (roi_align + flip) on batches of {batch}, one thread: "
            "the device's work, here on the CPU",
            HEADER_ONLY: "worker of decode_on=device (data.decode=gpu): JPEG header parse + box/flip draw + packing "
            "of the bytes (encode_regions); worker-side only: the decode itself moves to the device",
            DEVICE_DECODE: f"main-process side of decode_on=device run on this CPU, batches of {batch}, one thread: "
            "batched torchvision decode_jpeg (libjpeg-turbo) + region cut (decode_regions) + "
            f"crop_flip_batch (that crop alone {1000 * median(crop_share[kind] or [0.0]):.2f} ms/image); "
            "what a CPU-only main process would pay; on a GPU this is nvJPEG (device time), measured by "
            "benchmarks/gpu_check.sh part 2, not here",
        }[name]
        if name == HEADER_ONLY:
            what += f"; {HEADER_ONLY_PASSES} passes over the images per round"
        extra = {"rates": [1 / x for x in series], "goal": goal}
        if name == DEVICE_DECODE:
            extra.update(seconds_per_image=series, crop_flip_seconds_per_image=crop_share[kind])
        rows.append(
            Row(
                "decode+RRC+flip per core",
                f"{title[kind]}: {name}",
                rate,
                "img/s/core",
                f"{what}; images per CPU-second of one thread ({1000 * median(series):.3f} ms/image); "
                f"{len(kinds[kind])} images x {rounds} rounds (min {1 / max(series):.0f}, max {1 / min(series):.0f})"
                + (f"; {verdict(rate, goal)}" if goal else ""),
                extra,
            )
        )
    best = "decode-only (simplejpeg)" if fast else "decode-only (PIL decode)"
    for kind in kinds:
        ratio = speed_ratio(by_name[(kind, best)], by_name[(kind, "PIL transform")])
        rows.append(
            Row(
                "decode+RRC+flip per core",
                f"{title[kind]}: {best} / PIL transform",
                ratio[0],
                "x",
                f"worker CPU per image, same rounds; {fmt_ratio(ratio)}",
                {"rounds": list(ratio)},
            )
        )
        ratio = speed_ratio(by_name[(kind, HEADER_ONLY)], by_name[(kind, best)])
        rows.append(
            Row(
                "decode+RRC+flip per core",
                f"{title[kind]}: {HEADER_ONLY} / {best}",
                ratio[0],
                "x",
                f"worker CPU per image, same rounds (the decode moved to the device); {fmt_ratio(ratio)}",
                {"rounds": list(ratio)},
            )
        )
    ratio = speed_ratio(
        by_name[("tar", "tar parsing, lean reader")], by_name[("tar", "tar parsing, tarfile (webdataset)")]
    )
    rows.append(
        Row(
            "decode+RRC+flip per core",
            "tar parsing: lean reader / tarfile",
            ratio[0],
            "x",
            f"same rounds; {fmt_ratio(ratio)}",
            {"rounds": list(ratio)},
        )
    )
    return rows


def _decode_only_loaders(settings: Settings, paths: dict) -> list[Row]:
    """Whole loaders, max workers: CPU per image of the workers (and of the main process apart)."""
    transform = pretrain_transform(settings.photo_crop)
    batch = settings.loader_batch
    batches = max(1, settings.photo_count // batch)
    workers = max(settings.loader_workers)
    folders = {
        "full": paths["photos"],
        "resized": folder_from_shards(
            paths["resized_shards"],
            Path(settings.scratch) / f"photos-from-max{settings.max_size}-{settings.photo_count}",
        ),
    }
    shards = {"full": paths["photo_shards"], "resized": paths["resized_shards"]}
    w, h = settings.photo_size
    title = {"full": f"{w}x{h} JPEGs", "resized": f"--max-size {settings.max_size}"}
    candidates = []
    for kind in ("full", "resized"):
        candidates.append(
            (
                kind,
                "shard loader, PIL transform",
                lambda e, k=kind: our_loader(shards[k], transform, batch, workers, batches, epoch=e),
            )
        )
        candidates.append(
            (
                kind,
                "shard loader, decode-only",
                lambda e, k=kind: our_loader(
                    shards[k], transform, batch, workers, batches, epoch=e, augment_on="device"
                ),
            )
        )
        candidates.append(
            (
                kind,
                "ImageFolder+DataLoader, PIL transform",
                lambda e, k=kind: imagefolder_loader(folders[k], transform, batch, workers),
            )
        )
    main_cpu: list[list[float]] = [[] for _ in candidates]
    worker_cpu: list[list[float]] = [[] for _ in candidates]
    delivered: list[int] = [0 for _ in candidates]
    order = list(range(len(candidates)))
    for r in range(min(settings.rounds, 3) + 1):  # round 0 warms the page cache and is dropped
        for k in order if r % 2 == 0 else order[::-1]:
            main_s, worker_s, images = epoch_split_seconds(lambda k=k, r=r: candidates[k][2](r), batches)
            if r:
                main_cpu[k].append(main_s / images)
                worker_cpu[k].append(worker_s / images)
                delivered[k] = images
    rows, by_name = [], {}
    for (kind, name, _), mains, works, images in zip(candidates, main_cpu, worker_cpu, delivered):
        by_name[(kind, name)] = works
        per_image = median(works)
        rate = 1 / per_image if per_image > 0 else float("nan")
        note = (
            f"{workers} workers, batch {batch}, {images} images per epoch (worker start included); worker CPU "
            f"{1000 * per_image:.2f} ms/image, main process {1000 * median(mains):.2f} ms/image"
            + (" (the batched crop on this CPU: on a GPU, device time)" if "decode-only" in name else "")
        )
        if "decode-only" in name:
            note += f"; {verdict(rate, DECODE_ONLY_GOALS[kind])}"
        rows.append(
            Row(
                "data loader",
                f"{title[kind]}: {name} (images per worker CPU-second)",
                rate,
                "img/s/core",
                note,
                {"worker_cpu_per_image": works, "main_cpu_per_image": mains, "workers": workers},
            )
        )
    for kind in ("full", "resized"):
        for ours in ("shard loader, PIL transform", "shard loader, decode-only"):
            ratio = speed_ratio(by_name[(kind, ours)], by_name[(kind, "ImageFolder+DataLoader, PIL transform")])
            rows.append(
                Row(
                    "data loader",
                    f"{title[kind]}: {ours} / ImageFolder (worker CPU)",
                    ratio[0],
                    "x",
                    f"same rounds; {fmt_ratio(ratio)}; {verdict(ratio[0], 1.0)}",
                    {"rounds": list(ratio)},
                )
            )
    return rows


# ----------------------------------------------------------------------------- short epochs (issue 13)

STEP_SECONDS = 0.05  # a stand-in for the step's compute between batches


def short_epoch_overhead(spec, epochs: int) -> tuple[float, float, int]:
    """(seconds per step beyond STEP_SECONDS, data wait per step, steps) over `epochs` epochs, one loader
    per epoch as the training loop opens them, STEP_SECONDS of sleep per batch."""
    steps, waited = 0, 0.0
    started = time.perf_counter()
    for epoch in range(epochs):
        batches = iter(open_loader(spec, epoch=epoch))
        while True:
            asked = time.perf_counter()
            try:
                next(batches)
            except StopIteration:
                break
            waited += time.perf_counter() - asked
            steps += 1
            time.sleep(STEP_SECONDS)
        del batches
    wall = time.perf_counter() - started
    close_idle_workers()
    return wall / steps - STEP_SECONDS, waited / steps, steps


def _short_epochs(settings: Settings, paths: dict) -> list[Row]:
    """A linear probe on 10% of the labels has epochs of one batch: what opening a loader per epoch costs per
    step, with workers started every epoch (before) and kept across epochs, starting the next ahead (now)."""
    shards = paths["small_shards"]
    manifest = read_manifest(str(shards))
    n = manifest.split("train").num_samples
    batch = 64 if not settings.quick else 4
    workers = max(settings.loader_workers) or 1
    keep = tuple(range(0, n, 10))  # 10% of the samples: len(keep) // batch steps per epoch
    epochs = 60 if not settings.quick else 3
    rows = []
    for label, keep_indices, count in (
        ("10% of the samples", keep, epochs),
        ("all samples", None, max(1, epochs // 10)),
    ):
        spec = LoaderSpec(
            shards=str(shards),
            manifest=manifest,
            batch_size=batch,
            transform=pretrain_transform(32),
            training=True,
            num_workers=workers,
            keep_indices=keep_indices,
        )
        results = {}
        for arm, pools, ahead in (("kept", pool_module.MAX_IDLE_POOLS, True), ("restarted", 0, False)):
            saved = pool_module.MAX_IDLE_POOLS, pool_module.RUN_AHEAD
            pool_module.MAX_IDLE_POOLS, pool_module.RUN_AHEAD = pools, ahead
            try:
                results[arm] = short_epoch_overhead(spec, count)
            finally:
                pool_module.MAX_IDLE_POOLS, pool_module.RUN_AHEAD = saved
        per_epoch = results["kept"][2] // count
        for arm, (overhead, waited, steps) in results.items():
            what = (
                "workers kept across epochs, the next epoch started ahead"
                if arm == "kept"
                else "workers started every epoch (before issue 13)"
            )
            rows.append(
                Row(
                    "data loader",
                    f"epochs of {per_epoch} batch(es) ({label}): {arm} workers",
                    1000 * overhead,
                    "ms/step",
                    f"{what}; wall time per step beyond a {1000 * STEP_SECONDS:.0f} ms step, data wait "
                    f"{1000 * waited:.1f} ms/step; {steps} steps of {batch} 32 px images, {workers} workers",
                    {"data_wait_per_step": waited, "steps": steps},
                )
            )
    return rows
