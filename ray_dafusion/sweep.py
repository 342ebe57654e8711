"""Sweep: the paper's experiment, shots x seeds x methods, as Ray Tune trials over reused stage outputs.

Shape of a run (everything under ``workdir``)::

    ingest source ─> real/pool            once: val and test fixed, the whole train pool kept
      for each trial (shots k, seed s, method m), on Ray Tune:
        ingest (format real) ─> real/k{k}-s{s}                      one per (k, s), shared
        invert               ─> tokens/k{k}-s{s}                    one per (k, s), if m needs tokens
        augment              ─> synthetic/{mode}[-t0s]/k{k}-s{s}     one per (k, s, mode, t0 levels)
        (filtered methods: the baseline run of (k, s), then its classifier scores of the synthetic set
         ─> synthetic/.../k{k}-s{s}/scores/classifier, both shared)
        train                ─> train/{m}-k{k}-s{s}                 the trial's own run
        trials/{m}-k{k}-s{s}.json                                  written when the trial is done
    evaluate every run on the pool's test split ─> results/ (per run)
    ─> summary.md / summary.json / accuracy_vs_shots.png: mean test accuracy with a 95% interval
       per (method, shots), and paired differences against baseline and standard

Every stage skips a complete output, so a trial reuses what an earlier trial made, and a re-run of
the sweep skips finished trials (their trial record holds the fingerprint of the configs they ran
with, of the pool they drew from and, for methods with a synthetic set, of the diffusion model's
files). Shots beyond a class's train pool are refused right after the pool is ingested (unless
``ingest.allow_fewer``, whose short classes the summary marks). The summary names the plan it
covers and when it was written, so one left by an earlier or failed sweep is told from this one's.
Two trials that need the same shared output at once do not collide: the second waits for the
first's lease, then finds the output complete.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from . import schema, storage
from .config import (
    SweepConfig,
    callable_stage_module,
)
from .configlib import config_fingerprint, shared_settings
from .errors import ConfigError, StageError
from .logs import setup_logging
from .modes import AUGMENT_MODES, SWEEP_VARIANTS, TRAIN_METHODS

__all__ = ["SweepResult", "sweep", "trial_plan", "summarize", "Trial"]

log = logging.getLogger(__name__)

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
SUMMARY_PLOT = "accuracy_vs_shots.png"


@dataclass(frozen=True)
class Trial:
    """One (method, shots, seed) cell of the experiment and where its outputs go."""

    method: str
    shots: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-k{self.shots}-s{self.seed}"


@dataclass
class SweepResult:
    """What `sweep` produced."""

    workdir: str
    trials: int
    ran: int
    """Trials run by this call (the others were finished before)."""
    summary: list[dict[str, Any]] = field(default_factory=list)
    """One row per (method, shots): n, mean, 95% interval, paired differences."""
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def trial_plan(cfg: SweepConfig) -> list[Trial]:
    """Every trial, shots first, then seeds, then methods (so shared outputs are made once, early)."""
    return [Trial(m, k, s) for k in cfg.shots for s in cfg.seeds for m in cfg.methods]


# --------------------------------------------------------------------------------------
# One trial (runs in a Ray Tune trial actor)
# --------------------------------------------------------------------------------------


def _paths(cfg: SweepConfig, trial: Trial) -> dict[str, str]:
    w, cell = cfg.workdir, f"k{trial.shots}-s{trial.seed}"
    variant = SWEEP_VARIANTS[trial.method]
    mode = TRAIN_METHODS[variant.method].synthetic_mode
    levels = "" if variant.strengths is None else "-t0_" + "_".join(f"{t:g}" for t in variant.strengths)
    return {
        "pool": storage.join(w, "real", "pool"),
        "real": storage.join(w, "real", cell),
        "tokens": storage.join(w, "tokens", cell),
        "synthetic": storage.join(w, "synthetic", f"{mode}{levels}", cell) if mode else "",
        "train": storage.join(w, "train"),
        "record": storage.join(w, "trials", f"{trial.name}.json"),
    }


def _waiting(fn: Callable[[Any], Any], cfg: Any, patience: float = 3600.0) -> Any:
    """Run a stage; while another trial holds its output, wait for it (it then finds it complete)."""
    deadline = time.time() + patience
    while True:
        try:
            return fn(cfg)
        except storage.LeaseError:
            if time.time() > deadline:
                raise
            time.sleep(2.0)


def _stage_configs(cfg: SweepConfig, trial: Trial) -> dict[str, Any]:
    """The configs of a trial's stages: the sweep's sections with the trial's shots, seed and method."""
    p = _paths(cfg, trial)
    variant = SWEEP_VARIANTS[trial.method]
    method = TRAIN_METHODS[variant.method]
    def shared(section: Any) -> dict[str, Any]:  # the sweep's endpoint, overwrite, stall times, prices
        return shared_settings(cfg, section)

    out: dict[str, Any] = {
        "real": dataclasses.replace(cfg.ingest, source=p["pool"], format="real", output=p["real"],
                                    examples_per_class=trial.shots, seed=trial.seed, **shared(cfg.ingest)),
    }
    if method.synthetic_mode:
        mode = AUGMENT_MODES[method.synthetic_mode]
        if mode.needs_tokens:
            out["invert"] = dataclasses.replace(cfg.invert, real=p["real"], output=p["tokens"], seed=trial.seed,
                                                **shared(cfg.invert))
        out["augment"] = dataclasses.replace(
            cfg.augment, real=p["real"], output=p["synthetic"], mode=method.synthetic_mode, seed=trial.seed,
            strengths=list(variant.strengths) if variant.strengths is not None else None,
            embeddings=p["tokens"] if mode.needs_tokens else None, **shared(cfg.augment))
    # every method but the baseline trains with the same standard augmentation, as the paper compares them
    if variant.augmented:
        augmentation = {"randaugment": True if cfg.train.randaugment is None else cfg.train.randaugment}
    else:
        augmentation = {"randaugment": False, "rotation": 0.0, "hflip": False}
    if variant.synthetic_filter:
        # the filter reads the classifier scores that this (shots, seed)'s baseline run gives the synthetic set
        baseline = _stage_configs(cfg, Trial("baseline", trial.shots, trial.seed))["train"]
        out["baseline"] = baseline
        out["score"] = dataclasses.replace(cfg.score, synthetic=p["synthetic"], scorers=["classifier"],
                                           run=storage.join(baseline.output, baseline.name), **shared(cfg.score))
    out["train"] = dataclasses.replace(
        cfg.train, real=p["real"], synthetic=p["synthetic"] or None, output=p["train"], name=trial.name,
        method=variant.method, seed=trial.seed, **augmentation, **shared(cfg.train),
        **({"synthetic_filter": variant.synthetic_filter} if variant.synthetic_filter else {}))
    return out


