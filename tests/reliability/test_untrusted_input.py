"""Configs, arguments, checkpoints and encoders that are wrong or hostile."""

from __future__ import annotations

import dataclasses
import json
import pickle
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datasets_helpers import MarkerPickle
from engine_helpers import TINY, python_cmd, run
from vitmpp.common.checkpoint import file_checksums
from vitmpp.common.config import schema_keys
from vitmpp.finetune.config import FinetuneConfig
from vitmpp.models.objective import objective_names
from vitmpp.pretrain.config import PretrainConfig


def call_entry_point(main, argv, capsys) -> str:
    """Run an entry point in-process; it must exit 2 with one 'error:' line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--print-config"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def typed_keys(schema):
    """(dotted key, type, metadata) for every leaf key of a config schema."""
    out = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", tp, f.metadata))

    walk(schema, "")
    return out


def wrong_value_for(tp, meta):
    """A strategy of YAML values that `tp` can never accept (None when there is none)."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if optional else tp
    words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).filter(
        lambda w: w not in ("true", "false", "null", "yes", "no", "on", "off", "y", "n", "nan", "inf")
    )
    if base in (int, float):
        return st.one_of(words, st.just("[1, 2]"), st.just("{a: 1}"))
    if base is bool:
        return st.one_of(words, st.integers(0, 5).map(str), st.just("[true]"))
    if base is str and meta.get("choices"):
        return words.filter(lambda w: w not in meta["choices"])
    if typing.get_origin(base) in (list, tuple):
        return st.one_of(words, st.just("{a: 1}"))
    return None


def cases(schema):
    keys = [(k, t, m) for k, t, m in typed_keys(schema) if wrong_value_for(t, m) is not None]
    return st.sampled_from(keys).flatmap(lambda kt: wrong_value_for(kt[1], kt[2]).map(lambda v: f"{kt[0]}={v}"))


ENTRY_POINTS = {"pretrain": PretrainConfig.resolve_schema({}), "finetune": FinetuneConfig}


def stage_schemas(stage):
    """(overrides that select it, schema): pretraining has one schema per objective (its own section)."""
    if stage == "finetune":
        return [([], FinetuneConfig)]
    return [([f"objective={name}"], PretrainConfig.resolve_schema({"objective": name})) for name in objective_names()]


def entry(name):
    if name == "pretrain":
        from vitmpp.pretrain.main import main
    else:
        from vitmpp.finetune.main import main
    return main


@pytest.mark.fault("random unknown config keys (hypothesis)", expect="clear error")
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.from_regex(r"[a-z][a-z_]{0,10}(\.[a-z][a-z_]{0,10}){0,2}", fullmatch=True), value=st.integers())
def test_unknown_keys(stage, key, value, capsys):
    if key in schema_keys(ENTRY_POINTS[stage]):
        return
    line = call_entry_point(entry(stage), [f"{key}={value}"], capsys)
    assert "Unknown key" in line or "must be" in line


@pytest.mark.fault("wrong types for known config keys (hypothesis)", expect="clear error")
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_wrong_types(stage, data, capsys):
    select, schema = data.draw(st.sampled_from(stage_schemas(stage)))
    override = data.draw(cases(schema))
    line = call_entry_point(entry(stage), select + [override], capsys)
    assert f"'{override.split('=')[0]}" in line


@pytest.mark.fault("negative or zero sizes, ratios out of range (hypothesis)", expect="clear error")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    override=st.one_of(
        st.sampled_from(
            [
                "train.global_batch",
                "train.steps",
                "model.img_size",
                "log.log_every",
                "data.shuffle_buffer",
                "log.keep_checkpoints",
            ]
        ).flatmap(lambda k: st.integers(-1000, 0).map(lambda v: f"{k}={v}")),
        # an objective's section exists only with that objective
        st.integers(-1000, 0).map(lambda v: f"objective=mae mae.decoder_depth={v}"),
        st.floats(1.0, 100.0).map(lambda v: f"objective=mae mae.mask_ratio={v}"),
        st.floats(1.0, 100.0).map(lambda v: f"mpp.corrupt_ratio={v}"),
        st.floats(-10.0, 0.0).map(lambda v: f"optim.lr={v}"),
        st.sampled_from([(32, 5), (32, 3), (30, 4), (224, 15), (48, 32)]).map(
            lambda p: f"model.img_size={p[0]} model.patch_size={p[1]}"
        ),
    )
)
def test_out_of_range_values(override, capsys):
    line = call_entry_point(entry("pretrain"), override.split(" "), capsys)
    assert "must" in line


@pytest.mark.fault("impossible batch geometry (global batch vs processes x per-device batch)", expect="clear error")
@pytest.mark.slow
@pytest.mark.parametrize(
    "geometry",
    [["train.global_batch=30", "train.per_device_batch=8"], ["train.global_batch=33", "train.per_device_batch=2"]],
)
def test_impossible_batch_geometry(tmp_path, digits16, geometry):
    result = run(
        python_cmd("pretrain/main.py") + TINY + geometry + [f"data.shards={digits16}"], cwd=tmp_path, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: train.global_batch=")


@pytest.mark.fault("config file with a !!python/object tag", expect="clear error")
def test_yaml_code_tags_are_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"objective: !!python/object/apply:os.system ['touch {marker}']\n")
    line = call_entry_point(entry("pretrain"), ["--config", str(config)], capsys)
    assert "not valid YAML" in line and not marker.exists()


@pytest.mark.fault("checkpoint whose pickle would run code", expect="clear error")
@pytest.mark.slow
def test_tampered_checkpoint_is_refused_without_running_it(tmp_path, digits16):
    common = TINY + ["train.steps=4", f"data.shards={digits16}", "log.checkpoint_every=2"]
    run(python_cmd("pretrain/main.py") + common + ["debug.stop_at_step=2"], cwd=tmp_path)
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "runs" / "default-mpp" / "checkpoints" / "step-0000002"
    (checkpoint / "optimizer.bin").write_bytes(pickle.dumps(MarkerPickle(str(marker))))
    state = json.loads((checkpoint / "trainer_state.json").read_text())  # the tamperer rewrites the checksums too,
    state["files"] = file_checksums(checkpoint)  # so loading (weights-only) is what refuses
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    result = run(python_cmd("pretrain/main.py") + common + ["--resume", "auto"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and not marker.exists()
    assert "refusing to load it" in result.stderr and "step-0000002" in result.stderr


@pytest.mark.fault("encoder given as a pickled .pt file", expect="clear error")
def test_pickled_encoder_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "encoder.pt"
    evil.write_bytes(pickle.dumps(MarkerPickle(str(marker))))
    from vitmpp.finetune.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"encoder={evil}", "data.shards=/nonexistent"])
    assert exit_info.value.code == 2 and not marker.exists()
    assert "safetensors" in capsys.readouterr().err
