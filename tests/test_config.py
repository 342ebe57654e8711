"""Configs: typed, validated with named errors, loadable from YAML, overridable from the CLI."""

import glob
import os
import subprocess
import sys

import pytest
import yaml

from ray_dafusion import config as C
from ray_dafusion import configlib as L
from ray_dafusion.cli import build_parser, parse_args
from ray_dafusion.pipeline import DEMO_CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_match_the_method():
    a = C.AugmentConfig()
    assert (a.num_augmentations, a.t0_levels(), a.guidance_scale, a.num_inference_steps) == (10, [0.25, 0.5, 0.75, 1.0], 7.5, 50)
    assert a.prompt_templates == ["a photo of a {}"] and a.mode == "da_fusion"
    i = C.InvertConfig()
    assert (i.steps, i.batch_size, i.learning_rate, i.initializer_token, i.num_vectors) == (1000, 4, 5e-4, "the", 1)
    e = C.EraseConfig()
    assert (e.iterations, e.learning_rate, e.negative_guidance, e.start_guidance) == (1000, 1e-5, 1.0, 3.0)
    t = C.TrainConfig()
    assert (t.alpha, t.arch, t.backbone, t.batch_size, t.learning_rate, t.image_size, t.rotation) == (
        0.5, "resnet50", "linear_probe", 32, 1e-4, 256, 15.0)


@pytest.mark.parametrize("cls, field, value, words", [
    (C.AugmentConfig, "strengths", [0.5, 1.5], "t0 must lie in (0, 1]"),
    (C.AugmentConfig, "strengths", [], "at least one"),
    (C.AugmentConfig, "mode", "magic", "one of da_fusion, real_guidance"),
    (C.AugmentConfig, "num_augmentations", 0, "must be > 0"),
    (C.AugmentConfig, "num_augmentations", "ten", "must be an integer"),
    (C.AugmentConfig, "prompt_templates", ["a photo"], "exactly one {}"),
    (C.TrainConfig, "alpha", 1.5, "[0, 1]"),
    (C.TrainConfig, "arch", "vgg", "one of resnet50"),
    (C.IngestConfig, "format", "csv", "one of folder, voc, coco"),
    (C.EraseConfig, "method", "half", "one of full, xattn"),
    (C.IngestConfig, "allow_fewer", "yes", "true or false"),
    (C.TrainConfig, "learning_rate", float("inf"), "must be a finite number"),
    (C.TrainConfig, "learning_rate", float("nan"), "must be a finite number"),
    (C.IngestConfig, "seed", -1, "must be >= 0"),  # numpy refuses it, but only once a stage draws
    (C.IngestConfig, "split_seed", -3, "must be >= 0"),
    (C.TrainConfig, "seed", -1, "must be >= 0"),
    (C.SweepConfig, "seeds", [0, -1], "every seed must be >= 0"),
    (C.SweepConfig, "methods", [], "needs at least one of baseline"),
    (C.PipelineConfig, "methods", [], "needs at least one of baseline"),
    (C.PipelineConfig, "real_guidance_strengths", [1.5], "t0 levels in (0, 1]"),
    (C.TrainConfig, "synthetic_filter", "classifier.p_label >=", "is not a filter"),
    (C.TrainConfig, "synthetic_filter", "__import__('os')", "is not allowed in a filter"),
])
def test_bad_values_name_the_field_and_value(cls, field, value, words):
    with pytest.raises(C.ConfigError) as err:
        cls(**{field: value})
    shown = [repr(value)] + ([repr(v) for v in value] if isinstance(value, list) else [])
    assert f"'{field}'" in str(err.value) and any(s in str(err.value) for s in shown)
    assert words in str(err.value)


def test_fused_qkv_is_refused_with_erasure():
    with pytest.raises(C.ConfigError, match="'fuse_qkv'.*cannot be used with erasure"):
        C.AugmentConfig(fuse_qkv=True, erasure="erasure/weights")
    assert C.AugmentConfig(fuse_qkv=True).fuse_qkv