def run_trial(cfg: SweepConfig, trial: Trial, model: str) -> dict[str, Any]:
    """Make (or find) every output the trial needs, train its run, write its record (`model`: the
    sweep's `_model_fingerprint`)."""
    from .augment import augment
    from .ingest import ingest
    from .inversion import invert
    from .score import score
    from .train import train

    setup_logging()
    configs = _stage_configs(cfg, trial)
    started = time.time()
    seconds: dict[str, float] = {}
    stages = {"real": ingest, "invert": invert, "augment": augment, "baseline": train, "score": score, "train": train}
    for key, fn in stages.items():
        if key in configs:
            begun = time.time()
            result = _waiting(fn, configs[key])
            seconds[key] = round(time.time() - begun, 2)
    record = {"trial": dataclasses.asdict(trial), "name": trial.name, "run": result.output,
              "best_val_mean_class_acc": result.best_val_mean_class_acc, "optimizer_steps": result.optimizer_steps,
              "seconds": round(time.time() - started, 1), "stage_seconds": seconds,
              "fingerprint": _trial_fingerprint(cfg, trial, model)}
    storage.write_json(_paths(cfg, trial)["record"], record, cfg.endpoint_url)
    return record


def _trial_fingerprint(cfg: SweepConfig, trial: Trial, model: str) -> str:
    """The trial's stage configs, the pool they draw from (by its ingest fingerprint) and, if the
    trial makes a synthetic set, the diffusion model's files (`model`): a pool ingested again from
    another source, or a model rebuilt at the same path, leaves no trial of it finished."""
    pool = storage.read_manifest(_paths(cfg, trial)["pool"], cfg.endpoint_url) or {}
    made_of = {"pool": pool.get("config_fingerprint"),
               **{k: config_fingerprint(v) for k, v in _stage_configs(cfg, trial).items()}}
    if _uses_model(trial.method):  # (methods without one keep the fingerprint they had before it was added)
        made_of["model"] = model
    return storage.fingerprint(made_of)


