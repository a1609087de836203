"""Data never becomes code (issue 26, fault 1; docs/security.md).

A `pipe:` manifest's shards are read with the user's command, the file name swapped for the
name the manifest lists. That name comes from a file that may not be ours (a bucket, a server,
a plain-http connection), so it must reach the command as a literal word: these tests put every
shell metacharacter into manifest names, shard files of exactly those names on disk, and check
that the shards are read (the name was taken literally) and that no command hidden in a name ran.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.data.transforms import MaybePILToTensor

from datasets_helpers import spec_for, write_tiny_shards
from engine_helpers import TINY, python_cmd, run
from vitmpp.common.errors import UserError
from vitmpp.datasets import open_loader, read_manifest
from vitmpp.datasets.manifest import MANIFEST_NAME, pipe_with_file

# Names a POSIX file may have, each hiding a command that would create `pwned-*` in the working
# folder if a shell interpreted it ($IFS$1 is a space that survives inside a URL).
SHELL_NAMES = {
    "command substitution": "x$(touch pwned-subst).tar",
    "backticks": "x`touch pwned-tick`.tar",
    "semicolon": "x;touch pwned-semi;.tar",
    "pipe": "x|touch pwned-pipe|.tar",
    "and": "x&&touch pwned-and&&.tar",
    "background": "x&touch pwned-bg&.tar",
    "redirect": "x>pwned-redirect.tar",
    "single quote": "x'$(touch pwned-squote)'.tar",
    "double quote": 'x"$(touch pwned-dquote)".tar',
    "backslash": "x\\$(touch pwned-backslash).tar",
    "variable": "x$IFS$(touch$IFS$1pwned-ifs).tar",
    "braces": "x${IFS}$(touch${IFS}pwned-brace).tar",
    "glob and tilde": "~*?[x]-pwned-glob.tar",
    "comment": "x #touch pwned-comment.tar",
    "non-ASCII": "x-ü-€-$(touch pwned-unicode).tar",
}
# Not file names a shard can have: refused in one sentence before anything runs.
CONTROL_NAMES = {
    "newline": "x\ntouch pwned-newline\n.tar",
    "NUL": "x\x00touch pwned-nul.tar",
    "carriage return": "x\rtouch pwned-cr.tar",
    "tab": "x\ttouch\tpwned-tab.tar",
}
# Server-sent: names curl takes as a URL path (no space, no braces: curl refuses or globs those).
URL_NAMES = [
    "x$(touch$IFS$1pwned-subst).tar",
    "x`touch$IFS$1pwned-tick`.tar",
    "x;touch$IFS$1pwned-semi;.tar",
    "x|touch$IFS$1pwned-pipe|.tar",
    "x&&touch$IFS$1pwned-and&&.tar",
]
IDENTITY = MaybePILToTensor()


def pwned(folder: Path) -> list[str]:
    """What a hidden command made in `folder` (the working folder of the read; never the shards')."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*pwned*"))


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty working folder for the read, apart from the shards."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def rename_shards(folder: Path, split: str, names: list[str]) -> None:
    """Give the shards of `split` the file names `names`, on disk and in `_info.json`."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    info = manifest["splits"][split]
    assert len(names) <= len(info["filenames"])
    for k, name in enumerate(names):
        (folder / info["filenames"][k]).rename(folder / name)
        info["filenames"][k] = name
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def indices_read(shards: str, **fields) -> list[int]:
    loader = open_loader(spec_for(shards, batch_size=4, transform=IDENTITY, training=False, num_workers=0, **fields))
    return sorted(i for batch in loader for i in batch.indices.tolist() if i >= 0)


@pytest.mark.fault("shard manifest naming shell metacharacters under pipe: (local manifest)", expect="read literally")
@pytest.mark.parametrize("kind", sorted(SHELL_NAMES))
def test_a_local_pipe_manifest_cannot_run_a_command(tmp_path, cwd, kind):
    folder = tmp_path / "shards"
    write_tiny_shards(folder, [3, 2])
    rename_shards(folder, "train", [SHELL_NAMES[kind]])
    assert indices_read(f"pipe:cat {folder}/{MANIFEST_NAME}") == list(range(5))  # the named file, read as named
    assert pwned(cwd) == []


@pytest.mark.fault("shard manifest naming a control character (newline, NUL, tab)", expect="clear error")
@pytest.mark.parametrize("kind", sorted(CONTROL_NAMES))
def test_a_name_with_a_control_character_is_refused_before_anything_runs(tmp_path, cwd, kind):
    folder = tmp_path / "shards"
    write_tiny_shards(folder, [3, 2])
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["splits"]["train"]["filenames"][0] = CONTROL_NAMES[kind]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a plain relative file name") as caught:
        read_manifest(f"pipe:cat {folder}/{MANIFEST_NAME}")
    assert "\n" not in str(caught.value) and "\x00" not in str(caught.value)  # shown escaped, on one line
    assert pwned(cwd) == []


@pytest.mark.fault("label file name with shell metacharacters under pipe:", expect="read literally")
def test_a_label_file_name_cannot_run_a_command(tmp_path, cwd):
    folder = tmp_path / "shards"
    write_tiny_shards(folder, [3, 2])
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    name = "_labels$(touch pwned-labels)`touch pwned-labels2`.npy"
    (folder / manifest["splits"]["train"]["labels_file"]).rename(folder / name)
    manifest["splits"]["train"]["labels_file"] = name
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    labels = read_manifest(f"pipe:cat {folder}/{MANIFEST_NAME}").labels("train")
    assert list(labels) == [i % 5 for i in range(5)]
    assert pwned(cwd) == []


@pytest.mark.fault("server-sent shard manifest naming shell commands (pipe:curl, end to end)", expect="read literally")
def test_a_server_sent_manifest_cannot_run_a_command_on_a_training_node(tmp_path, digits16, http_server):
    served = tmp_path / "served"
    shutil.copytree(digits16, served / "digits")
    rename_shards(served / "digits", "train", URL_NAMES)
    url = http_server(served)
    work = tmp_path / "work"
    work.mkdir()
    # README/docs/streaming.md's form: curl reads the manifest, then every shard with the name swapped
    result = run(
        python_cmd("pretrain/main.py")
        + TINY
        + ["train.steps=3", "data.num_workers=1", f"data.shards=pipe:curl -f -s -L {url}/digits/{MANIFEST_NAME}"],
        cwd=work,
        cache=work / "cache",
        check=False,
        timeout=240,
    )
    assert pwned(work) == []
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "runs" / "default-mpp" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- the rule itself

_NAME = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30).map(lambda s: s + ".tar")


@settings(max_examples=60, deadline=None)
@given(name=_NAME, quoting=st.sampled_from(["", "'", '"']))
def test_any_name_reaches_the_command_as_the_same_bytes(tmp_path_factory, name, quoting):
    """Whatever the name and however the user quoted the file word, the shell hands the command
    exactly the prefix, the name and the suffix, and runs nothing else."""
    work = tmp_path_factory.mktemp("sh")
    command = f"printf %s {quoting}s3://bucket/data/{MANIFEST_NAME}{quoting} ; printf '|end'"
    text = pipe_with_file(command, name)
    out = subprocess.run(["/bin/sh", "-c", text], cwd=work, capture_output=True, timeout=10)
    assert out.stdout.decode("utf-8") == f"s3://bucket/data/{name}|end", text
    assert list(work.iterdir()) == []
