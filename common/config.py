"""Typed configs: a YAML file plus `key.sub=value` overrides, validated into dataclasses.

Every stage describes its whole recipe as a tree of dataclasses (the schema).
`load_config(Schema, path, overrides)` reads the YAML with a bounded `yaml.SafeLoader`
(no tags, no code; limits on size, nesting and alias expansion: `read_yaml`), applies
the overrides, and builds the dataclasses, checking every key and value on the way.
Errors are one sentence that names the key, where it came from (file or override), and
what is allowed, e.g.::

    Unknown key 'optim.lrr' in configs/pretrain/mpp_digits.yaml; did you mean 'optim.lr'?

Why our own builder and not a library. pydantic v2 was measured on this code: a prototype
that turns each schema into a pydantic model (`param()` bounds and choices as `Field`/`Literal`,
`extra="forbid"`, `allow_inf_nan=False`) and translates the first `ValidationError` entry into
our sentence, keeping our key sources and closest-key suggestions. It would remove the value
conversion and range checks (`_Builder.convert`, `check_range`, `_describe_type`, `_show`,
`_TypeMismatch`: about 155 of this file's lines) and add about 70 (model generation and the
translation). Of 16 override errors from tests/test_config.py it kept 4 sentences (an
unknown key twice, a lower bound, the 64-bit bound as a bound) and lost 12: an integer or
number error becomes pydantic's "Input should be a valid integer, unable to parse string as
an integer"; a key with two bounds names only the violated one; `choices` and `Literal` lose
"did you mean"; a tuple of the wrong length reads "Key 'optim.betas[1]': Field required";
`ratio=true` is taken as the number 1 (lax mode lets a boolean pass as a number; strict
mode would refuse YAML 1.1's "1e-4", a string, for a float), and `steps=1e5` is refused
(neither mode reads it as an integer): custom validators, i.e. our rules again. The
decision: keep ours. pydantic
would save about 85 lines, make every stage depend on it (today only typer pulls it in), and
each lost sentence would come back only as more translation code. OmegaConf structured
configs (dinov2's choice) check types only (no ranges or choices), and their errors are
multi-line (`full_key: ... object_type=...`) with no closest-key suggestion; tyro /
jsonargparse build a command line from dataclasses, where ours is `key=value` overrides on a
YAML recipe (big_vision-style). The measurement is in docs/objectives.md ("Config plumbing").

A schema whose sections depend on a value (the pretraining config has a section
named after its objective) defines a classmethod `resolve_schema(data) -> schema`,
called with the merged file and overrides before anything is built.

A section may list keys that are alternatives to each other in
`__alternatives__ = (("steps", "epochs"),)`: when a file or override gives one of
them, the default of the other is dropped.

Constraints are attached with `param(default, help=..., gt=/ge=/lt=/le=, choices=)`;
on a list or tuple they hold for each item (Adam's betas: `ge=0, lt=1`). Beyond them
every integer must fit in 64 bits (`INT64`: torch and numpy hold them so) and every
number must be finite. Checks that involve several keys go in a `check(self)` method
on the dataclass, which raises `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import ConfigError
from .io import UnreadableFile, atomic_write, read_regular_file

T = TypeVar("T")

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_MISSING = dataclasses.MISSING
# The integers a config may hold: what torch and numpy keep them in (a larger step, size or count is an
# OverflowError deep inside a library, not a value anyone means); keys add tighter bounds with le=.
INT64 = (-(2**63), 2**63 - 1)


def param(
    default: Any = _MISSING,
    *,
    help: str = "",
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: Sequence[Any] | None = None,
    default_factory: Any = _MISSING,
) -> Any:
    """A dataclass field with a help text and an allowed range or set of values (of each item, for a list)."""
    meta = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- reading

# Limits on what a config may be: far above any recipe (those in configs/ are < 4 KB, a few levels
# deep, with no aliases), far below what makes reading one slow or crash.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_VALUES = 100_000


class _Refused(yaml.YAMLError):
    """A YAML document over one of the limits; `problem` is the end of a sentence."""

    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that counts while it composes, before anything walks the document.

    A "billion laughs" file (aliases of aliases of collections) is a few hundred bytes and composes
    in microseconds, because an alias is a shared reference; it explodes only when something
    walks it (~10^10 values). So every alias is charged the size of what it expands to, and
    the document is refused once it holds more than MAX_CONFIG_VALUES values, nests deeper
    than MAX_CONFIG_DEPTH (PyYAML composes recursively: 5,000 levels is a RecursionError),
    or an alias names a collection that contains it (a structure with no end).
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._values = 0
        self._expanded: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded

    def _charge(self, values: int, mark) -> None:
        self._values += values
        if self._values > MAX_CONFIG_VALUES:
            raise _Refused(
                f"it holds more than {MAX_CONFIG_VALUES:,} values once its aliases (*name) are expanded", mark
            )

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._expanded:
                raise _Refused("an alias (*name) refers to a collection that contains it", mark)
            self._charge(self._expanded[id(node)], mark)
            return node
        self._depth += 1
        if self._depth > MAX_CONFIG_DEPTH:
            raise _Refused(f"it is nested more than {MAX_CONFIG_DEPTH} levels deep", mark)
        before = self._values
        self._charge(1, mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._expanded[id(node)] = self._values - before
        return node


def _load_bounded(text: str) -> Any:
    """`yaml.safe_load` within the limits above (a `yaml.YAMLError` when over one)."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_config_text(path: Path) -> str:
    """The text of a config file: a regular file (a FIFO would block the read forever) of sane size."""
    try:
        raw = read_regular_file(path, limit=MAX_CONFIG_BYTES)
    except UnreadableFile as err:
        advice = (
            "pass an existing YAML file to --config"
            if err.missing
            else "pass a YAML recipe (see configs/), not a data file"
            if "bytes" in err.reason
            else "pass a readable YAML file to --config"
        )
        raise ConfigError(f"Config file '{path}' {err.reason}; {advice}.") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"Config file '{path}' is not UTF-8 text (byte {err.start}); pass a YAML file.") from None


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping safely and within bounds (size, nesting, alias expansion); any problem is
    a one-sentence ConfigError naming the file."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        data = _load_bounded(text)
    except _Refused as err:
        raise ConfigError(
            f"Config file '{path}' is refused: {err.problem} (line {err.problem_mark.line + 1}); "
            "a recipe is a few levels of plain keys and values (see configs/)."
        ) from None
    except yaml.YAMLError as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"Config file '{path}' is not valid YAML{where}: {problem}.") from None
    except ValueError as err:  # a value Python will not hold, e.g. an integer of 5,000 digits
        raise ConfigError(
            f"Config file '{path}' holds a value that cannot be read ({str(err).split(':')[0]}); fix that value."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys to values, not a {type(data).__name__}.")
    return data


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse `a.b=value` strings; the value is read as YAML (numbers, bools, lists)."""
    parsed = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"Override '{text}' is not of the form key=value with a dotted key (e.g. optim.lr=1e-4).")
        try:
            value = _load_bounded(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError):
            value = raw  # not YAML: keep it as a plain string, the type check decides
        parsed.append((key, value))
    return parsed


# ----------------------------------------------------------------------------- schema helpers


def schema_keys(schema: type) -> list[str]:
    """Every dotted key a schema accepts, nested sections included."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if not f.init:
            continue
        keys.append(f.name)
        sub = _dataclass_of(hints[f.name])
        if sub is not None:
            keys.extend(f"{f.name}.{k}" for k in schema_keys(sub))
    return keys


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _origin(tp) is Union:
        subs = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(subs) == 1:
            return _dataclass_of(subs[0])
    return None


def _origin(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is types.UnionType:
        return Union
    return origin


def closest_key(key: str, valid: Sequence[str]) -> str | None:
    """The valid dotted key most like `key` (by whole path, then by last part)."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        return match[0]
    last = key.rsplit(".", 1)[-1]
    by_last = {k.rsplit(".", 1)[-1]: k for k in valid}
    match = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)
    return by_last[match[0]] if match else None


def _describe_type(tp: Any) -> str:
    origin = _origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_describe_type(a) for a in args)
        return f"{inner} or null" if type(None) in typing.get_args(tp) else inner
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(_describe_type(a) for a in args)})"
        return f"a list of {_describe_type(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------- building


class _TypeMismatch(ConfigError):
    """A value of the wrong type (as opposed to a wrong value of the right type)."""


class _Builder:
    """Builds a dataclass tree from nested dicts, knowing where each key came from."""

    def __init__(self, schema: type, sources: Mapping[str, str]):
        self.schema = schema
        self.sources = sources
        self.valid_keys = schema_keys(schema)

    def where(self, key: str) -> str:
        key = key.split("[", 1)[0]  # an item (optim.betas[1]) comes from where its list came from
        source = self.sources.get(key)
        if source is None:
            # a nested key inherits the source of its section
            parts = key.split(".")
            for i in range(len(parts) - 1, 0, -1):
                source = self.sources.get(".".join(parts[:i]))
                if source:
                    break
        return source or "the defaults"

    def fail_type(self, key: str, value: Any, tp: Any) -> ConfigError:
        return _TypeMismatch(f"Key '{key}' in {self.where(key)} must be {_describe_type(tp)}, got {_show(value)}.")

    def build(self, schema: type, data: Mapping, prefix: str = "") -> Any:
        if not isinstance(data, Mapping):
            raise self.fail_type(prefix.rstrip(".") or "(top level)", data, schema)
        hints = typing.get_type_hints(schema)
        fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
        for key in data:
            if key not in fields:
                full = f"{prefix}{key}"
                hint = closest_key(full, self.valid_keys)
                suggestion = f"; did you mean '{hint}'?" if hint else "."
                raise ConfigError(f"Unknown key '{full}' in {self.where(full)}{suggestion}")
        kwargs = {}
        for name, f in fields.items():
            key = f"{prefix}{name}"
            section = _dataclass_of(hints[name])
            if section is not None and f.default_factory is not _MISSING:
                # a section's defaults are those of the enclosing schema's factory
                # (e.g. a stage's own optimizer defaults), with the given keys on top
                given = data.get(name, {})
                if isinstance(given, Mapping):
                    base = to_dict(f.default_factory())
                    # keys that are alternatives (steps | epochs): giving one drops the default of the other
                    for group in getattr(section, "__alternatives__", ()):
                        if any(k in given for k in group):
                            for k in group:
                                if k not in given:
                                    base[k] = None
                    kwargs[name] = self.build(section, _merge(base, given), key + ".")
                    continue
            if name in data:
                kwargs[name] = self.convert(hints[name], data[name], key, f.metadata)
            elif f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(f"Key '{key}' is required in {self.where(key)} but missing.")
        obj = schema(**kwargs)
        check = getattr(obj, "check", None)
        if callable(check):
            check()
        return obj

    def convert(self, tp: Any, value: Any, key: str, meta: Mapping | None = None) -> Any:
        meta = meta or {}
        origin = _origin(tp)
        if origin is Union:
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            errors = []
            for sub in args:
                if sub is type(None):
                    continue
                try:
                    return self.convert(sub, value, key, meta)
                except ConfigError as err:
                    errors.append(err)
            value_errors = [e for e in errors if not isinstance(e, _TypeMismatch)]
            if value_errors:  # right type, wrong value: that message is the precise one
                raise value_errors[0]
            raise self.fail_type(key, value, tp)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value if value is not None else {}, key + ".")
        if origin is Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
                tail = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(
                    f"Key '{key}' in {self.where(key)} must be one of "
                    f"{', '.join(str(a) for a in allowed)}; got {_show(value)}{tail}."
                )
            return value
        if origin in (list, tuple) or tp in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise self.fail_type(key, value, tp)
            args = typing.get_args(tp)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise self.fail_type(key, value, tp)
                items = [self.convert(a, v, f"{key}[{i}]", meta) for i, (a, v) in enumerate(zip(args, value))]
            else:
                item_tp = args[0] if args else Any
                items = [self.convert(item_tp, v, f"{key}[{i}]", meta) for i, v in enumerate(value)]
            return tuple(items) if (origin is tuple or tp is tuple) else items
        if origin is dict or tp is dict:
            if not isinstance(value, Mapping):
                raise self.fail_type(key, value, tp)
            args = typing.get_args(tp)
            val_tp = args[1] if args else Any
            return {str(k): self.convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
        if tp is Any:
            return value
        if tp is bool:
            if not isinstance(value, bool):
                raise self.fail_type(key, value, tp)
            return value
        if tp is int:
            if isinstance(value, str) and _NUMBER.match(value.strip()):
                number = float(value)  # "1e5" (YAML 1.1 reads no exponent without a dot)
                if math.isfinite(number) and number.is_integer():
                    value = int(number)
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise self.fail_type(key, value, tp)
            self.check_range(key, value, meta)  # first: the key's own bounds say more than 64 bits do
            if not INT64[0] <= value <= INT64[1]:
                raise ConfigError(
                    f"Key '{key}' in {self.where(key)} must fit in 64 bits (-2**63 to 2**63 - 1), got {_show(value)}."
                )
            return value
        if tp is float:
            if isinstance(value, str) and _NUMBER.match(value.strip()):
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail_type(key, value, tp)
            try:
                value = float(value)
            except OverflowError:  # an integer beyond any float (10**400)
                value = math.inf if value > 0 else -math.inf
            if not math.isfinite(value):
                raise ConfigError(f"Key '{key}' in {self.where(key)} must be a finite number, got {value}.")
            return self.check_range(key, value, meta)
        if tp is str:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise self.fail_type(key, value, tp)
            value = str(value)
            choices = meta.get("choices")
            if choices and value not in choices:
                hint = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
                tail = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(
                    f"Key '{key}' in {self.where(key)} must be one of {', '.join(choices)}; got {_show(value)}{tail}."
                )
            return value
        return value

    def check_range(self, key: str, value: float, meta: Mapping) -> float:
        bounds = []
        if meta.get("gt") is not None and not value > meta["gt"]:
            bounds.append(f"> {meta['gt']}")
        if meta.get("ge") is not None and not value >= meta["ge"]:
            bounds.append(f">= {meta['ge']}")
        if meta.get("lt") is not None and not value < meta["lt"]:
            bounds.append(f"< {meta['lt']}")
        if meta.get("le") is not None and not value <= meta["le"]:
            bounds.append(f"<= {meta['le']}")
        if bounds:
            allowed = " and ".join(
                f"{op} {meta[name]}"
                for name, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                if meta.get(name) is not None
            )
            raise ConfigError(f"Key '{key}' in {self.where(key)} must be {allowed}, got {_show(value)}.")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(
                f"Key '{key}' in {self.where(key)} must be one of {', '.join(map(str, choices))}; got {_show(value)}."
            )
        return value


def _merge(base: dict, update: Mapping) -> dict:
    """`update` laid over `base`, recursively for nested mappings."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _mark_sources(tree: Mapping, source: str, prefix: str, sources: dict) -> None:
    for key, value in tree.items():
        full = f"{prefix}{key}"
        sources[full] = source
        if isinstance(value, Mapping):
            _mark_sources(value, source, full + ".", sources)


def resolve_schema(schema: type[T], data: Mapping) -> type[T]:
    """The concrete schema for `data` (`schema.resolve_schema`, where a schema defines it)."""
    resolve = getattr(schema, "resolve_schema", None)
    return resolve(data) if callable(resolve) and isinstance(data, Mapping) else schema


def from_dict(schema: type[T], data: Mapping, source: str = "the config") -> T:
    """Validate a nested dict into `schema`; errors name `source`."""
    sources: dict[str, str] = {}
    _mark_sources(data, source, "", sources)
    schema = resolve_schema(schema, data)
    return _Builder(schema, sources).build(schema, data)


def load_config(
    schema: type[T],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
) -> T:
    """Load `path` (optional) into `schema`, then apply `key=value` overrides."""
    data: dict = {}
    sources: dict[str, str] = {}
    if path is not None:
        data = read_yaml(path)
        _mark_sources(data, f"{path}", "", sources)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
        shown = str(value) if len(str(value)) <= 60 else str(value)[:57] + "..."  # 10**400 stays one short sentence
        sources[key] = (
            f"the override '{key}={shown}'" if not isinstance(value, (dict, list)) else f"the override of '{key}'"
        )
        if isinstance(value, Mapping):
            _mark_sources(value, sources[key], key + ".", sources)
    schema = resolve_schema(schema, data)
    return _Builder(schema, sources).build(schema, data)


# ----------------------------------------------------------------------------- writing


def to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists, for YAML)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    stream = io.StringIO()
    yaml.safe_dump(to_dict(cfg), stream, sort_keys=False, default_flow_style=False)
    return stream.getvalue()


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (`common.io.atomic_write`)."""
    atomic_write(path, dump_yaml(cfg))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to scalars (lists as strings): what trackers such as TensorBoard accept."""
    if dataclasses.is_dataclass(tree):
        tree = to_dict(tree)
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, full + "."))
        elif isinstance(value, (list, tuple)):
            flat[full] = str(list(value))
        elif value is None:
            flat[full] = "null"
        else:
            flat[full] = value
    return flat


