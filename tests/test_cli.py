"""The command line and the job scripts: one line on stderr and an exit code for every ordinary
failure, the full traceback on request, and every script under jobs/ run at least once."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest

from ray_dafusion import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", os.path.join(ROOT, "jobs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_dafusion.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_a_failed_stage_is_one_line_and_exit_code_1(tmp_path):
    missing = str(tmp_path / "no-such-output")
    proc = _cli("gallery", missing)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("ray-dafusion gallery: error: ") and missing in lines[-1]
    assert "Traceback" not in proc.stderr and "--traceback" in lines[-1]
    # on request, the whole traceback
    assert "Traceback (most recent call last)" in _cli("gallery", missing, "--traceback").stderr
    assert "Traceback (most recent call last)" in _cli("gallery", missing, env={"RAY_DAFUSION_TRACEBACK": "1"}).stderr


def test_an_error_raised_in_a_ray_worker_is_one_line_too(ray_session):
    """Ray Data wraps a worker's error (RayTaskError(UserCodeException), with a hint about retries
    on its last line; ActorDiedError when an actor's constructor fails): still an ordinary failure,
    and its one line is the original error's."""
    import ray
    import ray.data

    from ray_dafusion.errors import StageError, one_line, ordinary_failures

    def task(batch):
        raise FileNotFoundError("no parquet files under runs/real/train")

    class Call:
        def __call__(self, batch):
            raise FileNotFoundError("no parquet files under runs/real/train")

    class Start:
        def __init__(self):
            raise FileNotFoundError("no parquet files under runs/real/train")

        def __call__(self, batch):
            return batch

    def handling(batch):  # raised while handling another error: the chain holds both
        try:
            {}["x"]
        except KeyError:
            raise FileNotFoundError("no parquet files under runs/real/train")

    pool = {"compute": ray.data.ActorPoolStrategy(size=1), "num_cpus": 0.25}
    for udf, kw in ((task, {"num_cpus": 0.25}), (Call, pool), (Start, pool), (handling, {"num_cpus": 0.25})):
        with pytest.raises(ordinary_failures()) as err:
            ray.data.range(2).map_batches(udf, **kw).materialize()
        assert one_line(err.value) == "FileNotFoundError: no parquet files under runs/real/train", udf

    @ray.remote(num_cpus=0.25)
    def stage():  # a plain task: Ray carries the original error, whatever it was raised while handling
        try:
            {}["x"]
        except KeyError:
            raise StageError("class cat failed: the loss became nan")

    with pytest.raises(StageError) as err:
        ray.get(stage.remote())
    assert one_line(err.value) == "class cat failed: the loss became nan"


def test_a_bad_config_is_exit_code_2():
    proc = _cli("train", "--alpha", "2")
    assert proc.returncode == 2 and "'alpha'" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("augment", "--prompt_templates", "a photo of a {}, close up")
    assert proc.returncode == 2 and "comma" in proc.stderr


