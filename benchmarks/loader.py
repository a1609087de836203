"""Rows: the data loader.

* our shard loader against torchvision `ImageFolder` + `DataLoader` on the same
  JPEGs, same transform (MAE's RandomResizedCrop + flip to uint8), same batch and
  workers, epochs alternating;
* decode + RandomResizedCrop + flip per core (one process, one thread, bytes
  already in memory): ImageNet-like 500 x 375 JPEGs -> 224, the same after
  `make_shards --max-size`, and 32 px images -> 32; plus the levers measured on
  the same bytes (PIL draft decoding, resize with a reducing gap);
* worker scaling of our loader.

Goals (issue 7): loader / ImageFolder >= 1.0 per core; >= 300 images/s/core at
224 from full JPEGs, >= 1,000 from pre-resized shards, >= 3,000 at 32 px;
worker scaling >= 0.9 x N. An H100 at 50% MFU eats ~8,400 MAE-B images/s,
~530/s per core of a 16-core host.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from vitmpp.datasets import LoaderSpec, open_loader, pretrain_transform, read_manifest
from vitmpp.datasets.samples import Tally, decode_sample, read_shard

from .data import folder_bytes, shards_from_folder, synthetic_shards, write_photo_folder
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
    """(wall, CPU) seconds to pull `batches` batches from a fresh iterator, worker start-up and exit included."""
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
    gc.collect()  # the workers are joined (and their CPU time reaped) when the iterator goes
    return wall, cpu_seconds() - cpu


def our_loader(shards: Path, transform, batch: int, workers: int, batches: int, epoch: int = 0):
    spec = LoaderSpec(shards=str(shards), manifest=read_manifest(shards), batch_size=batch, transform=transform,
                      training=True, num_workers=workers, shuffle_buffer=4 * batch, batches_per_epoch=batches)
    return open_loader(spec, epoch=epoch)


def imagefolder_loader(root: Path, transform, batch: int, workers: int):
    """torchvision's ImageFolder + DataLoader: the usual baseline (PIL open + convert, default collate)."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=transform)
    kwargs = {"prefetch_factor": 2} if workers else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=False, **kwargs)


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

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, reducing_gap: float = 3.0):
        from PIL import Image

        self.size, self.scale, self.ratio, self.hflip, self.gap = size, scale, ratio, hflip, reducing_gap
        self.bicubic = Image.Resampling.BICUBIC

    def __call__(self, image):
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop

        top, left, h, w = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        out = image.resize((self.size, self.size), self.bicubic, box=(left, top, left + w, top + h),
                           reducing_gap=self.gap)
        if random.random() < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


def prepare(settings: Settings) -> dict[str, Path]:
    scratch = Path(settings.scratch)
    w, h = settings.photo_size
    photos = write_photo_folder(scratch / f"photos-{w}x{h}-{settings.photo_count}", settings.photo_count,
                                settings.photo_size)
    return {
        "photos": photos,
        "photo_shards": shards_from_folder(photos, scratch / f"photo-shards-{settings.photo_count}"),
        "resized_shards": shards_from_folder(photos, scratch / f"photo-shards-{settings.photo_count}-max{settings.max_size}",
                                             max_size=settings.max_size),
        "small_shards": synthetic_shards(scratch / f"synthetic32-{settings.small_count}", settings.small_count, 32),
    }


