"""The machinery behind the stage configs: typed dataclasses with docstrings under each field,
YAML plus ``--field value`` overrides, validation that names the field, and one identity rule.

``config.py`` holds only the configs themselves; everything here is generic.

Identity: each field says what it is to the output through its metadata ``kind``:

- ``output`` (the default): changes what the stage writes. Two runs with different values are
  different outputs, and a re-run with another value is refused unless ``overwrite``.
- ``extent``: how much of the same work to do (``epochs``, the ``classes`` subset). A re-run with
  a larger extent continues the output instead of being refused.
- ``resource``: where and with what it runs (CPUs, GPUs, caches, endpoints, batch sizes that do
  not change results, ``overwrite`` itself). Never refuses a re-run.
- ``location``: the output URI and run name: where the output is, not what it holds.

:func:`identity` returns the ``output`` fields; every stage fingerprints that (plus the content
fingerprints of its inputs) through :func:`config_fingerprint`, and records it
(:func:`config_record`) so that a refusal names what changed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .errors import ConfigError

__all__ = [
    "ConfigError",
    "StageConfig",
    "resource",
    "extent",
    "location",
    "field_kind",
    "identity",
    "config_record",
    "config_fingerprint",
    "field_help",
    "field_default",
    "read_yaml",
    "base_type",
    "bad",
    "one_of",
    "positive",
]

KINDS = ("output", "extent", "resource", "location")


def _kind_field(kind: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"kind": kind})
    return field(default=default, metadata={"kind": kind})


def resource(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field that says where or with what a stage runs; it never changes what the output is made of
    (and so is not fingerprinted), though a batch or call size may change pixels by float rounding."""
    return _kind_field("resource", default, default_factory)


