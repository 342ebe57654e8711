"""Score, filters and cost: scores stored once per synthetic image (exactly once, resumable), filters
applied at train time without regenerating, a safe filter grammar, cost in manifests, the report."""

from __future__ import annotations

import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from ray_dafusion import storage
from ray_dafusion.config import GalleryConfig, ReportConfig, ScoreConfig, TrainConfig
from ray_dafusion.errors import ConfigError
from ray_dafusion.filters import parse_filter

CLASSES = ("cat", "dog", "fox")


def test_the_filter_grammar_is_safe_and_names_the_column():
    available = {"classifier": {"p_label", "top1"}, "source_distance": {"value", "mse"}}
    f = parse_filter("classifier.p_label >= 0.5 and not (source_distance.value < 0.05 or source_distance.value > 1)",
                     available)
    values = {"classifier.p_label": np.array([0.9, 0.2, 0.9, 0.9]),
              "source_distance.value": np.array([0.1, 0.1, 0.01, 2.0])}
    assert f.mask(values).tolist() == [True, False, False, False]
    assert f.columns == {"classifier": {"p_label"}, "source_distance": {"value"}}
    assert parse_filter("0.2 <= classifier.p_label < 0.8", available).mask(values).tolist() == [False, True, False, False]
    with pytest.raises(ConfigError, match="unknown column classifier.p_labl; classifier has p_label, top1"):
        parse_filter("classifier.p_labl >= 0.5", available)
    with pytest.raises(ConfigError, match="no scores 'text'"):
        parse_filter("text.value > 0.2", available)
    for bad in ("__import__('os').system('x')", "classifier.p_label.real > 0", "classifier.p_label >= 'a'",
                "classifier.p_label + 1 > 2", "p_label > 0.5", "classifier.p_label >="):
        with pytest.raises(ConfigError, match="synthetic_filter"):
            parse_filter(bad, available)


def test_the_filter_names_a_refused_operator_and_refuses_bare_values_as_conditions():
    available = {"classifier": {"p_label"}, "source_distance": {"value"}}
    for op in ("in", "not in", "is", "is not"):
        with pytest.raises(ConfigError, match=f"operator '{op}' is not allowed in a filter"):
            parse_filter(f"classifier.p_label {op} 1", available)
    # a bare column or number as a condition would keep every nonzero value, NaN included
    for bad, what in (("classifier.p_label > 0.5 or source_distance.value", "source_distance.value"),
                      ("source_distance.value", "source_distance.value"),
                      ("not classifier.p_label", "classifier.p_label"),
                      ("classifier.p_label > 0.5 and 1", "1")):
        with pytest.raises(ConfigError, match=rf"'synthetic_filter': '{re.escape(what)}' is not a condition"):
            parse_filter(bad, available)
    with pytest.raises(ConfigError, match="is a condition where a comparison needs a scorer.column or a number"):
        parse_filter("(classifier.p_label > 0.5) == (source_distance.value > 1)", available)
    kept = parse_filter("classifier.p_label > 0.5 or not source_distance.value <= -0.5", available)
    values = {"classifier.p_label": np.array([0.9, 0.1, 0.1]), "source_distance.value": np.array([0.0, np.nan, -1.0])}
    assert kept.mask(values).tolist() == [True, False, False]  # row 2: false or unknown stays unknown: dropped
    with pytest.raises(ConfigError, match="'0 < 1' compares no score column"):
        parse_filter("classifier.p_label > 0.5 or 0 < 1", available)


def test_a_missing_score_drops_a_row_however_the_filter_is_written():
    """NaN compares as SQL's NULL: unknown, kept unknown by not, decided by a known side of and/or."""
    available = {"classifier": {"p_label"}, "source_distance": {"value"}}
    p = {"classifier.p_label": np.array([0.2, 0.8, np.nan, np.nan, 0.8]),
         "source_distance.value": np.array([0.1, 0.1, 0.1, 0.0, np.nan])}
    for text in ("classifier.p_label >= 0.5", "not classifier.p_label < 0.5", "not not classifier.p_label >= 0.5",
                 "0.5 <= classifier.p_label <= 2"):
        assert parse_filter(text, available).mask(p).tolist() == [False, True, False, False, True], text
    assert parse_filter("classifier.p_label != 0.3", available).mask(p).tolist() == [True, True, False, False, True]
    # a known side decides and/or; otherwise unknown, dropped
    both = "classifier.p_label >= 0.5 {} source_distance.value > 0.05"
    assert parse_filter(both.format("and"), available).mask(p).tolist() == [False, True, False, False, False]
    assert parse_filter(both.format("or"), available).mask(p).tolist() == [True, True, True, False, True]
    assert parse_filter(f"not ({both.format('and')})", available).mask(p).tolist() == [True, False, False, True, False]


