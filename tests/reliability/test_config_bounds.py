"""Every config key of both stages, fed extreme, empty, wrong-typed and non-finite values.

The property: a value is either refused by the schema with one sentence (a `UserError`, which the
entry points print as one `error: ` line and exit 2) or accepted, and then what consumes it first
(the seeds, batch geometry, schedule, optimizer and its step, LR scheduler, crop transform, class
subset, the encoder's shapes) takes it without a traceback. In-process (`load_config`, what the entry
points call) so that hypothesis can try many values; a few real command lines check the exit code.
"""

from __future__ import annotations

import copy
import math
import types
import typing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from engine_helpers import TINY, python_cmd, run
from test_untrusted_input import stage_schemas, typed_keys
from vitmpp.common.config import format_value, load_config, schema_keys, to_dict
from vitmpp.common.errors import UserError
from vitmpp.common.optim import batch_geometry, build_optimizer, build_scheduler, make_schedule
from vitmpp.common.seeding import restored_generators, seed_generators
from vitmpp.finetune.config import FinetuneConfig
from vitmpp.pretrain.config import PretrainConfig

SCHEMAS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


def stage_keys(stage: str) -> list[tuple[list[str], str, typing.Any]]:
    """(overrides that select the key's schema, dotted key, type) for every key of a stage, each once:
    pretraining's shared keys under its default objective, each objective's section under that objective."""
    out, seen = [], set()
    for select, schema in sorted(stage_schemas(stage), key=lambda s: s[0] != ["objective=mpp"]):
        for key, tp, _ in typed_keys(schema):
            if key not in seen:
                seen.add(key)
                out.append((select, key, tp))
    return out


KEYS = {stage: stage_keys(stage) for stage in SCHEMAS}

_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
# 10**400: an integer beyond any float; 2**63, 2**64: beyond int64
_huge = st.one_of(
    st.sampled_from([2**31, 2**32, 2**32 + 1, 2**53 + 1, 2**63, 2**64, 10**400]), st.integers(2**31, 2**80)
)
_scalars = st.one_of(  # what goes into a list: the extremes, and the edges of the unit interval
    _huge,
    _huge.map(lambda v: -v),
    st.integers(-1000, 1000),
    st.sampled_from([0.0, 1.0, 2.0, -0.5, 0.5, 5e-324]),
    st.floats(1.0, 1e6),
    st.floats(1e15, 1e308),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)


def _list_of_extremes(tp):
    """Lists of extreme numbers, of the tuple's own length where the key is a fixed-length tuple."""
    inner = tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[tuple[...]]: the tuple
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(inner) is tuple and typing.get_args(inner) and typing.get_args(inner)[-1] is not Ellipsis:
        n = len(typing.get_args(inner))
        return st.lists(_scalars, min_size=n, max_size=n)
    return st.lists(_scalars, min_size=1, max_size=4)


# value kind -> (key type -> strategy of Python values; each is written as an override with format_value)
KINDS: dict[str, typing.Callable[[typing.Any], st.SearchStrategy]] = {
    "huge_int": lambda tp: _huge,
    "huge_negative_int": lambda tp: _huge.map(lambda v: -v),
    "negative": lambda tp: st.one_of(st.integers(-1000, -1), st.floats(-1e6, -1e-9)),
    "zero": lambda tp: st.sampled_from([0, 0.0]),
    "one_and_above": lambda tp: st.one_of(st.sampled_from([1, 1.0, 2.0]), st.floats(1.0, 1e6)),
    # "1e400": YAML 1.1 reads an exponent without a dot as a string, which is then read as a number (inf)
    "huge_float": lambda tp: st.one_of(
        st.sampled_from([1e308, 1e300, 1e20, "1e400", "-1e400"]), st.floats(1e15, 1e308)
    ),
    "tiny_float": lambda tp: st.sampled_from([5e-324, 1e-300, 1e-45]),
    "nan": lambda tp: st.just(math.nan),
    "inf": lambda tp: st.just(math.inf),
    "-inf": lambda tp: st.just(-math.inf),
    "empty_string": lambda tp: st.just(""),
    "empty_list": lambda tp: st.just([]),
    "wrong_type": lambda tp: st.one_of(
        _words, st.booleans(), st.just({"a": 1}), st.lists(_words, min_size=1, max_size=3)
    ),
    "list_of_extremes": _list_of_extremes,
}