def _uses_model(method: str) -> bool:
    return TRAIN_METHODS[SWEEP_VARIANTS[method].method].synthetic_mode is not None


def _model_fingerprint(cfg: SweepConfig) -> str:
    """The content fingerprint of augment's model, as augment computes it ('' when no method makes a
    synthetic set); computed once per sweep, on the driver (an s3 model is staged there too)."""
    from . import models

    if not any(_uses_model(m) for m in cfg.methods):
        return ""
    augment = dataclasses.replace(cfg.augment, **shared_settings(cfg, cfg.augment))
    local = models.resolve_model(augment.model, augment.cache_dir, augment.endpoint_url)
    return models.model_fingerprint(local, augment.cache_dir)


def _tune_trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: one trial, its validation accuracy reported."""
    import ray.tune

    cfg = SweepConfig.from_dict(config["sweep"])
    record = run_trial(cfg, Trial(**config["trial"]), config["model"])
    ray.tune.report({"best_val_mean_class_acc": record["best_val_mean_class_acc"] or 0.0,
                     "optimizer_steps": record["optimizer_steps"]})


def _finished(cfg: SweepConfig, trials: list[Trial], model: str) -> set[str]:
    """Trials whose record says they finished with the current config, pool and model."""
    done = set()
    for trial in trials:
        try:
            record = storage.read_json(_paths(cfg, trial)["record"], cfg.endpoint_url)
        except FileNotFoundError:
            continue
        if record.get("fingerprint") == _trial_fingerprint(cfg, trial, model):
            done.add(trial.name)
    return done


def _run_trials(cfg: SweepConfig, todo: list[Trial], model: str) -> None:
    """The trials on Ray Tune, at most max_concurrent_trials at once; a failed trial is an error."""
    import ray.tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    # the trial actor itself only waits on its stages, which reserve their own resources
    trainable = ray.tune.with_resources(_tune_trainable, {"cpu": 0.01})
    fs, path = storage.resolve(storage.join(cfg.workdir, "tune"), cfg.endpoint_url)
    tuner = Tuner(
        trainable,
        param_space={"sweep": cfg.to_dict(), "model": model,
                     "trial": ray.tune.grid_search([dataclasses.asdict(t) for t in todo])},
        # reused trial processes keep torch, the models and the stage code loaded from trial to trial
        tune_config=TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True),
        run_config=RunConfig(name=f"trials-{int(time.time())}", storage_path=path,
                             storage_filesystem=fs if storage.is_s3(cfg.workdir) else None, verbose=0),
    )
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    if failed:
        first = failed[0]
        raise StageError(f"{len(failed)} of {len(todo)} trials failed, e.g. {first.config['trial']}: "
                         f"{str(first.error).strip().splitlines()[-1] if str(first.error).strip() else first.error}. "
                         "Finished trials are kept; re-run the same command to retry the others.")


# --------------------------------------------------------------------------------------
# Summary: means, 95% intervals, paired differences
# --------------------------------------------------------------------------------------


def _interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width nan for fewer than 2 values."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else float("nan"), float("nan")
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows per (method, shots) from evaluated runs (each with method, shots, seed, mean_class_acc,
    and optionally fewest_per_class): mean accuracy with its 95% interval, the fewest train images
    any class had in any of its seeds (None when unknown), and paired differences (same shots and
    seed) against baseline and standard, with theirs."""
    acc: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    fewest: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r in runs:
        acc[(r["method"], r["shots"])][r["seed"]] = r["mean_class_acc"]
        if r.get("fewest_per_class") is not None:
            fewest[(r["method"], r["shots"])].append(r["fewest_per_class"])
    rows = []
    for (method, shots), by_seed in sorted(acc.items(), key=lambda kv: (kv[0][1], list(SWEEP_VARIANTS).index(kv[0][0]))):
        mean, half = _interval(list(by_seed.values()))
        row = {"method": method, "shots": shots, "n": len(by_seed), "mean": mean, "ci95": half,
               "fewest_per_class": min(fewest[(method, shots)], default=None)}
        for ref in ("baseline", "standard"):
            other = acc.get((ref, shots))
            if other is None or ref == method:
                continue
            seeds = sorted(set(by_seed) & set(other))
            diffs = [by_seed[s] - other[s] for s in seeds]
            d_mean, d_half = _interval(diffs)
            row[f"vs_{ref}"] = {"n": len(diffs), "mean": d_mean, "ci95": d_half,
                                "wins": int(sum(d > 0 for d in diffs))}
        rows.append(row)
    return rows


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _short(row: dict[str, Any]) -> bool:
    """Whether some class of some seed had fewer train images than the row's shots (ingest.allow_fewer)."""
    return row.get("fewest_per_class") is not None and row["fewest_per_class"] < row["shots"]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| method | shots | seeds | test mean per-class accuracy (%) | vs baseline (points) | vs standard (points) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for ref in ("baseline", "standard"):
            d = r.get(f"vs_{ref}")
            cells.append("-" if d is None else
                         f"{'+' if d['mean'] >= 0 else ''}{_pct(d['mean'])} ± {_pct(d['ci95'])} ({d['wins']}/{d['n']} better)")
        shots = f"{r['shots']} (min {r['fewest_per_class']})" if _short(r) else str(r["shots"])
        lines.append(f"| {r['method']} | {shots} | {r['n']} | {_pct(r['mean'])} ± {_pct(r['ci95'])} | "
                     f"{cells[0]} | {cells[1]} |")
    return lines


