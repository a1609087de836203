"""A wrong `data.shards` is named as the user wrote it, not as the `_info.json` guessed next to it."""

from __future__ import annotations

import pytest

from engine_helpers import TINY, python_cmd, run


@pytest.mark.fault("data.shards pointing at a path that does not exist", expect="clear error")
@pytest.mark.parametrize(
    "given,named",
    [
        ("{tmp}/no/such/folder", "Shards '{tmp}/no/such/folder' do not exist"),
        ("{tmp}/gone/shards-{{000000..000003}}.tar", "'{tmp}/gone' does not exist"),
    ],
)
def test_a_missing_shard_path_is_named_as_given(tmp_path, given, named):
    given, named = given.format(tmp=tmp_path), named.format(tmp=tmp_path)
    result = run(
        python_cmd("pretrain/main.py") + TINY + ["train.steps=1", f"data.shards={given}"],
        cwd=tmp_path,
        check=False,
        cache=tmp_path / "cache",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and named in result.stderr, result.stderr
    assert "_info.json'" not in result.stderr.split(";")[0]  # not the guessed manifest next to the path
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))
