"""Data ingest under real faults: symlink loops, links out of the tree, FIFOs and sockets where
files are read, empty class folders, every Pillow image mode, duplicate tar keys, a validation
fraction too small for the data, and validation classes that training never sees.

Each test builds real files (os.symlink, os.mkfifo, a bound AF_UNIX socket, images written by
Pillow). Whatever could block or print runs as the real command in a subprocess with a
timeout, so a hang fails the test instead of stalling the suite; follow-up checks that can
neither block nor print run in-process (`write_shards`, `open_loader`) to keep the file fast."""

from __future__ import annotations

import colorsys
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.data.transforms import MaybePILToTensor

from datasets_helpers import add_member, drop_member, index_of_image, replace_member, spec_for, write_tiny_shards
from engine_helpers import TINY, python_cmd, run
from vitmpp.common.errors import UserError
from vitmpp.common.io import atomic_write_json
from vitmpp.datasets import ShardWarning, open_loader, read_manifest, write_shards
from vitmpp.datasets.manifest import MANIFEST_NAME, Manifest

MAKE_SHARDS = [sys.executable, "-m", "vitmpp.datasets.make_shards"]
IDENTITY = MaybePILToTensor()
HANG = 120  # seconds: far above a tiny make_shards on a busy machine, far below "forever"


