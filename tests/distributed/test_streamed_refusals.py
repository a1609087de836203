"""What cannot change on a retry is not retried, and a page that is not a shard is called so
(issue 26, "unclear": HTTP). A real server on 127.0.0.1 misbehaves on purpose (conftest.serve)."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from timm.data.transforms import MaybePILToTensor

from datasets_helpers import write_tiny_shards
from vitmpp.common.errors import UserError
from vitmpp.datasets import LoaderSpec, open_loader, read_manifest

IDENTITY = MaybePILToTensor()


def read_all(shards, training=False, split="train"):
    spec = LoaderSpec(
        shards=shards,
        manifest=read_manifest(shards),
        split=split,
        batch_size=2,
        transform=IDENTITY,
        training=training,
        num_workers=0,
        batches_per_epoch=2 if training else None,
    )
    return list(open_loader(spec))


@pytest.mark.fault("HTTP redirect loop for a shard", expect="clear error")
def test_a_redirect_loop_is_final_and_names_the_url(tmp_path, serve):
    write_tiny_shards(tmp_path / "d", [4])
    server = serve(tmp_path, lambda path, n: "loop" if path.endswith(".tar") else None)
    started = time.monotonic()
    with pytest.raises(
        UserError,
        match=r"Shard '.*tiny-train-000000\.tar' cannot be read \(the server answered "
        r"HTTP 302: its redirects loop\); check the URL",
    ) as caught:
        read_all(f"{server.url}/d")
    assert "server is up" not in str(caught.value)
    attempts = {path: n for path, n in server.requests.items() if path.endswith(".tar")}
    assert list(attempts.values()) and max(attempts.values()) <= 12  # urllib's own redirect limit, no retries
    assert time.monotonic() - started < 60  # no back-off (whose budget is 300 s) was waited for


@pytest.mark.fault("shard URL typed with a space (and the same name listed by a served manifest)", expect="clear error")
def test_a_url_http_cannot_send_is_final_and_a_manifest_name_is_encoded(tmp_path, serve):
    folder = tmp_path / "d"
    write_tiny_shards(folder, [4], extra_splits={"validation": [2]})
    manifest = json.loads((folder / "_info.json").read_text())
    names = {"train": "tiny x-train-000000.tar", "validation": "v #1 ?%20.tar"}  # a path, not URL syntax
    for split, name in names.items():
        (folder / manifest["splits"][split]["filenames"][0]).rename(folder / name)
        manifest["splits"][split]["filenames"][0] = name
    (folder / "_info.json").write_text(json.dumps(manifest))
    server = serve(tmp_path)
    for split in names:  # named by the manifest: percent-encoded, read
        assert read_all(f"{server.url}/d", split=split)
    with pytest.raises(UserError, match="not one HTTP can send.*percent-encode") as caught:
        read_all(f"{server.url}/d/{names['train']}")  # typed with a raw space
    assert "attempts" not in str(caught.value) and "server is up" not in str(caught.value)


@pytest.mark.fault("HTML login page served with status 200 instead of a shard (one-shard split)", expect="clear error")
def test_an_html_page_for_a_shard_is_called_so(tmp_path, serve):
    write_tiny_shards(tmp_path / "d", [4])
    server = serve(tmp_path, lambda path, n: "html" if path.endswith(".tar") else None)
    with pytest.raises(UserError) as caught:
        read_all(f"{server.url}/d", training=True)
    message = str(caught.value)
    assert "HTML" in message and "not a tar" in message and "Sign in" in message, message
    assert "shards in a row" not in message


@pytest.mark.fault("zip archive where a tar shard should be", expect="clear error")
def test_a_zip_for_a_shard_is_called_so(tmp_path):
    folder = tmp_path / "d"
    write_tiny_shards(folder, [4])
    shard = folder / "tiny-train-000000.tar"
    archive = shutil.make_archive(str(tmp_path / "z"), "zip", root_dir=folder, base_dir=shard.name)
    shard.write_bytes(open(archive, "rb").read())
    with pytest.raises(UserError, match="a zip archive, not a tar"):
        read_all(str(folder), training=True)