def test_scores_have_one_place_where_train_and_gallery_find_them():
    """No `output`: train's synthetic_filter and gallery read <synthetic>/scores, so scores written
    elsewhere would never be found."""
    with pytest.raises(ConfigError, match="unknown field\\(s\\) output"):
        ScoreConfig.from_dict({"synthetic": "runs/demo/synthetic/da_fusion", "output": "elsewhere/scores"})


def _stored_run(root: str, real: str, classes=CLASSES, seed: int = 0) -> str:
    """A finished train run on `classes` whose best checkpoint is a small CNN with a random head
    (`seed`: another config, as train's fingerprint would say)."""
    from ray_dafusion.classifier import build_model

    torch.manual_seed(seed)
    model = build_model("small_cnn", len(classes))
    run = os.path.join(root, "baseline")
    ckpt = os.path.join(run, "checkpoint_000")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes(os.path.join(ckpt, "model.pt"), buf.getvalue())
    storage.write_json(os.path.join(ckpt, "meta.json"), {"arch": "small_cnn", "num_classes": len(classes), "image_size": 32})
    storage.write_json(os.path.join(run, "train_result.json"), {
        "best_checkpoint": ckpt, "real": real,
        "classes": [{"name": n, "label": i, "token": f"<{n}>"} for i, n in enumerate(classes)]})
    storage.write_manifest(run, {"stage": "train", "config_fingerprint": storage.fingerprint([list(classes), seed])})
    return run


@pytest.fixture
def scored(ray_session, make_real, tmp_path):
    from test_train import write_synthetic

    real = make_real(class_names=CLASSES, per_split={"train": 3, "val": 2, "test": 1}, size=32)
    synthetic = write_synthetic(real, str(tmp_path / "synthetic"), m=3)
    manifest = storage.read_manifest(synthetic)
    storage.write_manifest(synthetic, {**manifest, "real": real, "config_fingerprint": "fixture"})
    run = _stored_run(str(tmp_path / "runs"), real)
    cfg = ScoreConfig(synthetic=synthetic, run=run, scorers=["classifier", "source_distance", "text"], batch_size=4,
                      cost={"prices": {"cpu_hour": 0.5, "gpu_hour": 2.0}})
    return real, synthetic, run, cfg


def test_scores_are_written_once_per_image_and_resume(scored, caplog):
    from ray_dafusion.score import score

    real, synthetic, run, cfg = scored
    ids = storage.read_parquet(storage.join(synthetic, "data"), columns=["id"]).column("id").to_pylist()
    result = score(cfg)
    assert result.scored == {"classifier": 27, "source_distance": 27}
    assert result.skipped == {"text": "no clip_model configured"} and "text scorer skipped" in caplog.text
    for scorer in ("classifier", "source_distance"):
        table = storage.read_parquet(storage.join(synthetic, "scores", scorer, "data")).to_pylist()
        assert sorted(r["id"] for r in table) == sorted(ids)
        manifest = storage.read_manifest(storage.join(synthetic, "scores", scorer))
        assert manifest["counts"]["rows"] == 27 and manifest["cost"]["wall_seconds"] > 0
        assert manifest["cost"]["prices"] == {"cpu_hour": 0.5, "gpu_hour": 2.0}
    classifier = storage.read_parquet(storage.join(synthetic, "scores", "classifier", "data")).to_pylist()
    assert all(0.0 <= r["p_label"] <= r["p_top1"] <= 1.0 and r["top1_is_label"] == (r["top1"] == r["label"])
               for r in classifier)
    distance = storage.read_parquet(storage.join(synthetic, "scores", "source_distance", "data")).to_pylist()
    assert all(0.0 <= r["mse"] <= 1.0 for r in distance) and len({round(r["value"], 6) for r in distance}) > 1
    # complete: nothing is rescored; a lost file is rescored alone (resume), and the rows stay exactly once
    assert score(cfg).scored == {}
    data = storage.join(synthetic, "scores", "source_distance", "data")
    lost = storage.parquet_files(data)[0]
    rows_lost = storage.read_parquet(lost).num_rows
    storage.delete(lost)
    storage.delete(storage.join(synthetic, "scores", "source_distance", "manifest.json"))
    again = score(cfg)
    assert again.scored == {"source_distance": rows_lost} and "classifier" in again.skipped
    assert sorted(storage.read_parquet(data, columns=["id"]).column("id").to_pylist()) == sorted(ids)


