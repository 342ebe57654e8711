"""Score: quality scores per synthetic image, stored beside the augment output, filterable at train time.

Shape of a run::

    <synthetic>/data/*.parquet ─> read (skip ids every requested scorer has) ─> batch-sized blocks
        ─> map_batches(QualityScorer: an actor pool, or tasks that keep the models loaded per process):
           one file per scorer per batch, named from its ids
        ─> <synthetic>/scores/<scorer>/data/*.parquet + manifest.json (per scorer, written last)

Scorers (columns besides id, source_id, label, class_name):

- ``classifier``: ``p_label`` (probability of the image's own label under a trained run's best
  checkpoint), ``top1``, ``p_top1``, ``top1_is_label`` (ALIA keeps images the baseline gets right).
- ``source_distance``: ``value`` (1 - cosine similarity of the pixels with its own real source, at the
  source's size, so in [0, 2]) and ``mse``: near copies (t0 too low) score ~0, drift scores high.
- ``text``: ``value``, cosine similarity between the image and "a photo of a <class name>" under a
  CLIP model given as ``clip_model`` (a diffusers-style local dir, s3:// prefix or hub id); skipped,
  with a message, when none is given.

Exactly once and resumable like augment: a batch's file is named from the ids it covers, a re-run
scores only ids without a committed row, and a scorer's manifest is written after checking that
every synthetic id has exactly one row. Changing a train-time filter never rescores or regenerates.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from . import plan, schema, storage
from .config import ScoreConfig, callable_stage_module
from .errors import ConfigError, StageError
from .logs import setup_logging
from .modes import SCORERS
from .runinfo import CostMeter, versions
from .watchdog import Watchdog

__all__ = ["ScoreResult", "QualityScorer", "score_batch", "score", "SCORERS", "SCORE_COLUMNS", "scores_dir", "read_scores"]

log = logging.getLogger(__name__)

SCORE_COLUMNS: dict[str, dict[str, pa.DataType]] = {
    "classifier": {"p_label": pa.float64(), "top1": pa.int64(), "p_top1": pa.float64(), "top1_is_label": pa.bool_()},
    "source_distance": {"value": pa.float64(), "mse": pa.float64()},
    "text": {"value": pa.float64()},
}
_KEYS = {"id": pa.string(), "source_id": pa.string(), "label": pa.int64(), "class_name": pa.string()}


@dataclass
class ScoreResult:
    """What `score` produced, per scorer."""

    synthetic: str
    scores: dict[str, str] = field(default_factory=dict)
    """scorer -> its output directory."""
    scored: dict[str, int] = field(default_factory=dict)
    """scorer -> rows scored by this run."""
    skipped: dict[str, str] = field(default_factory=dict)
    """scorer -> why it was not run (complete, or not configured)."""
    seconds: float = 0.0


def scores_dir(synthetic: str, scorer: str) -> str:
    """Where a scorer's table of `synthetic` lives: always beside the images, where train's filter and gallery look."""
    return storage.join(synthetic, "scores", scorer)


def _schema(scorer: str) -> pa.Schema:
    return pa.schema({**_KEYS, **SCORE_COLUMNS[scorer]})


def _batch_name(ids: list[str]) -> str:
    return "part-" + hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24] + ".parquet"


# --------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------


@dataclass
class _ScoringModels:
    """What the scorers of one job load: the real sources, the run's classifier, the CLIP model."""

    device: Any
    sources: dict[str, np.ndarray]
    classifier: Any = None
    transform: Any = None
    clip: Any = None
    clip_tokenizer: Any = None


_LOADED: dict[str, _ScoringModels] = {}
"""This process's models, for the score run that loaded them last (compute: tasks reuses them batch to batch)."""


