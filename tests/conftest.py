"""Shared fixtures: digits shards made once per test session."""

from __future__ import annotations

import os
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


def live_children(excluding: set[int] = frozenset()) -> list:
    """This process's multiprocessing children (DataLoader workers among them) that really still run: a
    child another party reaped is listed by multiprocessing forever, so its pid is checked as well."""
    import multiprocessing

    def running(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    return [p for p in multiprocessing.active_children() if p.pid not in excluding and running(p.pid)]


@pytest.fixture(autouse=True)
def loader_workers_released():
    """Each test releases the loader workers it started: the kept-worker pools (datasets/pool.py) are
    closed when it ends, and a worker process the test started that is still alive after that fails
    the test (an unclosed loader would otherwise hold its workers, ~75 MB each, for the session)."""
    before = {p.pid for p in live_children()}
    yield
    pool = sys.modules.get("vitmpp.datasets.pool")  # a test that never opened a loader has nothing to close
    if pool is None:
        return
    pool.close_idle_workers()
    deadline = time.monotonic() + 10  # a closed worker may take a moment to exit on a busy machine
    while (alive := live_children(before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"loader worker processes still running after the test: {[p.pid for p in alive]}"
