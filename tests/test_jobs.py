"""`ray job submit` for real: a head started with `ray start --head` on loopback (token
authentication on, as Ray 2.60 sets it up), the pipeline submitted from the repository with
`--working-dir .`, outputs checked, and only the cluster this test started stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ray_dafusion import storage

from localcluster import free_ports, kill_session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on loopback in its own process group; SIGTERM to `ray start --block` stops
    exactly this cluster (`ray stop` would stop every Ray on the machine)."""
    import ray

    ray.shutdown()  # the session's local Ray: these tests run last (see conftest)
    gcs, dash, agent, agent_grpc, rt_env, metrics, nm, om, client = free_ports(9)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = f"/tmp/rdf-{os.getpid()}"
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
         f"--metrics-export-port={metrics}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
         f"--ray-client-server-port={client}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        kill_session(head.pid)  # what a graceful stop left (workers keep the session)
        log.close()


def _submit(head, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**head["env"], "RAY_AUTH_MODE": "token"}  # present the token from ~/.ray/auth_token
    deadline = time.time() + 180
    while True:  # the dashboard's job agent takes a few seconds to come up
        proc = subprocess.run(
            [f"{BIN}/ray", "job", "submit", "--address", head["address"], "--working-dir", ".", "--", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        text = proc.stdout + proc.stderr
        starting = "No available agent" in text or "Failed to connect to Ray" in text
        if proc.returncode == 0 or not starting or time.time() > deadline:
            return proc
        time.sleep(3)


def test_pipeline_job_submitted_to_a_real_head(ray_head, tmp_path, tiny_model):
    from ray_dafusion.sample_data import write_digits

    source = str(tmp_path / "digits")
    write_digits(source, size=32, per_class=10)
    workdir = str(tmp_path / "work")
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({
        "workdir": workdir,
        "methods": ["baseline", "da_fusion"],
        "ingest": {"source": source, "classes": ["zero", "one", "two"], "examples_per_class": 2,
                   "val_per_class": 2, "test_per_class": 2},
        "invert": {"model": tiny_model, "steps": 4, "resolution": 32, "batch_size": 2, "num_cpus": 0.5},
        "augment": {"model": tiny_model, "num_augmentations": 2, "num_inference_steps": 4, "resolution": 32,
                    "batch_size": 2, "num_cpus": 0.5},
        "train": {"arch": "resnet18", "backbone": "finetune", "image_size": 32, "epochs": 1, "batch_size": 4, "iterations_per_epoch": 2,
                  "cpus_per_worker": 0.5},
    }))
    proc = _submit(ray_head, ["python", "jobs/pipeline.py", "--config", str(config)], timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "succeeded" in output
    results = storage.read_json(storage.join(workdir, "results", "results.json"))
    assert results, "evaluate wrote no results"
    assert os.path.exists(os.path.join(workdir, "results", "results.md"))
    assert storage.read_manifest(storage.join(workdir, "synthetic", "da_fusion"))["counts"]
    assert "results table" in output
