"""Fixtures of the streamed-shard tests: a local HTTP server that can misbehave on purpose, and
the `fault` marker's record, shared with tests/reliability so that these faults are listed in
docs/reliability.md too (regenerate with
`VITMPP_RELIABILITY_REPORT=docs/reliability.md python -m pytest tests/reliability tests/distributed`)."""

from __future__ import annotations

import importlib.util
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

_RELIABILITY_CONFTEST = Path(__file__).resolve().parents[1] / "reliability" / "conftest.py"
_private_recorder = None


def _recorder(config):
    """tests/reliability/conftest.py as pytest loaded it (when that folder is collected too), so that
    both folders fill one table; else a private copy of it, which then writes the table itself."""
    global _private_recorder
    for plugin in config.pluginmanager.get_plugins():
        if Path(getattr(plugin, "__file__", "") or "").resolve() == _RELIABILITY_CONFTEST:
            return plugin, False
    if _private_recorder is None:
        spec = importlib.util.spec_from_file_location("vitmpp_reliability_recorder", _RELIABILITY_CONFTEST)
        _private_recorder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_private_recorder)
    return _private_recorder, True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    recorder, _ = _recorder(item.config)
    inner = recorder.pytest_runtest_makereport(item, call)
    next(inner)
    outcome = yield
    try:
        inner.send(outcome)
    except StopIteration:
        pass


def pytest_sessionfinish(session, exitstatus):
    recorder, private = _recorder(session.config)
    if private:
        recorder.pytest_sessionfinish(session, exitstatus)


# ----------------------------------------------------------------------------- a misbehaving HTTP server


class FlakyHandler(SimpleHTTPRequestHandler):
    """Serves `server.root`; `server.plan(path, n)` (n: this path's request count, from 1) says how
    to answer: None (normally), an HTTP status to send instead, "drop" (the headers with the
    whole Content-Length, a fifth of the body, then the connection closed), "vanish" (the
    connection closed without a word), "loop" (a redirect to itself) or "html" (a login page,
    status 200)."""

    def __init__(self, request, client_address, server):
        super().__init__(request, client_address, server, directory=str(server.root))

    def log_message(self, format, *args):  # keep the test output quiet; the server counts requests
        pass

    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests[self.path] = count = server.requests.get(self.path, 0) + 1
        action = server.plan(self.path, count)
        if action is None:
            return super().do_GET()
        if action == "vanish":
            self.close_connection = True
            return None
        if action in ("loop", "html"):  # a redirect to itself; an HTML page with status 200
            body = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>" if action == "html" else b""
            self.send_response(HTTPStatus.FOUND if action == "loop" else HTTPStatus.OK)
            if action == "loop":
                self.send_header("Location", self.path)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        if action == "drop":
            body = (server.root / self.path.lstrip("/")).read_bytes()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 5])
            self.wfile.flush()
            self.close_connection = True
            return None
        self.send_error(action)
        return None


class FlakyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, plan):
        super().__init__(("127.0.0.1", 0), FlakyHandler)
        self.root, self.plan, self.requests, self.lock = Path(root), plan, {}, threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def stop_soon(self) -> None:
        """Stop from a request's own thread: from then on, connections are refused."""
        with self.lock:
            if getattr(self, "_stopping", False):
                return
            self._stopping = True
        threading.Thread(target=self.stop, daemon=True).start()


@pytest.fixture
def serve():
    """serve(root, plan=None) -> a started FlakyServer on a free port of 127.0.0.1 (stopped after the test)."""
    servers = []

    def start(root, plan=None) -> FlakyServer:
        server = FlakyServer(root, plan or (lambda path, n: None))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        try:
            server.stop()
        except OSError:
            pass
