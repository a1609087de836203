"""Lazy package exports (PEP 562), so that `--help` answers before torch is imported.

A package `__init__` names what it exports and the submodule each name lives in;
the submodule is imported on first attribute access. `python -m vitmpp.datasets.make_shards
--help` then imports the package (as Python must) without importing timm, torch and
the loader (seconds on a cold disk).

Written here rather than taken from scientific-python's `lazy_loader` because it is
the dozen lines below and the project keeps its dependency list short.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, where: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """(`__getattr__`, `__dir__`, `__all__`) for `package`.

    `where`: exported name -> submodule path, relative to the package (".loader") or
    absolute ("timm.data"); `"module:attribute"` exports an attribute under another name.
    """

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = where[name].partition(":")
        value = getattr(importlib.import_module(module, package), attribute or name)
        import sys

        setattr(sys.modules[package], name, value)  # the next access is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__, sorted(where)
