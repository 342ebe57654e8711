"""Report: one table of every stage output under a workdir: time, work, device-seconds, cost, links.

Every stage writes ``cost`` into its manifest (wall seconds, CPU core-seconds, GPU-seconds, peak
memory, images or samples per second, and a cost estimate from the config's ``cost.prices``);
``ray-dafusion report WORKDIR`` gathers them, sums them, and points to the gallery sheets and the
results tables it finds. A run that wrote several outputs (score: one per scorer) is counted once.
Outputs whose manifest records no cost (written by an older version) are named: the totals leave
them out, so they are a lower bound.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Optional

from . import storage
from .config import ReportConfig, callable_stage_module

__all__ = ["ReportResult", "report"]

log = logging.getLogger(__name__)

_SUMMED = ("wall_seconds", "cpu_core_seconds", "gpu_seconds", "estimated_cost")


@dataclass
class ReportResult:
    """The report: one row per stage output, the totals, and links."""

    output: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)
    without_cost: list[str] = field(default_factory=list)
    """Outputs whose manifest records no cost (or not all of it): the totals leave them out."""
    links: list[str] = field(default_factory=list)
    table: str = ""


def _work(manifest: dict[str, Any]) -> str:
    """What a stage did, in a few words, from its manifest's counts."""
    counts = manifest.get("counts") or {}
    stage = manifest.get("stage")
    if stage == "ingest":
        return " / ".join(f"{v} {k}" for k, v in (counts.get("splits") or {}).items()) + " images"
    if stage == "augment":
        return f"{counts.get('synthetic_rows', 0)} images ({counts.get('generated', 0)} generated)"
    if stage in ("invert", "erase"):
        return f"{counts.get('classes', 0)} classes ({counts.get('trained', 0)} trained)"
    if stage == "train":
        return f"{counts.get('epochs', 0)} epochs, {counts.get('optimizer_steps', 0)} steps"
    if stage == "evaluate":
        return f"{counts.get('runs', 0)} runs scored"
    if stage == "score":
        return f"{manifest.get('scorer')}: {counts.get('rows', 0)} images ({counts.get('scored_now', 0)} now)"
    if stage == "pretrain":
        return f"{counts.get('images', 0)} images, {counts.get('steps', 0)} steps"
    return ""


