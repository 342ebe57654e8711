"""Faults and placement on a real multi-node Ray cluster on this machine (tests/localcluster.py):
a head and four worker nodes, two carrying `gen_gpu` and two `train_gpu` as cluster.yaml's node
types do. A node is lost the way a spot preemption loses it: SIGKILL to its raylet and every
worker on it, while it holds work. Each test puts a fresh node in place of the one it killed.

These run after every single-node test (see conftest): they stop the session's local Ray and
drive this cluster from the test process."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import pytest

from ray_dafusion import storage, weights
from ray_dafusion.config import AugmentConfig, InvertConfig

from localcluster import LocalCluster

pytestmark = pytest.mark.slow

NODES = {"gen_a": {"gen_gpu": 1}, "gen_b": {"gen_gpu": 1}, "train_a": {"train_gpu": 1}, "train_b": {"train_gpu": 1}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_cache, tiny_model):
    import ray

    ray.shutdown()  # the session's local Ray
    c = LocalCluster(str(tmp_path_factory.mktemp("cluster")), head_cpus=1,
                     env={"RAY_DAFUSION_CACHE": model_cache, "HF_HUB_OFFLINE": "1"})
    try:
        for name, resources in NODES.items():
            c.add_node(name, cpus=1, resources=resources)
        c.connect(runtime_env={"env_vars": {"RAY_DAFUSION_CACHE": model_cache, "HF_HUB_OFFLINE": "1"}})
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        yield c
    finally:
        ray.shutdown()
        c.stop()
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # as conftest set it: loopback only


@pytest.fixture
def replace_killed(cluster):
    """Puts a fresh node in place of any node a test killed, so the next test has all four."""
    yield
    for name, resources in NODES.items():
        if name not in cluster.nodes:
            cluster.add_node(name, cpus=1, resources=resources)
    cluster.wait_for(set(NODES))


def _where(cluster, kind: str, name_part: str) -> dict[str, str]:
    """Ray id -> node name for every actor (kind "actors") or task ("tasks") whose class or
    function name contains `name_part`, alive or finished."""
    from ray.util import state

    names = cluster.node_names(include_dead=True)
    rows = (state.list_actors(address=cluster.address, detail=True, limit=10000) if kind == "actors"
            else state.list_tasks(address=cluster.address, detail=True, limit=10000))
    key = "class_name" if kind == "actors" else "name"
    ident = "actor_id" if kind == "actors" else "task_id"
    return {r[ident]: names.get(r["node_id"], "?") for r in rows if name_part in (r.get(key) or "") and r.get("node_id")}


def _augment_rows(cfg) -> int:
    from ray_dafusion.augment import augment

    return augment(cfg).synthetic_rows


def _train_epochs(cfg) -> list[int]:
    from ray_dafusion.train import train

    return [m["epoch"] for m in train(cfg).metrics]


def _driver(address: str, init_kwargs: dict, fn, *args):
    """In a fresh process: join the cluster as a driver, run fn(*args); ("ok", value) or ("error", text)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    import ray
    import ray.data

    ray.init(address=address, _node_ip_address=address.split(":")[0], log_to_driver=False, configure_logging=False,
             **init_kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        return "ok", fn(*args)
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    finally:
        ray.shutdown()


def _in_new_driver(cluster, fn, *args):
    """fn(*args) in a new driver process (a user's command), the test's own driver left as it is."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_driver, (cluster.address, cluster.init_kwargs, fn, *args))


def _kill_when(cluster, ready, pick, timeout: float = 300) -> tuple[threading.Thread, list]:
    """A thread that waits until ready() is true, then kills the node pick() names."""
    killed: list = []

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                name = pick()
                if name:
                    killed.append((name, cluster.kill_node(name)))
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, killed


def test_augment_survives_a_lost_generation_node(cluster, replace_killed, make_real, tmp_path):
    from test_augment import FAST, M, _check_complete, _embeddings, _real_rows

    real = make_real(per_split={"train": 12, "val": 1, "test": 1})  # 24 batches of one row
    ids = _real_rows(real).column("id").to_pylist()
    cfg = AugmentConfig(real=real, output=str(tmp_path / "out"), embeddings=_embeddings(tmp_path / "t.safetensors"),
                        batch_size=1, min_actors=2, max_actors=2, num_cpus=0.5, max_restarts=3,
                        **{**FAST, "num_inference_steps": 20})
    data = storage.join(cfg.output, "data")

    def actor_node():  # a generation node that holds one of the pool's actors now
        alive = cluster.node_names()
        held = [n for n in _where(cluster, "actors", "MapWorker").values() if n in alive.values()]
        return held[0] if held else None

    thread, killed = _kill_when(cluster, lambda: storage.exists(data) and storage.list_files(data, ".parquet"),
                                actor_node)
    # Each run is a user's command: a new driver process joined to the cluster. (In one long-lived
    # driver, Ray Data keeps a failed run's surviving actors alive for lineage, holding the CPUs a
    # re-run's actors wait for.)
    outcome, synthetic_rows = _in_new_driver(cluster, _augment_rows, cfg)
    if outcome != "ok":  # the job may end with the node; a re-run must then complete it
        print(f"first run ended with the node: {synthetic_rows}")
        thread.join(timeout=5)
        # re-run once Ray has declared the node dead (until then new actors are still placed on it
        # and die starting)
        deadline = time.time() + 180
        while killed and killed[0][0] in cluster.node_names().values() and time.time() < deadline:
            time.sleep(1)
        outcome, synthetic_rows = _in_new_driver(cluster, _augment_rows, cfg)
        assert outcome == "ok", synthetic_rows
    thread.join(timeout=5)
    assert killed and killed[0][0].startswith("gen_"), f"no generation node was killed: {killed}"
    table = _check_complete(cfg.output, ids)  # exactly N x M: no duplicate, none missing
    assert table.num_rows == len(ids) * M and synthetic_rows == len(ids) * M
    print(f"augment: node {killed[0][0]} killed ({killed[0][1]} processes); rows expected {len(ids) * M}, "
          f"written {table.num_rows}, duplicated 0")
    # every diffusion actor, the restarted ones included, ran on a generation node
    placed = set(_where(cluster, "actors", "MapWorker").values())
    assert placed and placed <= {"gen_a", "gen_b"}, placed


def test_train_survives_a_lost_training_node(cluster, replace_killed, make_real, tmp_path):
    from test_train import _check_exact, _epoch_rows, _pids, _real_ids, ddp_kill_config

    cfg, real, debug = ddp_kill_config(make_real, tmp_path)
    # each worker reads its share of the rows itself (the default for a union this small): a node's
    # loss is the fault here; the streamed path under a killed worker is test_train's, on one node,
    # where each Ray Data pass costs seconds instead of the minute it takes on 1-CPU nodes
    cfg = dataclasses.replace(cfg, cache_mb=64)

    def rank1_node():  # the node whose session holds the rank-1 worker process
        import glob
        import re

        for path in glob.glob(os.path.join(debug, "epoch0-rank1-*.json")):
            pid = int(re.search(r"-(\d+)\.json$", path).group(1))
            return cluster.node_of_pid(pid)
        return None

    thread, killed = _kill_when(cluster, lambda: bool(rank1_node()), rank1_node)
    placed = {}
    watcher_stop = threading.Event()

    def watch_workers():  # where the worker group's actors are, while they exist
        while not watcher_stop.is_set():
            try:
                placed.update(_where(cluster, "actors", "RayTrainWorker"))
            except Exception:
                pass
            time.sleep(1)

    watcher = threading.Thread(target=watch_workers, daemon=True)
    watcher.start()
    outcome, epochs = _in_new_driver(cluster, _train_epochs, cfg)  # a user's command: a new driver
    assert outcome == "ok", epochs
    thread.join(timeout=5)
    watcher_stop.set()
    watcher.join(timeout=5)
    assert killed and killed[0][0].startswith("train_"), f"no training node was killed: {killed}"
    assert epochs == [0, 1]
    assert len(_pids(debug)) >= 4, "a new worker group took over after the node was lost"
    ids = _real_ids(real)
    for epoch, by_rank in _epoch_rows(debug).items():  # the epoch guarantee, after the restart too
        assert set(by_rank) == {0, 1}
        _check_exact(by_rank[0][1] + by_rank[1][1], ids, passes=2)
    placed.update(_where(cluster, "actors", "RayTrainWorker"))
    assert placed and set(placed.values()) <= {"train_a", "train_b"}, placed
    print(f"train: node {killed[0][0]} killed mid-epoch; {len(epochs)} epochs finished on "
          f"{sorted(set(placed.values()))}")


def test_invert_retries_the_class_of_a_lost_node(cluster, replace_killed, make_real, tmp_path):
    from ray_dafusion.inversion import invert

    names = ("cat", "dog", "fox", "owl")
    real = make_real(class_names=names)
    out = str(tmp_path / "tokens")
    cfg = InvertConfig(real=real, model="tiny", output=out, steps=400, batch_size=2, resolution=32, num_cpus=0.5)

    def running_node():
        from ray.util import state

        alive = cluster.node_names()
        for task in state.list_tasks(address=cluster.address, filters=[("state", "=", "RUNNING")], detail=True):
            if "_invert_class" in task["name"] and alive.get(task["node_id"], "").startswith("gen_"):
                return alive[task["node_id"]]
        return None

    thread, killed = _kill_when(cluster, lambda: bool(running_node()), running_node)
    try:
        result = invert(cfg)
        outcome = "retried"
    except RuntimeError as exc:  # named as failed, the others kept; a re-run trains only that class
        assert "re-run the same command" in str(exc)
        kept = storage.list_files(storage.join(out, "classes"), ".safetensors")
        assert kept, "the classes that finished are kept"
        result = invert(cfg)
        assert set(result.trained) < set(names)
        outcome = f"failed, kept {len(kept)}, re-run trained {sorted(result.trained)}"
    thread.join(timeout=5)
    assert killed and killed[0][0].startswith("gen_")
    tensors, _ = weights.load_embeddings(out)
    assert len(tensors) == len(names)
    placed = set(_where(cluster, "tasks", "_invert_classes").values())
    assert placed and placed <= {"gen_a", "gen_b"}, placed
    print(f"invert: node {killed[0][0]} killed while it ran a class; {outcome}; {len(tensors)} of {len(names)} tokens")
