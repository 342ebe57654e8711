"""Sweep: trials on Ray Tune reuse stage outputs, a re-run skips finished trials, and the summary's
intervals and paired differences are computed right."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from ray_dafusion import storage
from ray_dafusion.config import SweepConfig
from ray_dafusion.score import read_scores
from ray_dafusion.sweep import summarize, sweep, trial_plan


def test_summary_means_intervals_and_paired_differences():
    runs = []
    for seed, (base, std, daf) in enumerate([(0.50, 0.52, 0.60), (0.40, 0.45, 0.47), (0.60, 0.58, 0.66)]):
        runs += [{"method": "baseline", "shots": 1, "seed": seed, "mean_class_acc": base},
                 {"method": "standard", "shots": 1, "seed": seed, "mean_class_acc": std},
                 {"method": "da_fusion", "shots": 1, "seed": seed, "mean_class_acc": daf}]
    rows = {r["method"]: r for r in summarize(runs)}
    assert [r["method"] for r in summarize(runs)] == ["baseline", "standard", "da_fusion"]
    base = rows["baseline"]
    assert base["n"] == 3 and base["mean"] == pytest.approx(0.5)
    # t(0.975, 2) = 4.3027; sd of (0.5, 0.4, 0.6) = 0.1
    assert base["ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    d = rows["da_fusion"]["vs_standard"]  # paired: 0.08, 0.02, 0.08
    diffs = np.array([0.08, 0.02, 0.08])
    assert d["mean"] == pytest.approx(diffs.mean()) and d["wins"] == 3 and d["n"] == 3
    assert d["ci95"] == pytest.approx(4.302653 * diffs.std(ddof=1) / math.sqrt(3), rel=1e-5)
    assert "vs_standard" not in rows["standard"] and rows["standard"]["vs_baseline"]["wins"] == 2


def test_trials_cover_shots_seeds_methods_once():
    cfg = SweepConfig(source="x", shots=[1, 2], seeds=[0, 1, 2], methods=["baseline", "da_fusion", "da_fusion_k1"])
    names = [t.name for t in trial_plan(cfg)]
    assert len(names) == len(set(names)) == 18 and names[0] == "baseline-k1-s0"
    with pytest.raises(ValueError, match="methods"):
        SweepConfig(methods=["magic"])


def test_every_method_but_the_baseline_trains_with_the_same_standard_augmentation():
    from ray_dafusion.sweep import Trial, _stage_configs

    cfg = SweepConfig.from_dict({"source": "x", "workdir": "/tmp/w", "train": {"rotation": 10, "hflip": False,
                                                                               "randaugment": False}})
    train = {m: _stage_configs(cfg, Trial(m, 1, 0))["train"] for m in ("baseline", "standard", "da_fusion")}
    assert (train["baseline"].rotation, train["baseline"].hflip, train["baseline"].randaugment) == (0.0, False, False)
    for m in ("standard", "da_fusion"):
        assert (train[m].rotation, train[m].hflip, train[m].randaugment) == (10, False, False)
    # without a choice in the config, the standard augmentation includes RandAugment
    default = SweepConfig.from_dict({"source": "x", "workdir": "/tmp/w"})
    assert _stage_configs(default, Trial("standard", 1, 0))["train"].randaugment is True
    assert _stage_configs(default, Trial("baseline", 1, 0))["train"].randaugment is False


def test_the_filtered_method_scores_the_shared_synthetic_set_with_its_seeds_baseline():
    from ray_dafusion.sweep import Trial, _stage_configs

    cfg = SweepConfig.from_dict({"source": "x", "workdir": "/tmp/w"})
    plain, filtered = _stage_configs(cfg, Trial("da_fusion", 2, 3)), _stage_configs(cfg, Trial("da_fusion_filtered", 2, 3))
    assert "score" not in plain and plain["train"].synthetic_filter is None
    # the same synthetic set and tokens as da_fusion; the baseline run exactly the baseline trial's
    assert filtered["augment"] == plain["augment"] and filtered["invert"] == plain["invert"]
    assert filtered["baseline"] == _stage_configs(cfg, Trial("baseline", 2, 3))["train"]
    assert filtered["score"].synthetic == plain["augment"].output
    assert filtered["score"].run == "/tmp/w/train/baseline-k2-s3" and filtered["score"].scorers == ["classifier"]
    assert filtered["train"].synthetic_filter == "classifier.top1_is_label == 1"
    assert filtered["train"].name == "da_fusion_filtered-k2-s3"


def test_a_pool_ingested_again_from_another_source_leaves_no_trial_finished(tmp_path):
    """The trials' stage configs name the pool by its path only: its ingest fingerprint (which
    holds the source) is part of each trial's, so finished trials of another pool are not reused."""
    from ray_dafusion.sweep import Trial, _trial_fingerprint

    cfg = SweepConfig.from_dict({"source": "/data/a", "workdir": str(tmp_path)})
    trial = Trial("da_fusion", 2, 0)
    pool = str(tmp_path / "real" / "pool")
    storage.write_manifest(pool, {"stage": "ingest", "config_fingerprint": "pool-of-a"})
    of_a = _trial_fingerprint(cfg, trial, "model")
    assert _trial_fingerprint(cfg, trial, "model") == of_a
    storage.write_manifest(pool, {"stage": "ingest", "config_fingerprint": "pool-of-b"})
    assert _trial_fingerprint(cfg.replace(source="/data/b"), trial, "model") != of_a


