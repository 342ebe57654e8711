"""Plans that cannot progress are fixed or refused up front; a stalled stage says why."""

from __future__ import annotations

import logging

import pytest

from ray_dafusion import plan
from ray_dafusion.errors import ConfigError, StageError

TWO_CPUS = plan.ClusterCapacity(now={"CPU": 2.0}, most={"CPU": 2.0}, autoscaling=False)


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
    with pytest.raises(ConfigError, match="1 GPU but the cluster has 0"):
        plan.check("augment", _actors(1, 0.5, gpus=1.0), TWO_CPUS)
    # tasks that queue (per-class) only need to fit one at a time
    tasks = plan.Demand("per-class task", 10, {"CPU": 1.0}, size_fields={"num_cpus": 1.0}, needs_data_tasks=False)
    assert plan.check("invert", tasks, TWO_CPUS) == 10


def test_an_autoscaling_cluster_may_grow_into_the_plan():
    scaling = plan.ClusterCapacity(now={"CPU": 4.0}, most={"CPU": 68.0, "GPU": 8.0, "gen_gpu": 8.0}, autoscaling=True)
    assert plan.check("augment", _actors(8, 4.0, gpus=1.0), scaling) == 8
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
