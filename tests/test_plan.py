"""Plans that cannot progress are fixed or refused up front; a stalled stage says why."""

from __future__ import annotations

import logging

import pytest

from ray_dafusion import plan
from ray_dafusion.errors import ConfigError, StageError

TWO_CPUS = plan.ClusterCapacity(nodes=[{"CPU": 2.0}])


def _actors(count, cpus, gpus=0.0):
    return plan.Demand("diffusion actors", count, {"CPU": cpus, "GPU": gpus}, count_field="max_actors",
                       size_fields={"num_cpus": cpus, "num_gpus": gpus})


def test_a_plan_that_starves_ray_data_is_lowered_or_refused(caplog):
    caplog.set_level(logging.WARNING, logger="ray_dafusion")
    assert plan.check("augment", _actors(2, 0.5), TWO_CPUS) == 2  # 1 CPU left for read/write tasks
    assert plan.check("augment", _actors(2, 0.9), TWO_CPUS) == 1  # 1.8 of 2 would hang: one actor
    assert "max_actors 2 -> 1" in caplog.text and "Ray Data's read and write tasks" in caplog.text
    with pytest.raises(ConfigError, match=r"num_cpus to at most 1 \(now 1.5\)"):
        plan.check("augment", _actors(1, 1.5), TWO_CPUS)
    workers = plan.Demand("training workers", 2, {"CPU": 0.9}, size_fields={"cpus_per_worker": 0.9})
    with pytest.raises(ConfigError, match="cpus_per_worker to at most 0.5"):
        plan.check("train", workers, TWO_CPUS)
    with pytest.raises(ConfigError, match=r"no node has that much.*Set num_gpus to 0 \(now 1\) or add GPU nodes"):
        plan.check("augment", _actors(1, 0.5, gpus=1.0), TWO_CPUS)
    # tasks that queue (per-class) only need to fit one at a time
    tasks = plan.Demand("per-class task", 10, {"CPU": 1.0}, size_fields={"num_cpus": 1.0}, needs_data_tasks=False,
                        all_at_once=False)
    assert plan.check("invert", tasks, TWO_CPUS) == 10
    # a worker group without Ray Data beside it (train on a cached union) still starts all at once
    group = plan.Demand("training workers", 3, {"CPU": 1.0}, size_fields={"cpus_per_worker": 1.0},
                        needs_data_tasks=False)
    with pytest.raises(ConfigError, match=r"at most 2 of them fit on the nodes at once.*cpus_per_worker to at most "
                                          r"0.66 \(now 1\)"):
        plan.check("train", group, TWO_CPUS)
    assert plan.check("train", plan.Demand("training workers", 2, {"CPU": 1.0}, needs_data_tasks=False), TWO_CPUS) == 2


def _tasks(count, cpus):
    return plan.Demand("per-class tasks", count, {"CPU": cpus, "GPU": 0.0},
                       size_fields={"num_cpus": cpus, "num_gpus": 0.0}, needs_data_tasks=False, all_at_once=False)


