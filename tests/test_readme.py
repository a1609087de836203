"""README's commands are the ones that work: every config they name loads, every entry point
accepts its arguments, and the cheap commands run as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands() -> list[str]:
    """Shell lines of README's ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def entry_point_lines(script: str) -> list[list[str]]:
    """The arguments README passes `script`, directly (`accelerate launch pretrain/main.py ...`,
    `python pretrain/main.py ...`) or through launch.sh (`./launch.sh pretrain CONFIG ...`: a first
    argument ending in .yaml is the --config)."""
    out = []
    stage = script.split("/")[0]
    for line in commands():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if script in words:
                out.append(words[words.index(script) + 1 :])
            elif words[:2] in (["./launch.sh", stage], ["srun", "./launch.sh"]) and stage in words[:3]:
                args = words[words.index(stage) + 1 :]
                out.append(["--config", *args] if args and args[0].endswith(".yaml") else args)
    return out


def test_readme_names_only_existing_configs():
    for path in re.findall(r"configs/[\w/]+\.yaml", README):
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("script", ["pretrain/main.py", "finetune/main.py"])
def test_readme_entry_point_commands_parse(script, capsys, monkeypatch):
    if script == "pretrain/main.py":
        from vitmpp.pretrain.main import main
    else:
        from vitmpp.finetune.main import main
    monkeypatch.chdir(ROOT)
    lines = entry_point_lines(script)
    assert lines, f"README shows no {script} command"
    for args in lines:
        if "--help-config" in args or "--print-config" in args:
            main(args)
        else:
            main(args + ["--print-config"])  # the config the command would run, validated
    printed = capsys.readouterr().out
    assert ("objective: mae" if script == "pretrain/main.py" else "protocol: finetune") in printed


def test_readme_compare_config_loads():
    from vitmpp.common.config import load_config
    from vitmpp.experiments.grid import CompareConfig

    lines = [line for line in commands() if "vitmpp.experiments.compare" in line]
    assert lines
    for line in lines:
        words = shlex.split(line, comments=True)
        load_config(CompareConfig, ROOT / words[words.index("--config") + 1])


def test_readme_launch_sh_commands_dry_run():
    lines = [line for line in commands() if line.startswith("./launch.sh") or "srun ./launch.sh" in line]
    assert lines
    for line in lines:
        words = shlex.split(line.replace("srun ", ""), comments=True)
        result = subprocess.run(
            [str(ROOT / "launch.sh"), "--dry-run", *words[1:]],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "VITMPP_GPUS_PER_NODE": "8"},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("python -m vitmpp.common.launcher ")


def test_readme_make_shards_digits_command_runs(tmp_path):
    line = next(line for line in commands() if "make_shards --source digits" in line)
    words = shlex.split(line)
    result = subprocess.run([sys.executable, *words[1:], "--quiet"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "digits" / "_info.json").is_file()


def test_readme_other_commands_know_their_flags():
    """make_shards and analyze accept every flag README passes them."""
    for module in ("vitmpp.datasets.make_shards", "vitmpp.analyze"):
        help_text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True).stdout
        for line in commands():
            if module in line:
                for flag in re.findall(r"(--[\w-]+)", line):
                    assert flag in help_text, (module, flag)


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of one README section (`## <section>` up to the next `## `)."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


@pytest.mark.slow
def test_readme_use_the_encoder_elsewhere_snippets_run_on_a_real_run(tmp_path, digits16):
    """The timm and transformers snippets, as written, on the folder the default pretraining writes."""
    from engine_helpers import TINY, python_cmd, run

    run(python_cmd("pretrain/main.py") + TINY + ["train.steps=2", f"data.shards={digits16}"], cwd=tmp_path)
    blocks = [b for b in python_blocks("Use the encoder elsewhere") if "runs/default-mpp" in b]
    assert len(blocks) == 2 and "AutoModel" in blocks[1]
    for block in blocks:
        result = run([sys.executable, "-c", block + "\nprint(tuple(features.shape))"], cwd=tmp_path)
        width = __import__("json").loads((tmp_path / "runs/default-mpp/encoder.json").read_text())["embed_dim"]
        assert result.stdout.strip().splitlines()[-1] == f"(1, {width})"
