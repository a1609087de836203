"""`--help-config` tells the truth: for each stage, with no arguments and with every recipe in
configs/, it lists exactly the keys and values `--print-config` shows (what the run would use)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vitmpp.models.objective import objective_names

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^  (?P<key>[A-Za-z_][\w.]*) = (?P<value>.*?)(?:  (?P<help>.*))?$")


def stage_main(stage: str):
    if stage == "pretrain":
        from vitmpp.pretrain.main import main
    else:
        from vitmpp.finetune.main import main
    return main


def output(stage: str, argv: list[str], capsys) -> str:
    capsys.readouterr()
    stage_main(stage)(argv)
    return capsys.readouterr().out


def dotted(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def help_values(text: str) -> dict:
    values = {}
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"--help-config line not of the form '  key = value  help': {line!r}"
        values[match["key"]] = yaml.safe_load(match["value"])
    return values


CASES = [("pretrain", []), ("finetune", [])]
CASES += [("pretrain", [f"objective={name}"]) for name in objective_names()]
CASES += [
    ("pretrain", ["--config", str(p.relative_to(ROOT))]) for p in sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
]
CASES += [
    ("finetune", ["--config", str(p.relative_to(ROOT))]) for p in sorted((ROOT / "configs" / "finetune").glob("*.yaml"))
]


@pytest.mark.parametrize("stage,argv", CASES, ids=[f"{s}:{' '.join(a) or 'no arguments'}" for s, a in CASES])
def test_help_config_equals_print_config(stage, argv, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    printed = dotted(yaml.safe_load(output(stage, argv + ["--print-config"], capsys)))
    helped = help_values(output(stage, argv + ["--help-config"], capsys))
    assert list(helped) == list(printed)  # the same keys, in the same order
    assert helped == printed


def test_help_config_shows_the_embedded_default_not_the_class_defaults(capsys, monkeypatch):
    """What a new user meets first: the no-argument run's model, lr, flips and MAE decoder."""
    monkeypatch.chdir(ROOT)
    mpp = help_values(output("pretrain", ["--help-config"], capsys))
    assert mpp["model.name"] == "vit_nano_patch8_32" and mpp["optim.lr"] == 1e-3 and mpp["data.hflip"] == 0.0
    mae = help_values(output("pretrain", ["--help-config", "objective=mae"], capsys))
    assert (mae["mae.decoder_embed_dim"], mae["mae.decoder_depth"]) == (128, 2)
    assert not any(key.startswith("mpp.") for key in mae), "only the chosen objective's section exists"


def test_every_objective_is_listed_in_the_objective_help(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = next(
        line for line in output("pretrain", ["--help-config"], capsys).splitlines() if line.startswith("  objective =")
    )
    for name in objective_names():
        assert f"{name}: " in line


def test_a_section_of_another_objective_is_an_error(capsys):
    from vitmpp.common.config import load_config
    from vitmpp.common.errors import ConfigError
    from vitmpp.pretrain.config import PretrainConfig

    with pytest.raises(
        ConfigError, match=r"Section 'mpp' holds options of objective 'mpp', but the objective is 'mae'"
    ):
        load_config(PretrainConfig, None, ["objective=mae", "mpp.corrupt_ratio=0.15"])
    with pytest.raises(ConfigError, match=r"Key 'objective' must be one of .*did you mean 'mae'"):
        load_config(PretrainConfig, None, ["objective=maee"])


def test_defaults_the_docs_state_are_the_schemas():
    """A default written in README or docs/ ("the default `log.analysis_every=250`") is the default a
    run without arguments uses (issue 27, item 14): docs drift is caught here, not by a user."""
    from vitmpp.common.config import flatten, load_config, to_dict
    from vitmpp.finetune.config import FinetuneConfig
    from vitmpp.pretrain.config import PretrainConfig

    defaults = [flatten(to_dict(load_config(schema, None, []))) for schema in (PretrainConfig, FinetuneConfig)]
    pattern = re.compile(r"default\s+`([a-z_]+(?:\.[a-z_]+)+)=([^`]+)`")
    stated = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(path.read_text().split())
        stated += [(path.name, key, value) for key, value in pattern.findall(text)]
    assert stated, "no documented default found: the pattern no longer matches the docs"
    for name, key, value in stated:
        actual = [d[key] for d in defaults if key in d]
        assert actual, f"{name} states a default for '{key}', which neither stage has"
        assert any(str(a) == value or yaml.safe_load(value) == a for a in actual), (name, key, value, actual)
