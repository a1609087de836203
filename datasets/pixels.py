"""Decoded pixels of any PIL mode as 8-bit RGB (`to_rgb`), with PIL and numpy only.

`to_rgb` is the one way a decoded image of any PIL mode becomes RGB, both where
make_shards reads input files and where the loader decodes shard members, because
PIL's own `convert("RGB")` clips 16- and 32-bit values at 255 (a 16-bit PNG comes out
white), turns 0..1 floats black and drops alpha.

Kept apart from the training transforms so that make_shards (which needs only this)
starts without importing torch and timm.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# transparent pixels are composited onto white, what a viewer shows (logos and product shots on
# transparent backgrounds), rather than keeping the arbitrary colours stored under them
ALPHA_BACKGROUND = 255
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_LAB_TO_SRGB = None


class UnknownScale(ValueError):
    """Pixels with no known 8-bit scale (32-bit integers outside 0..65535, floats outside 0..1)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` (any PIL mode) as 8-bit RGB, values scaled, never clipped.

    - `I;16*` and `I` are 16-bit grey (Pillow opens 16-bit PNG, TIFF and PGM so): v / 257;
      `I` values outside 0..65535 raise UnknownScale;
    - `F` follows the 0..1 float convention: v x 255; values outside it raise UnknownScale;
    - alpha (`RGBA`, `LA`, `PA`, `RGBa`, or a transparent colour of `P`, `L`, `RGB`) is
      composited onto white;
    - `LAB` (ICC Lab, D50) goes to sRGB through LittleCMS without its precomputed 8-bit
      table, which is off by up to 7 levels in dark colours;
    - `1`, `L`, `P`, `CMYK`, `YCbCr`, `HSV`, `RGBX`: Pillow's conversion, which is exact
      or the standard formula.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if mode == "F" else 65535.0
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > top:
            kind = "float pixels outside 0..1" if mode == "F" else "32-bit integer pixels outside 0..65535"
            raise UnknownScale(f"{kind} have no known 8-bit scale")
        grey = np.rint(values * (255.0 / top)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in _ALPHA or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
        return Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    if mode == "LAB":
        global _LAB_TO_SRGB
        from PIL import ImageCms

        if _LAB_TO_SRGB is None:
            _LAB_TO_SRGB = ImageCms.buildTransform(
                ImageCms.createProfile("LAB"),
                ImageCms.createProfile("sRGB"),
                "LAB",
                "RGB",
                flags=ImageCms.Flags.NOOPTIMIZE,
            )
        return ImageCms.applyTransform(image, _LAB_TO_SRGB)
    return image.convert("RGB")
