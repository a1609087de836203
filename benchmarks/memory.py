"""Rows: memory per image for each objective, the largest batch for an 80 GB GPU, and
activation checkpointing (memory saved, speed lost).

Two measures:

* everywhere: the bytes autograd keeps for the backward pass per image (each
  saved tensor's storage counted once, found through `saved_tensors_hooks`),
  under bf16 autocast as a GPU run would have them, as the slope between two batch
  sizes. This is the part of the memory that grows with the batch; the CPU has no
  allocator peak to read;
* on CUDA: the allocator's peak (`max_memory_allocated`) of a whole training step at
  two batch sizes; the slope is the memory per image, the intercept the weights,
  gradients and AdamW state.

The largest batch = (memory - fixed) / per image, with fixed = 16 bytes per
parameter (fp32 weights, gradients and AdamW's two moments) where not measured.
"""

from __future__ import annotations

import torch

from .harness import Row, Settings, alternate, fmt_ratio, speed_ratio
from .objectives import OBJECTIVES
from .steps import autocast, build_objective, fixed_batch, make_step

GPU_BYTES = 80e9  # an 80 GB card (H100)
USABLE = 0.92  # what the allocator can use of it (CUDA context, fragmentation)
FIXED_BYTES_PER_PARAM = 16


def saved_activation_bytes(model, images, labels, precision: str) -> int:
    """Bytes of the distinct storages autograd saves during one forward of `model` on the batch."""
    storages: dict[tuple, int] = {}

    def pack(tensor):
        try:
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), tensor.device.type)
            storages[key] = max(storages.get(key, 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            storages[(id(tensor), "x")] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(images.device.type, precision):
        output = model(images, labels)
    del output
    # parameters are saved too (by linear layers) but do not grow with the batch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for (ptr, _), n in storages.items() if ptr not in params)


def _cuda_peak(model, batch: int, img: int, precision: str) -> int:
    images, labels = fixed_batch(batch, img, "cuda")
    step = make_step(model, images, labels, precision=precision)
    step()  # optimizer state exists from here on
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del images, labels, step
    return peak


def memory_rows(settings: Settings) -> list[Row]:
    rows: list[Row] = []
    enc, img = settings.encoder, settings.img_size
    # two batch sizes: the slope is per image; the intercept is what does not grow with the batch
    # (under autocast, the bf16 copies of the weights that linear layers save)
    small, large = (1, 3) if settings.device == "cpu" else (4, 12)
    probes = {b: fixed_batch(b, img, settings.device) for b in (small, large)}
    for name in OBJECTIVES:
        per_image = {}
        for ckpt in (False, True):
            model = build_objective(
                name, enc, img, mae_decoder=settings.mae_decoder, grad_checkpointing=ckpt, device=settings.device
            )
            saved = {b: saved_activation_bytes(model, *probes[b], "bf16") for b in (small, large)}
            per_image[ckpt] = (saved[large] - saved[small]) / (large - small)
        params = sum(p.numel() for p in model.parameters())
        fixed = FIXED_BYTES_PER_PARAM * params
        extra = {
            "saved_bytes_per_image": per_image[False],
            "saved_bytes_per_image_ckpt": per_image[True],
            "params": params,
        }
        note = (
            f"{enc} @{img}px, bf16 autocast: autograd keeps {per_image[False] / 2**20:.1f} MiB/image, "
            f"{per_image[True] / 2**20:.1f} MiB with activation checkpointing; {params / 1e6:.1f}M params"
        )
        largest = int((GPU_BYTES * USABLE - fixed) // per_image[False])
        largest_ckpt = int((GPU_BYTES * USABLE - fixed) // per_image[True])
        if settings.device == "cuda":
            del model
            torch.cuda.empty_cache()
            measured = {}
            for ckpt in (False, True):
                model = build_objective(
                    name, enc, img, mae_decoder=settings.mae_decoder, grad_checkpointing=ckpt, device="cuda"
                )
                small, large = (16, 64) if not settings.quick else (4, 8)
                peaks = [_cuda_peak(model, b, img, settings.precision) for b in (small, large)]
                slope = (peaks[1] - peaks[0]) / (large - small)
                intercept = peaks[0] - slope * small
                total = torch.cuda.get_device_properties(0).total_memory
                measured[ckpt] = {
                    "bytes_per_image": slope,
                    "fixed_bytes": intercept,
                    "largest_batch": int((total * 0.97 - intercept) // slope),
                    "device_bytes": total,
                }
                del model
                torch.cuda.empty_cache()
            extra["cuda"] = measured
            largest, largest_ckpt = measured[False]["largest_batch"], measured[True]["largest_batch"]
            note += (
                f"; CUDA allocator peak: {measured[False]['bytes_per_image'] / 2**20:.1f} MiB/image "
                f"({measured[True]['bytes_per_image'] / 2**20:.1f} checkpointed), fixed "
                f"{measured[False]['fixed_bytes'] / 2**30:.2f} GiB"
            )
        else:
            note += f"; largest batch estimated for {GPU_BYTES / 1e9:.0f} GB ({USABLE:.0%} usable)"
        rows.append(Row("memory", f"{name}: MiB per image", per_image[False] / 2**20, "MiB", note, extra))
        rows.append(
            Row(
                "memory",
                f"{name}: largest batch on 80 GB",
                largest,
                "images",
                f"activation checkpointing: {largest_ckpt} images",
                {"with_checkpointing": largest_ckpt},
            )
        )
    rows.append(_checkpointing_speed(settings))
    return rows


def _checkpointing_speed(settings: Settings) -> Row:
    """Speed of a MAE step with activation checkpointing against without (same weights)."""
    enc, img = settings.small_encoder, settings.small_img_size
    images, labels = fixed_batch(settings.batch, img, settings.device)
    plain = build_objective("mae", enc, img, mae_decoder=settings.mae_decoder, device=settings.device)
    ckpt = build_objective(
        "mae", enc, img, mae_decoder=settings.mae_decoder, grad_checkpointing=True, device=settings.device
    )
    ckpt.load_state_dict(plain.state_dict())
    seconds = alternate(
        {
            "plain": make_step(plain, images, labels, precision=settings.precision),
            "ckpt": make_step(ckpt, images, labels, precision=settings.precision),
        },
        rounds=settings.rounds,
        calls=settings.steps,
        warmup=settings.warmup,
        device=settings.device,
    )
    ratio = speed_ratio(seconds["ckpt"], seconds["plain"])
    return Row(
        "memory",
        "activation checkpointing: speed with / without",
        ratio[0],
        "x",
        f"mae {enc} @{img}px, batch {settings.batch}, {settings.precision}; {fmt_ratio(ratio)} "
        "(below 1: the price of recomputing each block's forward in the backward)",
        {"seconds": seconds},
    )
