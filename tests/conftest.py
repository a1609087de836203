"""Shared fixtures: digits shards made once per test session."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
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


@pytest.fixture
def http_server(tmp_path):
    """`python -m http.server` on 127.0.0.1 (a free port) serving a folder: start(root) -> base URL."""
    started = []

    def start(root: Path) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=2).close()
                return url
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)
