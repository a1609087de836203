"""A training step as the engine takes it, without the engine's bookkeeping.

forward (autocast when bf16) -> loss.backward() -> fused AdamW step -> zero_grad,
on one fixed, already normalised batch that lives on the device: these rows
measure the model and the optimizer, not the data (the data rows do that).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from vitmpp.common.errors import ConfigError
from vitmpp.common.optim import build_optimizer
from vitmpp.common.sections import OptimConfig
from vitmpp.models import create_encoder, create_objective
from vitmpp.models.objective import objective_class

NUM_CLASSES = 1000  # the supervised head of the speed rows: ImageNet's classes


def build_objective(
    name: str,
    encoder: str,
    img_size: int,
    *,
    mae_decoder: dict | None = None,
    grad_checkpointing: bool = False,
    fused_attn: bool = True,
    device: str = "cpu",
    num_classes: int = NUM_CLASSES,
) -> nn.Module:
    """Registered objective `name` around a fresh `encoder` (the same architecture for every objective).

    Its options: for MAE, `mae_decoder` (the benchmark's decoder; None: the paper's); for every
    other objective its config defaults (the paper's), or, where those do not fit this encoder
    (a ConfigError, e.g. SimMIM's 32 px mask patches on a 16 px image), the embedded CPU demo's
    (`Objective.embedded_options`). `model.options()` tells which were used.
    """
    if name == "mae":
        model = create_objective(
            name, create_encoder(encoder, img_size=img_size), num_classes=num_classes, **dict(mae_decoder or {})
        )
    else:
        try:
            model = create_objective(name, create_encoder(encoder, img_size=img_size), num_classes=num_classes)
        except ConfigError:
            small = objective_class(name).embedded_options
            if not small:
                raise
            model = create_objective(name, create_encoder(encoder, img_size=img_size), num_classes=num_classes, **small)
    if grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)  # MAE's decoder follows the encoder's flag
    set_fused_attention(model, fused_attn)
    return model.to(device).train()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm's attention layers of `model` (encoder and, for MAE, decoder): those with a `fused_attn` flag."""
    return [m for m in model.modules() if hasattr(m, "fused_attn")]


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch timm's fused scaled-dot-product path on or off in every attention layer; returns how many."""
    layers = attention_modules(model)
    for layer in layers:
        layer.fused_attn = enabled
    return len(layers)


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def fixed_batch(batch: int, img_size: int, device: str, num_classes: int = NUM_CLASSES, seed: int = 0):
    """A batch of pixels [B, 3, S, S] float32 in [0, 1] (what an objective takes) and labels [B], on `device`."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, img_size, img_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    return images.to(device), labels.to(device)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The engines' optimizer: timm's AdamW with the fused kernel (MAE's betas and weight decay)."""
    return build_optimizer(model, OptimConfig(name="adamw", lr=1.5e-4, base_lr=None), lr=1.5e-4)


def make_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    precision: str,
    compile_model: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> Callable[[], None]:
    """A function running one training step of `model` on the fixed batch."""
    optimizer = optimizer or make_optimizer(model)
    forward = torch.compile(model) if compile_model else model
    device = images.device.type

    def step() -> None:
        with autocast(device, precision):
            output = forward(images, labels)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
