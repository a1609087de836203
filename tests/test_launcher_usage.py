"""Every usage line of `./launch.sh --help` is true (issue 27, item 3): each documented form is run
with real values, through `--dry-run` (what launch.sh would run) and then that command itself, in a
way that stops after its arguments are parsed (--print-config, or a value the command names)."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from engine_helpers import ROOT, env

FORMS = {  # the usage line (as --help prints it) -> (arguments filled in, what the run must print)
    "pretrain CONFIG [key=value ...] [--resume auto]": (
        ["pretrain", "configs/pretrain/mpp_digits.yaml", "train.steps=1", "--resume", "auto", "--print-config"],
        "steps: 1",
    ),
    "finetune CONFIG [key=value ...] [--resume auto]": (
        ["finetune", "configs/finetune/linear_digits.yaml", "train.seed=7", "--resume", "auto", "--print-config"],
        "seed: 7",
    ),
    "compare  CONFIG [--jobs N] [--overwrite] [key=value ...]": (
        ["compare", "configs/compare/digits.yaml", "--jobs", "2", "--overwrite", "no_such_key=1"],
        "no_such_key",
    ),
    "analyze  --encoder RUN --shards DIR --out DIR": (
        ["analyze", "--encoder", "no/such/run", "--shards", "no/such/shards", "--out", "out"],
        "no/such/run",
    ),
}


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "launch.sh"), *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )


def test_help_exits_0_and_a_wrong_command_line_2():
    assert launch("--help").returncode == 0
    assert launch().returncode == 2
    assert launch("no-such-command").returncode == 2


def test_every_usage_line_is_covered_here():
    lines = [
        line.split("./launch.sh", 1)[1].split("(")[0].strip()
        for line in launch("--help").stdout.splitlines()
        if line.strip().startswith("./launch.sh ")
    ]
    assert lines, "no usage lines"
    # shards, demo, test and --dry-run are run by tests/test_launcher.py and the README tests
    rest = {"shards   --source digits --out DIR [...]", "demo", "test [pytest args]", "--dry-run pretrain ..."}
    assert set(lines) == set(FORMS) | rest, set(lines) ^ (set(FORMS) | rest)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_documented_form_is_accepted(form, tmp_path):
    args, printed = FORMS[form]
    dry = launch("--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    command = shlex.split(dry.stdout.strip().splitlines()[-1])
    result = subprocess.run(
        command, cwd=ROOT, env=env(cache=tmp_path / "cache"), capture_output=True, text=True, timeout=300
    )
    out = result.stdout + result.stderr
    assert "unrecognized arguments" not in out and "usage:" not in out, out[-2000:]
    assert "Traceback" not in out and printed in out, out[-2000:]