def test_a_scorer_keeps_its_table_when_other_scorers_or_paths_change(scored, tmp_path):
    """A scorer's identity is what its values depend on: the synthetic set's content, the scorer, the
    classifier's run (by its config and checkpoint, not its path), not the rest of the config."""
    from ray_dafusion.score import score

    _, synthetic, run, cfg = scored
    assert score(cfg.replace(scorers=["source_distance"])).scored == {"source_distance": 27}
    moved = str(tmp_path / "moved" / "baseline")
    shutil.copytree(run, moved)  # the same run elsewhere
    again = score(cfg.replace(synthetic=synthetic + "/", run=moved, scorers=["source_distance", "classifier"]))
    assert again.scored == {"classifier": 27} and again.skipped == {"source_distance": "complete (same config)"}
    assert score(cfg.replace(run=run + "/", scorers=["classifier"])).skipped == {"classifier": "complete (same config)"}
    # a run trained with another config gives other probabilities: refused, naming what changed
    other = _stored_run(str(tmp_path / "other"), storage.read_manifest(synthetic)["real"], seed=1)
    with pytest.raises(storage.StorageError, match=r"input run\.config_fingerprint: "):
        score(cfg.replace(run=other, scorers=["classifier", "source_distance"]))


def test_complete_scores_stand_when_their_run_is_gone(scored, tmp_path):
    """Completeness is decided before inputs are checked: a re-run after the train run was deleted
    has nothing to do, while incomplete scores of a missing run are still refused."""
    from ray_dafusion.score import score

    _, synthetic, run, cfg = scored
    assert score(cfg.replace(scorers=["classifier"])).scored == {"classifier": 27}
    shutil.rmtree(run)
    again = score(cfg.replace(run=run + "/", scorers=["classifier"]))
    assert again.scored == {} and again.skipped == {"classifier": f"complete (run {run}/ no longer exists; "
                                                                  "its scores are kept)"}
    with pytest.raises(FileNotFoundError, match="holds no train_result.json"):
        score(cfg.replace(run=str(tmp_path / "never"), scorers=["classifier"]))


def test_the_real_set_is_resolved_and_checked_on_the_driver(scored, tmp_path, monkeypatch):
    """A real set recorded relative to where augment ran is read from the driver's directory and given
    to the actors as an absolute URI; missing, it is refused before any actor starts; `real` overrides it."""
    from ray_dafusion.score import score

    real, synthetic, _, cfg = scored
    relative = os.path.relpath(real, tmp_path)
    storage.write_manifest(synthetic, {**storage.read_manifest(synthetic), "real": relative})
    moved, lost = str(tmp_path / "moved"), str(tmp_path / "lost")
    shutil.copytree(synthetic, moved)
    shutil.copytree(synthetic, lost)
    cfg = cfg.replace(scorers=["source_distance"])
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"real data set {relative} (as the augment manifest of {synthetic} records it, read from "
            f"{tmp_path / 'elsewhere'}) has no train split")):
        score(cfg)
    assert not storage.exists(storage.join(synthetic, "scores", "source_distance"))  # refused before writing
    assert score(cfg.replace(synthetic=moved, real=real)).scored == {"source_distance": 27}
    monkeypatch.chdir(tmp_path)
    assert score(cfg).scored == {"source_distance": 27}
    with pytest.raises(FileNotFoundError, match=re.escape(f"real data set {tmp_path / 'nope'} (given as real) has no")):
        score(cfg.replace(synthetic=lost, real=str(tmp_path / "nope")))
    # `real` names the same set elsewhere, never another: its ingest fingerprint is the one augment recorded
    storage.write_json(storage.join(lost, "_run.json"), {"stage": "augment", "config_fingerprint": "a", "made_of": {
        "config": {}, "inputs": {"real": {"config_fingerprint": "made-from"}}}})
    copy = str(tmp_path / "real-copy")
    shutil.copytree(real, copy)
    storage.write_manifest(copy, {**storage.read_manifest(copy), "config_fingerprint": "another"})
    with pytest.raises(ConfigError, match="'real': .* is another real set .*another.* than the one .*made-from"):
        score(cfg.replace(synthetic=lost, real=copy))
    storage.write_manifest(copy, {**storage.read_manifest(copy), "config_fingerprint": "made-from"})
    assert score(cfg.replace(synthetic=lost, real=copy)).scored == {"source_distance": 27}


