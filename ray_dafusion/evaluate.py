"""Score trained runs on a held-out split: mean per-class accuracy (the paper's metric),
per-class accuracy, top-1 and the confusion matrix; tables and plots for comparing methods.

Each run's checkpoint is the one `train` selected on val; the numbers come from `split`
(test by default). Scoring streams the split through a Ray Data actor pool; only (id, label,
prediction) triples reach the driver.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import posixpath
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from . import plan, schema, storage
from .classifier import CHECKPOINT_MODEL, decode_uint8, eval_transform, load_classifier
from .config import AugmentConfig, EvaluateConfig, TrainConfig, callable_stage_module
from .configlib import config_record, field_default, field_kind
from .errors import StageError
from .modes import AUGMENT_MODES
from .runinfo import CostMeter, versions
from .watchdog import Watchdog

__all__ = ["EvaluateResult", "evaluate", "class_metrics", "Scorer"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SHOTS_PLOT = "accuracy_vs_shots.png"
_MODEL_BYTES_PER_PASS = 768 * 2**20  # checkpoint bytes one scoring actor holds at once (8 ResNet-50s; hundreds of small_cnns)

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    """What `evaluate` produced."""

    output: str
    split: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    """Per run: name, method, alpha, examples_per_class, mean_class_acc, top1, ..."""
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def class_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Confusion matrix (rows: true class, columns: predicted), per-class and mean per-class accuracy, top-1.

    Classes absent from `labels` get accuracy None and do not enter the mean.
    """
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    support = confusion.sum(axis=1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    present = [a for a in per_class if a is not None]
    return {
        "confusion": confusion.tolist(),
        "per_class_acc": per_class,
        "mean_class_acc": float(np.mean(present)) if present else 0.0,
        "top1": float(np.trace(confusion) / confusion.sum()) if confusion.sum() else 0.0,
        "num_examples": int(confusion.sum()),
    }


class Scorer:
    """Ray Data actor: encoded images -> one predicted-label column per run (``pred_<i>``).

    Holds several runs' best checkpoints so the split is read and decoded once for all of them.
    """

    def __init__(self, checkpoint_uris: list[str], endpoint_url: Optional[str] = None, use_gpu: bool = False):
        import torch

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.models, self.sizes, self.transforms = [], [], {}
        for uri in checkpoint_uris:
            model, meta = load_classifier(uri, endpoint_url)
            self.models.append(model.to(self.device))
            self.sizes.append(int(meta["image_size"]))
            self.transforms.setdefault(self.sizes[-1], eval_transform(meta))  # the transform train validated with

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        images = [decode_uint8(b) for b in batch.column("image").combine_chunks().field("bytes").to_pylist()]
        out = {"id": batch.column("id"), "label": batch.column("label")}
        inputs = {size: torch.stack([tf(img) for img in images]) for size, tf in self.transforms.items()}  # (B, 3, S, S)
        for i, (model, size) in enumerate(zip(self.models, self.sizes)):
            x = inputs[size]
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16,
                                                 enabled=self.device.type == "cuda"):
                out[f"pred_{i}"] = pa.array(model(x.to(self.device)).argmax(1).cpu().numpy(), pa.int64())
        return pa.table(out)


def _score(cfg: EvaluateConfig, checkpoint_uris: list[str], files: list[str]) -> tuple[dict[str, int], list[dict[str, int]]]:
    """({id: label}, one {id: prediction} per checkpoint) over the split, in one streaming pass.

    Predictions are keyed by image id: Ray Data promises no row order, so nothing is zipped by
    position across passes.
    """
    import ray.data

    cap = plan.capacity()
    pin = plan.node_pinning(cfg.node_resource, cfg.num_gpus, cap, "evaluate")
    plan.check("evaluate", plan.Demand("scoring actor", 1, {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus, **pin},
                                       size_fields={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}), cap)
    ds = storage.ray_dataset(files, ["id", "label", "image"], cfg.endpoint_url)
    scored = ds.map_batches(
        Scorer, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
        fn_constructor_kwargs={"checkpoint_uris": checkpoint_uris, "endpoint_url": cfg.endpoint_url,
                               "use_gpu": cfg.num_gpus > 0},
        **({"resources": pin} if pin else {}),
    )
    cols = [f"pred_{i}" for i in range(len(checkpoint_uris))]
    with Watchdog("evaluate", "scoring pass", cfg.stall_warning, cfg.stall_timeout,
                  hint=f"the scoring actor reserves num_cpus {cfg.num_cpus:g} and num_gpus {cfg.num_gpus:g}"):
        rows = scored.select_columns(["id", "label", *cols]).take_all()  # a few ints per test image
    labels = {r["id"]: int(r["label"]) for r in rows}
    if len(labels) != len(rows):
        raise ValueError(f"{cfg.split} split of {cfg.real} has duplicate ids; re-run ingest")
    return labels, [{r["id"]: int(r[c]) for r in rows} for c in cols]