def diff_keys(a: Any, b: Any, ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (dataclasses or dicts)."""
    fa, fb = flatten(a), flatten(b)
    skip = tuple(ignore)
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k) != fb.get(k) and not k.startswith(skip)]


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """One line per key, `  key = value  help`, with the values of `cfg` as YAML would write them.

    Pass the resolved config (what a run would use), so that `--help-config` shows
    exactly the values of `--print-config`; a schema class shows its field defaults.
    """
    lines = []
    schema = cfg if isinstance(cfg, type) else type(cfg)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if not f.init:
            continue
        if isinstance(cfg, type):
            if f.default is not _MISSING:
                value = f.default
            elif f.default_factory is not _MISSING:
                value = f.default_factory()
            else:
                value = "required"
        else:
            value = getattr(cfg, f.name)
        if _dataclass_of(hints[f.name]) is not None and dataclasses.is_dataclass(value):
            lines.extend(describe(value, f"{prefix}{f.name}."))
            continue
        help_text = f.metadata.get("help", "") if f.metadata else ""
        lines.append(f"  {prefix}{f.name} = {format_value(value)}  {help_text}".rstrip())
    return lines


def format_value(value: Any) -> str:
    """A value as it is written in YAML flow style (what an override takes): `[0.5, 1.0]`, `null`, `true`."""
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text
