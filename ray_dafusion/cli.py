"""`ray-dafusion STAGE [--config FILE.yaml] [--FIELD VALUE ...]`, and the body of every job script.

The only place in the package that parses arguments, reads the environment and chooses how to
connect to Ray (a stage called from Python without ray.init starts Ray with Ray's defaults, as Ray
Data would: plan.capacity).
Each stage maps to one library function (``config.STAGES``); its config's fields (with their
docstrings and defaults) become the options.

Failures end in one line on stderr and an exit code: 2 for a bad config, 1 for a stage that could
not finish (with what to do), 130 for Ctrl-C. ``--traceback`` (or ``RAY_DAFUSION_TRACEBACK=1``)
prints the full traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import logging
import os
import sys
import traceback
import typing
from typing import Any, Callable, Optional, Sequence

from .config import STAGES, StageConfig
from .configlib import base_type, field_default, field_help
from .errors import ConfigError, one_line, ordinary_failures
from .logs import setup_logging

__all__ = ["main", "run_job", "connect_ray", "build_parser", "parse_args", "stage_function"]

log = logging.getLogger(__name__)

TRACEBACK_ENV = "RAY_DAFUSION_TRACEBACK"
_NO_RAY = ("gallery", "report")  # stages that read and write files only
# `ray-dafusion gallery SYNTHETIC`, `ray-dafusion report WORKDIR`: the one field that may be positional
_POSITIONAL = {"gallery": ("synthetic", "augment output to show"), "report": ("workdir", "workdir to report on")}


def stage_function(stage: str) -> Callable[..., Any]:
    entry = STAGES[stage]
    return getattr(importlib.import_module(entry.module), entry.function)


def _add_fields(
    parser: argparse.ArgumentParser, cls: type[StageConfig], prefix: str = "", defaults: Optional[dict] = None
) -> None:
    """One option per field; `defaults` (the demo's embedded config) replaces class defaults in the help."""
    docs = field_help(cls)
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        base = base_type(hints[f.name])
        if inspect.isclass(base) and issubclass(base, StageConfig):
            group = parser.add_argument_group(f"{prefix}{f.name} section ({docs.get(f.name, '')})")
            _add_fields(group, base, prefix=f"{prefix}{f.name}.", defaults=defaults.get(f.name))  # type: ignore[arg-type]
            continue
        default = defaults.get(f.name, field_default(f))
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
    for stage, entry in STAGES.items():
        text = entry.summary or entry.config.__doc__
        p = sub.add_parser(stage, help=text, description=text)
        if stage in _POSITIONAL:
            field_name, text = _POSITIONAL[stage]
            p.add_argument("_positional", nargs="?", metavar=field_name.upper(), help=text)
        p.add_argument("--config", dest="_config", default=None, metavar="FILE.yaml",
                       help="YAML file of field: value (local path or s3://); options below override it")
        p.add_argument("--traceback", dest="_traceback", action="store_true",
                       help=f"on failure print the full traceback, not one line (or set {TRACEBACK_ENV}=1)")
        _add_fields(p, entry.config, defaults=_demo_config() if stage == "demo" else None)
    return parser


def _demo_config() -> dict[str, Any]:
    from .pipeline import DEMO_CONFIG

    return DEMO_CONFIG


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[str, StageConfig]:
    """The stage named on the command line and its config (YAML file, then options; for `demo`
    both apply on top of the embedded default). Bad values exit with status 2 and a message."""
    stage, cfg, _ = _parse(argv)
    return stage, cfg


def _parse(argv: Optional[Sequence[str]]) -> tuple[str, StageConfig, bool]:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    stage = args.pop("stage")
    config_path = args.pop("_config")
    show_traceback = args.pop("_traceback") or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    positional = args.pop("_positional", None)
    if positional:
        name = _POSITIONAL[stage][0]
        if name in args and args[name] != positional:  # neither silently wins
            parser.exit(2, f"ray-dafusion {stage}: {name} given twice, {positional!r} as {name.upper()} and "
                           f"{args[name]!r} as --{name}; give one\n")
        args[name] = positional
    try:
        cfg = STAGES[stage].config.from_args(config_path, args, base=_demo_config() if stage == "demo" else None)
    except ConfigError as exc:
        parser.exit(2, f"ray-dafusion {stage}: {exc}\n")
    return stage, cfg, show_traceback


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`), else start a fresh local one.

    A fresh local cluster is a single node on loopback: Ray's single-node mode (the variable
    below, read when ray is first imported) keeps every address at 127.0.0.1 instead of the
    machine's external interface, so a laptop run opens nothing to the network. It also keeps up
    to 8 idle worker processes (Ray's default: as many as the node has CPUs, the others ended
    after 10 s idle): on a 2-core laptop the default ends the workers that hold a loaded diffusion
    model whenever a sweep's trials train, and the next stage loads it again (docs/benchmarks.md).
    """
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_num_workers_soft_limit", "8")
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, log_to_driver=True)


# the fields that name where a stage reads or writes its data (score writes under its synthetic set)
_PLACES = ("output", "workdir", "real", "synthetic", "source")


def _warn_local_output(stage: str, cfg: StageConfig) -> None:
    """Warn when a stage's output, workdir or data inputs are local paths while Ray spans several
    machines, or its autoscaler can add some: each node would write its part to its own disk, and
    read only what its own disk holds (unless the path is a filesystem that every node mounts)."""
    from . import plan, storage

    local = [(name, getattr(cfg, name)) for name in _PLACES
             if isinstance(getattr(cfg, name, None), str) and getattr(cfg, name)
             and not storage.is_s3(getattr(cfg, name))]
    if not local:
        return
    import ray

    hosts = {n.get("NodeManagerHostname") for n in ray.nodes() if n.get("Alive")}
    if len(hosts) < 2 and not plan.capacity().can_add:
        return
    where = f"spans {len(hosts)} machines" if len(hosts) > 1 else "can add machines (autoscaler)"
    for name, path in local:
        log.warning("%s: %s %s is a local path and this Ray cluster %s: each node reads and writes its own "
                    "disk there; give s3:// URIs, unless every node mounts %s", stage, name, path, where, path)


def _print_result(result: Any) -> None:
    if getattr(result, "table", ""):  # a report: the table is the answer
        print(result.table, end="")
        return
    if dataclasses.is_dataclass(result):
        result = dataclasses.asdict(result)
    if isinstance(result, dict) and "outputs" in result:  # a pipeline: where things went, not every number
        result = {k: result[k] for k in ("workdir", "outputs", "seconds") if k in result}
    print(json.dumps(result, indent=2, default=str))


def _run(stage: str, argv: Sequence[str], report: Callable[[Any], None]) -> int:
    """Parse, connect, run one stage, report; every ordinary failure becomes one line and an exit code."""
    setup_logging()
    stage, cfg, show_traceback = _parse([stage, *argv])
    try:
        if stage not in _NO_RAY:
            connect_ray()
            _warn_local_output(stage, cfg)
        result = stage_function(stage)(cfg)
    except KeyboardInterrupt:
        print(f"ray-dafusion {stage}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except ordinary_failures() as exc:
        if show_traceback:
            traceback.print_exc()
        code = 2 if isinstance(exc, ConfigError) else 1
        hint = "" if show_traceback else f" (--traceback or {TRACEBACK_ENV}=1 for details)"
        print(f"ray-dafusion {stage}: error: {one_line(exc)}{hint}", file=sys.stderr)
        return code
    report(result)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `ray-dafusion` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):  # no stage: let argparse print usage or help
        build_parser().parse_args(argv)
    return _run(argv[0], argv[1:], _print_result)


def run_job(stage: str, argv: Sequence[str], summary: Callable[[Any], str]) -> int:
    """The body of `jobs/<stage>.py`: like `ray-dafusion <stage>`, but ends with one summary line."""
    return _run(stage, argv, lambda result: print(summary(result), flush=True))


if __name__ == "__main__":
    sys.exit(main())