def test_a_model_rebuilt_at_the_same_path_leaves_no_trial_of_it_finished(tmp_path):
    """The stage configs name the model by its path only: its files' fingerprint is part of the
    fingerprint of every trial that makes a synthetic set (and of no other)."""
    from ray_dafusion.sweep import Trial, _finished, _model_fingerprint, _paths, _trial_fingerprint

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "weights.bin").write_bytes(b"first")
    cfg = SweepConfig.from_dict({"source": "/data/a", "workdir": str(tmp_path / "w"), "shots": [1], "seeds": [0],
                                 "methods": ["baseline", "da_fusion"], "invert": {"model": str(model)},
                                 "augment": {"model": str(model), "cache_dir": str(tmp_path / "cache")}})
    trials = [Trial("baseline", 1, 0), Trial("da_fusion", 1, 0)]
    first = _model_fingerprint(cfg)
    for trial in trials:
        storage.write_json(_paths(cfg, trial)["record"], {"fingerprint": _trial_fingerprint(cfg, trial, first)})
    assert _finished(cfg, trials, first) == {"baseline-k1-s0", "da_fusion-k1-s0"}
    (model / "unet" / "weights.bin").write_bytes(b"again")  # pretrain wrote it again, at the same path
    second = _model_fingerprint(cfg)
    assert second != first
    assert _finished(cfg, trials, second) == {"baseline-k1-s0"}
    assert _model_fingerprint(cfg.replace(methods=["baseline", "standard"])) == ""


def test_shots_beyond_a_class_pool_are_refused_before_any_trial(make_real):
    from ray_dafusion.config import ConfigError
    from ray_dafusion.sweep import _check_pool_holds_the_shots

    pool = make_real(per_split={"train": 2, "val": 1, "test": 1})  # 2 train images per class
    cfg = SweepConfig.from_dict({"source": "/data/a", "shots": [1, 3]})
    with pytest.raises(ConfigError, match=r"'shots': 3 examples per class, .* fewer train images for 2 class\(es\) "
                                          r"\(cat 2, dog 2\)"):
        _check_pool_holds_the_shots(cfg, pool)
    _check_pool_holds_the_shots(cfg.replace(shots=[1, 2]), pool)
    _check_pool_holds_the_shots(SweepConfig.from_dict({"source": "/data/a", "shots": [3],
                                                       "ingest": {"allow_fewer": True}}), pool)


def test_repeated_seeds_shots_or_methods_and_a_val_evaluation_are_refused():
    from ray_dafusion.config import ConfigError

    with pytest.raises(ConfigError, match=r"'seeds': names 0 more than once"):
        SweepConfig(source="x", seeds=[0, 0, 1])
    with pytest.raises(ConfigError, match=r"'shots': names 1 more than once"):
        SweepConfig(source="x", shots=[1, 1])
    with pytest.raises(ConfigError, match=r"'methods': names baseline more than once"):
        SweepConfig(source="x", methods=["baseline", "baseline"])
    # the checkpoint is chosen on val: a summary of val accuracy would be optimistic, and it says test
    with pytest.raises(ConfigError, match=r"'evaluate.split': .*chosen on val"):
        SweepConfig.from_dict({"source": "x", "evaluate": {"split": "val"}})
    SweepConfig(source="x", seeds=[1, 0], shots=[2, 1], methods=["standard", "baseline"])


