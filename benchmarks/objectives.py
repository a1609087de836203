"""Rows: objective step throughput (every registered objective, FLOPs, MFU; MAE vs MPP and
MAE vs supervised) and the attention path.

Same encoder, same batch, same precision for every objective; a step is forward +
backward + fused AdamW step. The objectives are those of the registry
(`vitmpp.models.objective_names()`), so a new one gets its rows with no edit here; each
runs with the options `steps.build_objective` gives it (recorded in the row). The speed
ratio MAE/supervised is set against their FLOP ratio (the goal: speed ratio >= 0.9 x FLOP
ratio).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitmpp.common.tracking import peak_flops
from vitmpp.models import flops_per_image, objective_names

from .harness import Row, Settings, alternate, fmt_ratio, median, speed_ratio, spread, verdict
from .steps import attention_modules, build_objective, fixed_batch, make_step

# every registered objective (mae, mpp, simmim, supervised, ...): the rows of this module and memory.py
OBJECTIVES = tuple(objective_names())
FLOP_RATIO_SHARE = 0.9  # goal: measured speed ratio >= 0.9 x the FLOP ratio


def _peak(settings: Settings) -> float | None:
    if settings.device != "cuda":
        return None
    return peak_flops(settings.peak_tflops)


def objective_rows(settings: Settings) -> list[Row]:
    """images/s per objective (with and without torch.compile where asked), FLOPs, MFU, ratios."""
    rows: list[Row] = []
    images, labels = fixed_batch(settings.batch, settings.img_size, settings.device)
    peak = _peak(settings)
    size = f"{settings.encoder} @{settings.img_size}px, batch {settings.batch}, {settings.precision}"
    for compiled in settings.compile_modes:
        tag = " +compile" if compiled else ""
        steps, flops, options = {}, {}, {}
        for name in OBJECTIVES:
            model = build_objective(
                name, settings.encoder, settings.img_size, mae_decoder=settings.mae_decoder, device=settings.device
            )
            flops[name] = flops_per_image(model, settings.img_size)
            options[name] = model.options()
            steps[name] = make_step(model, images, labels, precision=settings.precision, compile_model=compiled)
        seconds = alternate(
            steps, rounds=settings.rounds, calls=settings.steps, warmup=settings.warmup, device=settings.device
        )
        for name in OBJECTIVES:
            per_step = median(seconds[name])
            ips = settings.batch / per_step
            achieved = flops[name] * ips
            mfu = achieved / peak if peak else None
            note = f"{size}; {flops[name] / 1e9:.1f} GFLOP/img (fwd+bwd); {achieved / 1e12:.3g} TFLOP/s achieved"
            if mfu is not None:
                note += f"; MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s"
            note += f"; spread {spread(seconds[name]):.0%}"
            rows.append(
                Row(
                    "objective step",
                    f"{name}{tag}",
                    ips,
                    "img/s",
                    note,
                    {
                        "seconds_per_step": seconds[name],
                        "flops_per_image": flops[name],
                        "mfu": mfu,
                        "achieved_tflops": achieved / 1e12,
                        "encoder": settings.encoder,
                        "img_size": settings.img_size,
                        "batch": settings.batch,
                        "precision": settings.precision,
                        "compile": compiled,
                        "options": options[name],
                    },
                )
            )
            if mfu is not None:
                rows.append(
                    Row("MFU", f"{name}{tag}", 100 * mfu, "%", f"{size}; peak {peak / 1e12:.0f} TFLOP/s dense bf16")
                )
        mae_vs_mpp = speed_ratio(seconds["mae"], seconds["mpp"])
        rows.append(
            Row(
                "objective step",
                f"MAE/MPP step speed{tag}",
                mae_vs_mpp[0],
                "x",
                f"MAE images/s / MPP images/s, {fmt_ratio(mae_vs_mpp)}; FLOP ratio MPP/MAE "
                f"{flops['mpp'] / flops['mae']:.2f}",
                {"rounds": list(mae_vs_mpp)},
            )
        )
        mae_vs_sup = speed_ratio(seconds["mae"], seconds["supervised"])
        flop_ratio = flops["supervised"] / flops["mae"]
        share = mae_vs_sup[0] / flop_ratio
        rows.append(
            Row(
                "objective step",
                f"MAE/supervised speed vs FLOP ratio{tag}",
                share,
                "of FLOP ratio",
                f"speed ratio {fmt_ratio(mae_vs_sup)} vs FLOP ratio {flop_ratio:.2f}; "
                f"{verdict(share, FLOP_RATIO_SHARE)}",
                {"speed_ratio": list(mae_vs_sup), "flop_ratio": flop_ratio},
            )
        )
    return rows


# ----------------------------------------------------------------------------- attention path


class AttentionKernels(TorchDispatchMode):
    """Counts the attention kernels and softmaxes a forward dispatches."""

    def __init__(self):
        super().__init__()
        self.kernels: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "scaled_dot_product" in name or name in ("_softmax", "softmax"):
            self.kernels[name] = self.kernels.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def attention_kernels(model, images, labels, precision: str) -> dict[str, int]:
    """Which aten attention kernels one forward of `model` runs (and how often)."""
    from .steps import autocast

    counter = AttentionKernels()
    with torch.no_grad(), autocast(images.device.type, precision), counter:
        model(images, labels)
    return counter.kernels


def flash_usable(model, images, labels) -> bool | None:
    """On CUDA: does a bf16 forward run with only the flash SDPA backend allowed? (None on CPU)."""
    if images.device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
            model(images, labels)
        return True
    except RuntimeError:
        return False


def attention_rows(settings: Settings) -> list[Row]:
    """Fused SDPA in every objective (which kernel), and its speed against timm's unfused path."""
    rows: list[Row] = []
    encoder, img = settings.small_encoder, settings.small_img_size
    images, labels = fixed_batch(settings.batch, img, settings.device)
    size = f"{encoder} @{img}px, batch {settings.batch}, {settings.precision}"
    for name in OBJECTIVES:
        fused = build_objective(name, encoder, img, mae_decoder=settings.mae_decoder, device=settings.device)
        unfused = build_objective(
            name, encoder, img, mae_decoder=settings.mae_decoder, device=settings.device, fused_attn=False
        )
        unfused.load_state_dict(fused.state_dict())
        layers = attention_modules(fused)
        kernels = attention_kernels(fused, images, labels, settings.precision)
        sdpa_calls = sum(v for k, v in kernels.items() if "scaled_dot_product" in k)
        flash = flash_usable(fused, images, labels)
        seconds = alternate(
            {
                "fused": make_step(fused, images, labels, precision=settings.precision),
                "unfused": make_step(unfused, images, labels, precision=settings.precision),
            },
            rounds=settings.rounds,
            calls=settings.steps,
            warmup=settings.warmup,
            device=settings.device,
        )
        ratio = speed_ratio(seconds["fused"], seconds["unfused"])
        kernel_text = ", ".join(f"{k} x{v}" for k, v in sorted(kernels.items()))
        flash_text = "" if flash is None else f"; flash backend alone: {'runs' if flash else 'REFUSED'}"
        rows.append(
            Row(
                "attention",
                f"{name}: fused/unfused speed",
                ratio[0],
                "x",
                f"{size}; {fmt_ratio(ratio)}; {sdpa_calls}/{len(layers)} attention layers ran SDPA ({kernel_text})"
                f"{flash_text}",
                {
                    "kernels": kernels,
                    "layers": len(layers),
                    "all_fused": sdpa_calls == len(layers),
                    "flash": flash,
                    "seconds": seconds,
                },
            )
        )
    return rows
