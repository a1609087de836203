"""Shared fixtures: digits shards made once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits16(tmp_path_factory):
    """scikit-learn's digits as 16 px PNG shards (train + validation)."""
    from vitmpp.datasets import digits_shards

    return Path(digits_shards(16, cache=tmp_path_factory.mktemp("digits16")))


@pytest.fixture(scope="session")
def digits32(tmp_path_factory):
    from vitmpp.datasets import digits_shards

    return Path(digits_shards(32, cache=tmp_path_factory.mktemp("digits32")))
