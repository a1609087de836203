"""Training FLOPs per image, for MFU: counted by PyTorch, not estimated by formula.

`flops_per_image(objective)` rebuilds the objective on the meta device (no
memory, no arithmetic), runs one forward and backward on a batch of two images
under `torch.utils.flop_counter.FlopCounterMode`, and divides by two. The
counter counts matrix multiplies, convolutions and attention (the terms MFU
conventionally uses; elementwise work is left out). Activation recomputation is
not counted, as MFU's definition asks. Results are cached per (objective class,
options, encoder architecture, image size, classes).
"""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from .encoder import create_encoder, encoder_spec
from .objective import Objective, create_objective

_CACHE: dict[tuple, float] = {}
_BATCH = 2


def flops_per_image(objective: Objective, img_size: int | None = None) -> float:
    """Forward + backward FLOPs of one training image through `objective` at `img_size` (default: the encoder's)."""
    spec = encoder_spec(objective.encoder)
    size = int(img_size) if img_size is not None else spec["img_size"]
    key = (
        type(objective).__module__,
        type(objective).__qualname__,
        json.dumps(objective.options(), sort_keys=True),
        json.dumps({**spec, "img_size": size}, sort_keys=True, default=str),
        objective.num_classes,
    )
    if key not in _CACHE:
        _CACHE[key] = _count(objective, spec, size)
    return _CACHE[key]


def _count(objective: Objective, spec: dict, size: int) -> float:
    pos_embed = "learned" if spec["pos_embed"] == "sincos" else spec["pos_embed"]  # objectives fix it themselves
    with torch.device("meta"):
        encoder = create_encoder(spec["name"], img_size=size, pos_embed=pos_embed, **spec["overrides"])
        if spec["pos_embed"] == "sincos":
            encoder.pos_embed.requires_grad_(False)
        model = create_objective(
            type(objective).objective_name,
            encoder,
            objective.config,
            mean=objective.norm_mean,
            std=objective.norm_std,
            num_classes=objective.num_classes,
        )
        images = torch.zeros(_BATCH, 3, size, size)
        labels = torch.zeros(_BATCH, dtype=torch.long)
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        output = model(images, labels)
        output.loss.backward()
    return counter.get_total_flops() / _BATCH
