"""`ray-dafusion STAGE [--config FILE.yaml] [--FIELD VALUE ...]`.

The only place in the package that parses arguments and connects to Ray. Each stage maps to one
library function; its config's fields (with their docstrings and defaults) become the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
import typing
from typing import Any, Callable, Optional, Sequence

from .config import CONFIGS, ConfigError, StageConfig, _base_type, field_help

__all__ = ["main", "STAGES", "connect_ray", "build_parser"]

# stage -> (module, function); imported lazily so `--help` stays fast
STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("ray_dafusion.ingest", "ingest"),
    "invert": ("ray_dafusion.inversion", "invert"),
    "erase": ("ray_dafusion.erasure", "erase"),
    "augment": ("ray_dafusion.augment", "augment"),
    "train": ("ray_dafusion.train", "train"),
    "evaluate": ("ray_dafusion.evaluate", "evaluate"),
    "gallery": ("ray_dafusion.gallery", "gallery"),
    "pipeline": ("ray_dafusion.pipeline", "pipeline"),
    "demo": ("ray_dafusion.pipeline", "demo"),
}

_DESCRIPTIONS = {
    "demo": "Run the whole pipeline on the embedded default: local Ray, ./runs/demo, the tiny model, "
    "handwritten digits. Takes the pipeline's options.",
}


def stage_function(stage: str) -> Callable[..., Any]:
    module, name = STAGES[stage]
    return getattr(importlib.import_module(module), name)


def _config_class(stage: str) -> type[StageConfig]:
    return CONFIGS["pipeline" if stage == "demo" else stage]


def _add_fields(
    parser: argparse.ArgumentParser, cls: type[StageConfig], prefix: str = "", defaults: Optional[dict] = None
) -> None:
    """One option per field; `defaults` (the demo's embedded config) replaces class defaults in the help."""
    docs = field_help(cls)
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        base = _base_type(hints[f.name])
        if inspect.isclass(base) and issubclass(base, StageConfig):
            group = parser.add_argument_group(f"{prefix}{f.name} section ({docs.get(f.name, '')})")
            _add_fields(group, base, prefix=f"{prefix}{f.name}.", defaults=defaults.get(f.name))  # type: ignore[arg-type]
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = defaults.get(f.name, default)
        parser.add_argument(
            f"--{prefix}{f.name}",
            dest=f"{prefix}{f.name}",
            default=argparse.SUPPRESS,
            metavar=getattr(base, "__name__", str(base)).upper(),
            help=f"{docs.get(f.name, '')} (default: {json.dumps(default)})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-dafusion",
        description="DA-Fusion data augmentation on Ray: ingest -> invert -> (erase) -> augment -> train -> evaluate.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    sub.required = True
    for stage in STAGES:
        cls = _config_class(stage)
        p = sub.add_parser(stage, help=_DESCRIPTIONS.get(stage, cls.__doc__),
                           description=_DESCRIPTIONS.get(stage, cls.__doc__))
        if stage == "gallery":
            p.add_argument("synthetic_uri", nargs="?", help="augment output to show")
        p.add_argument("--config", dest="_config", default=None, metavar="FILE.yaml",
                       help="YAML file of field: value (local path or s3://); options below override it")
        _add_fields(p, cls, defaults=_demo_config() if stage == "demo" else None)
    return parser


def _demo_config() -> dict[str, Any]:
    from .pipeline import DEMO_CONFIG

    return DEMO_CONFIG


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[str, StageConfig]:
    """The stage named on the command line and its config (YAML file, then options; for `demo`
    both apply on top of the embedded default). Bad values exit with status 2 and a message."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    stage = args.pop("stage")
    config_path = args.pop("_config")
    positional = args.pop("synthetic_uri", None)
    if positional:
        args["synthetic"] = positional
    try:
        return stage, _config_class(stage).from_args(config_path, args, base=_demo_config() if stage == "demo" else None)
    except ConfigError as exc:
        parser.exit(2, f"ray-dafusion {stage}: {exc}\n")


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a fresh local one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, log_to_driver=True)


def _print_result(result: Any) -> None:
    if dataclasses.is_dataclass(result):
        result = dataclasses.asdict(result)
    if isinstance(result, dict) and "outputs" in result:  # a pipeline: where things went, not every number
        result = {k: result[k] for k in ("workdir", "outputs", "seconds") if k in result}
    print(json.dumps(result, indent=2, default=str))


def main(argv: Optional[Sequence[str]] = None) -> int:
    stage, cfg = parse_args(argv)
    fn = stage_function(stage)
    if stage != "gallery":
        connect_ray()
    try:
        result = fn(cfg)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"ray-dafusion {stage}: error: {exc}", file=sys.stderr)
        return 1
    _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