def test_the_plan_is_packed_node_by_node_not_against_the_clusters_sum(caplog):
    caplog.set_level(logging.WARNING, logger="ray_dafusion")
    four_of_two = plan.ClusterCapacity(nodes=[{"CPU": 2.0}] * 4)  # 8 CPUs, none of them 3 on one node
    with pytest.raises(ConfigError, match=r"invert: 2 per-class tasks x \(CPU 3, GPU 0\): no node has that much.*"
                                          r"nodes now: 4 x \(CPU 2, GPU 0\)\. Set num_cpus to at most 2 \(now 3\)"):
        plan.check("invert", _tasks(2, 3.0), four_of_two)
    assert plan.check("invert", _tasks(2, 2.0), four_of_two) == 2
    # four 0.75-CPU actors on two 2-CPU nodes leave 0.5 CPU on each: Ray Data's read task never starts
    two_of_two = plan.ClusterCapacity(nodes=[{"CPU": 2.0}] * 2)
    fixed = plan.Demand("diffusion actors", 4, {"CPU": 0.75, "GPU": 0.0}, count_field="max_actors", min_count=4,
                        size_fields={"num_cpus": 0.75, "num_gpus": 0.0})
    with pytest.raises(ConfigError, match=r"4 diffusion actors x \(CPU 0.75, GPU 0\): however they are placed, no node "
                                          r"keeps 1 CPU free.*nodes now: 2 x \(CPU 2, GPU 0\)\. "
                                          r"Set num_cpus to at most 0.66 \(now 0.75\); or lower max_actors \(now 4\) to 3"):
        plan.check("augment", fixed, two_of_two)
    assert plan.check("augment", _actors(4, 0.75), two_of_two) == 3  # two on one node, one beside the read task
    assert "max_actors 4 -> 3" in caplog.text and "nodes now: 2 x (CPU 2, GPU 0)" in caplog.text
    assert plan.check("augment", _actors(4, 0.5), two_of_two) == 4  # 2 CPUs on one node, 1 left on the other
    # a node that cannot hold a worker can still run the read tasks
    small_and_big = plan.ClusterCapacity(nodes=[{"CPU": 1.0}, {"CPU": 4.0}])
    assert plan.check("augment", _actors(2, 2.0), small_and_big) == 2
    assert plan.check("augment", _actors(3, 2.0), small_and_big) == 2
    # pinned work goes only to nodes with the custom resource; the read tasks may run anywhere
    pinned = plan.ClusterCapacity(nodes=[{"CPU": 1.0}, {"CPU": 1.0, "gen_gpu": 1.0}, {"CPU": 1.0, "gen_gpu": 1.0}])
    pin = plan.node_pinning("gen_gpu", 0.0, pinned)
    two_pinned = plan.Demand("diffusion actors", 4, {"CPU": 0.5, "GPU": 0.0, **pin}, count_field="max_actors",
                             size_fields={"num_cpus": 0.5, "num_gpus": 0.0})
    assert plan.check("augment", two_pinned, pinned) == 4
    gpu_actors = plan.Demand("diffusion actors", 2, {"CPU": 0.5, "GPU": 1.0, "gen_gpu": 1.0},
                             size_fields={"num_cpus": 0.5, "num_gpus": 1.0})
    gpu_nodes = plan.ClusterCapacity(nodes=[{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0, "gen_gpu": 1.0}])
    with pytest.raises(ConfigError, match=r"at most 1 of them fit on the nodes at once.*"
                                          r"nodes now: 1 x \(CPU 4, GPU 1, gen_gpu 1\), 1 x \(CPU 4, GPU 1, gen_gpu 0\)"):
        plan.check("augment", gpu_actors, gpu_nodes)


def test_alive_nodes_count_against_their_type_whatever_memory_they_report():
    """A node type may state memory (KubeRay does); an alive node reports what it measured: the
    match is on CPU, GPU and custom resources, so the type's count of nodes still to add is right."""
    node = {"CPU": 8.0, "GPU": 1.0, "gen_gpu": 1.0, "memory": 30.5e9, "object_store_memory": 9e9}
    kind = {"CPU": 8.0, "GPU": 1.0, "gen_gpu": 1.0, "memory": 32e9}
    assert plan._can_add([node], [(kind, 2)]) == [(kind, 1)]


def test_placeable_fills_nodes_and_keeps_the_reserve_where_it_costs_least():
    unit = {"CPU": 0.75}
    assert plan._placeable(unit, [({"CPU": 2.0}, 2)]) == 4
    assert plan._placeable(unit, [({"CPU": 2.0}, 2)], reserve=1.0) == 3
    assert plan._placeable(unit, [({"CPU": 0.5}, 1)], reserve=1.0) == 0  # no node can keep the reserve
    assert plan._placeable(unit, [({"CPU": 2.0}, 1), ({"CPU": 1.0}, 1)], reserve=1.0) == 2  # the 1-CPU node keeps it
    assert plan._placeable(unit, [({"CPU": 8.0}, None)], reserve=1.0) == float("inf")
    assert plan._placeable({}, [({"CPU": 1.0}, 1)], reserve=1.0) == float("inf")


def test_the_autoscalers_node_types_count_less_the_nodes_already_up():
    head, cpu, gen = {"CPU": 0.0}, {"CPU": 16.0}, {"CPU": 8.0, "GPU": 1.0, "gen_gpu": 1.0}
    alive = [dict(head), {"CPU": 8.0, "GPU": 1.0, "gen_gpu": 1.0, "memory": 3e10}]
    assert plan._can_add(alive, [(head, 1), (cpu, 8), (gen, 8)]) == [(cpu, 8), (gen, 7)]
    assert plan._can_add(alive, [(gen, None)]) == [(gen, None)]  # no limit stays no limit
    assert plan._can_add([dict(gen)] * 3, [(gen, 2)]) == []  # nodes beyond max_workers: none to add


