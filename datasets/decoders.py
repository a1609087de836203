"""Decoders: a raw sample's image and label, as a PIL image, an array, or a JPEG left encoded.

- `decode_sample`: PIL, restricted to JPEG, PNG and WEBP, with JPEG draft scaling (`draft_side`);
  images of every mode become RGB through `pixels.to_rgb`, not a clipping `convert("RGB")`;
- `decode_array`: the same pixels as an HWC uint8 array, JPEGs through simplejpeg when installed;
- `read_for_device`: a JPEG the device can decode stays encoded, its size read from its header
  (`device_jpeg_size`); any other image is decoded as `decode_array` does.

A sample whose image or label is missing or bad raises `BadSample`, whose message says why.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .pixels import UnknownScale, to_rgb
from .samples import IMAGE_MEMBERS, RawSample

PIL_FORMATS = ["JPEG", "PNG", "WEBP"]
_LABEL = re.compile(r"-?[0-9]+", re.ASCII)


class BadSample(Exception):
    """A sample that cannot be used; the message says why."""


def _image_and_label(raw: RawSample, num_classes: int) -> tuple[bytes, int]:
    """The image member's bytes and the label of a raw sample; BadSample if either is missing or bad."""
    members = raw.members
    image_key = next((k for k in IMAGE_MEMBERS if k in members), None)
    if image_key is None:
        raise BadSample("no image member")
    if "cls" not in members:
        raise BadSample("no cls member")
    text = members["cls"].decode("utf-8", "replace").strip()
    # decimal digits only: Python's int() would also take '0_3', '+3', ' ３ ' (full-width) silently
    if not _LABEL.fullmatch(text):
        shown = repr(text) if len(text) <= 20 else repr(text[:17]) + "..."
        raise BadSample(f"its label (cls) is {shown}, not a class number")
    label = int(text)
    if num_classes > 0 and not 0 <= label < num_classes:
        raise BadSample(f"its label (cls) is {label}, outside the manifest's classes 0..{num_classes - 1}")
    return members[image_key], label


