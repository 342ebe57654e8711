"""The pipeline: stages in order under one workdir, skipping complete outputs; on local files
and with every URI on a loopback S3 server."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from ray_dafusion import storage
from ray_dafusion.config import PipelineConfig, SweepConfig, TrainConfig
from ray_dafusion.pipeline import DEMO_CONFIG, pipeline, stage_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_yaml_is_the_embedded_default():
    with open(os.path.join(ROOT, "jobs", "configs", "demo.yaml")) as f:
        assert yaml.safe_load(f) == DEMO_CONFIG


def test_stage_configs_live_under_the_workdir():
    cfg = PipelineConfig.from_dict({
        "workdir": "s3://b/w", "endpoint_url": "http://127.0.0.1:9",
        "methods": ["baseline", "real_guidance", "da_fusion"], "run_erase": True,
    })
    stages = stage_configs(cfg)
    assert stages["ingest"].output == "s3://b/w/real"
    assert stages["invert"].real == "s3://b/w/real" and stages["invert"].output == "s3://b/w/tokens"
    dafusion, guidance = stages["augment"]["da_fusion"], stages["augment"]["real_guidance"]
    assert dafusion.embeddings == "s3://b/w/tokens" and dafusion.erasure == "s3://b/w/erasure"
    assert dafusion.output == "s3://b/w/synthetic/da_fusion"
    assert guidance.mode == "real_guidance" and guidance.t0_levels() == [0.5] and guidance.embeddings is None
    assert stages["train"]["baseline"].synthetic is None
    assert stages["train"]["da_fusion"].synthetic == "s3://b/w/synthetic/da_fusion"
    assert stages["train"]["real_guidance"].synthetic == "s3://b/w/synthetic/real_guidance"
    assert {m: t.name for m, t in stages["train"].items()} == {m: m for m in cfg.methods}
    for section in (stages["ingest"], dafusion, stages["train"]["da_fusion"]):
        assert section.endpoint_url == "http://127.0.0.1:9"


def test_whole_run_settings_reach_every_stage_unless_a_section_sets_its_own():
    from ray_dafusion.sweep import Trial, _stage_configs

    prices = {"prices": {"cpu_hour": 0.05, "gpu_hour": 2.5}}
    top = {"stall_timeout": 600.0, "stall_warning": 120.0, "cost": prices, "overwrite": True,
           "train": {"stall_warning": 30.0}}
    stages = stage_configs(PipelineConfig.from_dict({**top, "methods": ["baseline", "da_fusion"]}))
    sweep_stages = _stage_configs(SweepConfig.from_dict({**top, "source": "x"}), Trial("da_fusion", 1, 0))
    for section in (stages["ingest"], stages["invert"], stages["augment"]["da_fusion"], stages["train"]["da_fusion"],
                    *sweep_stages.values()):
        assert (section.stall_timeout, section.cost, section.overwrite) == (600.0, prices, True), section
        assert section.stall_warning == (30.0 if isinstance(section, TrainConfig) else 120.0)


def test_real_guidance_keeps_its_own_t0_when_augment_strengths_are_set():
    cfg = PipelineConfig.from_dict({"methods": ["real_guidance", "da_fusion"], "augment": {"strengths": [0.25, 1.0]}})
    stages = stage_configs(cfg)["augment"]
    assert stages["da_fusion"].t0_levels() == [0.25, 1.0]
    assert stages["real_guidance"].t0_levels() == [0.5]  # DA-Fusion's levels are not Real Guidance's
    cfg = PipelineConfig.from_dict({"methods": ["real_guidance"], "real_guidance_strengths": [0.75]})
    assert stage_configs(cfg)["augment"]["real_guidance"].t0_levels() == [0.75]


def _small(workdir: str, source: str, model: str, **extra) -> PipelineConfig:
    return PipelineConfig.from_dict({
        "workdir": workdir,
        "methods": ["baseline", "da_fusion"],
        "ingest": {"source": source, "classes": ["zero", "one"], "examples_per_class": 2,
                   "val_per_class": 2, "test_per_class": 2},
        "invert": {"model": model, "steps": 4, "resolution": 32, "batch_size": 2, "num_cpus": 0.5},
        "augment": {"model": model, "num_augmentations": 2, "num_inference_steps": 4, "resolution": 32,
                    "batch_size": 2, "num_cpus": 0.5},
        "train": {"arch": "resnet18", "backbone": "finetune", "image_size": 32, "epochs": 1, "batch_size": 4, "iterations_per_epoch": 2,
                  "cpus_per_worker": 0.5},
        **extra,
    })


@pytest.mark.slow
def test_pipeline_with_every_uri_on_s3(ray_session, tiny_model, tmp_path, s3_bucket, s3_server, capfd):
    from ray_dafusion.sample_data import DIGIT_NAMES, write_digits

    bucket = s3_bucket("pipeline")
    # the sample writer writes to any URI (the demo and the sweep write it under their workdir)
    assert write_digits(f"{bucket}/digits", size=32, per_class=6, endpoint_url=s3_server) == {
        name: 6 for name in DIGIT_NAMES}
    assert len(storage.list_files(f"{bucket}/digits", ".png", s3_server, recursive=True)) == 60
    before = storage.read_bytes(f"{bucket}/digits/zero/0000.png", s3_server)
    assert write_digits(f"{bucket}/digits", size=16, per_class=6, endpoint_url=s3_server)["zero"] == 6
    assert storage.read_bytes(f"{bucket}/digits/zero/0000.png", s3_server) == before  # kept, not rewritten
    result = pipeline(_small(f"{bucket}/work", f"{bucket}/digits", tiny_model, endpoint_url=s3_server))

    # outputs are readable afterwards with pyarrow and pandas straight from S3
    import pandas as pd

    fs, path = storage.resolve(f"{bucket}/work/synthetic/da_fusion")
    files = storage.list_files(f"{bucket}/work/synthetic/da_fusion", ".parquet", recursive=True)
    assert files
    table = pq.read_table([storage.resolve(f)[1] for f in files], filesystem=fs)
    assert table.num_rows == 2 * 2 * 2  # classes x shots x M
    frame = pd.read_parquet(files[0], storage_options=storage.fsspec_options(s3_server))
    assert {"source_id", "aug_index", "strength", "image"} <= set(frame.columns)
    results = storage.read_json(f"{bucket}/work/results/results.json")
    assert results
    # checkpoints on S3 too
    train_files = storage.list_files(f"{bucket}/work/train", "", recursive=True)
    assert any("checkpoint" in f for f in train_files), train_files[:20]
    assert result.outputs["results"] == f"{bucket}/work/results"

    # no credentials in any manifest or log
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    out, err = capfd.readouterr()
    assert secret not in out + err and key_id not in out + err
    for uri in storage.list_files(f"{bucket}/work", ".json", recursive=True):
        text = storage.read_bytes(uri).decode()
        assert secret not in text and key_id not in text, uri
    # nor in the Ray workers' logs (the stage tasks and actors print there)
    import ray._private.worker

    logs = ray._private.worker._global_node.get_logs_dir_path()
    scanned = 0
    for dirpath, _, names in os.walk(logs):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                data = f.read()
            scanned += 1
            assert secret.encode() not in data and key_id.encode() not in data, os.path.join(dirpath, n)
    assert scanned, logs


@pytest.mark.slow
def test_pipeline_rerun_skips_complete_stages(ray_session, tiny_model, tmp_path, capfd):
    from ray_dafusion.sample_data import write_digits

    source = str(tmp_path / "digits")
    write_digits(source, size=32, per_class=6)
    cfg = _small(str(tmp_path / "work"), source, tiny_model, methods=["da_fusion"])
    first = pipeline(cfg)
    manifests = {k: storage.read_bytes(storage.join(v, "manifest.json")) for k, v in first.outputs.items()
                 if k in ("real", "tokens", "synthetic/da_fusion", "train/da_fusion", "results")}
    assert len(manifests) == 5, sorted(first.outputs)
    sheet = storage.read_bytes(first.outputs["gallery/da_fusion"])
    capfd.readouterr()
    second = pipeline(cfg)
    out = capfd.readouterr().err  # stage logs go to stderr
    assert "nothing to do" in out
    for k, before in manifests.items():  # complete outputs were not rewritten
        assert storage.read_bytes(storage.join(second.outputs[k], "manifest.json")) == before, k
    assert storage.read_bytes(second.outputs["gallery/da_fusion"]) == sheet
    assert " gallery: " not in out  # not redrawn (a redraw would give the same bytes, so ask the log)
    assert out.count("nothing to do") == 5, out  # ingest, invert, augment, train and evaluate say so
    assert json.loads(storage.read_bytes(storage.join(second.outputs["results"], "results.json")))