def test_the_report_counts_a_multi_scorer_run_once(scored):
    from ray_dafusion.report import report
    from ray_dafusion.score import score

    _, synthetic, _, cfg = scored
    score(cfg.replace(scorers=["classifier", "source_distance"]))
    costs = [storage.read_manifest(storage.join(synthetic, "scores", s))["cost"] for s in ("classifier", "source_distance")]
    assert costs[0] == costs[1] and costs[0]["shared_by"] == ["classifier", "source_distance"]
    result = report(ReportConfig(workdir=synthetic))  # the synthetic fixture's augment manifest records no cost
    assert costs[0]["cpu_core_seconds"] > 0
    assert result.totals["cpu_core_seconds"] == pytest.approx(costs[0]["cpu_core_seconds"], abs=1e-3)
    assert result.totals["wall_seconds"] == pytest.approx(costs[0]["wall_seconds"], abs=1e-3)
    shared = [r for r in result.rows if r["stage"] == "score" and r["cpu_core_seconds"] is None]
    assert [r["output"] for r in shared] == ["scores/source_distance"]
    assert "its cost is counted there" in shared[0]["work"] and "scores/classifier" in shared[0]["work"]


def test_tasks_score_like_actors(scored, tmp_path):
    """compute: tasks (a sweep's many small jobs) writes the scores an actor pool writes."""
    from ray_dafusion.score import score

    _, synthetic, _, cfg = scored
    rows = {}
    for compute in ("actors", "tasks"):
        copy = str(tmp_path / compute)  # scores live beside the images: one copy of the synthetic set each
        shutil.copytree(synthetic, copy)
        result = score(cfg.replace(synthetic=copy, scorers=["classifier", "source_distance"], compute=compute))
        assert result.scored == {"classifier": 27, "source_distance": 27}
        rows[compute] = {s: sorted(storage.read_parquet(storage.join(copy, "scores", s, "data")).to_pylist(),
                                   key=lambda r: r["id"]) for s in ("classifier", "source_distance")}
    for scorer, actor_rows in rows["actors"].items():
        for a, t in zip(actor_rows, rows["tasks"][scorer], strict=True):
            assert {k: v for k, v in a.items() if isinstance(v, (str, bool))} == \
                {k: v for k, v in t.items() if isinstance(v, (str, bool))}
            assert all(a[k] == pytest.approx(t[k], abs=1e-5) for k in a if isinstance(a[k], (int, float)))


def test_the_text_scorer_runs_with_a_clip_model(scored, tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from ray_dafusion.models import _tiny_tokenizer
    from ray_dafusion.score import score

    real, synthetic, run, cfg = scored
    tok = _tiny_tokenizer(CLASSES)
    clip_dir = str(tmp_path / "clip")
    config = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                     "pad_token_id": tok.pad_token_id},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(clip_dir)
    tok.save_pretrained(clip_dir)
    assert len(CLIPTokenizer.from_pretrained(clip_dir)) == len(tok)  # the saved tokenizer loads whole
    result = score(cfg.replace(scorers=["text"], clip_model=clip_dir))
    assert result.scored == {"text": 27}
    values = storage.read_parquet(storage.join(synthetic, "scores", "text", "data")).column("value").to_pylist()
    assert all(-1.0 <= v <= 1.0 for v in values) and len({round(v, 6) for v in values}) > 1
    # complete scores need no CLIP model: a re-run after the model is gone has nothing to do
    shutil.rmtree(clip_dir)
    assert score(cfg.replace(scorers=["text"], clip_model=clip_dir)).skipped == {"text": "complete (same config)"}


