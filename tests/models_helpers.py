"""Shared pieces for the models tests: tiny encoders and images with known statistics."""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitmpp.models import create_encoder, create_objective

TINY = "vit_pico_patch4_16"  # 16 px, patch 4 -> 16 patches, width 64, 2 blocks
TINY_MAE = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def normalise(images01: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """What the loader does: (x - mean) / std per channel."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images01 - m) / s


def uint8_images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random images on the 8-bit grid, in [0, 1]: [B, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float() / 255.0


def blocky_images(batch: int, size: int = 16, patch: int = 4, seed: int = 0) -> torch.Tensor:
    """Images made of flat-coloured patches (an easy, learnable MPP task), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    grid = size // patch
    colours = torch.rand(batch, 3, grid, grid, generator=g)
    return colours.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def tiny_objective(name: str, seed: int = 0, encoder: str = TINY, num_classes: int | None = 10, **cfg):
    torch.manual_seed(seed)
    if name == "mae":
        cfg = {**TINY_MAE, **cfg}
    return create_objective(name, create_encoder(encoder), num_classes=num_classes, **cfg)


def _outputs(output) -> dict[str, torch.Tensor]:
    return {"loss": output.loss.detach(), **{k: v for k, v in output.extras.items() if isinstance(v, torch.Tensor)}}


def _differing(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def assert_randomness_is_resumable(
    make, pixels: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0
) -> None:
    """Fail unless the objective `make()` builds draws its randomness as models/objective.py says: from
    torch's global generator, so that what the loop checkpoints (model state + generator states) is all
    its next forward depends on (`assert_same_seed_same_forward`, `assert_resume_draws_the_same`)."""
    assert_same_seed_same_forward(make(), pixels, labels, seed)
    assert_resume_draws_the_same(make, pixels, labels, seed)


def assert_same_seed_same_forward(
    objective, pixels: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0
) -> None:
    """The same global seed gives the same forward, twice in a row (a private generator would have moved on)."""
    torch.manual_seed(seed)
    first = _outputs(objective(pixels, labels))
    torch.manual_seed(seed)
    again = _outputs(objective(pixels, labels))
    assert not _differing(first, again), (
        f"{type(objective).__name__}: the same global seed gave another forward ({_differing(first, again)}): "
        "it draws from a generator of its own"
    )


def assert_resume_draws_the_same(make, pixels: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0) -> None:
    """A run checkpointed between two forwards and resumed in a fresh process (another objective from
    `make()`, its state and the global generator state restored, nothing else) gives the second
    forward bit for bit."""
    objective = make()
    torch.manual_seed(seed)
    objective(pixels, labels)  # step 1 of the run
    state = {k: v.clone() for k, v in objective.state_dict().items()}
    rng = torch.get_rng_state()  # what the loop checkpoints with the model
    continued = _outputs(objective(pixels, labels))  # step 2, uninterrupted

    torch.manual_seed(seed + 1)  # the resumed process starts from anything
    resumed = make()
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    after = _outputs(resumed(pixels, labels))
    assert not _differing(continued, after), (
        f"{type(objective).__name__}: resumed from its state and the global generators, the next forward "
        f"differs ({_differing(continued, after)}): it draws from a generator no checkpoint holds"
    )
