"""The `synthetic` source: procedurally drawn shapes on textured backgrounds.

The class is the (shape, colour) pair; everything else (position, size, rotation, background) is
drawn per image from a generator seeded by (seed, index), so any image can be regenerated alone.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from .sources import Item, Loaded, SourceData, register_source

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "bars")
TEXTURES = ("noise", "stripes", "gradient", "checker")


def synthetic_class_names(num_classes: int) -> list[str]:
    hues = math.ceil(num_classes / len(SHAPES))
    return [f"{SHAPES[c % len(SHAPES)]}-hue{(c // len(SHAPES)) * 360 // hues:03d}" for c in range(num_classes)]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], phase: float = 0.0):
        return [
            (
                cx + radii[k % len(radii)] * r * math.cos(angle + phase + 2 * math.pi * k / n),
                cy + radii[k % len(radii)] * r * math.sin(angle + phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if kind == "square":
        return ring(4, [1.0], math.pi / 4)
    if kind == "triangle":
        return ring(3, [1.0], -math.pi / 2)
    if kind == "diamond":
        return ring(4, [1.0, 0.55])
    if kind == "star":
        return ring(10, [1.0, 0.42], -math.pi / 2)
    if kind == "cross":  # a plus sign: 12 corners at two radii
        w = 0.34
        pts = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]
    raise ValueError(kind)


def draw_synthetic(index: int, label: int, num_classes: int, image_size: int, seed: int) -> Image.Image:
    """The synthetic image number `index` of class `label` (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    size = image_size
    hues = math.ceil(num_classes / len(SHAPES))
    shape = SHAPES[label % len(SHAPES)]
    hue = (label // len(SHAPES)) / hues + rng.uniform(-0.25, 0.25) / hues
    fg = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)))

    # background: a low-saturation texture that carries no class information
    bg_hue = rng.uniform()
    base = np.array(colorsys.hsv_to_rgb(bg_hue, rng.uniform(0.0, 0.3), rng.uniform(0.15, 0.6))) * 255
    other = np.array(colorsys.hsv_to_rgb((bg_hue + 0.5) % 1, rng.uniform(0.0, 0.3), rng.uniform(0.15, 0.6))) * 255
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    if texture == "noise":
        mix = rng.uniform(size=(size, size))
    elif texture == "stripes":
        theta, freq = rng.uniform(0, math.pi), rng.uniform(2, 6)
        mix = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    elif texture == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        mix = np.clip(0.5 + 0.7 * ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta)), 0, 1)
    else:
        cells = int(rng.integers(2, 6))
        mix = ((np.floor(xx * cells * 0.999) + np.floor(yy * cells * 0.999)) % 2).astype(float)
    pixels = base[None, None, :] * (1 - mix[..., None]) + other[None, None, :] * mix[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")

    # foreground shape, 30-45% of the side in radius, fully inside the image
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "ring":
        draw.ellipse(box, outline=fg, width=max(1, int(r * 0.35)))
    elif shape == "bars":
        for k in (-1, 0, 1):
            dx, dy = math.cos(angle + math.pi / 2) * k * r * 0.6, math.sin(angle + math.pi / 2) * k * r * 0.6
            end = (math.cos(angle) * r, math.sin(angle) * r)
            draw.line(
                [(cx + dx - end[0], cy + dy - end[1]), (cx + dx + end[0], cy + dy + end[1])],
                fill=fg,
                width=max(1, int(r * 0.22)),
            )
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fg)
    return image


@register_source("synthetic")
def synthetic_source(count: int = 1000, image_size: int = 32, num_classes: int = 10, seed: int = 0) -> SourceData:
    """`count` images, classes balanced (index i has label i % num_classes)."""

    def loader(i: int) -> Callable[[], Loaded]:
        return lambda: Loaded(draw_synthetic(i, i % num_classes, num_classes, image_size, seed))

    items = [Item(i % num_classes, f"synthetic[{i}]", loader(i)) for i in range(count)]
    return SourceData("synthetic", synthetic_class_names(num_classes), items=items)
