"""Shared fixtures: digits shards made once per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits16(tmp_path_factory):
    """scikit-learn's digits as 16 px PNG shards (train + validation)."""
    from vitmpp.datasets import ensure_digits_shards

    out = tmp_path_factory.mktemp("digits16") / "shards"
    ensure_digits_shards(out, image_size=16)
    return out


@pytest.fixture(scope="session")
def digits32(tmp_path_factory):
    from vitmpp.datasets import ensure_digits_shards

    out = tmp_path_factory.mktemp("digits32") / "shards"
    ensure_digits_shards(out, image_size=32)
    return out
