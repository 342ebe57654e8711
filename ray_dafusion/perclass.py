"""The driver of a per-class stage: one Ray task per class, failures collected, finished classes kept.

``invert`` (textual inversion) and ``erase`` (ESD) have the same shape, and so will any later
per-class adapter (LoRA, say)::

    classes = select_classes(table, cfg.classes, file_name)   # which classes, checked
    plan = plan_classes("invert", cfg, classes, marker)        # refuse another config; skip done ones
    records = run_class_tasks("invert", cfg, plan.todo, task, describe)   # one task per class (or group)
    ... the stage writes its combined output and manifest ...

A class is done once its marker file exists (the task writes it last), so a re-run after a crash
or a failed class trains only what is missing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from . import plan, storage
from .configlib import StageConfig, config_record
from .errors import StageError, one_line
from .schema import ClassInfo
from .watchdog import Watchdog

__all__ = ["ClassPlan", "select_classes", "plan_classes", "run_class_tasks", "class_seed"]

log = logging.getLogger(__name__)


@dataclass
class ClassPlan:
    """What a per-class stage has to do in this run."""

    config_fingerprint: str
    complete: Optional[dict[str, Any]]
    """The manifest, when the output is complete with this config."""
    done: list[ClassInfo] = field(default_factory=list)
    """Classes whose marker file exists (skipped)."""
    todo: list[ClassInfo] = field(default_factory=list)


def class_seed(seed: int, class_name: str) -> int:
    """A class's own seed: a hash of (run seed, class name), so seed 1 of class A never equals
    seed 0 of class B, and adding a class does not change the others' seeds."""
    digest = hashlib.sha256(f"{seed}\x1f{class_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def select_classes(table: Sequence[ClassInfo], wanted: Optional[Sequence[str]],
                   file_name: Callable[[ClassInfo], str]) -> list[ClassInfo]:
    """The classes to work on (`wanted`, default all), refusing names whose files would collide."""
    first: dict[str, ClassInfo] = {}
    clashes = []
    for c in table:  # ignoring case: macOS and Windows filesystems hold only one of Cat.x and cat.x
        other = first.setdefault(file_name(c).lower(), c)
        if other is not c:
            clashes.append(f"{other.name!r} and {c.name!r} ({file_name(other)}, {file_name(c)})")
    if clashes:
        raise ValueError(f"classes would share a file: {'; '.join(clashes)}. File names are compared ignoring "
                         "case; class names must differ in more than case, spacing or punctuation: rename the classes")
    if wanted is None:
        return list(table)
    names = {c.name for c in table}
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ValueError(f"classes {unknown} are not in the data set; its classes: {sorted(names)}")
    return [c for c in table if c.name in wanted]


def plan_classes(stage: str, cfg: StageConfig, classes: Sequence[ClassInfo],
                 marker: Callable[[ClassInfo], str], **inputs: Any) -> ClassPlan:
    """Refuse an output made with another config; find the classes already done."""
    ep = cfg.endpoint_url
    made_of = config_record(cfg, **inputs)
    fp = storage.fingerprint(made_of)
    complete = storage.ensure_fresh_output(cfg.output, stage, fp, cfg.overwrite, ep, made_of)
    done = [c for c in classes if storage.exists(marker(c), ep)]
    todo = [c for c in classes if c not in done]
    for c in done:
        logging.getLogger(f"ray_dafusion.{stage}").info("%s: %s exists, skipped", c.name, marker(c))
    return ClassPlan(fp, complete, done, todo)


def run_class_tasks(stage: str, cfg: Any, todo: Sequence[ClassInfo], task: Callable[..., list[dict[str, Any]]],
                    describe: Callable[[dict[str, Any]], str], meter: Optional[Any] = None,
                    classes_per_task: int = 1) -> dict[str, dict[str, Any]]:
    """Run ``task(cfg, infos)`` as one Ray task per `classes_per_task` classes (in table order) with
    cfg's num_cpus / num_gpus; the task returns one record per class of `infos`.

    Returns each class's record. Every task runs even when one fails; failures are then raised
    together as one StageError that names each class and its reason. Finished classes stay. When
    the wait ends early (stall_timeout, Ctrl-C), the tasks still running are cancelled.
    """
    import ray

    log = logging.getLogger(f"ray_dafusion.{stage}")  # lines read "invert: cat: done ...", not "perclass: ..."
    cap = plan.capacity()
    pin = plan.node_pinning(cfg.node_resource, cfg.num_gpus, cap, stage)
    groups = [list(todo[i:i + classes_per_task]) for i in range(0, len(todo), classes_per_task)]
    plan.check(stage, plan.Demand("per-class task", len(groups), {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus, **pin},
                                  size_fields={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
                                  needs_data_tasks=False, all_at_once=False), cap)
    # "DEFAULT": never inside a caller's placement group (a sweep trial's), which has no room for them
    remote = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, scheduling_strategy="DEFAULT",
                        **({"resources": pin} if pin else {}))(task)
    pending = {remote.remote(cfg, group): group for group in groups}
    records: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    hint = f"each class task reserves num_cpus {cfg.num_cpus:g} and num_gpus {cfg.num_gpus:g}; lower them or add nodes"
    with Watchdog(stage, "class", cfg.stall_warning, cfg.stall_timeout, hint=hint) as watchdog:
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                watchdog.progress()
                group = pending.pop(ref)
                try:
                    done = ray.get(ref)
                except Exception as exc:  # keep the other classes going; report every failure at the end
                    for info in group:
                        failures[info.name] = one_line(exc)
                        log.warning("%s: FAILED %s", info.name, failures[info.name])
                    continue
                for info, record in zip(group, done):
                    records[info.name] = record
                    if meter is not None:  # a record's seconds are its class's share of the task's, with
                        # its share of the task's setup (reads, model load)
                        meter.add_task_seconds(record["seconds"] + record.get("setup_seconds", 0.0), cfg.num_cpus,
                                               cfg.num_gpus, record.get("max_rss_bytes", 0))
                    log.info("%s: %s", info.name, describe(record))
        finally:  # left early (a stall, Ctrl-C, an error here): the tasks would go on holding GPUs for nothing
            _cancel(pending, log)
    if failures:
        raise StageError(
            f"{stage} failed for {len(failures)} of {len(todo)} classes: "
            + "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))
            + f". Finished classes are kept in {cfg.output}; re-run the same command to retry only the failed ones."
        )
    return records


def _cancel(pending: dict[Any, list[ClassInfo]], log: logging.Logger) -> None:
    """Stop the tasks of `pending` (force: a task inside a long torch call never looks for a cancel)."""
    import ray

    if pending:
        log.warning("cancelling %d class task(s) still running: %s", len(pending),
                    ", ".join(info.name for group in pending.values() for info in group))
    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception as exc:  # the error that stopped the stage is the one to report
            log.warning("could not cancel a class task: %s", one_line(exc))
