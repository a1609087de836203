"""A bad label is named with its value and reason, and the skip limit is judged on what it says
(issue 26, "unclear": labels). Real shards with real `cls` members rewritten."""

from __future__ import annotations

import warnings

import pytest
from timm.data.transforms import MaybePILToTensor

from datasets_helpers import replace_member, spec_for, write_tiny_shards
from vitmpp.datasets import open_loader
from vitmpp.datasets.loader import ShardWarning

IDENTITY = MaybePILToTensor()


def read_with_warnings(folder, **fields):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShardWarning)
        loader = open_loader(
            spec_for(folder, batch_size=4, transform=IDENTITY, training=False, num_workers=0, **fields)
        )
        indices = sorted(i for batch in loader for i in batch.indices.tolist() if i >= 0)
    return indices, loader, [str(w.message) for w in caught if issubclass(w.category, ShardWarning)]


@pytest.mark.fault("label (cls) that is negative, out of range, a float, text or '0_3'", expect="survived")
@pytest.mark.parametrize(
    "text,said",
    [
        (b"-1", "its label (cls) is -1, outside the manifest's classes 0..4"),
        (b"7", "its label (cls) is 7, outside the manifest's classes 0..4"),
        (b"3.0", "its label (cls) is '3.0', not a class number"),
        (b"cat", "its label (cls) is 'cat', not a class number"),
        (b"0_3", "its label (cls) is '0_3', not a class number"),
        (b"+3", "its label (cls) is '+3', not a class number"),
    ],
)
def test_a_bad_label_is_named_with_its_value(tmp_path, text, said):
    write_tiny_shards(tmp_path, [16])
    replace_member(tmp_path / "tiny-train-000000.tar", "00000003", "cls", text)
    indices, loader, messages = read_with_warnings(tmp_path)  # 1 of 16: within max_skip_fraction=0.1
    assert indices == [i for i in range(16) if i != 3] and loader.skipped_samples == 1
    assert any(f"sample 00000003 skipped ({said})" in m for m in messages), messages


@pytest.mark.fault("bad labels within max_skip_fraction, all in the first shard (6.25% under 10%)", expect="survived")
def test_bad_samples_within_the_limit_never_stop_the_epoch(tmp_path):
    write_tiny_shards(tmp_path, [16, 16, 16, 16])
    for key in range(4):  # 4 of 64: a running estimate over the first 20 samples would say 20%
        replace_member(tmp_path / "tiny-train-000000.tar", f"{key:08d}", "cls", b"x")
    indices, loader, _ = read_with_warnings(tmp_path, max_skip_fraction=0.1)
    assert loader.skipped_samples == 4 and indices == list(range(4, 64))