def make_shards(args, cwd: Path) -> subprocess.CompletedProcess:
    """The real command, with a timeout: a hang is a failure, not a stuck suite."""
    try:
        return run(MAKE_SHARDS + args + ["--quiet"], cwd=cwd, check=False, timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail(f"make_shards {' '.join(args)} did not finish in {HANG} s (blocked)")


def flat_image(red: int, blue: int) -> Image.Image:
    """A 16 px image coded by its colour: red = its number, blue = its class (exact in PNG)."""
    return Image.fromarray(np.full((16, 16, 3), (red, 0, blue), dtype=np.uint8))


def image_tree(root: Path, counts: dict[str, int]) -> dict[str, set[int]]:
    """Class folders of coded PNGs; returns each class's image numbers (red values)."""
    numbers, red = {}, 0
    for label, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        numbers[name] = set()
        for _ in range(n):
            flat_image(red, 100 + label).save(root / name / f"{red:03d}.png")
            numbers[name].add(red)
            red += 1
    return numbers


def loaded_codes(shards: Path) -> dict[str, list[tuple[int, int]]]:
    """(red, blue) of every image per class name, read back through the loader."""
    manifest = read_manifest(shards)
    out: dict[str, list] = {name: [] for name in manifest.class_names}
    for split in manifest.splits:
        for batch in open_loader(
            spec_for(shards, split=split, batch_size=8, transform=IDENTITY, training=False, num_workers=0)
        ):
            for image, label, index in zip(batch.images, batch.labels.tolist(), batch.indices.tolist()):
                if index >= 0:
                    out[manifest.class_names[label]].append((int(image[0, 0, 0]), int(image[2, 0, 0])))
    return out


def skipped_inputs(shards: Path) -> dict[str, str]:
    info = json.loads((shards / MANIFEST_NAME).read_text())["vitmpp"]
    assert info["num_skipped_inputs"] == len(info["skipped_inputs"])
    return {s["path"]: s["reason"] for s in info["skipped_inputs"]}


def no_partial_left(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


# ----------------------------------------------------------------------------- the tree read exactly


@pytest.mark.fault(
    "ImageFolder with a symlink loop (cat/loop -> ..) and links leading outside --root", expect="survived"
)
def test_imagefolder_never_follows_folder_links_and_labels_every_image_by_its_real_folder(tmp_path):
    root = tmp_path / "tree"
    numbers = image_tree(root, {"cat": 9, "dog": 11})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for k in range(4):  # images that are not part of the data set, whatever links point at them
        flat_image(200 + k, 50).save(outside / f"{k}.png")
    (root / "cat" / "loop").symlink_to("..")  # back to --root: dog would become cat
    (root / "cat" / "self").symlink_to(".")  # a loop onto itself
    (root / "dog" / "more").symlink_to(outside)  # a folder outside --root
    (root / "dog" / "farmed.png").symlink_to(outside / "0.png")  # a file outside --root: followed (the rule)
    (root / "cat" / "again.png").symlink_to(root / "cat" / "000.png")  # a file inside: followed (the rule)
    (root / ".ipynb_checkpoints").mkdir()  # hidden folder: not a class
    out = tmp_path / "shards"

    result = make_shards(
        ["--source", "imagefolder", "--root", str(root), "--out", str(out), "--val-fraction", "0.2"], tmp_path
    )

    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest.class_names == ["cat", "dog"]
    codes = loaded_codes(out)
    # exact counts: every real file once, plus the two file links; labels from the folder each file is in
    assert sorted(r for r, _ in codes["cat"]) == sorted([*numbers["cat"], 0])
    assert sorted(r for r, _ in codes["dog"]) == sorted([*numbers["dog"], 200])
    assert {b for _, b in codes["cat"]} == {100} and {b for _, b in codes["dog"]} == {101, 50}
    skipped = skipped_inputs(out)
    assert skipped["cat/loop"] == "symlink to a folder inside --root, not followed"
    assert skipped["cat/self"] == "symlink to a folder inside --root, not followed"
    assert skipped["dog/more"] == "symlink to a folder outside --root, not followed"
    assert "dog/farmed.png" not in skipped
    assert skipped[".ipynb_checkpoints"] == "hidden folder, not a class"
    assert f"{len(skipped)} inputs skipped" in result.stdout


def test_an_imagefolder_already_split_keeps_its_splits_with_one_class_list(tmp_path):
    """The ImageNet layout (root/train/<class>, root/val/<class>, root/test/<class>): each image stays in
    its split and is labelled by its class folder, with one class list across the splits."""
    root = tmp_path / "tree"
    numbers = {
        "train": image_tree(root / "train", {"cat": 6, "dog": 5}),
        "validation": image_tree(root / "val", {"cat": 2, "dog": 3}),
        "test": image_tree(root / "test", {"dog": 2}),
    }  # a class may be missing from val/test
    out = tmp_path / "shards"
    result = make_shards(["--source", "imagefolder", "--root", str(root), "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest.class_names == ["cat", "dog"]
    assert {split: manifest.split(split).num_samples for split in manifest.splits} == {
        "train": 11,
        "validation": 5,
        "test": 2,
    }
    made = json.loads((out / MANIFEST_NAME).read_text())["vitmpp"]["splits_made_by"]
    assert set(made) == {"train", "validation", "test"} and all("own split folders" in how for how in made.values())
    for split, per_class in numbers.items():  # every image where it was, with its class's label
        batch_codes = {name: set() for name in manifest.class_names}
        for batch in open_loader(
            spec_for(out, split=split, batch_size=4, transform=IDENTITY, training=False, num_workers=0)
        ):
            for image, label, index in zip(batch.images, batch.labels.tolist(), batch.indices.tolist()):
                if index >= 0:
                    batch_codes[manifest.class_names[label]].add(int(image[0, 0, 0]))
        # image_tree numbers images per tree from 0; blue codes the class within its own tree
        assert {name: len(codes) for name, codes in batch_codes.items() if codes} == {
            name: len(n) for name, n in per_class.items()
        }


def test_an_imagefolder_with_train_and_test_only_gets_validation_from_train(tmp_path):
    root = tmp_path / "tree"
    image_tree(root / "train", {"cat": 10, "dog": 10})
    image_tree(root / "test", {"cat": 3, "dog": 3})
    manifest = write_shards(tmp_path / "shards", "imagefolder", root=root, val_fraction=0.2, progress=False)
    assert {split: manifest.split(split).num_samples for split in manifest.splits} == {
        "train": 16,
        "validation": 4,
        "test": 6,
    }
    made = json.loads((tmp_path / "shards" / MANIFEST_NAME).read_text())["vitmpp"]["splits_made_by"]
    assert made["validation"].startswith("carved from train/ by a class-stratified --val-fraction 0.2")


@pytest.mark.fault(
    "ImageFolder whose layout is ambiguous (split folders beside classes, images directly in "
    "train/, a class only in val/)",
    expect="clear error",
)
@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train/cat": 3, "train/dog": 3, "bird": 3}, "mixes split folders (train) with other folders ('bird')"),
        ({"train": 3, "val": 3}, "holds train/, val/ with images directly inside"),
        ({"train/cat": 3, "val/cat": 2, "val/dog": 2}, "Class folder 'dog' of"),
        ({"train/cat": 3, "val/cat": 2, "validation/cat": 2}, "has both val/ and validation/"),
    ],
)
def test_an_ambiguous_split_tree_is_refused_in_one_sentence(tmp_path, layout, message):
    root = tmp_path / "tree"
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True)
        for k in range(n):
            flat_image(k, 0).save(root / folder / f"{k}.png")
    result = make_shards(["--source", "imagefolder", "--root", str(root), "--out", str(tmp_path / "shards")], tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "shards").exists()


@pytest.mark.fault("FIFO, socket and a link to a FIFO inside an ImageFolder", expect="survived")
def test_special_files_in_a_class_folder_are_skipped_without_being_opened(tmp_path):
    root = tmp_path / "tree"
    numbers = image_tree(root, {"cat": 6, "dog": 6})
    os.mkfifo(root / "cat" / "pipe.jpg")  # opening it for reading waits for a writer forever
    (root / "dog" / "pipe-link.png").symlink_to(root / "cat" / "pipe.jpg")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "dog" / "socket.png"))
    out = tmp_path / "shards"
    try:
        result = make_shards(
            ["--source", "imagefolder", "--root", str(root), "--out", str(out), "--val-fraction", "0.2"], tmp_path
        )
    finally:
        listener.close()

    assert result.returncode == 0, result.stderr[-3000:]
    assert no_partial_left(tmp_path)
    skipped = skipped_inputs(out)
    assert skipped["cat/pipe.jpg"] == "a FIFO, not a regular file"
    assert skipped["dog/pipe-link.png"] == "symlink to a FIFO, not followed"
    assert skipped["dog/socket.png"] == "a socket, not a regular file"
    codes = loaded_codes(out)
    assert {name: sorted(r for r, _ in c) for name, c in codes.items()} == {k: sorted(v) for k, v in numbers.items()}