def test_a_field_given_as_positional_and_as_option_must_agree(capsys):
    """`ray-dafusion gallery s3://b/aug1 --synthetic s3://b/aug2` took the positional silently."""
    from ray_dafusion.cli import parse_args

    for stage, name in (("gallery", "synthetic"), ("report", "workdir")):
        with pytest.raises(SystemExit) as exited:
            parse_args([stage, "s3://b/aug1", f"--{name}", "s3://b/aug2"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and f"ray-dafusion {stage}: {name} given twice" in err
        assert "'s3://b/aug1'" in err and "'s3://b/aug2'" in err
        # the same value both ways, or either alone, is fine
        for argv in (["s3://b/aug1", f"--{name}", "s3://b/aug1"], ["s3://b/aug1"], [f"--{name}", "s3://b/aug1"]):
            assert getattr(parse_args([stage, *argv])[1], name) == "s3://b/aug1"


def test_a_local_output_on_a_cluster_of_several_machines_is_warned_about(monkeypatch, caplog):
    import ray

    from ray_dafusion import cli, plan
    from ray_dafusion.config import IngestConfig, PipelineConfig, ScoreConfig, TrainConfig

    laptop = plan.ClusterCapacity(nodes=[{"CPU": 2.0}])
    scaling = plan.ClusterCapacity(nodes=[{"CPU": 0.0}], can_add=[({"CPU": 8.0}, 8)], autoscaling=True)
    caplog.set_level(logging.WARNING, logger="ray_dafusion")
    cases = [  # (alive nodes' hosts, capacity, config, warned)
        (["a"], laptop, TrainConfig(output="runs/x/train"), False),
        (["a", "a"], laptop, TrainConfig(output="runs/x/train"), False),  # nodes on one machine share its disk
        (["a", "b"], laptop, TrainConfig(output="runs/x/train"), True),
        (["head"], scaling, TrainConfig(output="runs/x/train"), True),  # only the head now, workers to come
        (["a", "b"], laptop, TrainConfig(output="s3://bucket/runs/x/train"), False),
        (["a", "b"], laptop, PipelineConfig(workdir="runs/x"), True),
        (["a", "b"], laptop, ScoreConfig(synthetic="runs/x/synthetic"), True),  # score writes under it
        (["a", "b"], laptop, TrainConfig(output="s3://bucket/t", real="runs/x/real"), True),  # read on every node
        (["a", "b"], laptop, IngestConfig(source="data/x", output="s3://bucket/r"), True),
        (["a", "b"], laptop, IngestConfig(source="s3://bucket/src", output="s3://bucket/r"), False),
    ]
    for hosts, cap, cfg, warned in cases:
        caplog.clear()
        monkeypatch.setattr(ray, "nodes", lambda hosts=hosts: [{"Alive": True, "NodeManagerHostname": h} for h in hosts])
        monkeypatch.setattr(plan, "capacity", lambda cap=cap: cap)
        cli._warn_local_output("stage", cfg)
        assert ("is a local path and this Ray cluster" in caplog.text) == warned, (hosts, cfg)


def test_ingest_train_evaluate_job_scripts(ray_session, tmp_path, capsys):
    from ray_dafusion.sample_data import write_digits

    source = str(tmp_path / "digits")
    write_digits(source, size=16, per_class=5)
    real, runs, results = (str(tmp_path / d) for d in ("real", "runs", "results"))
    common = ["--classes", "zero,one"]
    assert _job("ingest").main(["--config", os.path.join(ROOT, "jobs", "configs", "ingest.yaml"), "--source", source,
                                "--output", real, "--examples_per_class", "2", "--val_per_class", "1",
                                "--test_per_class", "2", *common]) == 0
    assert f"ingest: output {real}" in capsys.readouterr().out
    assert _job("train").main(["--real", real, "--output", runs, "--method", "baseline", "--arch", "resnet18",
                               "--backbone", "finetune", "--image_size", "16", "--epochs", "1", "--iterations_per_epoch", "2",
                               "--batch_size", "4"]) == 0
    assert "train (baseline, alpha 0.0)" in capsys.readouterr().out
    assert _job("evaluate").main(["--real", real, "--runs", storage.join(runs, "baseline"),
                                  "--output", results]) == 0
    assert "baseline: baseline shots 2" in capsys.readouterr().out
    from test_train import write_synthetic

    synthetic = write_synthetic(real, str(tmp_path / "synthetic"), m=2)
    classes = storage.read_manifest(real)["classes"]
    storage.write_manifest(synthetic, {**storage.read_manifest(synthetic), "real": real, "classes": classes})  # as augment
    assert _job("score").main(["--synthetic", synthetic, "--run", storage.join(runs, "baseline"),
                               "--scorers", "classifier,source_distance", "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"score: {synthetic}" in out and "classifier: 8 scored now" in out and "source_distance: 8 scored now" in out
    with pytest.raises(SystemExit) as exited:  # a bad config: exit code 2 before Ray is touched
        _job("sweep").main(["--config", str(tmp_path / "no-such-sweep.yaml")])
    assert exited.value.code == 2 and "config file not found" in capsys.readouterr().err
    # a failure inside the stage: exit code 1 and one line naming the problem
    assert _job("ingest").main(["--source", str(tmp_path / "nothing"), "--output", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err
    assert "ray-dafusion ingest: error:" in err and "is not a directory" in err and "Traceback" not in err