def unique_names(names: list[str]) -> list[str]:
    """The runs' names, a repeated one (the same run name under two outputs) as name-2, name-3, ...:
    the first such name no other run has, so no two runs share a row or a confusion plot."""
    taken: set[str] = set()
    suffix: Counter = Counter()
    out = []
    for base in names:
        name = base
        while name in taken:
            suffix[base] += 1
            name = f"{base}-{suffix[base] + 1}"
        taken.add(name)
        out.append(name)
    return out


def _examples_per_class(real: str, endpoint_url: Optional[str]) -> Optional[int]:
    """From the ingest manifest's config when recorded, else the most common train count per class."""
    manifest = storage.read_manifest(real, endpoint_url) or {}
    value = (manifest.get("config") or {}).get("examples_per_class")
    if value is not None:
        return int(value)
    try:
        labels = storage.read_parquet(storage.join(real, "train"), endpoint_url, columns=["label"])
    except FileNotFoundError:
        return None
    counts = Counter(labels.column("label").to_pylist())
    return Counter(counts.values()).most_common(1)[0][0] if counts else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "run"


def _file_names(names: list[str]) -> list[str]:
    """The runs' names made safe for a file name, each its own: names distinct as given may be one
    once made safe ("a b", "a_b"), and one plot would overwrite the other."""
    return unique_names([_safe(name) for name in names])


def _write_png(fig, uri: str, endpoint_url: Optional[str]) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    storage.write_bytes(uri, buf.getvalue(), endpoint_url)