def test_capacity_reads_the_alive_nodes_and_the_autoscaler_config(monkeypatch):
    import ray
    from ray._private.state import state
    from ray.core.generated import autoscaler_pb2

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # the nodes below stand for a connected cluster
    monkeypatch.setattr(ray, "nodes", lambda: [
        {"Alive": True, "Resources": {"CPU": 0.0, "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0}},
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "gen_gpu": 1.0, "node:10.0.0.2": 1.0}},
        {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0, "gen_gpu": 1.0, "node:10.0.0.3": 1.0}},
    ])
    monkeypatch.setattr(state, "get_cluster_config", lambda: None)
    cap = plan.capacity()
    assert cap.nodes == [{"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0, "gen_gpu": 1.0}] and not cap.autoscaling
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 0}, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="gen-gpu", resources={"CPU": 8, "GPU": 1, "gen_gpu": 1}, max_count=8),
    ])
    monkeypatch.setattr(state, "get_cluster_config", lambda: config)
    cap = plan.capacity()
    assert cap.autoscaling and cap.can_add == [({"CPU": 8.0, "GPU": 1.0, "gen_gpu": 1.0}, 7)]
    actors = _actors(8, 4.0, gpus=1.0)
    assert plan.check("augment", actors, cap) == 8  # one GPU node now, seven more to come
    with pytest.raises(ConfigError, match=r"nodes now: 1 x \(CPU 8, GPU 1\), 1 x \(CPU 0, GPU 0\); "
                                          r"the autoscaler can add 7 x \(CPU 8, GPU 1\)"):
        plan.check("augment", plan.Demand("diffusion actors", 9, {"CPU": 4.0, "GPU": 1.0}, min_count=9,
                                          count_field="max_actors"), cap)


def test_a_stage_called_without_ray_init_starts_ray_as_ray_data_would(monkeypatch):
    """Every Ray stage plans first; ray.nodes() raises before Ray is up, so capacity() makes the
    ray.init() call that Ray Data's first read would make (Ray's defaults), once."""
    import ray
    from ray._private import auto_init_hook
    from ray._private.state import state

    calls = []

    def nodes():
        if not calls:
            raise RuntimeError("Ray has not been started yet")
        return [{"Alive": True, "Resources": {"CPU": 2.0, "node:10.0.0.1": 1.0}}]

    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", True)
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(ray, "nodes", nodes)
    monkeypatch.setattr(state, "get_cluster_config", lambda: None)
    assert plan.capacity().nodes == [{"CPU": 2.0}]
    assert calls == [((), {})]  # Ray's defaults: RAY_ADDRESS, a running local Ray, else a new one
    plan.capacity()
    assert len(calls) == 1  # connected: never again
    # RAY_ENABLE_AUTO_CONNECT=0 turns it off, as for Ray; also where Ray's private hook cannot be imported
    calls.clear()
    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", False)
    with pytest.raises(RuntimeError, match="not been started"):
        plan.capacity()
    monkeypatch.setenv("RAY_ENABLE_AUTO_CONNECT", "0")
    monkeypatch.setitem(__import__("sys").modules, "ray._private.auto_init_hook", None)  # import fails
    with pytest.raises(RuntimeError, match="not been started"):
        plan.capacity()
    assert calls == []


def test_capacity_of_the_session_cluster(ray_session):
    cap = plan.capacity()
    assert cap.nodes and cap.nodes[0]["CPU"] == 2.0 and not cap.autoscaling
    assert not any(k.startswith("node:") for k in cap.nodes[0])


def test_an_autoscaling_cluster_may_grow_into_the_plan(caplog):
    caplog.set_level(logging.INFO, logger="ray_dafusion")
    scaling = plan.ClusterCapacity(nodes=[{"CPU": 4.0}], can_add=[({"CPU": 8.0, "GPU": 1.0, "gen_gpu": 1.0}, 8)],
                                   autoscaling=True)
    assert plan.check("augment", _actors(8, 4.0, gpus=1.0), scaling) == 8
    assert "8 diffusion actors fit once the autoscaler adds nodes" in caplog.text
    assert plan.check("augment", _actors(9, 4.0, gpus=1.0), scaling) == 8  # the node type's max_workers
    with pytest.raises(ConfigError, match="no node can have that much"):
        plan.check("augment", _actors(1, 4.0, gpus=2.0), scaling)
    assert plan.node_pinning("gen_gpu", 1.0, scaling) == {"gen_gpu": 1.0}
    assert plan.node_pinning("gen_gpu", 0.0, scaling) == {"gen_gpu": plan.PIN_AMOUNT}
    assert plan.node_pinning("gen_gpu", 1.0, TWO_CPUS) == {}  # a laptop: no node types, run anywhere


