"""Shared fixtures: one local Ray per test session, the tiny model, a loopback S3 server, and a
factory for small real data sets written in the ingest output layout."""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable

import numpy as np
import pytest

# Workers spawned by Ray inherit the environment of ray.init: set what they need first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray would otherwise bind to the machine's external interface; tests keep all traffic on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from ray_dafusion.logs import setup_logging  # noqa: E402

setup_logging()  # stage logs reach stderr (captured per test) as they do from the command line


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    """A per-session model cache shared by the driver and Ray workers."""
    path = str(tmp_path_factory.mktemp("model-cache"))
    os.environ["RAY_DAFUSION_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tiny_model(model_cache) -> str:
    """The tiny pipeline built once into the session cache; returns its local directory."""
    from ray_dafusion.models import resolve_model

    return resolve_model("tiny", cache_dir=model_cache)


@pytest.fixture(scope="session")
def ray_session(model_cache, s3_server):
    """One local Ray for the whole session (2 CPUs, like the machine).

    Starts after the loopback S3 server so Ray workers inherit its endpoint and test keys
    (workers copy the environment of ray.init; set later, S3 tests would fail in workers)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"RAY_DAFUSION_CACHE": model_cache, "HF_HUB_OFFLINE": "1"}},
        )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint on loopback (moto server); yields its URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in keys}
    # Everything S3 in the session goes to loopback, never to a real AWS host.
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-value",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> Callable[[str], str]:
    """Create a bucket on the loopback server; returns an s3:// URI."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")

    def make(name: str) -> str:
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    return make


def write_real_dataset(
    root: str,
    class_names=("cat", "dog"),
    per_split=None,
    size: int = 32,
    seed: int = 0,
    endpoint_url=None,
) -> str:
    """Write a small data set in the ingest output layout (train/val/test parquet + manifest)
    without running ingest, so stages can be tested on their own."""
    from ray_dafusion import schema, storage
    from ray_dafusion.ingest import split_fingerprint
    from ray_dafusion.tokens import class_token
    from PIL import Image
    import pyarrow as pa

    per_split = per_split or {"train": 2, "val": 1, "test": 1}
    rng = np.random.default_rng(seed)
    counts = {}
    split_ids: dict[str, list[str]] = {}
    for split, n in per_split.items():
        rows = []
        for label, name in enumerate(class_names):
            for i in range(n):
                base = np.array([60 + 120 * (label % 2), 40 * (label % 3), 200 - 50 * label]) % 256
                pixels = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype("uint8")
                data = schema.encode_image(Image.fromarray(pixels))
                rid = f"{split}-{label}-{i}"
                rows.append({
                    "id": rid, "image": schema.image_cell(data, f"{name}/{rid}.png"), "label": label,
                    "class_name": name, "source_path": f"{name}/{rid}.png",
                    "sha256": storage.sha256_bytes(pixels.tobytes()), "width": size, "height": size,
                })
        table = pa.Table.from_pylist(rows, schema=schema.real_schema(list(class_names)))
        storage.write_parquet(table, storage.join(root, split, "part-00000.parquet"), endpoint_url)
        counts[split] = len(rows)
        split_ids[split] = [r["id"] for r in rows]
    storage.write_manifest(root, {
        "stage": "ingest",
        "classes": [{"name": n, "label": i, "token": class_token(n)} for i, n in enumerate(class_names)],
        "counts": counts,
        "config_fingerprint": "test-fixture",
        "split_fingerprints": {split: split_fingerprint(ids) for split, ids in split_ids.items()},
    }, endpoint_url)
    return root


@pytest.fixture
def make_real(tmp_path) -> Callable[..., str]:
    """Factory: make_real(class_names=..., per_split=..., size=...) -> URI of a real data set."""
    counter = iter(range(1000))

    def make(root=None, **kwargs) -> str:
        return write_real_dataset(root or str(tmp_path / f"real{next(counter)}"), **kwargs)

    return make


sys.path.insert(0, os.path.dirname(__file__))  # lets tests import helpers from conftest


LAST = ("test_multinode", "test_jobs")


def pytest_collection_modifyitems(session, config, items):
    """Run the multi-node and `ray job submit` tests last, in that order: they stop the session's
    local Ray first, so the cluster they start is the only Ray on the machine (Ray's state API
    refuses to guess between two)."""
    items.sort(key=lambda item: LAST.index(item.module.__name__) + 1 if item.module.__name__ in LAST else 0)
