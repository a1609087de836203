"""The transport of shards and manifests: local files, `http(s)://` URLs, `pipe:` commands, and retries.

Streamed shards (`http(s)://` URLs, `pipe:` commands; docs/streaming.md): a failure of the
*transport* is told apart from damage to the *data*. An HTTP body that ends before its
Content-Length, a dropped connection, a stall, an HTTP 5xx/408/429, a refused connection, or
a `pipe:` command that exits non-zero after its first byte is retried: the shard is opened
again from its beginning and the samples already yielded are passed over, so the reader
yields exactly what an undisturbed read yields (exact resume holds). Retries back off
exponentially (`RETRY_FIRST_DELAY_S` doubling up to `RETRY_MAX_DELAY_S`), at most
`retry_policy()` attempts within its time budget, counted by the shard reader
(`samples.read_shard`, in `Tally.retries`). A shard that stays unreachable, an HTTP 4xx such as
404, or a `pipe:` command that fails before its first byte stops the run with a
`ShardUnreachable` sentence naming the URL: unlike a damaged shard, whose bytes are the same at
every read, skipping it would make the samples trained on depend on the network. A stream that
arrives whole but is not a valid tar is damage, as for a file.
"""

from __future__ import annotations

import os
import random
import select
import signal
import stat
import subprocess
import tempfile
import time

from vitmpp.common.errors import UserError


def open_local(url: str):
    """A local shard opened for reading after `stat` says it is a regular file (never a FIFO)."""
    mode = os.stat(url).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"{url} is not a regular file")
    return open(url, "rb")


# The retry policy of streamed shards, in one place. The attempts and the time budget can be set
# per run through the environment (the loader's worker processes inherit it); the delays cannot.
RETRIES_ENV = "VITMPP_DATA_RETRIES"
RETRY_TIMEOUT_ENV = "VITMPP_DATA_RETRY_TIMEOUT_S"
DEFAULT_RETRIES = 10  # retries of one shard read after its first failure
DEFAULT_RETRY_TIMEOUT_S = 300.0  # from the start of the first failed attempt to giving up
RETRY_FIRST_DELAY_S = 0.25  # the delays: 0.25, 0.5, 1, ... s, each x0.5-1 random jitter ...
RETRY_MAX_DELAY_S = 30.0  # ... never more than this
STALL_TIMEOUT_S = 60.0  # no byte for this long (HTTP connect or read, pipe output): a failed attempt
# HTTP answers worth asking again (the server is busy, restarting or overloaded); any other 4xx is final
RETRIED_HTTP = {408, 425, 429}
_JITTER = random.SystemRandom()  # never the global `random`: augmentations draw from it (exact resume)


def retry_policy() -> tuple[int, float]:
    """(retries, time budget in s) for one shard read, from the environment or the defaults."""

    def number(name: str, default: float, kind):
        text = os.environ.get(name, "").strip()
        if not text:
            return default
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if value < 0:
            raise UserError(
                f"Environment variable {name}={text!r} is not a non-negative number; unset it or give a number."
            )
        return value

    return number(RETRIES_ENV, DEFAULT_RETRIES, int), number(RETRY_TIMEOUT_ENV, DEFAULT_RETRY_TIMEOUT_S, float)


def is_streamed(url: str) -> bool:
    """Shards read over HTTP(S) or from a `pipe:` command: the ones whose reads are retried."""
    return url.startswith(("http://", "https://", "pipe:"))


class StreamFailed(OSError):
    """The transport of a streamed shard failed, not its contents (`reason` says how).
    `final`: asking again cannot help (an HTTP 404, a command that never produced a byte)."""

    def __init__(self, reason: str, final: bool = False):
        super().__init__(reason)
        self.reason, self.final = reason, final


class ShardUnreachable(UserError):
    """A streamed shard (or manifest) that could not be read within the retry policy."""


