"""Shards streamed over HTTP and from `pipe:` commands (issue #14, part 3; docs/streaming.md).

In-process loader tests show that every way of naming streamed shards yields the batches of
the local folder, and that transport failures are retried without changing a sample; the
end-to-end tests run the real pretraining command against a local HTTP server (127.0.0.1, a
free port) and `pipe:cat`, and compare its losses with the same run over the local folder.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from timm.data.transforms import MaybePILToTensor

from engine_helpers import TINY, metrics, python_cmd, run
from vitmpp.datasets import LoaderSpec, open_loader, read_manifest
from vitmpp.datasets.manifest import locate_manifest

STEPS, STOP = 6, 3
TRAIN = TINY + [f"train.steps={STEPS}"]
IDENTITY = MaybePILToTensor()
# a small retry budget, so that giving up takes seconds here (the defaults: 10 retries, 300 s)
QUICK_RETRIES = {"VITMPP_DATA_RETRIES": "4", "VITMPP_DATA_RETRY_TIMEOUT_S": "10"}


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir)]


def pretrain(tmp_path: Path, shards: str, *extra: str, check: bool = True, **env: str):
    return run(
        python_cmd("pretrain/main.py") + TRAIN + [f"data.shards={shards}", *extra],
        cwd=tmp_path,
        cache=tmp_path / "cache",
        check=check,
        timeout=240,
        **env,
    )


def tensorboard_scalars(run_dir: Path, suffix: str) -> list[float]:
    """Every value of the scalars whose tag ends in `suffix` (the namespace in front may change)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.endswith(suffix):
                values += [e.value for e in acc.Scalars(tag)]
    return values


def shard_pattern(folder: Path, prefix: str = "") -> str:
    names = read_manifest(folder).split("train").filenames  # digits-train-000000.tar ...
    return f"{prefix}{folder}/digits-train-{{000000..{len(names) - 1:06d}}}.tar"


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory, digits16):
    """The reference: the same run over the local folder."""
    tmp = tmp_path_factory.mktemp("local")
    pretrain(tmp, str(digits16))
    return losses(tmp / "runs" / "default-mpp")


def batches(shards, manifest=None, *, start_batch=0, num_workers=0):
    spec = LoaderSpec(
        shards=shards,
        manifest=read_manifest(manifest or shards),
        batch_size=16,
        transform=IDENTITY,
        training=True,
        seed=3,
        num_workers=num_workers,
        shuffle_buffer=64,
        batches_per_epoch=8,
    )
    loader = open_loader(spec, epoch=1, start_batch=start_batch)
    return [(b.images, b.indices) for b in loader], loader


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- in process: the loader


def test_every_form_of_streamed_shards_yields_the_local_batches(digits16, serve):
    server = serve(digits16.parent)
    folder_url = f"{server.url}/{digits16.name}"
    expected, _ = batches(str(digits16))
    forms = [
        folder_url,
        folder_url + "/",
        folder_url + "/_info.json",
        shard_pattern(digits16, "pipe:cat "),
        f"pipe:cat {digits16}/_info.json",
    ]
    for shards in forms:
        got, loader = batches(shards)
        assert same(got, expected), shards
        assert loader.retries == 0
    assert locate_manifest(shard_pattern(digits16, "pipe:cat ")) == f"pipe:cat {digits16}/_info.json"
    # a resumed epoch over URLs is the rest of the uninterrupted one
    resumed, _ = batches(folder_url, start_batch=3)
    assert same(resumed, expected[3:])


@pytest.mark.fault("HTTP shard server answers 503 or drops the connection mid-body (loader)", expect="survived")
def test_http_failures_are_retried_and_yield_the_same_batches(digits16, serve):
    def plan(path, n):  # every shard: a 503, then half its body and a closed connection, then fine
        return {1: 503, 2: "drop"}.get(n) if path.endswith(".tar") else None

    server = serve(digits16.parent, plan)
    expected, _ = batches(str(digits16))
    got, loader = batches(f"{server.url}/{digits16.name}", num_workers=1)  # counted in a worker, told to the main
    assert same(got, expected)
    # every shard whose samples arrived was asked three times (a 503, a dropped body, then whole); one a
    # worker had only begun to read ahead when the epoch ended may have been asked fewer times
    info = read_manifest(digits16).split("train")
    indices = {int(i) for _, batch_indices in got for i in batch_indices.tolist() if i >= 0}
    delivered = [
        f"/{digits16.name}/{name}"
        for name, start, length in zip(info.filenames, info.offsets, info.shard_lengths)
        if any(start <= i < start + length for i in indices)
    ]
    assert delivered and all(server.requests.get(p, 0) >= 3 for p in delivered), (delivered, server.requests)
    assert loader.retries >= 2 * len(delivered)