@pytest.mark.fault("FIFO or symlink loop under the --root of a torchvision data set", expect="clear error")
def test_torchvision_root_with_a_fifo_or_a_loop_is_refused_not_read(tmp_path):
    root = tmp_path / "tree"
    image_tree(root, {"cat": 3, "dog": 3})
    os.mkfifo(root / "dog" / "pipe.jpg")  # torchvision's ImageFolder would open it and wait
    out = tmp_path / "shards"
    args = ["--source", "torchvision", "--dataset", "ImageFolder", "--root", str(root), "--out", str(out)]

    result = make_shards(args, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "pipe.jpg" in result.stderr and "a FIFO" in result.stderr
    assert not out.exists() and no_partial_left(tmp_path)

    (root / "dog" / "pipe.jpg").unlink()
    (root / "cat" / "loop").symlink_to("..")  # torchvision's ImageFolder follows it (dog filed under cat)
    with pytest.raises(UserError, match="cat/loop' under --root is a symlink to one of its own parent folders"):
        write_shards(out, "torchvision", dataset="ImageFolder", root=root, progress=False)
    assert not out.exists() and no_partial_left(tmp_path)


@pytest.mark.fault("ImageFolder class folder that is empty or holds no readable image", expect="clear error")
def test_a_class_without_images_is_refused_so_labels_never_shift(tmp_path):
    root = tmp_path / "tree"
    image_tree(root, {"ant": 4, "cat": 4})
    (root / "bee").mkdir()  # sorted between ant and cat: it would silently take cat's label 1
    out = tmp_path / "shards"
    args = ["--source", "imagefolder", "--root", str(root), "--out", str(out), "--val-fraction", "0"]

    result = make_shards(args, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: Class folder 'bee' under '{root}' holds no files; add images or remove it (every folder is a "
        "class, and a class without images would take a label no sample has)."
    ]
    assert not out.exists() and no_partial_left(tmp_path)

    (root / "bee" / "notes.txt").write_text("not an image")  # files, none readable
    with pytest.raises(UserError, match=r"'bee' under .* has no readable image \(e.g. bee/notes.txt: not an image\)"):
        write_shards(out, "imagefolder", root=root, val_fraction=0, progress=False)
    assert not out.exists() and no_partial_left(tmp_path)


@pytest.mark.fault("--val-fraction too small for the classes (no validation image)", expect="clear error")
def test_a_validation_fraction_that_selects_nothing_is_said_with_the_fraction_that_would_not(tmp_path):
    root = tmp_path / "tree"
    image_tree(root, {"cat": 7, "dog": 5})
    out = tmp_path / "shards"

    result = make_shards(
        [
            "--source",
            "imagefolder",
            "--root",
            str(root),
            "--out",
            str(out),
            "--val-fraction",
            "0.05",
            "--test-fraction",
            "0",
        ],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warning == [
        "warning: --val-fraction 0.05 puts no image in the validation split (the largest class has 7 images, and a "
        "class needs 11 for one validation image at that fraction), so the shards have no validation split, which "
        "fine-tuning needs; pass --val-fraction 0.08 or more, or 0 to say you want none."
    ]
    assert list(read_manifest(out).splits) == ["train"]
    # the fraction it names does give a validation split
    from vitmpp.datasets.splits import SplitWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", SplitWarning)
        manifest = write_shards(tmp_path / "ok", "imagefolder", root=root, val_fraction=0.08, progress=False)
    assert manifest.split("validation").num_samples == 1


# ----------------------------------------------------------------------------- pixels of every mode


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """ICC Lab (D50; Pillow stores L as 0..255 and a, b as signed bytes) -> 8-bit sRGB, by the CIE
    formulas and the Bradford D50 -> D65 adaptation; out-of-gamut values clip in linear light."""
    L = lab[..., 0] / 255.0 * 100.0
    a, b = lab[..., 1].astype(np.int8).astype(float), lab[..., 2].astype(np.int8).astype(float)
    fy = (L + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = np.where(f**3 > 216 / 24389, f**3, (116 * f - 16) / (24389 / 27)) * np.array([0.96422, 1.0, 0.82521])
    bradford = np.array(
        [[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077], [0.0122982, -0.0204830, 1.3299098]]
    )
    to_rgb = np.array(
        [[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560], [0.0556434, -0.2040259, 1.0572252]]
    )
    linear = np.clip(xyz @ bradford.T @ to_rgb.T, 0, 1)
    return np.rint(255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055))


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return np.rint(rgb * a + 255 * (1 - a))


def mode_samples() -> dict[str, tuple[Image.Image, str, np.ndarray]]:
    """name -> (image, file format, expected 8-bit RGB), for every mode a file can hold."""
    rng = np.random.default_rng(7)
    size = (16, 16)

    def u8(*channels):
        return rng.integers(0, 256, size + channels, dtype=np.uint8)

    out = {}
    bits = rng.integers(0, 2, size).astype(bool)
    out["1"] = (Image.fromarray(bits), "png", np.repeat(bits[..., None] * 255.0, 3, -1))
    grey = u8()
    out["L"] = (Image.fromarray(grey), "png", np.repeat(grey[..., None], 3, -1))
    rgb = u8(3)
    out["RGB"] = (Image.fromarray(rgb), "png", rgb)
    for mode, dtype, fmt in (("I;16", "<u2", "png"), ("I;16B", ">u2", "tiff"), ("I", "<i4", "tiff")):
        wide = rng.integers(0, 65536, size).astype(dtype)
        wide[0, :4] = (0, 65535, 32896, 257)  # black, white, the middle, one 8-bit level
        image = Image.frombytes(mode, size, wide.tobytes())
        out[mode] = (image, fmt, np.repeat(np.rint(wide / 257.0)[..., None], 3, -1))
    floats = rng.random(size).astype(np.float32)
    floats[0, :2] = (0.0, 1.0)
    out["F"] = (Image.fromarray(floats), "tiff", np.repeat(np.rint(floats * 255.0)[..., None], 3, -1))
    la = u8(2)
    out["LA"] = (
        Image.frombytes("LA", size, la.tobytes()),
        "png",
        over_white(np.repeat(la[..., :1], 3, -1), la[..., 1]),
    )
    rgba = u8(4)
    out["RGBA"] = (Image.frombytes("RGBA", size, rgba.tobytes()), "png", over_white(rgba[..., :3], rgba[..., 3]))
    palette, index = rng.integers(0, 256, (256, 3), dtype=np.uint8), u8()
    p = Image.frombytes("P", size, index.tobytes())
    p.putpalette(palette.tobytes())
    out["P"] = (p, "png", palette[index])
    pt = p.copy()
    table = rng.integers(0, 256, 256, dtype=np.uint8)
    pt.info["transparency"] = table.tobytes()
    out["P+transparency"] = (pt, "png", over_white(palette[index], table[index]))
    pa_raw = u8(2)
    pa = Image.frombytes("PA", size, pa_raw.tobytes())
    pa.putpalette(palette.tobytes())
    out["PA"] = (pa, "tiff", over_white(palette[pa_raw[..., 0]], pa_raw[..., 1]))
    cmyk = u8(4).astype(float)
    out["CMYK"] = (
        Image.frombytes("CMYK", size, cmyk.astype(np.uint8).tobytes()),
        "tiff",
        np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255),
    )
    ycc = u8(3)
    y, cb, cr = (ycc[..., k].astype(float) for k in range(3))
    out["YCbCr"] = (
        Image.frombytes("YCbCr", size, ycc.tobytes()),
        "tiff",
        np.clip(
            np.rint(
                np.stack(
                    [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)],
                    -1,
                )
            ),
            0,
            255,
        ),
    )
    lab = u8(3)
    out["LAB"] = (Image.frombytes("LAB", size, lab.tobytes()), "tiff", lab_to_srgb(lab))
    return out


MODES = list(mode_samples())


@pytest.fixture(scope="module")
def modes_through_make_shards(tmp_path_factory):
    """Every mode as an image file in its own class folder, through the real make_shards and the
    loader; returns (class name -> loaded uint8 HWC image, skipped inputs)."""
    tmp = tmp_path_factory.mktemp("modes")
    root = tmp / "tree"
    for name, (image, fmt, _) in mode_samples().items():
        folder = root / name.replace(";", "_")
        folder.mkdir(parents=True)
        image.save(folder / f"image.{fmt}")
    # float pixels on no known scale: skipped with the reason, never clipped into a class
    Image.fromarray(np.full((16, 16), 300.0, dtype=np.float32)).save(root / "F" / "outside.tiff")
    out = tmp / "shards"
    write_shards(out, "imagefolder", root=root, val_fraction=0, progress=False)
    codes = {}
    manifest = read_manifest(out)
    for batch in open_loader(
        spec_for(out, split="train", batch_size=32, transform=IDENTITY, training=False, num_workers=0)
    ):
        for image, label, index in zip(batch.images, batch.labels.tolist(), batch.indices.tolist()):
            if index >= 0:
                codes[manifest.class_names[label]] = image.permute(1, 2, 0).numpy().astype(int)
    return codes, skipped_inputs(out)


@pytest.mark.fault(
    "image files in every Pillow mode (16-bit, float, alpha, palette, CMYK, YCbCr, LAB)", expect="survived"
)
@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_becomes_rgb_scaled_not_clipped(modes_through_make_shards, mode):
    codes, _ = modes_through_make_shards
    expected = mode_samples()[mode][2]
    got = codes[mode.replace(";", "_")]
    assert np.abs(got - expected).max() <= 1, f"{mode}: off by {np.abs(got - expected).max()} levels"


@pytest.mark.fault("float image file with pixels outside 0..1", expect="survived")
def test_pixels_with_no_known_scale_are_skipped_and_listed_not_clipped(modes_through_make_shards):
    _, skipped = modes_through_make_shards
    assert skipped == {"F/outside.tiff": "float pixels outside 0..1 have no known 8-bit scale"}


@pytest.mark.fault("image modes no file format holds (RGBX, HSV) and 32-bit integers above 16 bits", expect="survived")
def test_modes_without_a_file_format_convert_exactly():
    from vitmpp.datasets.pixels import UnknownScale, to_rgb

    rng = np.random.default_rng(3)
    rgbx = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.frombytes("RGBX", (16, 16), rgbx.tobytes()))), rgbx[..., :3])
    hsv = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    expected = np.array([[colorsys.hsv_to_rgb(*(px / 255.0)) for px in row] for row in hsv]) * 255
    got = np.asarray(to_rgb(Image.frombytes("HSV", (16, 16), hsv.tobytes()))).astype(int)
    assert np.abs(got - np.rint(expected)).max() <= 1
    with pytest.raises(UnknownScale, match="outside 0..65535"):
        to_rgb(Image.fromarray(np.array([[70000]], dtype=np.int32)))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.fault("shards written by another tool holding 16-bit, alpha, palette or CMYK images", expect="survived")