def _runs(seeds, shots=8, fewest=None):
    return [{"method": m, "shots": shots, "seed": s, "mean_class_acc": 0.5 + 0.01 * s + (0.1 if m == "standard" else 0),
             "fewest_per_class": fewest} for s in seeds for m in ("baseline", "standard")]


def test_the_summary_names_its_plan_marks_short_classes_and_writes_valid_json(tmp_path, caplog):
    from ray_dafusion.sweep import SUMMARY_JSON, Trial, _fewest_per_class, _paths, _warn_short, _write_summary

    cfg = SweepConfig.from_dict({"source": "x", "workdir": str(tmp_path), "shots": [8], "seeds": [0],
                                 "methods": ["baseline", "standard"], "ingest": {"allow_fewer": True},
                                 "train": {"rotation": 10, "hflip": True, "randaugment": False}})
    # a real set of 8 shots in which one class had only 5 train images (ingest's per-class counts)
    trials = [Trial("baseline", 8, 0), Trial("standard", 8, 0)]
    storage.write_manifest(_paths(cfg, trials[0])["real"],
                           {"stage": "ingest", "counts": {"per_class": {"train": {"cat": 8, "dog": 5}}}})
    assert _fewest_per_class(cfg, trials) == {"baseline-k8-s0": 5, "standard-k8-s0": 5}
    rows = summarize(_runs([0], fewest=5))
    with caplog.at_level("WARNING", logger="ray_dafusion.sweep"):
        _warn_short(rows)
    assert "shots 8: some class has only 5 train images" in caplog.text
    md_uri, json_uri, png_uri = _write_summary(cfg, rows, _runs([0], fewest=5), 1.0)
    md = storage.read_bytes(md_uri).decode()
    assert md.startswith("Sweep of shots 8 x seeds 0 x methods baseline, standard, written 20")
    assert "| baseline | 8 (min 5) | 1 | 50.0 ± - |" in md and "only j train images" in md
    # each reference column defined as the code sets it up
    assert "vs baseline: " in md and "no rotation, no flips, no RandAugment" in md and "which is `standard`" in md
    assert "vs standard: " in md and "rotation 10 degrees, horizontal flips on, RandAugment off" in md
    # one seed: no interval, written as null (a bare NaN is not JSON)
    text = storage.read_bytes(json_uri).decode()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{SUMMARY_JSON} holds {c}"))
    assert summary["rows"][0]["ci95"] is None and summary["rows"][0]["fewest_per_class"] == 5
    assert summary["plan"] == {"shots": [8], "seeds": [0], "methods": ["baseline", "standard"]}
    assert summary["written"] == md.split("written ")[1].split(";")[0]
    assert storage.read_bytes(png_uri)[:4] == b"\x89PNG"
    # enough train images: no mark
    plain = storage.read_bytes(_write_summary(cfg, summarize(_runs([0, 1], fewest=8)), [], 1.0)[0]).decode()
    assert "| baseline | 8 | 2 |" in plain and "(min" not in plain


def test_the_plot_says_what_its_bars_are_and_draws_none_for_one_seed():
    from ray_dafusion.sweep import _figure

    fig = _figure(summarize(_runs([0])))
    ax = fig.axes[0]
    assert ax.get_title() == "mean over seeds; bars: 95% t-interval over seeds; none with 1 seed"
    assert ax.containers and all(len(seg) == 0 for c in ax.containers for seg in c[2][0].get_segments())  # no zero bar
    fig = _figure(summarize(_runs([0, 1, 2])))
    assert fig.axes[0].get_title() == "mean over seeds; bars: 95% t-interval over seeds"
    bars = [seg for c in fig.axes[0].containers for seg in c[2][0].get_segments()]
    assert len(fig.axes[0].containers) == len(ax.containers) and bars and all(len(seg) == 2 for seg in bars)