CASES = [(stage, kind) for stage in SCHEMAS for kind in KINDS]
# keys x value kinds, both stages: what the walk of the two schemas yields, each one tried by a test below
COVERED = sum(len(KEYS[stage]) for stage, _ in CASES)

# ----------------------------------------------------------------------------- the first consumers

NUM_SAMPLES = 1079  # the digits' training split


def _tiny_vit():
    from vitmpp.models import create_encoder

    torch.manual_seed(0)
    return create_encoder("vit_pico_patch4_16", img_size=16)


_MODEL = _tiny_vit()  # layer decay groups parameters by block, so the optimizer needs a real ViT
_WEIGHTS = copy.deepcopy(_MODEL.state_dict())


_CONSUMED: set[tuple] = set()  # (part, the sections it reads) that went through without an error


def _once(part, sections, consume) -> None:
    """`consume()` unless these sections' values were consumed before (most examples change one key of one
    section, and building an encoder costs ~0.1 s even on the meta device)."""
    key = (part, format_value([to_dict(s) for s in sections]))
    if key not in _CONSUMED:
        consume()
        _CONSUMED.add(key)


def consume(stage: str, cfg) -> None:
    """What a run does first with its config, short of reading data: any problem must be a UserError."""
    _once("seed", [cfg.train.seed], lambda: _seed(cfg.train.seed))
    _once("optim", [cfg.train, cfg.optim], lambda: _optimize(cfg))
    if stage == "pretrain":
        _once("model", [cfg.model, cfg.data], lambda: _pretrain_model(cfg))
    else:
        _once("model", [cfg.model, cfg.data, cfg.train.seed], lambda: _finetune_model(cfg))


def _seed(seed: int) -> None:
    from accelerate.utils import set_seed

    with restored_generators():
        set_seed(seed)  # open_run
        seed_generators(seed)
        torch.Generator().manual_seed(seed)  # the loader's sampler
        np.random.default_rng(seed)