def test_the_loader_decodes_foreign_shard_images_of_every_mode_it_accepts(tmp_path):
    samples = mode_samples()
    in_png = [m for m in ("1", "L", "I;16", "LA", "RGBA", "P", "P+transparency") if samples[m][1] == "png"]
    write_tiny_shards(tmp_path, [len(in_png) + 1])
    shard = tmp_path / "tiny-train-000000.tar"
    for index, mode in enumerate(in_png):
        replace_member(shard, f"{index:08d}", "png", encoded(samples[mode][0], "PNG"))
    cmyk = Image.frombytes("CMYK", (16, 16), np.full((16, 16, 4), (0, 128, 255, 64), dtype=np.uint8).tobytes())
    key = f"{len(in_png):08d}"
    drop_member(shard, key, "png")
    add_member(shard, key, "jpg", encoded(cmyk, "JPEG"))
    got = {}
    for batch in open_loader(
        spec_for(tmp_path, split="train", batch_size=4, transform=IDENTITY, training=False, num_workers=0)
    ):
        for image, index in zip(batch.images, batch.indices.tolist()):
            if index >= 0:
                got[index] = image.permute(1, 2, 0).numpy().astype(int)
    assert sorted(got) == list(range(len(in_png) + 1))
    for index, mode in enumerate(in_png):
        assert np.abs(got[index] - samples[mode][2]).max() <= 1, mode
    # CMYK (0, 128, 255, 64) is (191, 95, 0) by the naive formula; JPEG keeps flat colours within a few levels
    assert np.abs(got[len(in_png)] - np.array([191, 95, 0])).max() <= 3