@pytest.mark.fault("pipe: command fails mid-stream (a fifth of a shard, then exit 3) (loader)", expect="survived")
def test_a_pipe_command_failing_mid_stream_is_run_again(digits16, tmp_path):
    script = tmp_path / "flaky_cat.py"
    script.write_text(
        "import pathlib, sys\n"
        "state, path = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        "data, marker = path.read_bytes(), state / (path.name + '.failed')\n"
        "if not marker.exists():\n"
        "    marker.touch(); sys.stdout.buffer.write(data[:len(data) // 5]); sys.stdout.flush(); sys.exit(3)\n"
        "sys.stdout.buffer.write(data)\n"
    )
    state = tmp_path / "state"
    state.mkdir()
    expected, _ = batches(str(digits16))
    got, loader = batches(shard_pattern(digits16, f"pipe:{sys.executable} {script} {state} "))
    assert same(got, expected)
    failed = list(state.glob("*.tar.failed"))  # (the manifest read, retried too, is not a shard read)
    assert failed and loader.retries >= len(failed)


# ----------------------------------------------------------------------------- the real command


def test_http_shards_train_and_resume_exactly_as_local(tmp_path, digits16, local_losses, http_server):
    url = f"{http_server(digits16.parent)}/{digits16.name}"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    pretrain(whole, url)
    pretrain(parts, url, f"debug.stop_at_step={STOP}")
    assert len(losses(parts / "runs" / "default-mpp")) == STOP
    pretrain(parts, url, "--resume", "auto")
    assert losses(whole / "runs" / "default-mpp") == local_losses
    assert losses(parts / "runs" / "default-mpp") == local_losses


@pytest.mark.fault("HTTP shard server answers 503 or drops the connection mid-body", expect="survived")
def test_transient_http_failures_do_not_change_the_run(tmp_path, digits16, local_losses, serve):
    server = serve(digits16.parent, lambda path, n: {1: 503, 2: "drop"}.get(n) if path.endswith(".tar") else None)
    pretrain(tmp_path, f"{server.url}/{digits16.name}", "data.num_workers=1")
    run_dir = tmp_path / "runs" / "default-mpp"
    assert losses(run_dir) == local_losses
    retries = tensorboard_scalars(run_dir, "/retries")
    assert retries and max(retries) >= 2


@pytest.mark.fault("HTTP shard unreachable (404, or the server gone: connection refused)", expect="clear error")
@pytest.mark.parametrize("how", ["404", "refused"])
def test_an_unreachable_shard_ends_the_run_with_one_sentence(tmp_path, digits16, serve, how):
    served = tmp_path / "served"
    shutil.copytree(digits16, served / "digits")
    if how == "404":
        for tar in (served / "digits").glob("*-train-*.tar"):
            tar.unlink()
        server = serve(served)
    else:

        def plan(path, n):  # the manifest is served; the first shard request takes the server down
            if path.endswith(".tar"):
                server.stop_soon()
                return "vanish"
            return None

        server = serve(served, plan)
    started = time.monotonic()
    workers = "data.num_workers=1" if how == "refused" else "data.num_workers=0"  # the sentence crosses from a worker
    result = pretrain(tmp_path, f"{server.url}/digits", workers, check=False, **QUICK_RETRIES)
    took = time.monotonic() - started
    print(f"{how}: the run ended after {took:.1f} s")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and f"{server.url}/digits/digits-train-" in error[0], result.stderr[-3000:]
    assert "404" in error[0] if how == "404" else "attempts" in error[0]
    assert took < 60
    assert not (tmp_path / "runs" / "default-mpp" / "metrics.jsonl").exists()  # no step ran


def test_pipe_shards_train_as_local(tmp_path, digits16, local_losses):
    pretrain(tmp_path, shard_pattern(digits16, "pipe:cat "))
    assert losses(tmp_path / "runs" / "default-mpp") == local_losses


@pytest.mark.fault("pipe: command that fails (non-zero exit) for the manifest or a shard", expect="clear error")
@pytest.mark.parametrize("what", ["manifest", "shard"])
def test_a_failing_pipe_command_is_one_sentence_naming_it(tmp_path, digits16, what):
    if what == "manifest":
        shards, named = "pipe:cat /nonexistent/digits-train-{000000..000001}.tar", "cat /nonexistent/_info.json"
    else:
        copy = tmp_path / "copy"
        shutil.copytree(digits16, copy)
        for tar in copy.glob("*-train-*.tar"):
            tar.unlink()
        shards, named = shard_pattern(copy, "pipe:cat "), f"cat {copy}/digits-train-"
    result = pretrain(tmp_path, shards, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and f"command '{named}" in error[0] and "exit status 1" in error[0], result.stderr[-3000:]