def test_yaml_that_reads_surprisingly_is_taken_as_meant_or_refused(tmp_path):
    def yaml_file(text):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        return str(path)

    # YAML 1.1 reads 1e-5 (no dot) as a string: in a file and in a list, a float field takes the number
    assert C.EraseConfig.from_args(yaml_file("learning_rate: 1e-5\n"), {}).learning_rate == 1e-5
    assert C.AugmentConfig.from_args(None, {"strengths": "1e-1,0.5"}).strengths == [0.1, 0.5]
    with pytest.raises(C.ConfigError, match="'learning_rate': must be a number"):
        C.EraseConfig.from_args(yaml_file("learning_rate: fast\n"), {})
    # a key given twice: refused, not the last silently kept
    with pytest.raises(C.ConfigError, match="not valid YAML: the key 'augment' appears twice"):
        C.SweepConfig.from_args(yaml_file("augment:\n  num_augmentations: 3\naugment:\n  seed: 2\n"), {})
    # keys YAML reads as booleans or numbers, and a section that is not a mapping: ConfigErrors, not tracebacks
    with pytest.raises(C.ConfigError, match="unknown field.*True .a key YAML reads as true/false"):
        C.TrainConfig.from_args(yaml_file("on: true\n"), {})
    with pytest.raises(C.ConfigError, match="'augment': must be a mapping of AugmentConfig fields"):
        C.SweepConfig.from_args(yaml_file("augment: 5\n"), {"augment.seed": "1"})


def test_stall_times_are_positive_or_null():
    for field in ("stall_warning", "stall_timeout"):
        for value in ("0", "-5"):
            with pytest.raises(C.ConfigError, match=f"'{field}': must be > 0"):
                C.TrainConfig.from_args(None, {field: value})
        assert getattr(C.TrainConfig.from_args(None, {field: "null"}), field) is None


def test_a_pipeline_trains_each_method_once_and_puts_each_synthetic_set_apart():
    with pytest.raises(C.ConfigError, match="'methods': names baseline more than once"):
        C.PipelineConfig.from_args(None, {"methods": "baseline,da_fusion,baseline"})
    with pytest.raises(C.ConfigError, match="'augment.output': would hold the synthetic sets of da_fusion and "
                                            "real_guidance at once"):
        C.PipelineConfig.from_args(None, {"methods": "real_guidance,da_fusion", "augment.output": "/tmp/syn"})
    one = C.PipelineConfig.from_args(None, {"methods": "baseline,da_fusion", "augment.output": "/tmp/syn"})
    assert one.augment.output == "/tmp/syn"


def test_the_batch_splits_evenly_across_train_workers():
    with pytest.raises(C.ConfigError, match="'batch_size': must be a multiple of num_workers .3."):
        C.TrainConfig.from_args(None, {"batch_size": "32", "num_workers": "3"})
    assert C.TrainConfig.from_args(None, {"batch_size": "30", "num_workers": "3"}).batch_size == 30
    assert C.TrainConfig.from_args(None, {"batch_size": "7", "num_workers": "0"}).batch_size == 7


def test_the_sections_that_make_tokens_name_augments_model():
    with pytest.raises(C.ConfigError, match="'invert.model': differs from augment.model 'tiny'.*got 'digits'"):
        C.PipelineConfig.from_dict({"invert": {"model": "digits"}})
    with pytest.raises(C.ConfigError, match="'erase.model': differs from augment.model 'digits'"):
        C.PipelineConfig.from_dict({"run_erase": True, **{s: {"model": "digits"} for s in ("invert", "augment")}})
    with pytest.raises(C.ConfigError, match="'invert.model': differs from augment.model 'digits'"):
        C.SweepConfig.from_dict({"source": "x", "augment": {"model": "digits"}})
    # one place written two ways is one model
    home = os.path.expanduser("~")
    assert C.PipelineConfig.from_dict({"invert": {"model": "~/models/sd/"}, "augment": {"model": f"{home}/models/sd"}})
    # only where a method uses tokens, and erase only when it runs
    assert C.PipelineConfig.from_dict({"invert": {"model": "digits"}, "methods": ["baseline", "standard"]})
    assert C.PipelineConfig.from_dict({"erase": {"model": "digits"}}).erase.model == "digits"
    assert C.SweepConfig.from_dict({"source": "x", "augment": {"model": "digits"}, "methods": ["baseline"]})


def test_a_bad_value_in_a_section_names_the_section(tmp_path):
    with pytest.raises(C.ConfigError, match=r"config field 'augment.batch_size': must be > 0 \(got 0\)"):
        C.SweepConfig.from_args(None, {"source": "x", "augment.batch_size": "0"})
    with pytest.raises(C.ConfigError, match="config field 'train.synthetic_filter': would filter every method"):
        C.SweepConfig.from_args(None, {"source": "x", "train.synthetic_filter": "classifier.p_label >= 0.5"})
    assert C.TrainConfig(synthetic_filter="classifier.p_label >= 0.5").synthetic_filter  # a good one passes
    # a config path that is a directory, or not text: one ConfigError naming it (exit code 2 from the CLI)
    with pytest.raises(C.ConfigError, match=f"config file {tmp_path} cannot be read"):
        C.TrainConfig.from_args(str(tmp_path), {})
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(C.ConfigError, match="is not UTF-8 text"):
        C.TrainConfig.from_args(str(tmp_path / "binary.yaml"), {})