def _optimize(cfg) -> None:
    """Batch geometry, schedule, optimizer, LR scheduler at its edges, and one optimizer step."""
    geometry = batch_geometry(cfg.train, 1, cfg.train.logical_ranks)
    schedule = make_schedule(cfg.train, cfg.optim, NUM_SAMPLES, geometry.global_batch)
    _MODEL.load_state_dict(_WEIGHTS)
    optimizer = build_optimizer(_MODEL, cfg.optim, schedule.peak_lr)
    scheduler = build_scheduler(optimizer, cfg.optim, schedule.total_steps, schedule.warmup_steps)
    for step in (0, schedule.warmup_steps, schedule.total_steps):
        scheduler.step_update(step)
    for p in _MODEL.parameters():
        p.grad = torch.ones_like(p)
    if cfg.optim.clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(_MODEL.parameters(), cfg.optim.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _pretrain_model(cfg) -> None:
    from vitmpp.datasets import pretrain_transform
    from vitmpp.models import encoder_from_config

    pretrain_transform(
        cfg.model.img_size, scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip, interpolation=cfg.data.interpolation
    )
    with torch.device("meta"):  # the shapes a size implies, without their memory
        encoder_from_config(cfg.model)


def _finetune_model(cfg) -> None:
    from vitmpp.finetune.subset import balanced_subset
    from vitmpp.models import create_encoder

    balanced_subset([i % 10 for i in range(200)], cfg.data.label_fraction, cfg.train.seed)
    if cfg.model.name is not None:
        with torch.device("meta"):
            create_encoder(
                cfg.model.name,
                img_size=cfg.model.img_size,
                drop_path_rate=cfg.model.drop_path_rate,
                global_pool=cfg.model.global_pool,
            )


def outcome(stage: str, select: list[str], key: str, value) -> str | None:
    """None when `key=value` is refused in one sentence naming the key, or accepted and consumed; else
    what went wrong."""
    text = f"{key}={format_value(value)}"
    override = text if len(text) <= 100 else text[:97] + "..."  # what a failure shows (10**400 has 401 digits)
    try:
        cfg = load_config(SCHEMAS[stage], None, select + [text])
    except UserError as err:
        message = str(err)
        if "\n" in message or not message:
            return f"{override}: a refusal of more than one line: {message!r}"
        if key not in message:
            return f"{override}: a refusal that does not name the key: {message!r}"
        return None
    except Exception as err:  # noqa: BLE001 - a traceback is the failure
        return f"{override}: {type(err).__name__} while loading: {err}"
    try:
        consume(stage, cfg)
    except UserError as err:
        return f"{override}: accepted, then refused in more than one line: {err!r}" if "\n" in str(err) else None
    except Exception as err:  # noqa: BLE001
        return f"{override}: accepted, then {type(err).__name__}: {str(err)[:200]}"
    return None


@pytest.mark.parametrize("covered", [COVERED], ids=[f"{COVERED}_keys_x_value_kinds"])
def test_every_key_of_both_stages_meets_every_value_kind(covered):
    """The cases cover both stages whole: every leaf key of every schema (each objective's section too)."""
    walked = {
        stage: {key for _, schema in stage_schemas(stage) for key, _, _ in typed_keys(schema)} for stage in SCHEMAS
    }
    assert {stage: {key for _, key, _ in KEYS[stage]} for stage in SCHEMAS} == walked
    expected = sum(len(keys) for keys in walked.values()) * len(KINDS)
    assert covered == expected, f"{covered} (key, value kind) cases, but the schemas and kinds make {expected}"


@pytest.mark.fault(
    "extreme, empty, wrong-typed and non-finite values for every config key (hypothesis)", expect="clear error"
)
@pytest.mark.parametrize("stage,kind", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_value_is_refused_in_one_sentence_or_safe(stage, kind):
    keys = KEYS[stage]
    values = st.fixed_dictionaries({key: KINDS[kind](tp) for _, key, tp in keys})
    tried: set[str] = set()

    # no shrinking: an example holds a value for every key, and the message already lists each failing key alone
    @settings(
        max_examples=4,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    @given(values=values)
    def check(values):
        tried.update(values)
        failures = [problem for select, key, _ in keys if (problem := outcome(stage, select, key, values[key]))]
        assert not failures, f"{len(failures)} of {len(keys)} keys:\n" + "\n".join(failures)

    check()
    assert tried == {key for _, key, _ in keys}, f"keys never tried with {kind} values"


# ----------------------------------------------------------------------------- the real command lines


@pytest.mark.fault("seed, Adam betas or eps the libraries refuse (command line)", expect="clear error")
@pytest.mark.parametrize(
    "script,override,allowed",
    [
        ("pretrain/main.py", "train.seed=4294967296", "<= 4294967295"),
        ("pretrain/main.py", "optim.betas=[0.9,2.0]", "< 1"),
        ("finetune/main.py", "train.seed=18446744073709551616", "<= 4294967295"),
        ("finetune/main.py", "optim.eps=.inf", "finite"),
    ],
)
def test_command_line_refuses_in_one_sentence(tmp_path, script, override, allowed):
    key = override.split("=")[0]
    schema = SCHEMAS["pretrain" if script.startswith("pretrain") else "finetune"]
    tiny = [o for o in TINY if o.split("=")[0] in schema_keys(schema)]  # finetuning has no log.image_every
    result = run(python_cmd(script) + tiny + ["train.steps=1", override], cwd=tmp_path, check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: Key '{key}"), result.stderr
    assert allowed in lines[0] and not (tmp_path / "runs").exists()