def test_the_two_of_two_cpu_augment_runs_with_one_actor_instead_of_hanging(ray_session, make_real, tiny_model,
                                                                           tmp_path, caplog):
    from safetensors.torch import save_file
    import torch

    from ray_dafusion.augment import augment
    from ray_dafusion.config import AugmentConfig

    caplog.set_level(logging.INFO, logger="ray_dafusion")
    real = make_real(class_names=("cat", "dog"), per_split={"train": 2, "val": 1, "test": 1})
    emb = str(tmp_path / "t.safetensors")
    save_file({f"<{n}>": torch.randn(32) for n in ("cat", "dog")}, emb)
    cfg = AugmentConfig(real=real, output=str(tmp_path / "out"), embeddings=emb, model=tiny_model,
                        num_augmentations=1, num_inference_steps=2, resolution=32, strengths=[0.5], batch_size=2,
                        min_actors=2, max_actors=2, num_cpus=0.9)
    result = augment(cfg)
    assert result.synthetic_rows == 4
    assert "max_actors 2 -> 1" in caplog.text


def test_a_stalled_stage_says_why_and_can_fail_instead_of_waiting(ray_session, make_real, tiny_model, tmp_path,
                                                                  caplog):
    from safetensors.torch import save_file
    import torch

    from ray_dafusion.augment import augment
    from ray_dafusion.config import AugmentConfig

    caplog.set_level(logging.INFO, logger="ray_dafusion")
    real = make_real(class_names=("cat", "dog"), per_split={"train": 1, "val": 1, "test": 1})
    emb = str(tmp_path / "t.safetensors")
    save_file({f"<{n}>": torch.randn(32) for n in ("cat", "dog")}, emb)
    base = dict(real=real, embeddings=emb, model=tiny_model, num_augmentations=1, num_inference_steps=2,
                resolution=32, strengths=[0.5], batch_size=2)
    augment(AugmentConfig(**base, output=str(tmp_path / "slow"), stall_warning=2.0), _faults={"sleep_seconds": 12})
    assert "no batch finished for" in caplog.text and "cluster: CPU" in caplog.text
    assert "lower them or max_actors" in caplog.text and "set compute: tasks" in caplog.text
    with pytest.raises(StageError, match="stalled: no batch finished for"):
        augment(AugmentConfig(**base, output=str(tmp_path / "stuck"), stall_warning=1.0, stall_timeout=3.0),
                _faults={"sleep_seconds": 60})


def test_the_stall_summary_lists_tasks_only_from_this_clusters_own_dashboard(ray_session, monkeypatch):
    import types

    import ray
    import ray.util.state

    from ray_dafusion.watchdog import cluster_summary

    asked = []

    def listing(*args, address=None, **kwargs):
        asked.append(address)
        return [types.SimpleNamespace(name="foreign")]

    monkeypatch.setattr(ray.util.state, "list_tasks", listing)
    monkeypatch.setattr(ray.util.state, "list_actors", listing)
    # the session's Ray runs no dashboard: 127.0.0.1:8265 may be another cluster's, so nothing is asked
    summary = cluster_summary()
    assert asked == [] and summary.startswith("cluster: CPU") and "actors" not in summary
    monkeypatch.setattr(ray._private.worker.global_worker.node, "_webui_url", "10.1.2.3:8265")
    summary = cluster_summary()
    assert asked == ["http://10.1.2.3:8265"] * 3 and "1 actors alive" in summary and "(foreign)" in summary


def test_a_run_pruning_its_checkpoints_still_shows_progress(tmp_path, caplog):
    """With num_to_keep each new checkpoint replaces an old one: the folder count stays put while
    the run is healthy, so the watchdog polls the names."""
    import shutil
    import time

    from ray_dafusion.watchdog import Watchdog, checkpoint_probe

    for epoch in range(2):
        (tmp_path / f"checkpoint_{epoch:06d}").mkdir()
    probe = checkpoint_probe(str(tmp_path))
    with Watchdog("train", "epoch", 0.6, probe=probe, poll_seconds=0.05):
        for epoch in range(2, 8):  # an epoch every 0.2 s, each pruning the oldest
            time.sleep(0.2)
            (tmp_path / f"checkpoint_{epoch:06d}").mkdir()
            shutil.rmtree(tmp_path / f"checkpoint_{epoch - 2:06d}")
    assert "no epoch finished for" not in caplog.text
    with Watchdog("train", "epoch", 0.6, probe=probe, poll_seconds=0.05):  # the same probe, nothing new: a stall
        time.sleep(1.0)
    assert "no epoch finished for" in caplog.text