def loader_rows(settings: Settings) -> list[Row]:
    torch.set_num_threads(1)  # the per-core rows: PIL is single-threaded, so should torch be
    paths = prepare(settings)
    rows: list[Row] = []
    rows += _versus_imagefolder(settings, paths)
    rows += _per_core(settings, paths)
    rows += _worker_scaling(settings, paths)
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
        pair = [("ours", lambda: our_loader(paths["photo_shards"], transform, batch, workers, batches, epoch=r)),
                ("theirs", lambda: imagefolder_loader(paths["photos"], transform, batch, workers))]
        for name, make in (pair if r % 2 == 0 else pair[::-1]):
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
        Row("data loader", "shard loader / ImageFolder+DataLoader (wall)", ratio[0], "x",
            f"{files} JPEGs {w}x{h} (mean {size / files / 1024:.0f} KiB) -> RandomResizedCrop {settings.photo_crop} + "
            f"flip, batch {batch}, {workers} workers, whole epochs (worker start included); ours {ours_rate:.0f} img/s, "
            f"ImageFolder {theirs_rate:.0f} img/s; {fmt_ratio(ratio)}; {verdict(ratio[0], 1.0)}",
            {"ours_images_per_sec": ours_rate, "imagefolder_images_per_sec": theirs_rate, "workers": workers,
             "rounds": list(ratio), "wall": wall}),
        Row("data loader", "shard loader / ImageFolder+DataLoader (per core)", cpu_ratio[0], "x",
            f"images per CPU-second (main process + workers): ours {ours_core:.0f}, ImageFolder {theirs_core:.0f}; "
            f"{fmt_ratio(cpu_ratio)}; {verdict(cpu_ratio[0], 1.0)}",
            {"ours_images_per_cpu_second": ours_core, "imagefolder_images_per_cpu_second": theirs_core, "cpu": cpu}),
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
        (f"{w}x{h} JPEG -> {crop}", full, standard, standard.decode_min_side, 300,
         "PIL decode (draft inactive: the smallest 0.2-area crop needs the full image) + timm RRC"),
        (f"--max-size {settings.max_size} shards -> {crop}", resized, standard, standard.decode_min_side, 1000,
         "pre-resized on write; the rest as above"),
        ("32 px JPEG -> 32", small, pretrain_transform(32), pretrain_transform(32).decode_min_side, 3000, "32 px synthetic shards"),
        (f"{w}x{h} JPEG -> {crop}, lever: reducing-gap RRC", full, ReducingGapRandomResizedCrop(crop), None, 300,
         "one PIL resize(box, reducing_gap=3) instead of crop + full bicubic"),
        (f"--max-size {settings.max_size} -> {crop}, lever: reducing-gap RRC", resized, ReducingGapRandomResizedCrop(crop),
         None, 1000, "pre-resized and reducing-gap RRC"),
        (f"{w}x{h} JPEG -> {crop}, lever: bilinear", full, pretrain_transform(crop, interpolation="bilinear"),
         standard.decode_min_side, 300, "data.interpolation=bilinear instead of MAE's bicubic"),
        (f"--max-size {settings.max_size} -> {crop}, lever: bilinear", resized,
         pretrain_transform(crop, interpolation="bilinear"), standard.decode_min_side, 1000,
         "pre-resized and bilinear"),
    ]
    # interleaved: every case once per round, the order reversed every other round
    random.seed(0)
    seconds: list[list[float]] = [[] for _ in cases]
    order = list(range(len(cases)))
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            _, raws, transform, draft, _, _ = cases[k]
            seconds[k].append(per_core_seconds(raws, transform, draft))
    for (name, raws, transform, draft, goal, how), series in zip(cases, seconds):
        rate = 1 / median(series)
        all_rates = [1 / s for s in series]
        need = f"; an H100 needs ~{H100_NEED_PER_CORE}/core" if str(crop) in name.split("->")[-1] else ""
        rows.append(Row("decode+RRC+flip per core", name, rate, "img/s/core",
                        f"{how}; images per CPU-second of one thread; {len(raws)} images x {rounds} rounds (min {min(all_rates):.0f}, max "
                        f"{max(all_rates):.0f}); {verdict(rate, goal)}{need}", {"rates": all_rates, "goal": goal}))
    for lever, base, what in ((1, 0, "pre-resized shards (--max-size)"), (3, 0, "reducing-gap RRC"),
                              (4, 0, "pre-resized + reducing-gap"), (5, 0, "bilinear"),
                              (6, 0, "pre-resized + bilinear")):
        ratio = speed_ratio(seconds[lever], seconds[base])
        rows.append(Row("decode+RRC+flip per core", f"lever speed-up: {what}", ratio[0], "x",
                        f"vs {cases[base][0]}, same rounds; {fmt_ratio(ratio)}", {"rounds": list(ratio)}))
    return rows


def _worker_scaling(settings: Settings, paths: dict) -> list[Row]:
    transform = pretrain_transform(settings.photo_crop)
    batch = settings.loader_batch
    batches = settings.photo_count // batch
    counts = list(settings.loader_workers)
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    cpu: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(min(settings.rounds, 3) + 1):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            wall_s, cpu_s = epoch_seconds(lambda: our_loader(paths["photo_shards"], transform, batch, n, batches, epoch=r),
                                          batches)
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
        rows.append(Row("data loader", f"worker scaling {base_n} -> {n}", efficiency, "of ideal",
                        f"speed-up {speedup:.2f}x for {ideal:g}x the workers ({batches * batch} images "
                        f"{settings.photo_size[0]}x{settings.photo_size[1]} -> {settings.photo_crop}, batch {batch}); "
                        f"CPU per image {1000 * median(cpu[n]) / (batches * batch):.1f} ms vs "
                        f"{1000 * median(cpu[base_n]) / (batches * batch):.1f} ms with {base_n} (equal: the work divides well, a "
                        "shortfall is cores taken by other processes); "
                        f"{os.cpu_count()} cores on this machine; {verdict(efficiency, 0.9)}",
                        {"seconds": {str(k): v for k, v in seconds.items()}, "cpu": {str(k): v for k, v in cpu.items()}}))
    return rows