def extent(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field that says how much of the same work to do; more of it continues an output."""
    return _kind_field("extent", default, default_factory)


def location(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field that says where the output goes (a URI, a run name)."""
    return _kind_field("location", default, default_factory)


def field_kind(f: dataclasses.Field) -> str:
    return f.metadata.get("kind", "output")


def bad(name: str, value: Any, why: str) -> ConfigError:
    """The error for one bad field value: names the field, the value and what is wrong."""
    return ConfigError(f"config field '{name}': {why} (got {value!r})")


@dataclass
class StageConfig:
    """Fields every stage shares."""

    endpoint_url: Optional[str] = resource(None)
    """S3-compatible endpoint for s3:// URIs (MinIO, a test server); default: AWS_ENDPOINT_URL or AWS."""
    overwrite: bool = resource(False)
    """Replace an output written with a different config instead of refusing."""
    stall_warning: Optional[float] = resource(300.0)
    """Seconds without a finished batch, task or epoch before the stage logs what it is waiting on (null: never)."""
    stall_timeout: Optional[float] = resource(None)
    """Seconds without progress after which the stage fails instead of waiting (default: wait)."""
    cost: dict = resource(default_factory=lambda: {"prices": {"cpu_hour": 0.0, "gpu_hour": 0.0}})
    """Prices for the estimated cost in each manifest, e.g. {prices: {cpu_hour: 0.05, gpu_hour: 1.2}} (currency per hour)."""

    def __post_init__(self) -> None:
        _coerce_fields(self)
        for name in ("stall_warning", "stall_timeout"):  # null means never; 0 or less would fire at once
            if getattr(self, name) is not None:
                positive(self, name)
        self._check_cost()
        self._check_seeds()
        self.validate()

    def validate(self) -> None:
        """Check values; subclasses extend. Raise ConfigError naming the field."""

    def _check_seeds(self) -> None:
        """Seeds (`seed`, `*_seed`, `seeds`) are >= 0: numpy's generators refuse negative ones, which
        would otherwise stop a stage only once it draws."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "seed" or f.name.endswith("_seed"):
                positive(self, f.name, allow_zero=True)
            elif f.name == "seeds" and isinstance(value, list) and any(s < 0 for s in value):
                raise bad(f.name, value, "every seed must be >= 0")

    def _check_cost(self) -> None:
        prices = (self.cost or {}).get("prices", {})
        if not isinstance(prices, dict) or set(self.cost) - {"prices"}:
            raise bad("cost", self.cost, "must be {prices: {cpu_hour: number, gpu_hour: number}}")
        for key, value in prices.items():
            if key not in ("cpu_hour", "gpu_hour") or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or value < 0:
                raise bad("cost", self.cost, f"price {key!r} must be cpu_hour or gpu_hour, a number >= 0")

    def require(self, *names: str) -> None:
        """Raise ConfigError unless every named field is set (stages call this before work)."""
        for name in names:
            value = getattr(self, name)
            if value is None or value == "" or value == []:
                raise bad(name, value, "is required for this stage")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "StageConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> "StageConfig":
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            # YAML reads the keys `on:`, `yes:`, `no:` as booleans and `2:` as a number
            odd = any(not isinstance(k, str) for k in set(data) - known)
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}"
                + (" (a key YAML reads as true/false or a number: quote it)" if odd else "")
                + f"; known fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str) -> "StageConfig":
        return cls.from_dict(read_yaml(path))

    @classmethod
    def from_args(
        cls, config_path: Optional[str], overrides: dict[str, str], base: Optional[dict[str, Any]] = None
    ) -> "StageConfig":
        """Build from `base` (a dict of defaults, e.g. the demo's), then an optional YAML file, then
        ``field -> raw string`` overrides; each later source wins, section by section."""
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in (base or {}).items()}
        for key, value in (read_yaml(config_path) if config_path else {}).items():
            data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
        for key, raw in overrides.items():
            section, _, sub = key.partition(".")
            if sub:  # `--augment.num_augmentations 5` sets a field of a nested section
                hints = typing.get_type_hints(cls)
                sub_cls = base_type(hints.get(section))
                if not (inspect.isclass(sub_cls) and issubclass(sub_cls, StageConfig)):
                    raise ConfigError(f"{cls.__name__}: '{section}' is not a config section")
                current = data.get(section) or {}
                if isinstance(current, StageConfig):
                    current = current.to_dict()
                if not isinstance(current, dict):
                    raise bad(section, current, f"must be a mapping of {sub_cls.__name__} fields")
                data[section] = {**current, sub: _parse_override(sub_cls, sub, raw)}
            else:
                data[key] = _parse_override(cls, key, raw)
        return cls.from_dict(data)


def identity(cfg: StageConfig) -> dict[str, Any]:
    """The fields of `cfg` that define its output (kind ``output``), sections included."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if field_kind(f) != "output":
            continue
        value = getattr(cfg, f.name)
        out[f.name] = identity(value) if isinstance(value, StageConfig) else value
    return out


SHARED_FIELDS = ("endpoint_url", "overwrite", "stall_warning", "stall_timeout", "cost")
"""The fields every stage has: set on a pipeline or a sweep, they reach each of its stages."""


def shared_settings(parent: StageConfig, section: StageConfig) -> dict[str, Any]:
    """The shared fields that `parent` (a pipeline, a sweep) sets and `section` leaves at its own
    default: the whole run's setting, for that stage. A value the section sets itself stays."""
    def default(cfg: StageConfig, name: str) -> Any:
        return field_default(next(f for f in dataclasses.fields(cfg) if f.name == name))

    return {name: getattr(parent, name) for name in SHARED_FIELDS
            if getattr(parent, name) != default(parent, name) and getattr(section, name) == default(section, name)}


def config_record(cfg: StageConfig, **inputs: Any) -> dict[str, Any]:
    """What a stage's output is made of: the config's identity plus the content fingerprints of
    its inputs (models, tokens, upstream manifests) passed as `inputs`. Stages record it beside
    their output, so a refused re-run can name the fields that changed."""
    return {"config": identity(cfg), **({"inputs": inputs} if inputs else {})}


def config_fingerprint(cfg: StageConfig, **inputs: Any) -> str:
    """Fingerprint of :func:`config_record`."""
    from .storage import fingerprint

    return fingerprint(config_record(cfg, **inputs))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last without
    a word, so a second `augment:` block would drop the first one's fields)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):  # the base loader refuses it with its own message
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML mapping from a local path or s3:// URI; ConfigError for anything else."""
    from . import storage  # config files may live on S3 too

    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except storage.StorageError as exc:  # a directory, a refused S3 read
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def _parse_override(cls: type, key: str, raw: str) -> Any:
    """A command-line string for field `key` of `cls`, turned into the value YAML would give."""
    hints = typing.get_type_hints(cls)
    if key not in hints:
        known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        raise ConfigError(f"{cls.__name__}: unknown field '{key}'; known fields: {known}")
    tp = hints[key]
    base = base_type(tp)
    if raw in ("null", "None") and type(None) in typing.get_args(tp):
        return None
    if base is str:
        return raw
    if base is list:
        (item_tp,) = typing.get_args(_strip_optional(tp)) or (Any,)
        if raw.strip().startswith("["):  # YAML flow syntax: --prompt_templates '["a {}, b"]'
            return _yaml_or_raw(raw)
        # `--strengths 0.25,0.5` is friendlier than YAML flow syntax on a command line; items of a
        # list of strings stay strings (`--classes no,1` is ['no', '1'], not [False, 1])
        parts = [part.strip() for part in raw.split(",") if part.strip()]
        return parts if item_tp is str else [_yaml_or_raw(part) for part in parts]
    return _yaml_or_raw(raw)


_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _float_text(text: str) -> Any:
    """YAML 1.1 reads `1e-5` (no dot) as a string, in a file as on a command line: a float field
    takes it as the number it means; other text is left for the type check to refuse."""
    return float(text) if _EXPONENT_FLOAT.fullmatch(text.strip()) else text


def _yaml_or_raw(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def base_type(tp: Any) -> Any:
    """`Optional[list[float]]` -> list; a nested config class stays itself."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return base_type(args[0]) if len(args) == 1 else tp
    return origin or tp


def _coerce_fields(cfg: StageConfig) -> None:
    """Check each field against its annotation; ints become floats where a float is meant."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        tp = hints[f.name]
        optional = type(None) in typing.get_args(tp)
        if value is None:
            if not optional:
                raise bad(f.name, value, "may not be null")
            continue
        base = base_type(tp)
        if inspect.isclass(base) and issubclass(base, StageConfig):
            if isinstance(value, dict):
                try:
                    setattr(cfg, f.name, base.from_dict(value))
                except ConfigError as exc:  # name the section: several have a batch_size
                    text = str(exc)
                    raise ConfigError(text.replace("config field '", f"config field '{f.name}.", 1)
                                      if text.startswith("config field '") else f"section '{f.name}': {text}") from None
            elif not isinstance(value, base):
                raise bad(f.name, value, f"must be a mapping of {base.__name__} fields")
            continue
        setattr(cfg, f.name, _coerce(f.name, value, tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    base = base_type(tp)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad(name, value, "must be true or false")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(name, value, "must be an integer")
        return value
    if base is float:
        if isinstance(value, str):
            value = _float_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(name, value, "must be a number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise bad(name, value, "must be a string")
        return value
    if base is list:
        if not isinstance(value, (list, tuple)):
            raise bad(name, value, "must be a list")
        (item_tp,) = typing.get_args(_strip_optional(tp)) or (Any,)
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if base is dict:
        if not isinstance(value, dict):
            raise bad(name, value, "must be a mapping")
        return dict(value)
    return value


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def one_of(cfg: Any, name: str, choices: typing.Iterable[str]) -> None:
    """Raise unless field `name` holds one of `choices`."""
    choices = tuple(choices)
    value = getattr(cfg, name)
    if value not in choices:
        raise bad(name, value, f"must be one of {', '.join(choices)}")


def positive(cfg: Any, *names: str, allow_zero: bool = False) -> None:
    """Raise unless each named field (when set) is > 0, or >= 0 with `allow_zero`."""
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(name, value, "must be a finite number")
        if value < 0 or (value == 0 and not allow_zero):
            raise bad(name, value, "must be >= 0" if allow_zero else "must be > 0")


def field_help(cls: type) -> dict[str, str]:
    """Map each field of a config class to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (dataclasses.is_dataclass(klass) and klass is not object):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