def _references(cfg: SweepConfig) -> dict[str, str]:
    """What the summary's reference columns compare against, as `_stage_configs` sets them up."""
    standard = _stage_configs(cfg, Trial("standard", cfg.shots[0], cfg.seeds[0]))["train"]
    return {
        "vs baseline": "the row's test accuracy minus that of the `baseline` run of the same shots and seed: real "
                       "images only, with no augmentation at all (no rotation, no flips, no RandAugment, whatever "
                       "the train section says); it is not a run without synthetic images under the same "
                       "augmentation (alpha = 0), which is `standard`",
        "vs standard": "the row's test accuracy minus that of the `standard` run of the same shots and seed: real "
                       f"images only, with the augmentation every other method also trains with (rotation "
                       f"{standard.rotation:g} degrees, horizontal flips {'on' if standard.hflip else 'off'}, "
                       f"RandAugment {'on' if standard.randaugment else 'off'})",
    }


def _plan(cfg: SweepConfig) -> dict[str, Any]:
    """What a summary covers: the sweep's shots, seeds and methods."""
    return {"shots": list(cfg.shots), "seeds": list(cfg.seeds), "methods": list(cfg.methods)}


def _markdown(rows: list[dict[str, Any]], plan: dict[str, Any], written: str, references: dict[str, str]) -> str:
    head = (f"Sweep of shots {_listed(plan['shots'])} x seeds {_listed(plan['seeds'])} x methods "
            f"{_listed(plan['methods'])}, written {written}; test split, each run's checkpoint chosen on val.\n\n")
    notes = ["± is the half-width of a 95% t-interval over seeds (- with 1 seed); differences are paired by seed.",
             *(f"{column}: {text}." for column, text in references.items())]
    if any(_short(r) for r in rows):
        notes.append("k (min j) under shots: ingest.allow_fewer let some class of some seed have only j train "
                     "images, fewer than k.")
    return head + "\n".join(_table(rows)) + "\n\n" + "\n\n".join(notes) + "\n"


def _listed(values: list[Any]) -> str:
    return ", ".join(map(str, values))


