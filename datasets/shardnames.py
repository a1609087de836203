"""Where shards are: local paths, URLs and `pipe:` commands, and the names a manifest lists.

A name that a manifest lists is data: `unsafe_file_name` refuses one that could leave the
shard folder or become a command, and `pipe_with_file` puts a name into the user's `pipe:`
command as one quoted shell literal (docs/security.md). Brace patterns expand as webdataset's
`expand_urls` does.
"""

from __future__ import annotations

import os
import re
import shlex
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitmpp.common.errors import UserError

# A URL scheme webdataset opens (http:, pipe:, file:, ...); a Windows drive letter is not one.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def is_url(text: str) -> bool:
    """True for `http://...`, `pipe:...` and other non-local shard names."""
    return bool(_SCHEME.match(text))


# the file a `pipe:` command reads: the first word that ends in a shard or manifest name
_PIPE_FILE = re.compile(r"""(?P<name>[^/\s'"=]+\.(?:tar|tgz|tar\.gz|json))(?=['"]?(?:\s|$))""")
SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")


def _pipe_file(command: str) -> re.Match | None:
    return _PIPE_FILE.search(command)


def pipe_with_file(command: str, name: str) -> str:
    """`command` (a `pipe:` shard or manifest command: the user's) reading file `name` of the same
    folder instead.

    `name` is data (a manifest lists it) and the result runs under /bin/sh, so the name never
    enters the command as shell text: it goes in as one single-quoted literal (`shlex.quote`,
    inside which sh interprets nothing), the user's own quotes closed around it first, so the
    command receives exactly the characters of the name whatever they are (docs/security.md)."""
    match = _pipe_file(command)
    if match is None:
        raise UserError(
            f"Cannot tell which file the command '{command}' reads (no word ending in .tar or "
            "_info.json); name the shard file in it, as in pipe:aws s3 cp s3://bucket/shard-000000.tar -."
        )
    start, end = match.span("name")
    quoted = shlex.quote(name)
    open_quote = _open_quote(command[:start])
    if open_quote and quoted != name:  # close the user's quote, add the literal, reopen it
        quoted = open_quote + quoted + open_quote
    return command[:start] + quoted + command[end:]


def _open_quote(text: str) -> str:
    """The quote (`'` or `"`) left open at the end of shell text `text`, or "" (POSIX sh rules:
    nothing escapes inside '...'; a backslash escapes the next character elsewhere)."""
    quote, k = "", 0
    while k < len(text):
        char = text[k]
        if char == "\\" and quote != "'":
            k += 2
            continue
        if quote == "" and char in "'\"":
            quote = char
        elif char == quote:
            quote = ""
        k += 1
    return quote


def unsafe_file_name(name: str) -> str | None:
    """Why `name` (listed by a manifest) cannot be a shard's file name, or None: a scheme (`pipe:`
    would make it a command), an absolute path or `..` (outside the folder), a control character
    (newline, NUL: no shard is named so, and a message could not show it), or text that is not UTF-8."""
    if is_url(name):
        return "it has a URL scheme"
    if os.path.isabs(name) or ".." in Path(name).parts:
        return "it reaches outside the shard folder"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds a control character"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not UTF-8 text"
    return None


def shard_name(location: str) -> str:
    """The file name of a shard path, URL or `pipe:` command (what the manifest lists)."""
    if location.startswith("pipe:"):
        match = _pipe_file(location)
        return match["name"] if match else location
    if is_url(location):
        from urllib.parse import urlsplit

        return urllib.parse.unquote(urlsplit(location).path.rstrip("/").rsplit("/", 1)[-1])
    return os.path.basename(location)


def names_all_shards(shards: Any) -> bool:
    """True when `shards` names a whole manifest (a folder, an `_info.json`, a folder URL, a `pipe:`
    command reading an `_info.json`) rather than a pattern or list of shards."""
    if not isinstance(shards, (str, os.PathLike)):
        return False
    text = os.fspath(shards)
    if not is_url(text):
        return os.path.isdir(text) or text.endswith(".json")
    if text.startswith("pipe:"):
        return "::" not in text and shard_name(text).endswith(".json")
    if "::" in text or "{" in text:
        return False
    name = shard_name(text)
    return name.endswith(".json") or not name.endswith(SHARD_SUFFIXES)


def expand_shard_spec(shards: str | Sequence[str]) -> list[str]:
    """A brace pattern (`a-{000..009}.tar`, `::`-separated lists) or a list, as a list of names."""
    import webdataset as wds

    if isinstance(shards, (str, os.PathLike)):
        return wds.shardlists.expand_urls(os.fspath(shards))
    return [os.fspath(s) for s in shards]