def test_a_summary_of_another_plan_is_named_at_the_start(tmp_path, caplog):
    from ray_dafusion.sweep import SUMMARY_JSON, _note_earlier_summary

    cfg = SweepConfig.from_dict({"source": "x", "workdir": str(tmp_path), "shots": [1, 2], "seeds": [0, 1],
                                 "methods": ["baseline", "standard"]})
    with caplog.at_level("INFO", logger="ray_dafusion.sweep"):
        _note_earlier_summary(cfg)  # none yet
        storage.write_json(str(tmp_path / SUMMARY_JSON), {"plan": {"shots": [2, 1], "seeds": [1, 0],
                                                                   "methods": ["standard", "baseline"]}})
        _note_earlier_summary(cfg)  # the same plan
        assert caplog.text == ""
        # a summary written before it named its plan: the plan is its config's
        storage.write_json(str(tmp_path / SUMMARY_JSON), {"config": {"shots": [1], "seeds": [0],
                                                                     "methods": ["baseline"]}})
        _note_earlier_summary(cfg)
    assert "covers shots 1 x seeds 0 x methods baseline, not this sweep's plan" in caplog.text


@pytest.mark.slow
def test_a_small_sweep_reuses_outputs_and_resumes(ray_session, tiny_model, tmp_path):
    from ray_dafusion.sample_data import write_digits

    source = str(tmp_path / "digits")
    write_digits(source, size=16, per_class=8, half="experiment")
    cfg = SweepConfig.from_dict({
        "source": source, "workdir": str(tmp_path / "sweep"), "shots": [1], "seeds": [0, 1],
        "methods": ["baseline", "da_fusion", "da_fusion_filtered"],
        "ingest": {"classes": ["zero", "one", "two"], "val_per_class": 2, "test_per_class": 2},
        "invert": {"model": tiny_model, "steps": 2, "resolution": 32, "num_cpus": 0.5},
        "augment": {"model": tiny_model, "num_augmentations": 2, "num_inference_steps": 4, "resolution": 32,
                    "compute": "tasks"},
        "train": {"arch": "small_cnn", "backbone": "finetune", "image_size": 16, "epochs": 1,
                  "iterations_per_epoch": 3, "batch_size": 4, "hflip": False, "num_workers": 0},
        "score": {"compute": "tasks"},
    })
    result = sweep(cfg)
    assert (result.trials, result.ran) == (6, 6)
    rows = {r["method"]: r for r in result.summary}
    assert set(rows) == {"baseline", "da_fusion", "da_fusion_filtered"} and rows["da_fusion"]["vs_baseline"]["n"] == 2
    for r in rows.values():
        assert r["n"] == 2 and 0.0 <= r["mean"] <= 1.0
    table = storage.read_bytes(result.files[0]).decode()
    assert "| da_fusion | 1 | 2 |" in table and "paired by seed" in table
    assert storage.read_bytes(result.files[2])[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(storage.read_bytes(result.files[1]))
    assert {r["seed"] for r in summary["runs"]} == {0, 1} and all(r["optimizer_steps"] == 3 for r in summary["runs"])
    # one subset and one token set per (shots, seed), shared by the methods; every run scored on the pool's test
    work = cfg.workdir
    assert sorted(os.listdir(os.path.join(work, "real"))) == ["k1-s0", "k1-s1", "pool"]
    assert sorted(os.listdir(os.path.join(work, "synthetic", "da_fusion"))) == ["k1-s0", "k1-s1"]
    # the filtered runs kept what their seed's baseline classifier scored as its own class, and no more
    for seed in (0, 1):
        scores = read_scores(os.path.join(work, "synthetic", "da_fusion", f"k1-s{seed}"), "classifier",
                             ["top1_is_label"]).column("top1_is_label").to_pylist()
        report = json.loads(storage.read_bytes(os.path.join(work, "train", f"da_fusion_filtered-k1-s{seed}",
                                                            "train_result.json")))["synthetic_filter"]
        assert (report["kept"], report["dropped"]) == (sum(scores), len(scores) - sum(scores))
    # a re-run skips every finished trial, and a new seed runs only its own trials
    again = sweep(cfg)
    assert again.ran == 0 and again.summary == result.summary
    more = sweep(cfg.replace(seeds=[0, 1, 2]))
    assert (more.trials, more.ran) == (9, 3)