def _no_nan(obj: Any) -> Any:
    """`obj` with every NaN float as None, so json writes null (a bare NaN is not JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def _figure(rows: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["shots"])
        # no interval (1 seed) draws no bar, rather than a bar of zero width
        ax.errorbar([r["shots"] for r in mine], [100 * r["mean"] for r in mine],
                    yerr=[100 * (r["ci95"] if r["ci95"] is not None else math.nan) for r in mine],
                    marker="o", capsize=3, label=method)
    one_seed = any(r["n"] < 2 for r in rows)
    ax.set_title("mean over seeds; bars: 95% t-interval over seeds" + ("; none with 1 seed" if one_seed else ""),
                 fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["shots"] for r in rows}), [str(s) for s in sorted({r["shots"] for r in rows})])
    ax.set_xlabel("examples per class")
    ax.set_ylabel("test mean per-class accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot(rows: list[dict[str, Any]], uri: str, endpoint_url: Optional[str]) -> None:
    import matplotlib.pyplot as plt

    fig = _figure(rows)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue(), endpoint_url)


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def sweep(cfg: SweepConfig) -> SweepResult:
    """Run every trial not finished yet, evaluate every run, write the summary."""
    from .evaluate import evaluate
    from .ingest import ingest

    cfg.require("source")
    started = time.time()
    ep = cfg.endpoint_url
    trials = trial_plan(cfg)
    _note_earlier_summary(cfg)
    if cfg.source == "digits":  # the experiment half of scikit-learn's digits (the `digits` model never saw it)
        cfg = cfg.replace(source=_write_digits(cfg))

    # 1. the pool: one ingest of the source, val and test fixed, the whole train pool kept
    pool_cfg = dataclasses.replace(cfg.ingest, source=cfg.source, output=storage.join(cfg.workdir, "real", "pool"),
                                   examples_per_class=None, **shared_settings(cfg, cfg.ingest))
    ingest(pool_cfg)
    _check_pool_holds_the_shots(cfg, pool_cfg.output)

    # 2. the trials not finished with this config, pool and model, on Ray Tune
    model = _model_fingerprint(cfg)
    done = _finished(cfg, trials, model)
    todo = [t for t in trials if t.name not in done]
    log.info("%d trials (%d shots x %d seeds x %d methods): %d finished earlier, %d to run", len(trials),
             len(cfg.shots), len(cfg.seeds), len(cfg.methods), len(done), len(todo))
    if todo:
        _run_trials(cfg, todo, model)

    # 3. every run scored on the pool's test split (the same images for every shot count and seed)
    records = [storage.read_json(_paths(cfg, t)["record"], ep) for t in trials]
    # (the sweep owns results/: a sweep with more seeds or methods replaces it)
    eval_cfg = dataclasses.replace(cfg.evaluate, **{**shared_settings(cfg, cfg.evaluate), "overwrite": True},
                                   real=pool_cfg.output, runs=[r["run"] for r in records],
                                   output=storage.join(cfg.workdir, "results"))
    scored = evaluate(eval_cfg)
    by_run = {r["run"]: r for r in scored.runs}
    fewest = _fewest_per_class(cfg, trials)
    runs = [{"method": t.method, "shots": t.shots, "seed": t.seed, "run": rec["run"],
             "mean_class_acc": by_run[rec["run"]]["mean_class_acc"], "fewest_per_class": fewest[t.name],
             "best_val_mean_class_acc": rec["best_val_mean_class_acc"], "optimizer_steps": rec["optimizer_steps"],
             "seconds": rec["seconds"], "stage_seconds": rec.get("stage_seconds", {})}
            for t, rec in zip(trials, records)]

    # 4. the summary: table, json, plot, each naming the plan it covers
    rows = summarize(runs)
    _warn_short(rows)
    seconds = round(time.time() - started, 1)
    files = _write_summary(cfg, rows, runs, seconds)
    log.info("%d trials (%d run now) in %.0fs; summary in %s", len(trials), len(todo), seconds, files[0])
    for line in _table(rows)[2:]:
        log.info("%s", line)
    return SweepResult(cfg.workdir, len(trials), len(todo), rows, files, seconds)


def _write_summary(cfg: SweepConfig, rows: list[dict[str, Any]], runs: list[dict[str, Any]],
                   seconds: float) -> list[str]:
    """summary.md, summary.json and the plot under the workdir; returns their URIs."""
    ep = cfg.endpoint_url
    files = [storage.join(cfg.workdir, name) for name in (SUMMARY_MD, SUMMARY_JSON, SUMMARY_PLOT)]
    plan, written, references = _plan(cfg), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), _references(cfg)
    storage.write_bytes(files[0], _markdown(rows, plan, written, references).encode(), ep)
    storage.write_json(files[1], _no_nan({
        "plan": plan, "written": written, "rows": rows, "runs": runs, "config": cfg.to_dict(), "seconds": seconds,
        "metric": "test mean per-class accuracy, checkpoint chosen on val", "references": references}), ep)
    _plot(rows, files[2], ep)
    return files


def _fewest_per_class(cfg: SweepConfig, trials: list[Trial]) -> dict[str, Optional[int]]:
    """Trial name -> the fewest train images any class has in its real set (ingest's per-class counts)."""
    by_set: dict[str, Optional[int]] = {}
    for trial in trials:
        real = _paths(cfg, trial)["real"]
        if real not in by_set:
            manifest = storage.read_manifest(real, cfg.endpoint_url) or {}
            per_class = manifest.get("counts", {}).get("per_class", {}).get("train") or {}
            by_set[real] = min(per_class.values()) if per_class else None
    return {t.name: by_set[_paths(cfg, t)["real"]] for t in trials}


def _warn_short(rows: list[dict[str, Any]]) -> None:
    for shots in sorted({r["shots"] for r in rows if _short(r)}):
        fewest = min(r["fewest_per_class"] for r in rows if r["shots"] == shots and _short(r))
        log.warning("shots %d: some class has only %d train images in some seed's set (ingest.allow_fewer); its "
                    "rows are marked '%d (min %d)'", shots, fewest, shots, fewest)


def _note_earlier_summary(cfg: SweepConfig) -> None:
    """Say so when the workdir's summary covers another plan (it stays until this sweep writes its own)."""
    try:
        earlier = storage.read_json(storage.join(cfg.workdir, SUMMARY_JSON), cfg.endpoint_url)
        plan = earlier.get("plan") or {k: earlier["config"][k] for k in ("shots", "seeds", "methods")}
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # unreadable: this sweep replaces it anyway
        log.info("%s: cannot read the plan of the summary there (%s); this sweep replaces it", cfg.workdir, exc)
        return
    mine = _plan(cfg)
    if any(sorted(map(str, plan.get(k) or [])) != sorted(map(str, mine[k])) for k in mine):
        log.info("the summary in %s (written %s) covers shots %s x seeds %s x methods %s, not this sweep's plan; "
                 "it stays until this sweep finishes", cfg.workdir, earlier.get("written", "at an unknown time"),
                 *(_listed(plan.get(k) or []) for k in ("shots", "seeds", "methods")))


def _check_pool_holds_the_shots(cfg: SweepConfig, pool: str) -> None:
    """Every class has train images for the largest shot count (checked before any trial: a
    trial would fail on it only after the smaller shot counts had run)."""
    if cfg.ingest.allow_fewer:
        return
    ep, most = cfg.endpoint_url, max(cfg.shots)
    have = Counter(storage.read_parquet(storage.join(pool, "train"), ep, columns=["class_name"])
                   .column("class_name").to_pylist())
    short = {c.name: have.get(c.name, 0) for c in schema.read_class_table(pool, ep) if have.get(c.name, 0) < most}
    if short:
        shown = ", ".join(f"{name} {n}" for name, n in sorted(short.items(), key=lambda kv: kv[1])[:5])
        raise ConfigError(f"config field 'shots': {most} examples per class, but the pool of {cfg.source} has fewer "
                          f"train images for {len(short)} class(es) ({shown}); lower shots or set "
                          "ingest.allow_fewer: true")


def _write_digits(cfg: SweepConfig) -> str:
    from .sample_data import write_digits

    root = storage.join(cfg.workdir, "sample", "digits-experiment")
    counts = write_digits(root, half="experiment", endpoint_url=cfg.endpoint_url)
    log.info("source digits: the experiment half of scikit-learn's digits (%d images) in %s", sum(counts.values()), root)
    return root


callable_stage_module(__name__)  # `from ray_dafusion import sweep` may give this module: call it as the stage
