"""The layers of ARCHITECTURE.md §1 are import-linter contracts in pyproject.toml; these tests
run `lint-imports` on the tree, and on a copy of it with one forbidden import added, to show
the contracts hold now and would catch a breach (lazy imports inside functions included)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = (
    "common",
    "datasets",
    "models",
    "evaluate",
    "analyze",
    "finetune",
    "pretrain",
    "experiments",
    "benchmarks",
)
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(cwd: Path, pythonpath: Path | None = None, contract: str | None = None) -> subprocess.CompletedProcess:
    """Run lint-imports with this interpreter in `cwd` (whose pyproject.toml holds the contracts),
    optionally one `contract` (its id); `pythonpath` goes first on the module search path. No
    cache folder is written."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    only = ["--contract", contract] if contract else []
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo", *only],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def copy_of_the_tree(tmp_path: Path) -> Path:
    """The subpackages as `tmp_path/vitmpp/<name>/`, and pyproject.toml beside them.

    `vitmpp` is a namespace package, so with `tmp_path` first on PYTHONPATH the path finder
    resolves `vitmpp.common` and the rest to the copy before the editable install's finder
    (which comes after it on `sys.meta_path`) is asked; grimp builds its graph from there."""
    for name in SUBPACKAGES:
        shutil.copytree(ROOT / name, tmp_path / "vitmpp" / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(copy: Path, module: str, statement: str) -> None:
    path = copy / "vitmpp" / Path(*module.split(".")).with_suffix(".py")
    with path.open("a") as handle:
        handle.write(f"\n\ndef _breach():\n    {statement}\n")  # a lazy import: it counts too


def test_the_tree_keeps_every_layer_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_unchanged_copy_gives_the_same_verdict_as_the_tree(tmp_path):
    """The copy is analysed like the tree (so the tests below see only their own breach)."""

    def verdict(result):
        return result.returncode, [line for line in result.stdout.splitlines() if not line.startswith("Analyzed")]

    assert verdict(lint_imports(copy_of_the_tree(tmp_path), pythonpath=tmp_path)) == verdict(lint_imports(ROOT))


def test_common_importing_a_higher_layer_breaks_the_layers_contract(tmp_path):
    copy = copy_of_the_tree(tmp_path)
    add_import(copy, "common.console", "import vitmpp.pretrain.engine")
    result = lint_imports(copy, pythonpath=tmp_path, contract="layers")
    assert result.returncode != 0
    assert "A layer imports only the layers below it BROKEN" in result.stdout
    assert "vitmpp.common.console -> vitmpp.pretrain.engine" in result.stdout  # read from the copy
    assert "vitmpp.common.console" not in lint_imports(ROOT, contract="layers").stdout  # not from the tree


def test_datasets_importing_models_breaks_their_independence(tmp_path):
    copy = copy_of_the_tree(tmp_path)
    add_import(copy, "datasets.transforms", "from vitmpp.models import patches")
    result = lint_imports(copy, pythonpath=tmp_path, contract="data-models-independent")
    assert result.returncode != 0
    assert "datasets and models never import each other BROKEN" in result.stdout
    assert "vitmpp.datasets.transforms -> vitmpp.models.patches" in result.stdout


def test_importing_an_entry_point_breaks_its_contract_even_from_a_higher_layer(tmp_path):
    copy = copy_of_the_tree(tmp_path)
    add_import(copy, "benchmarks.report", "import vitmpp.finetune.main")
    add_import(copy, "benchmarks.harness", "import vitmpp.analyze.__main__")
    result = lint_imports(copy, pythonpath=tmp_path, contract="entry-points")
    assert result.returncode != 0
    assert "Nothing imports an entry point BROKEN" in result.stdout
    assert "vitmpp.benchmarks.report -> vitmpp.finetune.main" in result.stdout
    assert "vitmpp.benchmarks.harness -> vitmpp.analyze.__main__" in result.stdout


def test_pretrain_importing_finetune_breaks_the_stages_independence(tmp_path):
    copy = copy_of_the_tree(tmp_path)
    add_import(copy, "pretrain.engine", "from vitmpp.finetune import engine")
    result = lint_imports(copy, pythonpath=tmp_path, contract="stages-independent")
    assert result.returncode != 0
    assert "pretrain and finetune independent BROKEN" in result.stdout
    assert "vitmpp.pretrain.engine -> vitmpp.finetune.engine" in result.stdout


def test_the_evaluation_importing_a_stage_breaks_its_contract(tmp_path):
    copy = copy_of_the_tree(tmp_path)
    add_import(copy, "evaluate.knn", "from vitmpp.finetune import config")
    result = lint_imports(copy, pythonpath=tmp_path, contract="evaluation-below-stages")
    assert result.returncode != 0
    assert "evaluation below the stages BROKEN" in result.stdout
    assert "vitmpp.evaluate.knn -> vitmpp.finetune.config" in result.stdout
