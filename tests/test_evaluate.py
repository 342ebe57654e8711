"""Evaluate: metrics on hand-checked cases, results.json/md and plots from stored checkpoints."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from ray_dafusion import storage
from ray_dafusion.config import ConfigError, EvaluateConfig
from ray_dafusion.evaluate import class_metrics, evaluate, unique_names

CLASSES = ("cat", "dog", "fox")


def test_mean_per_class_accuracy_from_a_known_confusion_matrix():
    # true 0: 2 right, 1 called 1; true 1: 1 right, 1 called 2; true 2: 3 right; class 3 absent
    labels = [0, 0, 0, 1, 1, 2, 2, 2]
    preds = [0, 0, 1, 1, 2, 2, 2, 2]
    m = class_metrics(np.array(labels), np.array(preds), 4)
    assert m["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 3, 0], [0, 0, 0, 0]]
    assert m["per_class_acc"] == [pytest.approx(2 / 3), 0.5, 1.0, None]
    assert m["mean_class_acc"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)  # 0.7222, unlike top-1
    assert m["top1"] == pytest.approx(6 / 8)
    assert m["num_examples"] == 8


def _constant_run(root: str, name: str, method: str, predicts: int, real: str, alpha: float = 0.0) -> str:
    """A stored run whose best checkpoint always predicts class `predicts` (fc weight 0, one-hot bias)."""
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Linear(512, len(CLASSES))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(predicts), len(CLASSES)).float() * 10)
    run = storage.join(root, name)
    ckpt = storage.join(run, "checkpoint_000")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes(storage.join(ckpt, "model.pt"), buf.getvalue())
    storage.write_json(storage.join(ckpt, "meta.json"),
                       {"arch": "resnet18", "num_classes": len(CLASSES), "image_size": 32, "epoch": 0, "history": []})
    storage.write_json(storage.join(run, "train_result.json"), {
        "name": name, "method": method, "alpha": alpha, "best_checkpoint": ckpt, "best_val_mean_class_acc": 0.5,
        "real": real, "classes": [{"name": n, "label": i, "token": f"<{n}>"} for i, n in enumerate(CLASSES)],
    })
    return run


def test_repeated_run_names_get_the_first_free_suffix():
    assert unique_names(["a", "a", "a"]) == ["a", "a-2", "a-3"]
    # a run really named x-2 keeps its name; the second x skips to x-3
    assert unique_names(["x", "x-2", "x", "x"]) == ["x", "x-2", "x-3", "x-4"]
    assert unique_names(["b", "c"]) == ["b", "c"]


def test_the_shots_plot_says_which_runs_it_leaves_out(tmp_path, caplog):
    from ray_dafusion.evaluate import _shots_plot

    runs = [{"name": "a", "method": "baseline", "examples_per_class": 2, "mean_class_acc": 0.5},
            {"name": "b", "method": "baseline", "examples_per_class": None, "mean_class_acc": 0.4}]
    _shots_plot(runs, ["baseline", "baseline"], str(tmp_path / "accuracy_vs_shots.png"), None)
    assert (tmp_path / "accuracy_vs_shots.png").stat().st_size > 0
    assert "leaves out 1 run(s) whose real set records no examples_per_class (b)" in caplog.text


def test_the_shots_plot_keeps_runs_of_one_method_but_other_settings_apart():
    """A sweep's da_fusion, da_fusion_k1 and da_fusion_filtered all train method da_fusion: one line
    each, labelled by what differs (their seeds still average into one line)."""
    from ray_dafusion.evaluate import _line_labels

    four, one = [0.25, 0.5, 0.75, 1.0], [0.5]
    setting = {"alpha": 0.5, "t0": four, "filter": None, "randaugment": True}
    runs = [{"method": "baseline", "setting": {**setting, "alpha": 0.0, "t0": None}},
            {"method": "da_fusion", "setting": setting}, {"method": "da_fusion", "setting": dict(setting)},
            {"method": "da_fusion", "setting": {**setting, "t0": one}},
            {"method": "da_fusion", "setting": {**setting, "filter": "classifier.top1_is_label == 1"}}]
    assert _line_labels(runs) == [
        "baseline", "da_fusion (t0 0.25/0.5/0.75/1, filter none)", "da_fusion (t0 0.25/0.5/0.75/1, filter none)",
        "da_fusion (t0 0.5, filter none)", "da_fusion (t0 0.25/0.5/0.75/1, filter classifier.top1_is_label == 1)"]


def test_runs_of_one_method_differing_in_a_train_field_or_the_synthetic_set_are_apart(tmp_path):
    """Seeds average into one line; anything else that moves the numbers (arch, epochs, M, guidance...)
    keeps runs apart, named in the label."""
    from ray_dafusion.evaluate import _line_labels, _setting

    def record(**train):
        return {"method": "baseline", "alpha": 0.0, "config": {"seed": train.pop("seed", 0), **train}}

    runs = [record(seed=0), record(seed=1), record(arch="small_cnn"), record(epochs=3, seed=4)]
    runs = [{"method": "baseline", "setting": _setting(r, None)} for r in runs]
    assert _line_labels(runs) == ["baseline (arch resnet50, epochs 50)"] * 2 + [
        "baseline (arch small_cnn, epochs 50)", "baseline (arch resnet50, epochs 3)"]
    # a record from before a field existed reads as its default, not as a difference
    assert _setting({"method": "baseline", "alpha": 0.0, "config": {"seed": 2}}, None) == runs[0]["setting"]
    # the synthetic set: M and the guidance scale count, the augment seed does not
    made = []
    sets = ((10, 0, 7.5, None), (10, 1, 7.5, None), (5, 0, 7.5, None), (10, 0, 7.5, {"cat": "e1"}),
            (10, 1, 7.5, {"cat": "e1"}), (10, 0, 7.5, {"cat": "e2"}), (10, 0, 3.0, None))
    for i, (m, seed, guidance, erased) in enumerate(sets):
        synthetic = str(tmp_path / f"aug{i}")
        storage.write_manifest(synthetic, {"stage": "augment", "mode": "da_fusion", "erasure_fingerprints": erased,
                                           "config": {"num_augmentations": m, "seed": seed,
                                                      "guidance_scale": guidance}})
        made.append({"method": "da_fusion", "setting": _setting(
            {"method": "da_fusion", "alpha": 0.5, "synthetic": synthetic, "config": {}}, None)})
    labels = _line_labels(made)
    assert labels[0] == labels[1] == "da_fusion (num_augmentations 10, guidance_scale 7.5, erasure none)"
    assert labels[2] == "da_fusion (num_augmentations 5, guidance_scale 7.5, erasure none)"
    assert labels[3] == labels[4] != labels[0]  # the same erasure (by content) on two seeds: one setting
    assert labels[5] not in (labels[0], labels[3])  # another erasure: another setting
    assert labels[6] == "da_fusion (num_augmentations 10, guidance_scale 3.0, erasure none)"


def test_results_md_names_seed_and_setting_and_averages_over_seeds():
    from ray_dafusion.evaluate import _markdown

    def run(name, seed, shots, acc):
        return {"name": name, "seed": seed, "examples_per_class": shots, "mean_class_acc": acc, "top1": acc}

    runs = [run("b0", 0, 2, 0.5), run("b1", 1, 2, 0.7), run("d0", 0, 2, 0.6), run("b4", 0, 4, 0.8)]
    table = _markdown(runs, ["baseline", "baseline", "da_fusion", "baseline"], "test")
    assert "| b1 | baseline | 1 | 2 | 0.7000 | 0.7000 | - |" in table
    assert "| baseline | 2 | 0.6000 | 0.1414 | 2 |" in table  # sample std of 0.5 and 0.7
    assert "| baseline | 4 | 0.8000 | - | 1 |" in table and "| da_fusion | 2 | 0.6000 | - | 1 |" in table


def test_confusion_plot_files_stay_apart_when_names_meet_once_made_safe():
    from ray_dafusion.evaluate import _file_names

    assert _file_names(["a b", "a_b", "seed0/daf", "seed0_daf"]) == ["a_b", "a_b-2", "seed0_daf", "seed0_daf-2"]


def test_a_run_named_twice_is_refused(tmp_path):
    run = str(tmp_path / "runs" / "a")
    with pytest.raises(ConfigError, match="names the same run more than once"):
        EvaluateConfig(real="r", runs=[run, run + "/", str(tmp_path / "runs" / "b")], output="o").validate()


def test_results_table_and_plots(ray_session, make_real, tmp_path):
    real4 = make_real(class_names=CLASSES, per_split={"train": 4, "val": 1, "test": 2}, size=32)
    real1 = make_real(class_names=CLASSES, per_split={"train": 1, "val": 1, "test": 2}, size=32)
    runs = [
        _constant_run(str(tmp_path / "runs"), "base-1", "baseline", 0, real1),
        _constant_run(str(tmp_path / "runs"), "base-4", "baseline", 1, real4),
        _constant_run(str(tmp_path / "runs"), "daf-4", "da_fusion", 2, real4, alpha=0.5),
    ]
    out = str(tmp_path / "results")
    result = evaluate(EvaluateConfig(real=real4, runs=runs, output=out, batch_size=4))
    by_name = {r["name"]: r for r in result.runs}
    # test split: 2 images per class; a constant prediction gets one class fully right
    for name, k in (("base-1", 0), ("base-4", 1), ("daf-4", 2)):
        r = by_name[name]
        expected = np.zeros((3, 3), int)
        expected[:, k] = 2
        assert r["confusion"] == expected.tolist()
        assert r["mean_class_acc"] == pytest.approx(1 / 3) and r["top1"] == pytest.approx(1 / 3)
        assert r["per_class_acc"] == [1.0 if c == k else 0.0 for c in range(3)]
    assert [by_name[n]["examples_per_class"] for n in ("base-1", "base-4", "daf-4")] == [1, 4, 4]
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["split"] == "test" and len(saved["runs"]) == 3
    table = open(os.path.join(out, "results.md")).read()
    assert "| daf-4 | da_fusion | - | 4 | 0.3333 | 0.3333 |" in table
    for png in ("confusion_base-1.png", "confusion_daf-4.png", "accuracy_vs_shots.png"):
        assert open(os.path.join(out, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert storage.read_manifest(out)["counts"] == {"runs": 3}
    again = evaluate(EvaluateConfig(real=real4, runs=runs, output=out, batch_size=4))  # complete: not rescored
    assert again.seconds == 0.0 and again.runs == json.loads(json.dumps(result.runs))
    # resource fields and overwrite (which the pipeline passes to every stage) never refuse a re-run
    for resources in ({"overwrite": True}, {"overwrite": False, "batch_size": 16, "num_cpus": 0.25}):
        again = evaluate(EvaluateConfig(real=real4, runs=runs, output=out, **resources))
        assert again.seconds == 0.0
    # a run trained on other classes is refused by name
    other = make_real(class_names=("a", "b"), per_split={"train": 1, "val": 1, "test": 1}, size=32)
    with pytest.raises(ValueError, match="trained on classes"):
        evaluate(EvaluateConfig(real=other, runs=runs[:1], output=str(tmp_path / "r2")))
    with pytest.raises(FileNotFoundError, match="train_result.json"):
        evaluate(EvaluateConfig(real=real4, runs=[str(tmp_path)], output=str(tmp_path / "r3")))
    # a run whose real set was moved away is refused as such (not as one of another split)
    moved = str(tmp_path / "moved")
    os.rename(real1, moved)
    with pytest.raises(FileNotFoundError, match="holds no ingest output now"):
        evaluate(EvaluateConfig(real=real4, runs=runs[:1], output=str(tmp_path / "r4")))
    os.rename(moved, real1)


def _random_run(root: str, name: str, seed: int, real: str) -> str:
    """A stored run with a random head (predictions vary from image to image)."""
    run = _constant_run(root, name, "baseline", 0, real)
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Linear(512, len(CLASSES))
    with torch.no_grad():
        model.fc.weight.mul_(50.0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes(storage.join(run, "checkpoint_000", "model.pt"), buf.getvalue())
    return run


def test_more_runs_than_one_pass_over_many_blocks_score_exactly(ray_session, make_real, tmp_path, monkeypatch):
    """11 runs (two scoring passes: 8 checkpoints' bytes per pass) over a test split written as
    one-row files: every run's accuracy equals a direct in-process computation (predictions
    joined to labels by id)."""
    from ray_dafusion import evaluate as evaluate_module
    from ray_dafusion.classifier import CHECKPOINT_MODEL, decode_uint8, eval_transform, load_classifier

    real = make_real(class_names=CLASSES, per_split={"train": 1, "val": 1, "test": 5}, size=32)
    table = storage.read_parquet(storage.join(real, "test"))
    storage.delete(storage.join(real, "test"))
    for i in range(table.num_rows):
        storage.write_parquet(table.slice(i, 1), storage.join(real, "test", f"part-{i:03d}.parquet"))
    runs = [_random_run(str(tmp_path / "runs"), f"r{i:02d}", i, real) for i in range(11)]
    one = storage.total_size([storage.join(runs[0], "checkpoint_000", CHECKPOINT_MODEL)])
    monkeypatch.setattr(evaluate_module, "_MODEL_BYTES_PER_PASS", 8 * one)
    passes = []
    score = evaluate_module._score
    monkeypatch.setattr(evaluate_module, "_score", lambda cfg, uris, files: passes.append(len(uris)) or score(cfg, uris, files))
    result = evaluate(EvaluateConfig(real=real, runs=runs, output=str(tmp_path / "results"), batch_size=2))
    assert passes == [8, 3]
    rows = sorted(table.to_pylist(), key=lambda r: r["id"])
    labels = np.array([r["label"] for r in rows])
    accuracies = []
    for run, scored in zip(runs, result.runs):
        model, meta = load_classifier(storage.join(run, "checkpoint_000"))
        transform = eval_transform(meta)
        with torch.no_grad():
            x = torch.stack([transform(decode_uint8(r["image"]["bytes"])) for r in rows])
            preds = model(x).argmax(1).numpy()
        direct = class_metrics(labels, preds, len(CLASSES))
        assert scored["name"] == os.path.basename(run)
        assert scored["confusion"] == direct["confusion"] and scored["mean_class_acc"] == direct["mean_class_acc"]
        accuracies.append(direct["mean_class_acc"])
    assert len(set(accuracies)) > 1, "the runs should disagree, or the test checks nothing"


def test_a_run_from_another_test_split_is_refused(ray_session, make_real, tmp_path):
    real = make_real(class_names=CLASSES, per_split={"train": 1, "val": 1, "test": 2}, size=32)
    other = make_real(class_names=CLASSES, per_split={"train": 1, "val": 1, "test": 3}, size=32)
    runs = [_constant_run(str(tmp_path / "runs"), "mine", "baseline", 0, real),
            _constant_run(str(tmp_path / "runs"), "theirs", "baseline", 0, other)]
    with pytest.raises(ValueError, match="test split .* is not the test split"):
        evaluate(EvaluateConfig(real=real, runs=runs, output=str(tmp_path / "results")))