# ----------------------------------------------------------------------------- shards and the loader


def rename_key(shard: Path, old: str, new: str) -> None:
    """Give the members of sample `old` the key `new` (a writer that reused a key)."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            key, ext = name.split(".", 1)
            info = tarfile.TarInfo(f"{new if key == old else key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.fault("duplicated key inside a tar shard (adjacent or later)", expect="survived")
@pytest.mark.parametrize("duplicate, of", [(5, 4), (9, 2)], ids=["adjacent", "later"])
def test_a_duplicated_key_skips_only_the_repeat_and_reads_the_rest_of_the_shard(tmp_path, duplicate, of):
    write_tiny_shards(tmp_path, [12, 12])
    shard = tmp_path / "tiny-train-000000.tar"
    rename_key(shard, f"{duplicate:08d}", f"{of:08d}")
    loader = open_loader(
        spec_for(tmp_path, split="train", batch_size=4, transform=IDENTITY, training=False, num_workers=0)
    )
    seen = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShardWarning)
        for batch in loader:
            for image, label, index in zip(batch.images, batch.labels.tolist(), batch.indices.tolist()):
                if index >= 0:
                    seen[index] = (index_of_image(image), label)
    assert sorted(seen) == [i for i in range(24) if i != duplicate]
    assert all(code == (index, label) and label == index % 5 for index, (code, label) in seen.items())
    assert loader.skipped_samples == 1
    assert any(shard.name in str(w.message) and f"key {of:08d} more than once" in str(w.message) for w in caught)


@pytest.mark.fault("FIFO in place of a shard", expect="clear error")
def test_a_fifo_named_as_a_shard_is_refused_unopened(tmp_path):
    shards = tmp_path / "shards"
    write_tiny_shards(shards, [24, 24])
    fifo = shards / "tiny-train-000001.tar"
    fifo.unlink()
    os.mkfifo(fifo)
    try:
        result = run(
            python_cmd("pretrain/main.py") + TINY + ["train.global_batch=16", "train.steps=2", f"data.shards={shards}"],
            cwd=tmp_path,
            check=False,
            timeout=HANG,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pretraining blocked on the FIFO {fifo}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: Shard '{fifo}' listed in" in result.stderr and "is not a regular file" in result.stderr


# ----------------------------------------------------------------------------- fine-tuning


def shards_with_a_class_only_in_validation(out: Path) -> None:
    """Train holds classes 0..3 only, validation 0..4: class 'four' is never trained on."""
    train = write_tiny_shards(out / "a", [32], num_classes=4)
    val = write_tiny_shards(out / "b", [10], split="validation", num_classes=5)
    for part in ("a", "b"):
        for path in (out / part).iterdir():
            if path.name != MANIFEST_NAME:
                path.rename(out / path.name)
    manifest = Manifest(
        root=out,
        name="tiny",
        splits={**train.splits, **val.splits},
        num_classes=5,
        class_names=["zero", "one", "two", "three", "four"],
        image_size=16,
    )
    atomic_write_json(out / MANIFEST_NAME, manifest.to_json())


@pytest.mark.fault("validation split with a class the training split lacks", expect="survived")
def test_finetuning_warns_once_naming_validation_classes_training_never_sees(tmp_path):
    shards = tmp_path / "shards"
    shards_with_a_class_only_in_validation(shards)
    result = run(
        python_cmd("finetune/main.py")
        + [
            "protocol=scratch",
            "model.name=vit_pico_patch4_16",
            "model.img_size=16",
            "train.global_batch=16",
            "train.steps=2",
            "data.num_workers=0",
            "log.log_every=1",
            "optim.warmup_steps=1",
            f"data.shards={shards}",
            "run.name=scratch",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    warning = [line for line in result.stderr.splitlines() if "training never sees" in line]
    assert warning == [
        f"warning: validation split 'validation' of {shards} holds 1 class(es) that training never sees: 'four' "
        "(2 of 10 validation images, which no classifier trained here can get right); rewrite the shards so that "
        "every class is in 'train'."
    ]
