"""Packaging: one distribution, `vitmpp`, and nothing else at the top level of the wheel."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

IMPORT = r"^\s*(?:from|import)\s+vitmpp\.{}\b"

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_only_vitmpp_packages(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("vitmpp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"vitmpp", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    packages = {name.split("/")[1] for name in names if name.startswith("vitmpp/")}
    assert {
        "common",
        "datasets",
        "models",
        "evaluate",
        "pretrain",
        "finetune",
        "analyze",
        "experiments",
        "benchmarks",
    } <= packages
    assert not any(name.startswith(("datasets/", "models/")) for name in names)


def test_subpackages_import_as_vitmpp():
    import vitmpp.common.config
    import vitmpp.datasets
    import vitmpp.models

    assert Path(vitmpp.datasets.__file__).parent == ROOT / "datasets"
    assert Path(vitmpp.models.__file__).parent == ROOT / "models"
    assert Path(vitmpp.common.config.__file__).parent == ROOT / "common"


def test_common_imports_no_other_layer():
    """The shared plumbing sits below every layer: it must not import them."""
    for path in (ROOT / "common").glob("*.py"):
        text = path.read_text()
        for layer in ("datasets", "models", "evaluate", "pretrain", "finetune", "analyze", "experiments", "benchmarks"):
            assert not re.search(IMPORT.format(layer), text, re.M), f"{path.name} imports vitmpp.{layer}"


def test_lower_layers_never_import_engines():
    for folder in ("datasets", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for higher in ("evaluate", "pretrain", "finetune", "analyze", "experiments", "benchmarks"):
                assert not re.search(IMPORT.format(higher), text, re.M), f"{path} imports vitmpp.{higher}"
