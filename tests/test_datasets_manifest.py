"""The manifest: where it is found, what it must hold, and one-sentence errors when it is wrong."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from datasets_helpers import write_tiny_shards
from vitmpp.common.errors import UserError
from vitmpp.datasets import read_manifest
from vitmpp.datasets.manifest import MANIFEST_NAME


@pytest.fixture
def shards(tmp_path):
    write_tiny_shards(tmp_path, [3, 4], extra_splits={"validation": [2]})
    return tmp_path


def rewrite(root, edit):
    data = json.loads((root / MANIFEST_NAME).read_text())
    edit(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def test_found_from_folder_json_pattern_and_list(shards):
    pattern = str(shards / "tiny-train-{000000..000001}.tar")
    for spec in (shards, str(shards), shards / MANIFEST_NAME, pattern, [str(shards / "tiny-train-000001.tar")]):
        manifest = read_manifest(spec)
        assert manifest.split("train").shard_lengths == [3, 4]
    assert manifest.shard_urls("train") == [
        str(shards / "tiny-train-000000.tar"),
        str(shards / "tiny-train-000001.tar"),
    ]
    assert all(os.path.isabs(u) for u in manifest.shard_urls("validation"))
    assert read_manifest(manifest) is manifest


def test_labels_come_from_the_sidecar_without_decoding(shards):
    manifest = read_manifest(shards)
    for name in os.listdir(shards):  # no shard is opened: remove them all
        if name.endswith(".tar"):
            os.remove(shards / name)
    assert manifest.labels("train") == [i % 5 for i in range(7)]
    assert manifest.labels("validation") == [0, 1]


def test_unknown_split_lists_the_available_ones(shards):
    with pytest.raises(UserError, match=r"no split 'val' \(available: 'train', 'validation'\)"):
        read_manifest(shards).split("val")


def test_missing_manifest_names_the_path(tmp_path):
    with pytest.raises(UserError, match=f"No manifest at '{tmp_path / MANIFEST_NAME}'"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.clear(), "no 'splits'"),
        (lambda d: d["splits"]["train"].pop("shard_lengths"), "lacks or mangles"),
        (lambda d: d["splits"]["train"].update(num_samples=8), "sum to 7"),
        (lambda d: d["splits"]["train"]["filenames"].append("x.tar"), "2 shard_lengths"),
        (lambda d: d["splits"]["train"]["filenames"].__setitem__(0, "pipe:rm -rf ~"), "not a plain relative file name"),
        (lambda d: d["splits"]["train"]["filenames"].__setitem__(0, "../elsewhere.tar"), "not a plain relative"),
        (lambda d: d["splits"]["train"]["filenames"].__setitem__(0, "/etc/passwd"), "not a plain relative"),
        (lambda d: d.update(num_classes="ten"), "'num_classes' is 'ten'"),
    ],
)
def test_invalid_manifests_are_refused_with_the_file_named(shards, edit, message):
    rewrite(shards, edit)
    with pytest.raises(UserError, match=message) as caught:
        read_manifest(shards)
    assert str(shards / MANIFEST_NAME) in str(caught.value)


def test_not_json_is_refused(shards):
    (shards / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_manifest(shards)


def test_a_manifest_without_labels_says_how_to_fix_it(shards):
    rewrite(shards, lambda d: d["splits"]["train"].pop("labels_file"))
    with pytest.raises(UserError, match="stores no labels for split 'train'.*make_shards"):
        read_manifest(shards).labels("train")


def test_a_label_file_of_the_wrong_length_is_refused(shards):
    np.save(shards / "_labels-train.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(UserError, match="not 7 integers"):
        read_manifest(shards).labels("train")


def test_a_pipe_manifest_that_cannot_be_read_names_the_command_it_ran(shards):
    # pipe: shards find their manifest by running the same command on _info.json
    with pytest.raises(UserError, match="Manifest command 'cat /nonexistent/_info.json' cannot be read"):
        read_manifest("pipe:cat /nonexistent/x-train-000000.tar")