def _confusion_plot(run: dict[str, Any], class_names: list[str], uri: str, endpoint_url: Optional[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(run["confusion"])
    size = max(4.0, 0.35 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    if len(class_names) <= 20:
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{run['name']}: mean per-class acc {run['mean_class_acc']:.3f}")
    _write_png(fig, uri, endpoint_url)
    plt.close(fig)


def _shots_plot(runs: list[dict[str, Any]], labels: list[str], uri: str, endpoint_url: Optional[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unknown = [r["name"] for r in runs if not r["examples_per_class"]]
    if unknown:  # no place on a shots axis; the table has them
        log.warning("%s leaves out %d run(s) whose real set records no examples_per_class (%s); results.md has them",
                    posixpath.basename(uri), len(unknown), ", ".join(unknown[:5]))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if unknown:
        ax.set_title(f"{len(unknown)} run(s) of unknown shots left out (see results.md)", fontsize=8)
    for label, by_shots in _by_setting(runs, labels).items():
        xs = sorted(by_shots)
        ax.plot(xs, [float(np.mean(by_shots[x])) for x in xs], marker="o", label=label)
    ax.set_xlabel("examples per class")
    ax.set_ylabel("mean per-class accuracy")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    _write_png(fig, uri, endpoint_url)
    plt.close(fig)


def _by_setting(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[int, list[float]]]:
    """label -> shots -> the accuracies of its runs (e.g. several seeds), labels and shots sorted;
    runs of unknown shots left out."""
    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r, label in zip(runs, labels):
        if r["examples_per_class"]:
            points[label][r["examples_per_class"]].append(r["mean_class_acc"])
    return {label: dict(sorted(points[label].items())) for label in sorted(points)}


def _markdown(runs: list[dict[str, Any]], labels: list[str], split: str) -> str:
    """Each run's row (seed and setting label named, so a row is traced to its run), then the mean
    over seeds per setting and shots, the paper's number, with its sample standard deviation."""
    lines = [
        f"| run | setting | seed | examples per class | mean per-class acc ({split}) | top-1 ({split}) | "
        "best val mean per-class acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r, label in zip(runs, labels):
        val = f"{r['best_val_mean_class_acc']:.4f}" if r.get("best_val_mean_class_acc") is not None else "-"
        seed = "-" if r.get("seed") is None else r["seed"]
        lines.append(f"| {r['name']} | {label} | {seed} | {r['examples_per_class']} | "
                     f"{r['mean_class_acc']:.4f} | {r['top1']:.4f} | {val} |")
    lines += ["", f"Mean over runs of one setting and shots (mean per-class acc, {split}):", "",
              "| setting | examples per class | mean | std | runs |", "|---|---|---|---|---|"]
    for label, by_shots in _by_setting(runs, labels).items():
        for shots, accs in by_shots.items():
            std = f"{float(np.std(accs, ddof=1)):.4f}" if len(accs) > 1 else "-"
            lines.append(f"| {label} | {shots} | {float(np.mean(accs)):.4f} | {std} | {len(accs)} |")
    return "\n".join(lines) + "\n"


@storage.leased("evaluate")
def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Score every run in `cfg.runs` on `cfg.split`; write results.json, results.md and plots."""
    cfg.require("real", "runs", "output")
    started = time.time()
    meter = CostMeter(cfg.cost)
    ep = cfg.endpoint_url

    # 1. the split to score and the class table every run must share
    classes = schema.read_class_table(cfg.real, ep)
    files = storage.list_files(storage.join(cfg.real, cfg.split), ".parquet", ep, recursive=True)
    if not files:
        raise FileNotFoundError(f"no parquet files under {storage.join(cfg.real, cfg.split)}")

    # 2. each run's best-on-val checkpoint, checked against the class table and the fixed splits
    records = [_read_run(run_uri, [c.name for c in classes], cfg) for run_uri in cfg.runs]
    _check_same_splits(cfg, records)

    # 3. an output of the same config and the same checkpoints is complete: report it again
    # (a run resumed for more epochs may have a new best checkpoint, so they are fingerprinted)
    made_of = config_record(cfg, checkpoints=[r["best_checkpoint"] for _, r in records])
    config_fp = storage.fingerprint(made_of)
    if storage.ensure_fresh_output(cfg.output, "evaluate", config_fp, cfg.overwrite, ep, made_of) is not None:
        previous = storage.read_json(storage.join(cfg.output, RESULTS_JSON), ep)
        log.info("%s is complete (same config and checkpoints, %d runs); nothing to do", cfg.output,
                 len(previous["runs"]))
        return EvaluateResult(cfg.output, cfg.split, previous["runs"], previous["files"], 0.0)

    # 4. score: the split streams once per group of runs (a scoring actor holds a group's models)
    scoring = time.time()
    runs = _score_runs(cfg, records, files, len(classes))
    meter.add_actor_seconds(time.time() - scoring, cfg.num_cpus, cfg.num_gpus)  # one scoring actor at a time

    # 5. tables and plots; the manifest last
    result = _write_outputs(cfg, runs, [c.name for c in classes], config_fp, started, meter)
    scores = ", ".join(f"{r['name']} {r['mean_class_acc']:.3f}" for r in runs if r.get("mean_class_acc") is not None)
    log.info("%d runs scored on %s (%s); %s, %s and %d plots in %s", len(runs), cfg.split, scores, RESULTS_MD,
             RESULTS_JSON, len(result.files) - 2, cfg.output)
    return result


def _read_run(run_uri: str, class_names: list[str], cfg: EvaluateConfig) -> tuple[str, dict[str, Any]]:
    """(run URI, its train_result.json), refused when it has no checkpoint or other classes."""
    try:
        record = storage.read_json(storage.join(run_uri, "train_result.json"), cfg.endpoint_url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_uri} holds no train_result.json; is it a finished `ray-dafusion train` run?") from None
    if not record.get("best_checkpoint"):
        raise ValueError(f"run {run_uri} has no checkpoint to evaluate (did it train any epoch?)")
    run_classes = [c["name"] for c in record.get("classes", [])]
    if run_classes != class_names:
        raise ValueError(f"run {run_uri} was trained on classes {run_classes[:5]}..., "
                         f"but {cfg.real} has {class_names[:5]}...; evaluate it on its own data set")
    return run_uri, record


def _check_same_splits(cfg: EvaluateConfig, records: list[tuple[str, dict[str, Any]]]) -> None:
    """Every run was selected on the same val and is scored on the same test as `cfg.real` holds
    (ingest fixes them for a data set): otherwise train images could be in the test set."""
    ep = cfg.endpoint_url
    mine = (storage.read_manifest(cfg.real, ep) or {}).get("split_fingerprints")
    if not mine:
        raise ValueError(f"{cfg.real} records no split fingerprints (an ingest output from an older version); "
                         "re-run ingest into a new output")
    for run_uri, record in records:
        real = record.get("real")
        made = storage.read_manifest(real, ep) if real else None
        if real and made is None:
            raise FileNotFoundError(f"run {run_uri} was trained on {real}, which holds no ingest output now (moved "
                                    "or deleted?): its val/test splits cannot be checked against "
                                    f"{cfg.real}'s; put it back where the run recorded it")
        theirs = (made or {}).get("split_fingerprints", {})
        for split in ("val", "test"):
            if theirs.get(split) != mine.get(split):
                raise ValueError(
                    f"run {run_uri} was trained on {real}, whose {split} split ({theirs.get(split)}) is not the "
                    f"{split} split of {cfg.real} ({mine.get(split)}): its numbers would not be comparable and its "
                    f"train images may be in this {split} set. Ingest every shot count and seed from the same "
                    "source with the same split_seed and val/test sizes."
                )


def _pass_groups(records: list[tuple[str, dict[str, Any]]], endpoint_url: Optional[str]) -> list[list]:
    """Consecutive runs, as many per scoring pass as fit _MODEL_BYTES_PER_PASS of checkpoints (at
    least one): each pass reads and decodes the split once, so small models share few passes."""
    groups: list[list] = [[]]
    held = 0
    for record in records:
        size = storage.total_size([storage.join(record[1]["best_checkpoint"], CHECKPOINT_MODEL)], endpoint_url)
        if groups[-1] and held + size > _MODEL_BYTES_PER_PASS:
            groups.append([])
            held = 0
        groups[-1].append(record)
        held += size
    return groups


def _score_runs(cfg: EvaluateConfig, records: list[tuple[str, dict[str, Any]]], files: list[str],
                num_classes: int) -> list[dict[str, Any]]:
    """Each run's metrics; predictions are joined to labels by image id."""
    ep = cfg.endpoint_url
    default_shots = _examples_per_class(cfg.real, ep)
    labels: dict[str, int] = {}
    predictions: list[dict[str, int]] = []
    for group in _pass_groups(records, ep):
        pass_labels, preds = _score(cfg, [r["best_checkpoint"] for _, r in group], files)
        if labels and pass_labels != labels:
            raise StageError(f"the {cfg.split} split of {cfg.real} changed while it was being scored; re-run evaluate")
        labels = pass_labels
        predictions += preds
    ids = sorted(labels)
    y = np.array([labels[i] for i in ids], np.int64)
    runs: list[dict[str, Any]] = []
    names = unique_names([record.get("name") or posixpath.basename(run_uri.rstrip("/")) for run_uri, record in records])
    for (run_uri, record), preds, name in zip(records, predictions, names):
        # shots of the real set the run trained on (few-shot subsets share val/test with cfg.real)
        shots = _examples_per_class(record["real"], ep) if record.get("real") else None
        shots = shots if shots is not None else default_shots
        runs.append({
            "name": name, "run": run_uri, "method": record["method"], "alpha": record["alpha"],
            "seed": (record.get("config") or {}).get("seed"),
            "setting": _setting(record, ep), "examples_per_class": shots, "best_checkpoint": record["best_checkpoint"],
            "best_val_mean_class_acc": record.get("best_val_mean_class_acc"),
            **class_metrics(y, np.array([preds[i] for i in ids], np.int64), num_classes),
        })
    return runs


# what else moves a run's numbers, beside the method, alpha, t0, filter and RandAugment: the train
# and augment fields that are neither a location, a resource nor an input (and not the seed)
_SETTING_FROM_TRAIN = tuple(
    f.name for f in dataclasses.fields(TrainConfig)
    if field_kind(f) in ("output", "extent")
    and f.name not in ("seed", "real", "synthetic", "method", "alpha", "randaugment", "synthetic_filter"))
_SETTING_FROM_AUGMENT = tuple(
    f.name for f in dataclasses.fields(AugmentConfig)
    if field_kind(f) in ("output", "extent")
    and f.name not in ("seed", "real", "embeddings", "erasure", "mode", "strengths"))


def _setting(record: dict[str, Any], endpoint_url: Optional[str]) -> dict[str, Any]:
    """Besides its method, shots and seed, what a run was trained with that moves its numbers: alpha,
    the synthetic set's t0 levels, the synthetic filter, RandAugment, then the other train fields
    (arch, epochs, ...), how the synthetic set was made (model, M, guidance, ...) and the erasure it
    was made with (by content). A sweep's da_fusion, da_fusion_k1 and da_fusion_filtered share the
    method and differ here; runs that differ in their seed only share a setting, so they are
    averaged together."""
    train = {**_defaults(TrainConfig), **(record.get("config") or {})}
    setting = {"alpha": record.get("alpha"), "t0": None, "filter": train.get("synthetic_filter"),
               "randaugment": record.get("randaugment"), **{k: train.get(k) for k in _SETTING_FROM_TRAIN}}
    if record.get("synthetic"):
        made = storage.read_manifest(record["synthetic"], endpoint_url) or {}
        mode = AUGMENT_MODES.get(made.get("mode") or "")
        augment = {**_defaults(AugmentConfig), **(made.get("config") or {})}
        setting["t0"] = augment.get("strengths") or (list(mode.default_strengths) if mode else None)
        setting.update({k: augment.get(k) for k in _SETTING_FROM_AUGMENT})
        erased = made.get("erasure_fingerprints")
        setting["erasure"] = storage.fingerprint(erased)[:8] if erased else None
    return setting


def _defaults(config_class: type) -> dict[str, Any]:
    return {f.name: field_default(f) for f in dataclasses.fields(config_class)}


def _line_labels(runs: list[dict[str, Any]]) -> list[str]:
    """One label per run for the shots plot: its method, and, where runs of one method differ in
    setting, the parts of the setting that differ (runs of one label are one line)."""
    settings: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r.get("setting") not in settings[r["method"]]:
            settings[r["method"]].append(r.get("setting"))
    labels = []
    for r in runs:
        mine = settings[r["method"]]
        differ = [k for k in (r.get("setting") or {}) if len({repr((s or {}).get(k)) for s in mine}) > 1]
        shown = ", ".join(f"{k} {_shown_value(r['setting'][k])}" for k in differ)
        labels.append(f"{r['method']} ({shown})" if shown else r["method"])
    return labels


def _shown_value(value: Any) -> str:
    if isinstance(value, list):
        return "/".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in value)
    return "none" if value is None else str(value)


def _write_outputs(cfg: EvaluateConfig, runs: list[dict[str, Any]], class_names: list[str], config_fp: str,
                   started: float, meter: CostMeter) -> EvaluateResult:
    ep = cfg.endpoint_url
    written = []
    labels = _line_labels(runs)
    # file names of their own: names distinct as given may be one once made safe ("a b", "a_b")
    for r, safe in zip(runs, _file_names([r["name"] for r in runs])):
        uri = storage.join(cfg.output, f"confusion_{safe}.png")
        _confusion_plot(r, class_names, uri, ep)
        written.append(uri)
    if len(runs) > 1:
        uri = storage.join(cfg.output, SHOTS_PLOT)
        _shots_plot(runs, labels, uri, ep)
        written.append(uri)
    storage.write_bytes(storage.join(cfg.output, RESULTS_MD), _markdown(runs, labels, cfg.split).encode(), ep)
    written.append(storage.join(cfg.output, RESULTS_MD))
    written.insert(0, storage.join(cfg.output, RESULTS_JSON))
    result = EvaluateResult(cfg.output, cfg.split, runs, written, round(time.time() - started, 2))
    storage.write_json(written[0], {**dataclasses.asdict(result), "classes": class_names,
                                    "metric": "mean per-class accuracy"}, ep)
    storage.write_manifest(cfg.output, {
        "stage": "evaluate", "config": cfg.to_dict(), "config_fingerprint": config_fp,
        "counts": {"runs": len(runs)}, "timings": {"seconds": result.seconds},
        "cost": meter.report(images=len(runs) * (runs[0]["num_examples"] if runs else 0)), "versions": versions(),
    }, ep)
    return result


callable_stage_module(__name__)  # `from ray_dafusion import evaluate` may give this module: call it as the stage
