"""A validation or test split too small to choose on is said, with the fraction that would do
(issue 27, item 8): the real make_shards command on a real ImageFolder."""

from __future__ import annotations

import re
import sys

import numpy as np
from PIL import Image

from engine_helpers import run

MAKE_SHARDS = [sys.executable, "-m", "vitmpp.datasets.make_shards", "--quiet"]


def image_folder(root, per_class: int, classes: int = 2):
    for label in range(classes):
        (root / f"c{label}").mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(np.full((8, 8, 3), (k % 256, k // 256, label), dtype=np.uint8)).save(
                root / f"c{label}" / f"{k}.png"
            )


def test_a_tiny_validation_split_is_warned_with_the_fraction_that_would_not_be(tmp_path):
    image_folder(tmp_path / "tree", 300)
    small = run(
        MAKE_SHARDS
        + [
            "--source",
            "imagefolder",
            "--root",
            str(tmp_path / "tree"),
            "--out",
            str(tmp_path / "a"),
            "--val-fraction",
            "0.05",
            "--test-fraction",
            "0.2",
        ],
        cwd=tmp_path,
    )
    warned = [line for line in small.stderr.splitlines() if line.startswith("warning: The validation split")]
    assert len(warned) == 1, small.stderr
    assert "has 30 images" in warned[0] and "±18 points" in warned[0] and "noise" in warned[0], warned[0]
    fraction = re.search(r"pass --val-fraction (\d\.\d\d)", warned[0]).group(1)
    enough = run(
        MAKE_SHARDS
        + [
            "--source",
            "imagefolder",
            "--root",
            str(tmp_path / "tree"),
            "--out",
            str(tmp_path / "b"),
            "--val-fraction",
            fraction,
            "--test-fraction",
            "0.2",
        ],
        cwd=tmp_path,
    )
    assert "warning: The validation split" not in enough.stderr, enough.stderr
    # the test split (20% of 600) is above the limit and is not warned about
    assert "warning: The test split" not in small.stderr


def test_a_pre_split_tree_records_no_fraction_it_did_not_use(tmp_path):
    import json

    for split, n in (("train", 20), ("val", 6), ("test", 6)):
        image_folder(tmp_path / "tree" / split, n)
    run(
        MAKE_SHARDS + ["--source", "imagefolder", "--root", str(tmp_path / "tree"), "--out", str(tmp_path / "s")],
        cwd=tmp_path,
    )
    writer = json.loads((tmp_path / "s" / "_info.json").read_text())["vitmpp"]["writer"]
    assert writer["val_fraction"] is None and writer["test_fraction"] is None, writer
    # a tree without test/: its test split is carved with --test-fraction, which is then recorded
    for split, n in (("train", 20), ("val", 6)):
        image_folder(tmp_path / "tree2" / split, n)
    run(
        MAKE_SHARDS + ["--source", "imagefolder", "--root", str(tmp_path / "tree2"), "--out", str(tmp_path / "s2")],
        cwd=tmp_path,
    )
    writer = json.loads((tmp_path / "s2" / "_info.json").read_text())["vitmpp"]["writer"]
    assert writer["val_fraction"] is None and writer["test_fraction"] == 0.1, writer
