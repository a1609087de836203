"""What every benchmark row shares: sizes, timing, side-by-side ratios, result rows.

Absolute times on shared machines are noisy, so rows compare candidates in one run,
interleaved (A, B, A, B, ...: a slow spell hits both), and report the ratio of
medians with the spread of the per-round ratios.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Settings:
    """Sizes and repeats of one benchmark run; `for_run` picks them from device and --quick."""

    device: str  # "cpu" | "cuda"
    quick: bool  # CI smoke: tiny sizes, one repeat, no meaning in the numbers
    threads: int  # torch intra-op threads (CPU); every candidate gets the same
    rounds: int  # alternating A/B rounds per comparison
    steps: int  # timed steps per candidate per round
    warmup: int  # untimed steps per candidate before its first round
    # model rows
    encoder: str  # encoder of the objective rows (the same for all objectives)
    img_size: int
    batch: int
    small_encoder: str  # encoder of the A/B-heavy rows (attention path, checkpointing speed)
    small_img_size: int
    mae_decoder: dict  # decoder of the MAE rows
    precision: str  # "fp32" | "bf16" (autocast)
    compile_modes: tuple  # (False,) or (False, True)
    peak_tflops: float | None  # dense bf16 peak for MFU (None: looked up from the GPU, CPU: none)
    # data rows
    photo_count: int  # ImageNet-like JPEGs (500 x 375)
    photo_size: tuple  # (width, height)
    photo_crop: int  # RandomResizedCrop output of the photo rows
    max_size: int  # --max-size of the pre-resized shards
    small_count: int  # 32 px images
    loader_batch: int
    loader_workers: tuple  # worker counts of the scaling row
    # end to end / scaling
    e2e_encoder: str
    e2e_img_size: int
    e2e_batch: int
    e2e_steps: int
    e2e_workers: int
    scaling_steps: int
    scratch: str = ""  # folder for generated data and runs

    @classmethod
    def for_run(
        cls, device: str, quick: bool, scratch: str, threads: int | None = None, peak_tflops: float | None = None
    ) -> Settings:
        cores = os.cpu_count() or 1
        threads = threads or (1 if quick else cores)
        if device == "cuda":
            return cls(
                device=device,
                quick=quick,
                threads=threads,
                rounds=3 if quick else 5,
                steps=3 if quick else 10,
                warmup=2 if quick else 5,
                encoder="vit_base_patch16_224",
                img_size=224,
                batch=32 if quick else 128,
                small_encoder="vit_base_patch16_224",
                small_img_size=224,
                mae_decoder=dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
                precision="bf16",
                compile_modes=(False, True),
                peak_tflops=peak_tflops,
                photo_count=256 if quick else 1024,
                photo_size=(500, 375),
                photo_crop=224,
                max_size=256,
                small_count=512 if quick else 4096,
                loader_batch=64,
                loader_workers=(1, 4, 12),
                e2e_encoder="vit_base_patch16_224",
                e2e_img_size=224,
                e2e_batch=128,
                e2e_steps=20 if quick else 50,
                e2e_workers=min(12, max(1, cores - 2)),
                scaling_steps=0,
                scratch=scratch,
            )
        if quick:
            return cls(
                device=device,
                quick=True,
                threads=threads,
                rounds=2,
                steps=1,
                warmup=1,
                encoder="vit_pico_patch4_32",
                img_size=32,
                batch=4,
                small_encoder="vit_pico_patch4_16",
                small_img_size=16,
                mae_decoder=dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
                precision="fp32",
                compile_modes=(False,),
                peak_tflops=peak_tflops,
                photo_count=8,
                photo_size=(500, 375),
                photo_crop=224,
                max_size=256,
                small_count=32,
                loader_batch=4,
                loader_workers=(0, 1),
                e2e_encoder="vit_pico_patch4_16",
                e2e_img_size=16,
                e2e_batch=8,
                e2e_steps=6,
                e2e_workers=1,
                scaling_steps=4,
                scratch=scratch,
            )
        # full CPU run: ViT-B/16 at 224 for the objective rows (a step is ~20 s on 2 shared cores),
        # ViT-S/16 at 224 where many A/B rounds are needed
        return cls(
            device=device,
            quick=False,
            threads=threads,
            rounds=3,
            steps=2,
            warmup=1,
            encoder="vit_base_patch16_224",
            img_size=224,
            batch=8,
            small_encoder="vit_small_patch16_224",
            small_img_size=224,
            mae_decoder=dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
            precision="fp32",
            compile_modes=(False,),
            peak_tflops=peak_tflops,
            photo_count=640,
            photo_size=(500, 375),
            photo_crop=224,
            max_size=256,
            small_count=2048,
            loader_batch=32,
            loader_workers=(1, 2),
            e2e_encoder="vit_nano_patch4_32",
            e2e_img_size=32,
            e2e_batch=64,
            e2e_steps=60,
            e2e_workers=1,
            scaling_steps=40,
            scratch=scratch,
        )


@dataclass
class Row:
    """One line of the results table (and one record of the JSON)."""

    section: str  # e.g. "objective step", "data loader"
    name: str  # what was measured
    value: float | None  # the headline number (None: not measured here, see note)
    unit: str
    note: str = ""  # sizes, spread, target and whether it was met
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- timing


def synchronize(device: str | torch.device) -> None:
    """Wait for queued device work (CUDA); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], calls: int, device: str) -> float:
    """Seconds per call of `fn`, over `calls` calls, device work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / max(calls, 1)


def alternate(
    candidates: dict[str, Callable[[], Any]], *, rounds: int, calls: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of each candidate in `rounds` interleaved rounds (A, B, C, A, B, C, ...).

    Each candidate is warmed up first (`warmup` untimed calls: allocator, kernels,
    compilation). The order of the candidates alternates between rounds so none is
    always first after the others have heated the caches.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(time_calls(candidates[name], calls, device))
    return samples


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> float:
    """(max - min) / median: how noisy a series of timings was."""
    m = median(values)
    return (max(values) - min(values)) / m if m else float("nan")


def speed_ratio(seconds_a: list[float], seconds_b: list[float]) -> tuple[float, float, float]:
    """How much faster A is than B: (median B / median A, min and max of the per-round ratios).

    Both lists hold seconds per call from the same interleaved rounds.
    """
    per_round = [b / a for a, b in zip(seconds_a, seconds_b) if a > 0]
    return median(seconds_b) / median(seconds_a), min(per_round), max(per_round)


def fmt_ratio(ratio: tuple[float, float, float]) -> str:
    return f"{ratio[0]:.2f}x (rounds {ratio[1]:.2f}-{ratio[2]:.2f})"


def verdict(value: float, goal: float) -> str:
    """'met' or 'missed by N%' for a higher-is-better number against its goal."""
    if value >= goal:
        return f"goal >= {goal:g}: met"
    return f"goal >= {goal:g}: missed by {100 * (1 - value / goal):.0f}%"


def set_threads(n: int) -> None:
    """Same intra-op threads for every candidate (the peer included)."""
    torch.set_num_threads(n)


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
