"""cluster.yaml: valid for Ray's own autoscaler schema and shaped as DESIGN.md says."""

import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_passes_rays_autoscaler_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load())  # merges Ray's AWS defaults, as `ray up` does
    validate_config(config)


def test_cluster_shape():
    config = _load()
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert types[head]["resources"] == {"CPU": 0}
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    workers = {k: v for k, v in types.items() if k != head}
    assert {"cpu-worker", "gen-gpu", "train-gpu"} <= set(workers)
    for name, spec in workers.items():
        assert spec["min_workers"] == 0, name
        assert "Arn" in spec["node_config"]["IamInstanceProfile"], f"{name} has no instance profile: no S3 access"
    assert types["gen-gpu"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types["train-gpu"]["node_config"]
    assert any("pip install" in c and "ray-dafusion" in c for c in config["setup_commands"])
    # the copy of the project on each node leaves out .venv, runs/ (.gitignore) and the git history
    assert config["file_mounts"] == {"/home/ray/ray-dafusion": "."}
    assert config["rsync_filter"] == [".gitignore"] and config["rsync_exclude"] == [".git"]
    # each node type carries a custom resource, and each stage's default node_resource asks for it
    from ray_dafusion import config as C

    assert types["gen-gpu"]["resources"] == {"gen_gpu": 1} and types["train-gpu"]["resources"] == {"train_gpu": 1}
    for cls in (C.AugmentConfig, C.InvertConfig, C.EraseConfig):
        assert cls().node_resource == "gen_gpu"
    for cls in (C.TrainConfig, C.EvaluateConfig):
        assert cls().node_resource == "train_gpu"


def test_validation_catches_a_broken_node_type():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load()
    config["available_node_types"]["gen-gpu"]["min_wrokers"] = 0  # a typo Ray must reject
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_kuberay_rayjob_manifest():
    with open(os.path.join(ROOT, "docs", "kuberay-rayjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    script = job["spec"]["entrypoint"].split()[1].replace("/app/", "")
    assert os.path.exists(os.path.join(ROOT, script))
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0" and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert all(g["minReplicas"] == 0 for g in spec["workerGroupSpecs"])
    # each worker group carries the custom resource of its cluster.yaml node type, as KubeRay's
    # autoscaler reads it (the quoted JSON string of rayStartParams.resources)
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    types = _load()["available_node_types"]
    groups = {g["groupName"]: _get_ray_resources_from_group_spec(g, False) for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(types) - {"head"}
    for name, resources in groups.items():
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
        assert custom == types[name]["resources"], name