def test_unknown_fields_and_required_fields():
    with pytest.raises(C.ConfigError, match="unknown field.*num_augs"):
        C.AugmentConfig.from_dict({"num_augs": 3})
    with pytest.raises(C.ConfigError, match="'output': is required"):
        C.IngestConfig(source="x").require("source", "output")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("num_augmentations: 3\nstrengths: [0.5]\nreal: /data/real\n")
    cfg = C.AugmentConfig.from_args(str(path), {"num_augmentations": "5", "strengths": "0.25,0.75", "model": "tiny"})
    assert cfg.num_augmentations == 5 and cfg.strengths == [0.25, 0.75] and cfg.real == "/data/real"
    assert isinstance(cfg.strengths[0], float)
    with pytest.raises(C.ConfigError, match="not found"):
        C.AugmentConfig.from_args(str(tmp_path / "missing.yaml"), {})
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(C.ConfigError, match="must hold a mapping"):
        C.AugmentConfig.from_args(str(tmp_path / "bad.yaml"), {})


def test_pipeline_sections_nest(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("workdir: /w\naugment:\n  num_augmentations: 2\ntrain:\n  epochs: 1\n")
    cfg = C.PipelineConfig.from_args(str(path), {"augment.strengths": "[0.5]", "train.arch": "resnet18"})
    assert isinstance(cfg.augment, C.AugmentConfig)
    assert cfg.augment.num_augmentations == 2 and cfg.augment.strengths == [0.5]
    assert cfg.train.epochs == 1 and cfg.train.arch == "resnet18"
    with pytest.raises(C.ConfigError, match="config field 'train.alpha'"):
        C.PipelineConfig.from_dict({"train": {"alpha": 2}})


def test_every_field_has_help_and_every_stage_lists_it():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "stage")
    for stage, cls in C.CONFIGS.items():
        docs = C.field_help(cls)
        text = sub.choices[stage].format_help()
        for f in C.dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            section = L.base_type(C.typing.get_type_hints(cls)[f.name])
            if isinstance(section, type) and issubclass(section, C.StageConfig):  # nested: --augment.seed
                for g in C.dataclasses.fields(section):
                    for name in (stage, "demo") if stage == "pipeline" else (stage,):
                        assert f"--{f.name}.{g.name}" in sub.choices[name].format_help(), (name, f.name, g.name)
            else:
                assert f"--{f.name}" in text, f"`ray-dafusion {stage} --help` does not list {f.name}"
    help_text = sub.choices["augment"].format_help()
    assert "--num_augmentations" in help_text and "(default: 10)" in " ".join(help_text.split())
    # the demo's help shows the demo's defaults, the pipeline's the class defaults
    demo_help = " ".join(sub.choices["demo"].format_help().split())
    pipeline_help = " ".join(sub.choices["pipeline"].format_help().split())
    steps = DEMO_CONFIG["invert"]["steps"]
    entry = "--invert.steps INT Optimisation steps per class. (default: {})"
    assert entry.format(1000) in pipeline_help and entry.format(steps) in demo_help


def test_demo_options_override_the_embedded_default(tmp_path):
    stage, cfg = parse_args(["demo", "--train.epochs", "3", "--invert.steps", "1000"])
    assert stage == "demo"
    assert cfg.train.epochs == 3
    assert cfg.invert.steps == 1000  # equal to the class default: still an override of the demo's
    assert cfg.augment.num_augmentations == DEMO_CONFIG["augment"]["num_augmentations"]  # demo's, kept
    path = tmp_path / "d.yaml"
    path.write_text("augment:\n  num_augmentations: 3\n")
    _, cfg = parse_args(["demo", "--config", str(path)])
    assert cfg.augment.num_augmentations == 3 and cfg.invert.steps == DEMO_CONFIG["invert"]["steps"]
    assert cfg.workdir == DEMO_CONFIG["workdir"]


def test_cli_help_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "ray_dafusion.cli", "ingest", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--examples_per_class" in out and "--config" in out


def test_cli_reports_bad_values_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "ray_dafusion.cli", "augment", "--num_augmentations", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "'num_augmentations': must be > 0 (got 0)" in proc.stderr and "Traceback" not in proc.stderr


def _config_class_for(path: str):
    name = os.path.basename(path).split(".")[0]
    stage = name.split("_")[0].split("-")[0]
    return C.CONFIGS.get(stage, C.PipelineConfig)


def test_every_shipped_yaml_parses():
    files = sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml")))
    assert files, "jobs/configs/ holds no YAML"
    for path in files:
        cls = _config_class_for(path)
        cfg = cls.from_yaml(path)
        assert isinstance(cfg, cls), path
        with open(path) as f:
            assert set(yaml.safe_load(f) or {}) <= {x.name for x in C.dataclasses.fields(cls)}