def test_a_run_trained_on_other_classes_is_refused(scored, tmp_path):
    from ray_dafusion.score import score

    real, synthetic, _, cfg = scored
    for classes in (CLASSES[::-1], [*CLASSES[:-1], "zebra"]):  # same classes in another label order; another class
        other = _stored_run(str(tmp_path / "other" / classes[-1]), real, classes)
        with pytest.raises(ValueError, match=f"run {other} was trained on classes .* but {synthetic} holds"):
            score(cfg.replace(run=other, scorers=["classifier"]))
    assert not storage.exists(storage.join(synthetic, "scores", "classifier"))  # refused before writing


def test_filters_apply_at_train_time_and_fall_back_to_real(scored, tmp_path):
    from test_train import _epoch_rows

    from ray_dafusion.score import score
    from ray_dafusion.train import train

    real, synthetic, run, cfg = scored
    score(cfg.replace(scorers=["classifier", "source_distance"]))
    base = dict(real=real, synthetic=synthetic, output=str(tmp_path / "runs"), method="da_fusion", alpha=1.0,
                arch="small_cnn", backbone="finetune", image_size=32, epochs=1, batch_size=3, iterations_per_epoch=3)
    p_label = storage.read_parquet(storage.join(synthetic, "scores", "classifier", "data")).to_pydict()
    cut = float(np.median(p_label["p_label"]))
    kept = {i for i, p in zip(p_label["id"], p_label["p_label"]) if p >= cut}
    debug = str(tmp_path / "debug")
    result = train(TrainConfig(**base, name="filtered", synthetic_filter=f"classifier.p_label >= {cut}",
                               debug_dir=debug))
    record = json.load(open(os.path.join(result.output, "train_result.json")))
    assert record["synthetic_filter"]["kept"] == len(kept) and record["synthetic_filter"]["dropped"] == 27 - len(kept)
    assert sum(record["synthetic_filter"]["dropped_per_class"].values()) == 27 - len(kept)
    rows = _epoch_rows(debug)[0][0][1]
    assert all(rid in kept for rid, aug, _, _ in rows if aug != -1)  # only kept versions are candidates
    # a filter that drops everything: every source falls back to its real image (alpha 1 notwithstanding)
    none = train(TrainConfig(**base, name="none", synthetic_filter="source_distance.value > 100"))
    assert none.metrics[0]["synthetic_fraction"] == 0.0
    assert json.load(open(os.path.join(none.output, "train_result.json")))["synthetic_filter"][
        "sources_without_synthetic"] == 9
    with pytest.raises(ConfigError, match="unknown column classifier.p"):
        train(TrainConfig(**base, name="bad", synthetic_filter="classifier.p >= 0.5"))


def test_gallery_captions_by_score_and_the_report_sums_costs(scored, tmp_path):
    from PIL import Image

    from ray_dafusion.gallery import gallery
    from ray_dafusion.report import report
    from ray_dafusion.score import score

    real, synthetic, run, cfg = scored
    score(cfg.replace(scorers=["classifier"]))
    out = str(tmp_path / "sheet.png")
    sheet = gallery(GalleryConfig(synthetic=synthetic, output=out, score="classifier.p_label", threshold=0.99))
    assert sheet.sources > 0 and Image.open(out).size == (sheet.width, sheet.height)
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert np.all(pixels == [220, 0, 0], axis=-1).sum() > 100  # red frames: below the threshold
    with pytest.raises(ValueError, match="not 'nope'"):
        gallery(GalleryConfig(synthetic=synthetic, output=out, score="classifier.nope"))
    result = report(ReportConfig(workdir=synthetic))
    assert [r["stage"] for r in result.rows] == ["augment", "score"] and result.rows[1]["cpu_core_seconds"] > 0
    assert "| score | scores/classifier |" in result.table and os.path.exists(result.output)