def _describe(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    if reason is not None and not isinstance(reason, str):
        err = reason  # urllib wraps the socket error
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.rstrip(".")


class _HttpStream:
    """An HTTP(S) response body that raises StreamFailed when the transport fails, including a body
    that ends before its Content-Length (http.client returns b"" there without a word)."""

    def __init__(self, url: str):
        import http.client
        import urllib.error
        import urllib.request

        self._errors = (OSError, http.client.HTTPException)
        try:
            self.response = urllib.request.urlopen(url, timeout=STALL_TIMEOUT_S)
        except urllib.error.HTTPError as err:
            err.close()
            # a 3xx here is a redirect urllib gave up on (a loop, too many): the same on every attempt
            final = 300 <= err.code < 500 and err.code not in RETRIED_HTTP
            reason = "its redirects loop" if 300 <= err.code < 400 else (str(err.reason).splitlines() or [""])[0]
            raise StreamFailed(f"the server answered HTTP {err.code}: {reason}", final=final) from None
        except (http.client.InvalidURL, ValueError, UnicodeError) as err:  # a space, a control character, non-ASCII
            raise StreamFailed(
                f"the URL is not one HTTP can send ({_describe(err)}); percent-encode spaces, "
                "control and non-ASCII characters",
                final=True,
            ) from None
        except (urllib.error.URLError, *self._errors) as err:
            raise StreamFailed(_describe(err)) from None
        self.expected = self.response.length  # None for a chunked body (http.client checks those itself)
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.response.read(size if size is not None and size >= 0 else None)
        except self._errors as err:  # a reset, a stall (TimeoutError), a chunked body cut short
            raise StreamFailed(f"the connection failed after {self.received:,} bytes ({_describe(err)})") from None
        self.received += len(data)
        if not data and size != 0 and self.expected is not None and self.received < self.expected:
            raise StreamFailed(f"the connection closed after {self.received:,} of {self.expected:,} bytes")
        return data

    def close(self) -> None:
        self.response.close()


class _PipeStream:
    """The standard output of a `pipe:` shell command. Reaching its end checks the exit status
    (non-zero: StreamFailed, with the last line it wrote to stderr); no output for
    STALL_TIMEOUT_S is a failure too; closing early ends the command and its children."""

    def __init__(self, url: str):
        self.command = url[len("pipe:") :].strip()
        self.errors = tempfile.TemporaryFile()
        self.received = 0
        # The command is the user's own `pipe:` text; a shard or label name from a manifest enters it only as
        # one single-quoted literal (manifest.pipe_with_file; docs/security.md, tests/reliability/
        # test_data_is_not_code.py), so no data read from the shards reaches the shell as code.
        # its own session: closing early can end the whole pipeline (killpg), and a Ctrl-C at the
        # terminal reaches the training process only, which stops its workers (and their commands)
        self.proc = subprocess.Popen(
            self.command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            bufsize=0,
            start_new_session=True,
        )

    def _failed(self, reason: str) -> StreamFailed:
        # a command that fails before its first byte is wrong (path, tool, credentials) far more
        # often than unlucky, and aws/gsutil/curl --retry retry their own connections: say so at once
        return StreamFailed(reason, final=self.received == 0)

    def _stderr_tail(self) -> str:
        self.errors.seek(0, os.SEEK_END)
        self.errors.seek(max(0, self.errors.tell() - 2000))
        lines = [line.strip() for line in self.errors.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return f": {lines[-1]}" if lines else ""

    def read(self, size: int = -1) -> bytes:
        out = self.proc.stdout
        ready, _, _ = select.select([out], [], [], STALL_TIMEOUT_S)
        if not ready:
            self._end()
            raise self._failed(f"it wrote nothing for {STALL_TIMEOUT_S:.0f} s after {self.received:,} bytes")
        data = out.read(size if size is not None and size > 0 else 1 << 20)
        self.received += len(data)
        if not data and size != 0:
            try:
                status = self.proc.wait(timeout=STALL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._end()
                raise self._failed(f"it closed its output but did not exit within {STALL_TIMEOUT_S:.0f} s") from None
            if status != 0:
                how = f"exit status {status}" if status > 0 else f"killed by signal {-status}"
                raise self._failed(f"{how} after {self.received:,} bytes{self._stderr_tail()}")
        return data

    def _end(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()

    def close(self) -> None:
        self.proc.stdout.close()  # a command still writing gets SIGPIPE
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self._end()
        self.errors.close()


def open_stream(url: str):
    """A readable stream of a shard URL: HTTP(S) and `pipe:` by us (StreamFailed on a transport
    failure), any other scheme by webdataset's `gopen`."""
    if url.startswith(("http://", "https://")):
        return _HttpStream(url)
    if url.startswith("pipe:"):
        return _PipeStream(url)
    from webdataset.gopen import gopen

    return gopen(url)


class Attempts:
    """The retry policy applied to one read of one URL: `failed` returns how long to wait before
    the next attempt, or raises ShardUnreachable. Progress (a sample or byte delivered since the
    previous failure) starts the count and the time budget afresh."""

    def __init__(self, url: str, what: str = "Shard"):
        self.url, self.what = url, what
        self.retries, self.budget = retry_policy()
        self.failures, self.since, self.started = 0, None, time.monotonic()

    def attempt(self) -> None:
        """Call as each attempt starts."""
        self.started = time.monotonic()

    def failed(self, err: StreamFailed, progressed: bool) -> float:
        if progressed:
            self.failures, self.since = 0, None
        if self.since is None:
            self.since = self.started
        self.failures += 1
        elapsed = time.monotonic() - self.since
        delay = min(RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2 ** (self.failures - 1)) * _JITTER.uniform(0.5, 1.0)
        if err.final or self.failures > self.retries or elapsed + delay > self.budget:
            raise self.unreachable(err, elapsed)
        return delay

    def unreachable(self, err: StreamFailed, elapsed: float) -> ShardUnreachable:
        what, url = self.what, self.url
        if url.startswith("pipe:"):
            name = f"{what} command '{url[len('pipe:') :].strip()}'"
            fix = (
                "check that it runs in a shell on this machine and writes the file to its standard output "
                "(tool installed, credentials, path)"
            )
        else:
            name = f"{what} '{url}'"
            fix = (
                "check the URL and that the server holds it"
                if err.final
                else "check that the server is up and reachable from every node"
            )
        if err.final and self.failures == 1:
            told = f"cannot be read ({err.reason})"
        else:
            told = f"could not be read in {self.failures} attempts over {elapsed:.1f} s (last: {err.reason})"
        if what == "Shard":
            fix += ", then continue the run with --resume auto"
        else:  # (from Python, a local copy of the manifest can be passed instead)
            fix += " (from Python, pass a local copy as LoaderSpec(manifest=read_manifest(path)))"
        return ShardUnreachable(f"{name} {told}; {fix}.")


def read_url_bytes(url: str, limit: int, what: str) -> bytes:
    """Up to `limit` bytes of a URL (a manifest, a label file), with the shard retry policy for
    streamed URLs; the caller tells from the length whether there was more."""
    if not is_streamed(url):
        from webdataset.gopen import gopen

        with gopen(url) as stream:
            return stream.read(limit)
    attempts = Attempts(url, what)
    while True:
        attempts.attempt()
        chunks, received = [], 0
        try:
            stream = open_stream(url)
            try:
                while received < limit:
                    chunk = stream.read(min(1 << 20, limit - received))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    received += len(chunk)
            finally:
                stream.close()
            return b"".join(chunks)
        except StreamFailed as err:
            time.sleep(attempts.failed(err, progressed=False))