def report(cfg: ReportConfig) -> ReportResult:
    """Gather every stage manifest under `cfg.workdir` into report.md (and the returned table)."""
    cfg.require("workdir")
    ep = cfg.endpoint_url
    manifests = [u for u in storage.list_files(cfg.workdir, "manifest.json", ep, recursive=True)
                 if posixpath.basename(u) == "manifest.json" and "/_checkpoints/" not in u]
    if not manifests:
        raise FileNotFoundError(f"no stage outputs (manifest.json) under {cfg.workdir}")
    rows = []
    for uri in manifests:
        try:
            manifest = storage.read_json(uri, ep)
        except ValueError as e:  # not JSON (a JSONDecodeError is a ValueError)
            manifest = e
        if not isinstance(manifest, dict):  # someone else's file of that name: named, not fatal
            log.warning("report leaves out %s: not a stage manifest (%s)", uri,
                        manifest if isinstance(manifest, ValueError) else f"a JSON {type(manifest).__name__}")
            continue
        cost = manifest.get("cost") or {}
        rate = cost.get("images_per_second", cost.get("samples_per_second"))
        rows.append({
            "stage": manifest.get("stage", "?"),
            "output": posixpath.dirname(uri[len(cfg.workdir.rstrip("/")):].lstrip("/")) or ".",
            "work": _work(manifest),
            "wall_seconds": cost.get("wall_seconds"),
            "cpu_core_seconds": cost.get("cpu_core_seconds"),
            "gpu_seconds": cost.get("gpu_seconds"),
            "rate": rate,
            "peak_memory_gib": round(cost["peak_memory_bytes"] / 2**30, 2) if cost.get("peak_memory_bytes") else None,
            "estimated_cost": cost.get("estimated_cost"),
            "_run": cost.get("run_id"),
            "_no_cost": any(cost.get(k) is None for k in _SUMMED),
        })
    order = ["ingest", "pretrain", "invert", "erase", "augment", "score", "train", "evaluate"]
    rows.sort(key=lambda r: (order.index(r["stage"]) if r["stage"] in order else len(order), r["output"]))
    without_cost = [r["output"] for r in rows if r.pop("_no_cost")]
    _count_shared_runs_once(rows)
    # a row without a record adds 0 (it is named); the cost keeps the 6 digits each manifest records
    totals = {k: round(sum(r[k] or 0 for r in rows), 6 if k == "estimated_cost" else 3) for k in _SUMMED}

    links = sorted(u for u in storage.list_files(cfg.workdir, "", ep, recursive=True)
                   if u.endswith(("gallery.png", "results.md", "summary.md")))
    table = _markdown(rows, totals, without_cost, links, cfg.workdir)
    output = cfg.output or storage.join(cfg.workdir, "report.md")
    storage.write_bytes(output, table.encode(), ep)
    log.info("%d stage outputs under %s: %.0f s wall, %.0f CPU core-s, %.0f GPU-s, estimated cost %.4f; %s",
             len(rows), cfg.workdir, totals["wall_seconds"], totals["cpu_core_seconds"], totals["gpu_seconds"],
             totals["estimated_cost"], output)
    if without_cost:
        log.warning("%d outputs record no cost, so the totals are a lower bound: %s", len(without_cost),
                    ", ".join(without_cost))
    return ReportResult(output, rows, totals, without_cost, links, table)


def _count_shared_runs_once(rows: list[dict[str, Any]]) -> None:
    """One run that wrote several outputs (score, one per scorer) records its whole cost in each, with
    its ``run_id``: the first of its rows keeps the cost, the others point to it."""
    first: dict[str, str] = {}
    for r in rows:
        run = r.pop("_run")
        if run is None:
            continue
        if run not in first:
            first[run] = r["output"]
            continue
        for k in ("wall_seconds", "cpu_core_seconds", "gpu_seconds", "rate", "peak_memory_gib", "estimated_cost"):
            r[k] = None
        r["work"] += f" (one run with {first[run]}: its cost is counted there)"


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(rows: list[dict[str, Any]], totals: dict[str, float], without_cost: list[str], links: list[str],
              workdir: str) -> str:
    lines = [f"# Report: {workdir}", "",
             "| stage | output | work | wall s | CPU core-s | GPU-s | images or samples / s | peak GiB | est. cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['output']} | {r['work']} | {_fmt(r['wall_seconds'])} | "
                     f"{_fmt(r['cpu_core_seconds'])} | {_fmt(r['gpu_seconds'])} | {_fmt(r['rate'], 2)} | "
                     f"{_fmt(r['peak_memory_gib'], 2)} | {_fmt(r['estimated_cost'], 4)} |")
    n = len(without_cost)
    partial = f"{n} output{'s' if n > 1 else ''} without cost records: a lower bound" if n else ""
    lines.append(f"| **total** | | {partial} | {_fmt(totals['wall_seconds'])} | {_fmt(totals['cpu_core_seconds'])} | "
                 f"{_fmt(totals['gpu_seconds'])} | | | {_fmt(totals['estimated_cost'], 4)} |")
    lines += ["", "Device-seconds are what each stage reserved (num_cpus, num_gpus) for as long as its tasks, "
              "actors or workers ran, plus the driver's CPU time; the cost uses each stage's `cost.prices`.", ""]
    if links:
        lines += ["Sheets and tables:", ""] + [f"- {u}" for u in links]
    return "\n".join(lines) + "\n"


callable_stage_module(__name__)  # `from ray_dafusion import report` may give this module: call it as the stage
