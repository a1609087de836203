"""No two files import each other (ARCHITECTURE.md §1): a two-file import cycle, even one hidden by an
import inside a function, means the two files are one idea split in two, or a piece that belongs below
both. import-linter's contracts see packages, not files, so this test reads grimp's graph of every
vitmpp package (the root packages of pyproject.toml's [tool.importlinter]), function-local and
TYPE_CHECKING imports included, and names every pair it finds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from test_layers import add_import, copy_of_the_tree

ROOT = Path(__file__).resolve().parents[1]


def root_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]


def two_file_cycles(roots: list[str]) -> list[tuple[str, str]]:
    """Every pair of modules (files) that import each other, directly, sorted."""
    import grimp

    graph = grimp.build_graph(*roots, cache_dir=None)
    return sorted(
        (a, b)
        for a in graph.modules
        for b in graph.find_modules_directly_imported_by(a)
        if a < b and graph.direct_import_exists(importer=b, imported=a)
    )


def cycles_in(folder: Path) -> list[tuple[str, str]]:
    """`two_file_cycles` of the tree whose `vitmpp/` is in `folder` (first on the module search path)."""
    program = (
        f"import json, sys; sys.path[:0] = [{str(folder)!r}, {str(Path(__file__).parent)!r}]; "
        "from test_import_cycles import root_packages, two_file_cycles; "
        "print(json.dumps(two_file_cycles(root_packages())))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    return [tuple(pair) for pair in json.loads(result.stdout)]


def test_every_vitmpp_package_is_in_the_graph():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(root_packages()) == sorted(packages)


def test_no_two_files_import_each_other():
    found = two_file_cycles(root_packages())
    assert not found, "files that import each other: " + "; ".join(f"{a} <-> {b}" for a, b in found)


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    copy = copy_of_the_tree(tmp_path)
    add_import(copy, "common.io", "from vitmpp.common import console")  # console.py imports nothing of io yet
    add_import(copy, "common.console", "from vitmpp.common import io")
    assert ("vitmpp.common.console", "vitmpp.common.io") in cycles_in(tmp_path)
    assert ("vitmpp.common.console", "vitmpp.common.io") not in two_file_cycles(root_packages())
