"""The config system: YAML + dotted overrides -> typed dataclasses, with one-sentence errors."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from vitmpp.common.config import (
    describe,
    diff_keys,
    flatten,
    load_config,
    param,
    parse_overrides,
    read_yaml,
    save_config,
    to_dict,
)
from vitmpp.common.errors import ConfigError


@dataclass
class Optim:
    lr: float = param(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    name: str = param("adamw", choices=("adam", "adamw"))


@dataclass
class Recipe:
    objective: Literal["mpp", "mae"] = "mpp"
    steps: int = param(10, ge=1)
    ratio: float = param(0.5, gt=0, lt=1)
    tag: str | None = None
    flags: list[int] = param(default_factory=list)
    optim: Optim = field(default_factory=Optim)

    def check(self):
        if self.objective == "mae" and self.ratio < 0.5:
            raise ConfigError("Key 'ratio' must be at least 0.5 for mae.")


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_and_overrides_build_typed_config(tmp_path):
    path = write(tmp_path, "steps: 5\noptim:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    cfg = load_config(Recipe, path, ["optim.betas=[0.9,0.95]", "tag=x", "flags=[1,2]"])
    assert cfg.steps == 5 and cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.tag == "x" and cfg.flags == [1, 2]
    assert cfg.objective == "mpp" and cfg.optim.name == "adamw"


def test_override_wins_over_file(tmp_path):
    path = write(tmp_path, "steps: 5\n")
    assert load_config(Recipe, path, ["steps=7"]).steps == 7


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, path)
    message = str(err.value)
    assert "'optim.lrr'" in message and str(path) in message and "did you mean 'optim.lr'?" in message
    assert message.count("\n") == 0


def test_unknown_key_in_override_suggests_dotted_key():
    with pytest.raises(ConfigError, match=r"Unknown key 'lr' in the override 'lr=3'; did you mean 'optim.lr'\?"):
        load_config(Recipe, None, ["lr=3"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("steps=abc", r"Key 'steps' in the override 'steps=abc' must be an integer, got 'abc'\."),
        ("steps=2.5", r"Key 'steps' .* must be an integer, got 2\.5\."),
        ("steps=0", r"Key 'steps' .* must be >= 1, got 0\."),
        ("ratio=1.0", r"Key 'ratio' .* must be > 0 and < 1, got 1\.0\."),
        ("optim.lr=-1", r"Key 'optim.lr' .* must be > 0, got -1\.0\."),
        ("optim.name=sgd", r"Key 'optim.name' .* must be one of adam, adamw; got 'sgd'"),
        ("objective=mpe", r"must be one of mpp, mae; got 'mpe' \(did you mean 'mpp'\?\)"),
        ("optim.betas=[1]", r"Key 'optim.betas' .* must be a list of 2 values"),
        ("optim=3", r"Key 'optim' .* must be a mapping of keys, got 3\."),
        ("tag=[1]", r"Key 'tag' .* must be a string or null, got \[1\]\."),
        ("flags=[a]", r"Key 'flags\[0\]' .* must be an integer, got 'a'\."),
        ("ratio=true", r"Key 'ratio' .* must be a number, got True\."),
        ("ratio=.nan", r"Key 'ratio' .* must be a finite number"),
    ],
)
def test_wrong_type_or_range_is_one_sentence(override, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(Recipe, None, [override])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["steps", "=3", "a..b=1", "9x=1", ""])
def test_bad_override_syntax(override):
    with pytest.raises(ConfigError, match=r"is not of the form key=value"):
        load_config(Recipe, None, [override])


def test_cross_field_check_runs():
    with pytest.raises(ConfigError, match="at least 0.5 for mae"):
        load_config(Recipe, None, ["objective=mae", "ratio=0.2"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"Config file '.*nope.yaml' does not exist"):
        load_config(Recipe, tmp_path / "nope.yaml")
    bad = write(tmp_path, "steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+"):
        load_config(Recipe, bad)
    listing = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Recipe, listing)


def test_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    evil = write(tmp_path, f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(evil)
    assert not marker.exists()


def test_roundtrip_save_flatten_diff(tmp_path):
    cfg = load_config(Recipe, None, ["steps=3", "optim.betas=[0.8,0.9]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Recipe, tmp_path / "config.yaml")
    assert again == cfg
    flat = flatten(cfg)
    assert flat["optim.lr"] == pytest.approx(1e-3) and flat["optim.betas"] == "[0.8, 0.9]" and flat["tag"] == "null"
    assert diff_keys(cfg, load_config(Recipe, None, ["steps=4"])) == ["optim.betas", "steps"]
    assert to_dict(cfg)["optim"]["betas"] == [0.8, 0.9]


def test_describe_lists_every_key():
    text = "\n".join(describe(Recipe))
    for key in ("objective", "steps", "ratio", "tag", "flags", "optim.lr", "optim.betas", "optim.name"):
        assert f"  {key} = " in text


def test_override_values_parse_as_yaml():
    parsed = dict(parse_overrides(["a=1", "b=1.5", "c=true", "d=[1, 2]", "e=hello", "f=null", "g="]))
    assert parsed == {"a": 1, "b": 1.5, "c": True, "d": [1, 2], "e": "hello", "f": None, "g": ""}


@dataclass
class Stage:
    """A stage whose optimizer section has its own defaults (like pretrain vs finetune)."""

    optim: Optim = field(default_factory=lambda: Optim(lr=0.5, name="adam"))


def test_section_defaults_come_from_the_enclosing_factory():
    assert load_config(Stage, None, []).optim == Optim(lr=0.5, name="adam")
    cfg = load_config(Stage, None, ["optim.betas=[0.1,0.2]"])
    assert cfg.optim.lr == 0.5 and cfg.optim.name == "adam" and cfg.optim.betas == (0.1, 0.2)