def test_the_single_stage_configs_chain_under_one_workdir_with_one_model():
    """invert -> augment -> train (and erase) read each other's outputs under ./runs/x with one
    model; the demo's ./runs/demo holds digits-model outputs that these settings would refuse."""
    def load(stage):
        return C.load_config(stage, os.path.join(ROOT, "jobs", "configs", f"{stage}.yaml"))

    invert, augment, train, erase = (load(s) for s in ("invert", "augment", "train", "erase"))
    norm = os.path.normpath
    assert {norm(c.real) for c in (invert, augment, train, erase)} == {"runs/x/real"}
    assert norm(invert.output) == norm(augment.embeddings) and invert.model == augment.model == erase.model
    assert norm(augment.output) == norm(train.synthetic)


# ---- one identity rule -------------------------------------------------------------------------

RESOURCE_VALUES = {"num_cpus": 0.25, "num_gpus": 1.0, "cache_dir": "/tmp/elsewhere",
                   "endpoint_url": "http://127.0.0.1:1", "overwrite": True}


@pytest.mark.parametrize("stage", sorted(C.CONFIGS))
def test_resource_fields_never_change_what_an_output_is(stage):
    cls = C.CONFIGS[stage]
    base = cls()
    kinds = {f.name: L.field_kind(f) for f in C.dataclasses.fields(cls)}
    changed = {k: v for k, v in RESOURCE_VALUES.items() if k in kinds}
    assert {"endpoint_url", "overwrite"} <= set(changed)
    for name, value in changed.items():
        assert kinds[name] == "resource", (stage, name)
        assert L.config_fingerprint(base.replace(**{name: value})) == L.config_fingerprint(base), (stage, name)
    assert L.config_fingerprint(base.replace(**changed)) == L.config_fingerprint(base)


def test_output_fields_do_change_it_and_extent_fields_do_not():
    a = C.AugmentConfig()
    for change in ({"seed": 1}, {"num_augmentations": 3}, {"strengths": [0.5]}, {"model": "sd15-shape"}):
        assert L.config_fingerprint(a.replace(**change)) != L.config_fingerprint(a), change
    for change in ({"batch_size": 9}, {"max_actors": 4}, {"output": "/elsewhere"}):
        assert L.config_fingerprint(a.replace(**change)) == L.config_fingerprint(a), change
    t = C.TrainConfig()
    assert L.config_fingerprint(t.replace(epochs=50)) == L.config_fingerprint(t)  # more epochs continue a run
    assert L.field_kind(next(f for f in C.dataclasses.fields(t) if f.name == "epochs")) == "extent"
    assert L.config_fingerprint(t.replace(learning_rate=1e-3)) != L.config_fingerprint(t)
    i = C.InvertConfig()
    assert L.config_fingerprint(i.replace(classes=["cat"])) == L.config_fingerprint(i)  # a subset continues
    # the content of inputs enters through the stage's own fingerprints
    assert L.config_fingerprint(a, model="aaaa") != L.config_fingerprint(a, model="bbbb")


# ---- lists on the command line -------------------------------------------------------------------

def test_list_overrides_keep_strings_and_refuse_a_split_template():
    assert C.IngestConfig.from_args(None, {"classes": "no,1"}).classes == ["no", "1"]  # not [False, 1]
    assert C.IngestConfig.from_args(None, {"classes": "cat, dog"}).classes == ["cat", "dog"]
    assert C.AugmentConfig.from_args(None, {"strengths": "0.25,1"}).strengths == [0.25, 1.0]
    with pytest.raises(C.ConfigError, match="comma separates templates") as err:
        C.AugmentConfig.from_args(None, {"prompt_templates": "a photo of a {}, close up"})
    assert "'close up'" in str(err.value)
    one = C.AugmentConfig.from_args(None, {"prompt_templates": '["a photo of a {}, close up"]'})
    assert one.prompt_templates == ["a photo of a {}, close up"]
    two = C.AugmentConfig.from_args(None, {"prompt_templates": "a photo of a {},a drawing of a {}"})
    assert two.prompt_templates == ["a photo of a {}", "a drawing of a {}"]
    assert C.AugmentConfig.from_args(None, {"embeddings": "null"}).embeddings is None


def test_every_stage_is_registered_once():
    import ray_dafusion

    assert set(C.CONFIGS) | {"demo"} == set(C.STAGES)
    for stage in C.CONFIGS:
        assert callable(getattr(ray_dafusion, stage))
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(C.STAGES)