def _scoring_models(cfg: ScoreConfig, real: Optional[str], scorers: list[str], checkpoint: Optional[str],
                    run_id: str) -> _ScoringModels:
    """The models of one score run (`run_id`), loaded once per process: a later run, even of the same
    checkpoint path, loads afresh (the run may have been trained again since)."""
    import torch

    if run_id in _LOADED:
        return _LOADED[run_id]
    _LOADED.clear()  # one run's models at a time: a task worker that moves on to another run frees the last
    ep = cfg.endpoint_url
    models = _ScoringModels(torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"), {})
    if "source_distance" in scorers:
        table = storage.read_parquet(storage.join(real, "train"), ep, columns=["id", "image"])
        for rid, cell in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            models.sources[rid] = np.asarray(schema.decode_image(cell["bytes"]), dtype=np.float32) / 127.5 - 1.0
    if "classifier" in scorers:
        from .classifier import eval_transform, load_classifier

        model, meta = load_classifier(checkpoint, ep)
        models.classifier, models.transform = model.to(models.device), eval_transform(meta)
    if "text" in scorers:
        from transformers import CLIPModel, CLIPTokenizer

        from .models import resolve_model

        local = resolve_model(cfg.clip_model, cfg.cache_dir, ep, marker="config.json")
        models.clip = CLIPModel.from_pretrained(local).to(models.device).eval()
        models.clip_tokenizer = CLIPTokenizer.from_pretrained(local)
    _LOADED[run_id] = models
    return models


def score_batch(batch: pa.Table, cfg: ScoreConfig, real: Optional[str], scorers: list[str], outputs: dict[str, str],
                done: dict[str, list[str]], checkpoint: Optional[str], run_id: str) -> pa.Table:
    """One batch as a Ray Data task (compute: tasks), with this process's cached models."""
    return QualityScorer(cfg, real, scorers, outputs, done, checkpoint, run_id)(batch)


class QualityScorer:
    """Ray Data actor: a batch of synthetic rows -> one committed file per requested scorer.

    Loads, once: the real source images (few-shot sets are small), the run's classifier, the CLIP
    model. ``__call__`` returns one summary row per scorer (file, rows, seconds)."""

    def __init__(self, cfg: ScoreConfig, real: Optional[str], scorers: list[str], outputs: dict[str, str],
                 done: dict[str, list[str]], checkpoint: Optional[str], run_id: str = "") -> None:
        setup_started = time.perf_counter()
        setup_logging()
        self.cfg, self.scorers, self.outputs = cfg, scorers, outputs
        self.done = {s: set(ids) for s, ids in done.items()}
        self.models = _scoring_models(cfg, real, scorers, checkpoint, run_id or uuid.uuid4().hex)
        self._setup_seconds = time.perf_counter() - setup_started  # billed with the first batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        rows = batch.to_pylist()
        files, counts = [], []
        for scorer in self.scorers:
            todo = [r for r in rows if r["id"] not in self.done.get(scorer, set())]
            if not todo:
                files.append("")
                counts.append(0)
                continue
            name = _batch_name([r["id"] for r in todo])
            uri = storage.join(self.outputs[scorer], "data", name)
            if not storage.exists(uri, self.cfg.endpoint_url):  # a retried batch whose file got committed
                columns = getattr(self, f"_{scorer}")(todo)
                table = pa.table({**{k: [r[k] for r in todo] for k in _KEYS}, **columns}, schema=_schema(scorer))
                storage.write_parquet(table, uri, self.cfg.endpoint_url)
            files.append(name)
            counts.append(len(todo))
        seconds = time.perf_counter() - start + self._setup_seconds  # the models' load, on the first batch
        self._setup_seconds = 0.0
        return pa.table({"scorer": self.scorers, "file": files, "rows": counts,
                         "seconds": [seconds / len(self.scorers)] * len(self.scorers)})

    def _images(self, rows: list[dict[str, Any]]) -> list[Any]:
        return [schema.decode_image(r["image"]["bytes"]) for r in rows]

    def _classifier(self, rows: list[dict[str, Any]]) -> dict[str, list]:
        import torch

        from .classifier import decode_uint8

        x = torch.stack([self.models.transform(decode_uint8(r["image"]["bytes"])) for r in rows]).to(self.models.device)
        with torch.no_grad():
            probs = torch.softmax(self.models.classifier(x).float(), dim=1).cpu().numpy()  # (B, classes)
        labels = np.array([r["label"] for r in rows])
        top1 = probs.argmax(1)
        return {"p_label": probs[np.arange(len(rows)), labels].tolist(), "top1": top1.tolist(),
                "p_top1": probs.max(1).tolist(), "top1_is_label": (top1 == labels).tolist()}

    def _source_distance(self, rows: list[dict[str, Any]]) -> dict[str, list]:
        from PIL import Image

        values, mses = [], []
        for r, image in zip(rows, self._images(rows)):
            source = self.models.sources.get(r["source_id"])
            if source is None:
                raise StageError(f"synthetic image {r['id']} comes from {r['source_id']}, which is not in the real "
                                 "train set its augment manifest names")
            h, w = source.shape[:2]
            pixels = np.asarray(image.resize((w, h), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
            a, b = pixels.ravel(), source.ravel()
            cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
            values.append(1.0 - cosine)
            mses.append(float(np.mean(((a - b) / 2.0) ** 2)))  # in [0, 1] pixel units
        return {"value": values, "mse": mses}

    def _text(self, rows: list[dict[str, Any]]) -> dict[str, list]:
        import torch

        from .modes import class_word

        m = self.models
        size = m.clip.config.vision_config.image_size
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        pixels = torch.stack([torch.from_numpy(np.asarray(img.resize((size, size)), dtype=np.float32) / 255.0)
                              .permute(2, 0, 1) for img in self._images(rows)])
        pixels = ((pixels - mean) / std).to(m.device)
        prompts = [f"a photo of a {class_word(r['class_name'])}" for r in rows]
        ids = m.clip_tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(m.device)
        with torch.no_grad():
            image_embeds = torch.nn.functional.normalize(_embeds(m.clip.get_image_features(pixel_values=pixels)), dim=-1)
            text_embeds = torch.nn.functional.normalize(_embeds(m.clip.get_text_features(**ids)), dim=-1)
        return {"value": (image_embeds * text_embeds).sum(-1).cpu().tolist()}


def _embeds(output: Any) -> Any:
    """Projected CLIP embeddings: a tensor in older transformers, the pooler output of a model output in 5.x."""
    return output if hasattr(output, "norm") else output.pooler_output


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


def _committed_ids(output: str, endpoint_url: Optional[str]) -> list[str]:
    data = storage.join(output, "data")
    if not storage.list_files(data, ".parquet", endpoint_url):
        return []
    return storage.read_parquet(data, endpoint_url, columns=["id"]).column("id").to_pylist()


def read_scores(synthetic: str, scorer: str, columns: list[str], endpoint_url: Optional[str] = None) -> pa.Table:
    """The complete scores table of one scorer (id plus `columns`)."""
    out = scores_dir(synthetic, scorer)
    if storage.read_manifest(out, endpoint_url) is None:
        raise FileNotFoundError(f"no complete {scorer} scores in {out}; run `ray-dafusion score --synthetic {synthetic}`")
    return storage.read_parquet(storage.join(out, "data"), endpoint_url, columns=["id", *columns])


@storage.leased("score", lambda cfg: storage.join(cfg.synthetic, "scores") if cfg.synthetic else "")
def score(cfg: ScoreConfig) -> ScoreResult:
    """Write the requested scores of every synthetic image of `cfg.synthetic`."""
    cfg.require("synthetic")
    started = time.time()
    meter = CostMeter(cfg.cost)
    ep = cfg.endpoint_url
    result = ScoreResult(cfg.synthetic)

    # 1. the augment output and the requested scorers
    manifest = storage.read_manifest(cfg.synthetic, ep)
    if manifest is None or manifest.get("stage") != "augment":
        raise FileNotFoundError(f"{cfg.synthetic} holds no complete augment output (no augment {storage.MANIFEST})")
    scorers = _requested(cfg, result)
    record = _run_record(cfg) if "classifier" in scorers else None

    # 2. which scorers are complete already: decided before any of their inputs is checked or loaded
    fps, made_of = {}, {}
    for scorer in list(scorers):
        out = scores_dir(cfg.synthetic, scorer)
        if scorer == "classifier" and record is None:  # the run is gone: its complete scores still stand
            if not _complete_for_run(out, cfg.run, ep):
                raise FileNotFoundError(f"{cfg.run} holds no train_result.json; is it a finished train run?")
            reason = f"complete (run {cfg.run} no longer exists; its scores are kept)"
        else:
            identity = _run_identity(cfg.run, record, ep) if scorer == "classifier" and record else None
            made_of[scorer] = _made_of(cfg, scorer, manifest, identity)
            fps[scorer] = storage.fingerprint(made_of[scorer])
            done_manifest = storage.read_manifest(out, ep)
            if not done_manifest or done_manifest.get("stage") != "score" or \
                    done_manifest.get("config_fingerprint") != fps[scorer]:
                continue
            reason = "complete (same config)"
        result.skipped[scorer], result.scores[scorer] = reason, out
        scorers.remove(scorer)
        log.info("%s scores in %s are %s; nothing to do", scorer, out, reason)

    # 3. the inputs of the scorers still to run; then refuse another config's output, find what is committed
    checkpoint, real = _check_inputs(cfg, manifest, scorers, record)
    ids = storage.read_parquet(storage.join(cfg.synthetic, "data"), ep, columns=["id"]).column("id").to_pylist()
    outputs, done = {}, {}
    for scorer in scorers:
        outputs[scorer] = scores_dir(cfg.synthetic, scorer)
        storage.ensure_fresh_output(outputs[scorer], "score", fps[scorer], cfg.overwrite, ep, made_of[scorer])
        done[scorer] = _committed_ids(outputs[scorer], ep)

    # 4. the actor pool over the synthetic rows some scorer still lacks
    run_id = uuid.uuid4().hex  # this run: its models' cache key in the workers, and its cost's mark
    summaries = _run(cfg, real, scorers, outputs, done, checkpoint, ids, run_id) if scorers else []
    meter.add_actor_seconds(sum(s["seconds"] for s in summaries), cfg.num_cpus, cfg.num_gpus)

    # 5. per scorer: exactly one row per synthetic id, then its manifest, last; the run's one cost goes
    # into each, marked with the run's id, so that report counts it once
    for scorer in scorers:
        _verify(outputs[scorer], ids, ep)
    images = len(set(ids) - set.intersection(*(set(done[s]) for s in scorers))) if scorers else 0
    cost = {**meter.report(images=images), "run_id": run_id, "shared_by": list(scorers)}
    for scorer in scorers:
        scored = sum(s["rows"] for s in summaries if s["scorer"] == scorer)
        result.scores[scorer], result.scored[scorer] = outputs[scorer], scored
        storage.write_manifest(outputs[scorer], {
            "stage": "score", "scorer": scorer, "config": cfg.to_dict(), "config_fingerprint": fps[scorer],
            "synthetic": storage.absolute(cfg.synthetic),
            "run": storage.absolute(cfg.run) if scorer == "classifier" else None,
            "checkpoint": checkpoint if scorer == "classifier" else None,
            "columns": {k: str(v) for k, v in SCORE_COLUMNS[scorer].items()},
            "counts": {"rows": len(ids), "scored_now": scored},
            "cost": cost, "versions": versions(),
        }, ep)
    result.seconds = round(time.time() - started, 2)
    log.info("%s: %s", cfg.synthetic, "; ".join(
        [f"{s} {result.scored[s]} scored now" for s in result.scored] + [f"{s} {why}" for s, why in result.skipped.items()]))
    return result


def _requested(cfg: ScoreConfig, result: ScoreResult) -> list[str]:
    """The configured scorers, once each; text is skipped, with a message, without a CLIP model."""
    scorers = list(dict.fromkeys(cfg.scorers))
    if "classifier" in scorers and not cfg.run:
        raise ConfigError("config field 'run': the classifier scorer needs a trained run (the output of "
                          "`ray-dafusion train`, e.g. runs/demo/train/baseline); or drop it from scorers")
    if "text" in scorers and not cfg.clip_model:
        scorers.remove("text")
        result.skipped["text"] = "no clip_model configured"
        log.warning("text scorer skipped: it needs a CLIP model (clip_model: a local dir, s3:// prefix or hub id)")
    return scorers


def _run_record(cfg: ScoreConfig) -> Optional[dict[str, Any]]:
    """The run's train_result.json; None when there is none."""
    try:
        return storage.read_json(storage.join(cfg.run, "train_result.json"), cfg.endpoint_url)
    except FileNotFoundError:
        return None


def _complete_for_run(output: str, run: Optional[str], endpoint_url: Optional[str]) -> bool:
    """Whether `output` holds complete classifier scores made with the run at `run` (however it was written)."""
    manifest = storage.read_manifest(output, endpoint_url) or {}
    recorded = manifest.get("run")
    return manifest.get("stage") == "score" and bool(recorded) and bool(run) and \
        storage.absolute(recorded).rstrip("/") == storage.absolute(run).rstrip("/")


def _made_of(cfg: ScoreConfig, scorer: str, manifest: dict[str, Any], run_identity: Optional[dict[str, Any]]
             ) -> dict[str, Any]:
    """What one scorer's values depend on, and nothing else (configlib.config_record's shape, so a
    refusal names what changed): the synthetic set's content, by its augment fingerprint (which covers
    the real sources source_distance compares with), the scorer, and the classifier's run or the text
    scorer's CLIP model. Adding a scorer, changing another scorer's input, or writing the synthetic
    path another way leaves a complete table as it is."""
    config: dict[str, Any] = {"scorer": scorer}
    inputs: dict[str, Any] = {"synthetic": manifest.get("config_fingerprint")}
    if scorer == "classifier":
        inputs["run"] = run_identity
    elif scorer == "text":
        config["clip_model"] = cfg.clip_model
    return {"config": config, "inputs": inputs}


def _run_identity(run: str, record: dict[str, Any], endpoint_url: Optional[str]) -> dict[str, Any]:
    """A train run as the classifier scorer sees it: what it was trained from (its config fingerprint)
    and which checkpoint is its best, not the path it is named by."""
    manifest = storage.read_manifest(run, endpoint_url) or {}  # a run stopped before its manifest: its config
    checkpoint = str(record.get("best_checkpoint") or "").rstrip("/")
    return {"config_fingerprint": manifest.get("config_fingerprint") or storage.fingerprint(record.get("config")),
            "checkpoint": posixpath.basename(checkpoint) or None}


def _check_inputs(cfg: ScoreConfig, manifest: dict[str, Any], scorers: list[str], record: Optional[dict[str, Any]]
                  ) -> tuple[Optional[str], Optional[str]]:
    """What the scorers still to run need, checked on the driver before any actor starts: (the run's
    best checkpoint, for classifier; the real set as an absolute URI, for source_distance). The
    classifier must have been trained on the synthetic set's classes, in its label order: its
    probabilities are read by label."""
    checkpoint = None
    needs_real = "source_distance" in scorers or ("classifier" in scorers and not manifest.get("classes"))
    real = _real_set(cfg, manifest) if needs_real else None
    if "classifier" in scorers:
        assert record is not None  # a missing run with incomplete scores was refused when deciding completeness
        checkpoint = record.get("best_checkpoint")
        if not checkpoint:
            raise ValueError(f"run {cfg.run} has no best checkpoint")
        # the synthetic set's classes: its manifest's, else its real set's
        class_names = [c["name"] for c in manifest.get("classes") or []] or (
            [c.name for c in schema.read_class_table(real, cfg.endpoint_url)] if real else [])
        run_classes = [c["name"] for c in record.get("classes") or []]
        if run_classes != class_names:
            raise ValueError(f"run {cfg.run} was trained on classes {_shown(run_classes)} but {cfg.synthetic} holds "
                             f"{_shown(class_names)}: score with a run trained on the same data set")
    if "text" in scorers:  # fail here, not in every actor
        from .models import resolve_model

        resolve_model(cfg.clip_model, cfg.cache_dir, cfg.endpoint_url, marker="config.json")
    return checkpoint, real


def _check_same_real(cfg: ScoreConfig, uri: str) -> None:
    """`real` may name the synthetic set's real set elsewhere (moved, copied), never another one:
    its ingest fingerprint must be the one augment recorded (source_distance compares with it)."""
    ep = cfg.endpoint_url
    try:
        made_of = storage.read_json(storage.join(cfg.synthetic, storage.RUN_RECORD), ep).get("made_of") or {}
    except FileNotFoundError:
        return
    made_from = ((made_of.get("inputs") or {}).get("real") or {}).get("config_fingerprint")
    given = (storage.read_manifest(uri, ep) or {}).get("config_fingerprint")
    if made_from and given and made_from != given:
        raise ConfigError(f"config field 'real': {cfg.real} is another real set (ingest fingerprint {given}) than the "
                          f"one {cfg.synthetic} was made from ({made_from}); give that set, moved or copied")


def _real_set(cfg: ScoreConfig, manifest: dict[str, Any]) -> str:
    """The real data set the synthetic images came from (`real`, else the one their augment manifest
    records), as an absolute URI: scoring actors run in another directory."""
    real = cfg.real or manifest.get("real") or (manifest.get("config") or {}).get("real")
    if not real:
        raise ConfigError(f"config field 'real': the augment manifest of {cfg.synthetic} names no real data set; "
                          "give the ingest output it was made from with --real URI")
    uri = storage.absolute(real)
    if cfg.real:
        _check_same_real(cfg, uri)
    if not storage.parquet_files(storage.join(uri, "train"), cfg.endpoint_url):
        where = "given as real" if cfg.real else f"as the augment manifest of {cfg.synthetic} records it"
        relative = f", read from {os.getcwd()}" if uri != real else ""
        raise FileNotFoundError(f"real data set {real} ({where}{relative}) has no train split ({uri}/train): give "
                                "the ingest output the synthetic set was made from with --real URI (absolute, or "
                                "relative to this directory)")
    return uri


def _shown(names: list[str]) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}" if names else "no classes on record"


def _run(cfg: ScoreConfig, real: Optional[str], scorers: list[str], outputs: dict[str, str], done: dict[str, list[str]],
         checkpoint: Optional[str], ids: list[str], run_id: str) -> list[dict[str, Any]]:
    import ray.data
    from ray.data.expressions import col

    ep = cfg.endpoint_url
    finished = set.intersection(*(set(done[s]) for s in scorers)) if scorers else set()
    if len(finished) == len(ids):
        return []
    cap = plan.capacity()
    pin = plan.node_pinning(cfg.node_resource, cfg.num_gpus, cap, "score")
    actors = plan.check("score", plan.Demand("scoring actors", cfg.max_actors, {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus,
                                                                                 **pin},
                                            count_field="max_actors", size_fields={"num_cpus": cfg.num_cpus,
                                                                                   "num_gpus": cfg.num_gpus}), cap)
    files = storage.parquet_files(storage.join(cfg.synthetic, "data"), ep)
    ds = storage.ray_dataset(files, ["id", "source_id", "label", "class_name", "image"], ep)
    if finished:
        ds = ds.filter(expr=col("id").not_in(sorted(finished)))
    kwargs = {"cfg": cfg, "real": real, "scorers": scorers, "outputs": outputs, "done": done, "checkpoint": checkpoint,
              "run_id": run_id}
    if cfg.compute == "tasks":
        udf: Any = score_batch
        options: dict[str, Any] = {"fn_kwargs": kwargs, "compute": ray.data.TaskPoolStrategy(size=actors)}
    else:
        udf = QualityScorer
        options = {"fn_constructor_kwargs": kwargs,
                   "compute": ray.data.ActorPoolStrategy(min_size=min(cfg.min_actors, actors), max_size=actors)}
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size).map_batches(
        udf, **options, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus, **({"resources": pin} if pin else {}),
    )
    summaries = []
    with Watchdog("score", "batch", cfg.stall_warning, cfg.stall_timeout,
                  hint=f"each of {actors} scoring actors reserves num_cpus {cfg.num_cpus:g}"
                  + ("; with other jobs on a small cluster at once (a sweep's trials), set compute: tasks"
                     if cfg.compute == "actors" else "")) as watchdog:
        for row in ds.iter_rows():
            watchdog.progress()
            summaries.append(row)
    return summaries


def _verify(output: str, ids: list[str], endpoint_url: Optional[str]) -> None:
    counts: dict[str, int] = defaultdict(int)
    for i in _committed_ids(output, endpoint_url):
        counts[i] += 1
    duplicated = [i for i, n in counts.items() if n > 1]
    missing = set(ids) - set(counts)
    foreign = set(counts) - set(ids)
    if duplicated or missing or foreign:
        raise StageError(f"scores in {output} are inconsistent: {len(duplicated)} ids scored twice, {len(missing)} "
                         f"missing, {len(foreign)} not in the synthetic set; re-run with overwrite: true to score again")


callable_stage_module(__name__)  # `from ray_dafusion import score` may give this module: call it as the stage