def _draft_scale(width: int, height: int, draft_side: int | None) -> int:
    """The reduction PIL's `draft` picks for a JPEG of this size (1, 2, 4 or 8; 1: none)."""
    if not draft_side or min(width, height) < 2 * draft_side:
        return 1
    fits = min(width // draft_side, height // draft_side)
    return next(s for s in (8, 4, 2, 1) if fits >= s)


def decode_sample(raw: RawSample, num_classes: int, draft_side: int | None) -> tuple[Image.Image, int]:
    """RGB image and label of a raw sample; BadSample if either is missing or unreadable."""
    data, label = _image_and_label(raw, num_classes)
    try:
        # not closed: closing drops the decoded pixels, and the file is bytes in memory
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        if draft_side and img.format == "JPEG" and _draft_scale(*img.size, draft_side) > 1:
            img.draft("RGB", (draft_side, draft_side))  # decode at 1/2, 1/4 or 1/8 scale
        img.load()
        # plain RGB is used as decoded (to_rgb would return an identical copy)
        image = img if img.mode == "RGB" and "transparency" not in img.info else to_rgb(img)
    except UnknownScale as err:
        raise BadSample(str(err)) from None
    except Exception as err:  # PIL raises many types on bad bytes (OSError, SyntaxError, ValueError, ...)
        raise BadSample(f"image cannot be decoded ({type(err).__name__})") from None
    return image, label


_JPEG_START = b"\xff\xd8\xff"
_SIMPLEJPEG = []  # [module or None], imported on first use


def _simplejpeg():
    if not _SIMPLEJPEG:
        try:
            import simplejpeg
        except ImportError:  # the optional extra `vitmpp[fast]`
            simplejpeg = None
        _SIMPLEJPEG.append(simplejpeg)
    return _SIMPLEJPEG[0]


def use_fast_jpeg(enabled: bool) -> bool:
    """Switch the simplejpeg path of `decode_array` off (or back on, when installed) in this process;
    returns whether it was on (the benchmarks measure both)."""
    was = _simplejpeg() is not None
    _SIMPLEJPEG.clear()
    if not enabled:
        _SIMPLEJPEG.append(None)
    return was


def _fast_jpeg(data: bytes, draft_side: int | None) -> np.ndarray | None:
    """A baseline/progressive YCbCr or grey JPEG decoded by libjpeg-turbo through simplejpeg (when
    installed) at PIL's draft scale, as HWC uint8 RGB: the very pixels PIL gives; None for anything
    else, and for any warning or error of libjpeg (strict mode), which PIL then decides on."""
    simplejpeg = _simplejpeg()
    if simplejpeg is None or not data.startswith(_JPEG_START):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        limit = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb check stays PIL's
        if colorspace not in ("YCbCr", "Gray") or (limit is not None and width * height > limit):
            return None
        s = _draft_scale(width, height, draft_side)
        # simplejpeg picks the smallest scale with at least these sides: PIL's draft size, ceil(side / s)
        sides = {"min_height": -(-height // s), "min_width": -(-width // s)} if s > 1 else {}
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **sides)
    except Exception:  # noqa: BLE001 - every failure goes to PIL, which says what is wrong
        return None


def decode_array(raw: RawSample, num_classes: int, draft_side: int | None) -> tuple[np.ndarray, int]:
    """`decode_sample` as an HWC uint8 RGB array (the decode-only workers of `augment_on="device"`).

    JPEGs go through libjpeg-turbo directly when simplejpeg is installed (the `fast` extra: ~20%
    less CPU than PIL + `np.asarray` on 500 x 375 photos, docs/benchmarks.md) with the same pixels,
    size and draft scale; every other image, and any JPEG libjpeg warns about, through PIL exactly
    as `decode_sample` (so the samples that are skipped are the same)."""
    data, label = _image_and_label(raw, num_classes)
    fast = _fast_jpeg(data, draft_side)
    if fast is not None:
        return fast, label
    image, label = decode_sample(raw, num_classes, draft_side)
    return np.asarray(image), label


# ----------------------------------------------------------------------------- JPEGs left to the device


@dataclass(eq=False)  # compared by identity: the views of one image share its region (device_augment.py)
class EncodedJpeg:
    """A JPEG a decode-only worker leaves encoded for the device (`LoaderSpec(decode_on="device")`):
    its bytes and what its header says, so that the crop boxes are drawn without decoding it."""

    data: bytes
    height: int  # the full size, as the header states it
    width: int
    scale: int  # the draft reduction the worker would decode it at (1, 2, 4 or 8; `_draft_scale`)
    url: str  # where it came from, for the note when the device cannot decode it
    key: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of the array `decode_array` would give: PIL's draft size, ceil(side / scale)."""
        return -(-self.height // self.scale), -(-self.width // self.scale), 3


# Read by hand, not by PIL's lazy Image.open: PIL's header does not say the frame type (arithmetic-coded
# and lossless frames, which nvJPEG refuses) nor whether 3 components are stored as RGB (Adobe transform
# 0), and it does not check that the file is whole; opening it also costs more than this walk.
# SOF markers: baseline, extended sequential and progressive Huffman-coded frames, which nvJPEG and
# libjpeg-turbo both decode; every other frame type (lossless, hierarchical, arithmetic-coded) is PIL's
_SOF_DEVICE = {0xC0, 0xC1, 0xC2}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device may decode, read from its header alone; None for any other.

    It must be an 8-bit Huffman-coded YCbCr or grey JPEG (libjpeg's colour-space rules: JFIF, Adobe
    transform, component ids) that ends with its EOI marker (a truncated file is then decoded, and
    refused, in the worker as before), within PIL's decompression-bomb limit (above it PIL warns or
    refuses, in the worker)."""
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return None
    frame, jfif, adobe_transform = None, False, None
    pos, end = 2, len(data)
    while True:
        if pos + 4 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a segment
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xD8, 0xD9) or length < 2 or pos + 2 + length > end:
            return None
        if marker == 0xDA:  # start of scan: the header is over
            break
        segment = data[pos + 4 : pos + 2 + length]
        if marker in _SOF_OTHER or (marker in _SOF_DEVICE and (frame is not None or len(segment) < 6)):
            return None
        if marker in _SOF_DEVICE:
            frame = segment
        elif marker == 0xE0 and segment.startswith(b"JFIF\0"):
            jfif = True
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        pos += 2 + length
    if frame is None:
        return None
    precision, height, width, components = (
        frame[0],
        int.from_bytes(frame[1:3], "big"),
        int.from_bytes(frame[3:5], "big"),
        frame[5],
    )
    if precision != 8 or components not in (1, 3) or not height or not width:
        return None
    if components == 3 and not jfif:  # stored as RGB rather than YCbCr (libjpeg's jdapimin.c rules)
        ids = frame[6:15:3]  # the three components' ids (each component: id, sampling, table)
        if adobe_transform == 0 or (adobe_transform is None and ids == b"RGB"):
            return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > limit:
        return None
    return height, width


def read_for_device(raw: RawSample, num_classes: int, draft_side: int | None) -> tuple[EncodedJpeg | np.ndarray, int]:
    """`decode_array` for the decode-only workers of `decode_on="device"`: a JPEG the device may decode
    (`device_jpeg_size`) stays encoded (an `EncodedJpeg`, its header read, no pixel decoded); every
    other image is decoded here exactly as `decode_array` does (so it is skipped, or not, as there)."""
    data, label = _image_and_label(raw, num_classes)
    size = device_jpeg_size(data)
    if size is None:
        return decode_array(raw, num_classes, draft_side)
    height, width = size
    return EncodedJpeg(
        data, height, width, _draft_scale(width, height, draft_side), raw.url, str(raw.members.get("__key__"))
    ), label
