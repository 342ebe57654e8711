"""One typed config per stage.

Each config is a dataclass whose fields carry a one-line docstring underneath; the docstrings
become the ``--help`` text. Configs load from YAML, take ``--field value`` overrides, and
validate on construction: a bad value raises :class:`ConfigError` naming the field and value.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

__all__ = [
    "ConfigError",
    "StageConfig",
    "IngestConfig",
    "InvertConfig",
    "EraseConfig",
    "AugmentConfig",
    "TrainConfig",
    "EvaluateConfig",
    "GalleryConfig",
    "PipelineConfig",
    "load_config",
    "field_help",
]


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field."""


def _bad(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config field '{name}': {why} (got {value!r})")


# --------------------------------------------------------------------------------------
# Base machinery
# --------------------------------------------------------------------------------------


@dataclass
class StageConfig:
    """Fields every stage shares."""

    endpoint_url: Optional[str] = None
    """S3-compatible endpoint for s3:// URIs (MinIO, a test server); default: AWS_ENDPOINT_URL or AWS."""
    overwrite: bool = False
    """Replace an output written with a different config instead of refusing."""

    def __post_init__(self) -> None:
        _coerce_fields(self)
        self.validate()

    def validate(self) -> None:
        """Check values; subclasses extend. Raise ConfigError naming the field."""

    def require(self, *names: str) -> None:
        """Raise ConfigError unless every named field is set (stages call this before work)."""
        for name in names:
            value = getattr(self, name)
            if value is None or value == "" or value == []:
                raise _bad(name, value, "is required for this stage")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "StageConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> "StageConfig":
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                f"known fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str) -> "StageConfig":
        return cls.from_dict(_read_yaml(path))

    @classmethod
    def from_args(
        cls, config_path: Optional[str], overrides: dict[str, str], base: Optional[dict[str, Any]] = None
    ) -> "StageConfig":
        """Build from `base` (a dict of defaults, e.g. the demo's), then an optional YAML file, then
        ``field -> raw string`` overrides; each later source wins, section by section."""
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in (base or {}).items()}
        for key, value in (_read_yaml(config_path) if config_path else {}).items():
            data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
        for key, raw in overrides.items():
            section, _, sub = key.partition(".")
            if sub:  # `--augment.num_augmentations 5` sets a field of a nested section
                hints = typing.get_type_hints(cls)
                sub_cls = _base_type(hints.get(section))
                if not (inspect.isclass(sub_cls) and issubclass(sub_cls, StageConfig)):
                    raise ConfigError(f"{cls.__name__}: '{section}' is not a config section")
                current = data.get(section) or {}
                if isinstance(current, StageConfig):
                    current = current.to_dict()
                data[section] = {**current, sub: _parse_override(sub_cls, sub, raw)}
            else:
                data[key] = _parse_override(cls, key, raw)
        return cls.from_dict(data)


def _read_yaml(path: str) -> dict[str, Any]:
    from . import storage  # config files may live on S3 too

    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def _parse_override(cls: type, key: str, raw: str) -> Any:
    hints = typing.get_type_hints(cls)
    if key not in hints:
        known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        raise ConfigError(f"{cls.__name__}: unknown field '{key}'; known fields: {known}")
    if _base_type(hints[key]) is str:
        return None if raw in ("null", "None") else raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    # `--strengths 0.25,0.5` is friendlier than YAML flow syntax on a command line.
    if _base_type(hints[key]) is list and isinstance(value, str):
        value = [yaml.safe_load(part) for part in value.split(",") if part.strip()]
    if _base_type(hints[key]) is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-5` (no dot) as a string; on a command line it means the number
            value = float(value)
        except ValueError:
            pass
    return value


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else tp
    return origin or tp


def _coerce_fields(cfg: StageConfig) -> None:
    """Check each field against its annotation; ints become floats where a float is meant."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        tp = hints[f.name]
        optional = type(None) in typing.get_args(tp)
        if value is None:
            if not optional:
                raise _bad(f.name, value, "may not be null")
            continue
        base = _base_type(tp)
        if inspect.isclass(base) and issubclass(base, StageConfig):
            if isinstance(value, dict):
                setattr(cfg, f.name, base.from_dict(value))
            elif not isinstance(value, base):
                raise _bad(f.name, value, f"must be a mapping of {base.__name__} fields")
            continue
        setattr(cfg, f.name, _coerce(f.name, value, tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    base = _base_type(tp)
    if base is bool:
        if isinstance(value, bool):
            return value
        raise _bad(name, value, "must be true or false")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, value, "must be an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(name, value, "must be a number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise _bad(name, value, "must be a string")
        return value
    if base is list:
        if not isinstance(value, (list, tuple)):
            raise _bad(name, value, "must be a list")
        (item_tp,) = typing.get_args(_strip_optional(tp)) or (Any,)
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if base is dict:
        if not isinstance(value, dict):
            raise _bad(name, value, "must be a mapping")
        return dict(value)
    return value


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _one_of(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise _bad(name, value, f"must be one of {', '.join(choices)}")


def _positive(cfg: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            raise _bad(name, value, "must be >= 0" if allow_zero else "must be > 0")


def field_help(cls: type) -> dict[str, str]:
    """Map each field of a config class to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (dataclasses.is_dataclass(klass) and klass is not object):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# --------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------

FORMATS = ("folder", "voc", "coco")


@dataclass
class IngestConfig(StageConfig):
    """Turn labelled images into real/{train,val,test} parquet shards."""

    source: str = ""
    """Input: an image folder root/<class>/*, a VOC root (Annotations/, JPEGImages/), or a COCO instances JSON."""
    format: str = "folder"
    """Layout of `source`: folder | voc | coco."""
    output: str = ""
    """Output URI; gets train/, val/, test/, errors/ and manifest.json."""
    examples_per_class: int = 4
    """Train images per class, taken as a prefix of a seeded permutation (smaller sets nest in larger)."""
    val_per_class: Optional[int] = None
    """Validation images per class; default: half of what remains after train."""
    test_per_class: Optional[int] = None
    """Test images per class; default: the other half of what remains after train."""
    seed: int = 0
    """Seed of the per-class permutation that picks the splits."""
    images_dir: Optional[str] = None
    """COCO only: directory of the images (default: the JSON's directory)."""
    allow_fewer: bool = False
    """Keep a class that has fewer than examples_per_class usable images (all go to train) instead of refusing."""
    classes: Optional[list[str]] = None
    """Keep only these class names (default: every class found)."""
    max_image_size: Optional[int] = None
    """Downscale images whose longer side exceeds this many pixels (default: keep the size)."""
    rows_per_file: int = 512
    """Largest number of images in one parquet shard."""

    def validate(self) -> None:
        _one_of(self, "format", FORMATS)
        _positive(self, "examples_per_class", "rows_per_file", "max_image_size")
        _positive(self, "val_per_class", "test_per_class", allow_zero=True)


@dataclass
class InvertConfig(StageConfig):
    """Textual inversion: learn one token per class from its real train images."""

    real: str = ""
    """URI of the ingest output (its train/ split is used)."""
    model: str = "tiny"
    """Diffusion model: local dir, s3:// prefix, hub id, `tiny` or `sd15-shape`."""
    output: str = ""
    """Output URI: tokens.safetensors, per-class files and manifest.json."""
    steps: int = 1000
    """Optimisation steps per class."""
    learning_rate: float = 5e-4
    """Base learning rate (AdamW), scaled by batch x grad-accum x processes when scale_lr."""
    scale_lr: bool = True
    """Multiply the learning rate by batch_size x gradient_accumulation_steps x processes."""
    batch_size: int = 4
    """Images per optimisation step."""
    gradient_accumulation_steps: int = 1
    """Steps whose gradients are summed before an update."""
    resolution: int = 512
    """Training resolution (images are squashed to it, bicubic)."""
    num_vectors: int = 1
    """Embedding vectors per token."""
    initializer_token: str = "the"
    """Word whose embedding initialises each new token (must be one token)."""
    seed: int = 0
    """Seed for noise, timesteps, templates and flips."""
    classes: Optional[list[str]] = None
    """Learn only these classes (default: all)."""
    num_cpus: float = 1.0
    """CPUs reserved by each per-class Ray task."""
    num_gpus: float = 0.0
    """GPUs reserved by each per-class Ray task (fp16 mixed precision when > 0)."""
    cache_dir: Optional[str] = None
    """Local model cache (default: ~/.cache/ray_dafusion)."""

    def validate(self) -> None:
        _positive(self, "steps", "learning_rate", "batch_size", "gradient_accumulation_steps",
                  "resolution", "num_vectors")
        _positive(self, "num_cpus", "num_gpus", allow_zero=True)


ERASE_METHODS = ("full", "xattn")


@dataclass
class EraseConfig(StageConfig):
    """ESD concept erasure: one UNet edit per class name."""

    real: str = ""
    """URI of the ingest output (for the class table)."""
    model: str = "tiny"
    """Diffusion model: local dir, s3:// prefix, hub id, `tiny` or `sd15-shape`."""
    output: str = ""
    """Output URI: one safetensors file per class and manifest.json."""
    method: str = "xattn"
    """full: every UNet parameter (the paper); xattn: cross-attention key/value only, saved as deltas."""
    iterations: int = 1000
    """Optimisation steps per class."""
    learning_rate: float = 1e-5
    """Adam learning rate."""
    negative_guidance: float = 1.0
    """eta: the target is e0 - eta * (e_c - e0)."""
    start_guidance: float = 3.0
    """Guidance used to sample the partially denoised latent x_t."""
    num_inference_steps: int = 50
    """DDIM steps of the schedule x_t is drawn on."""
    resolution: int = 512
    """Latent size is resolution / 8."""
    seed: int = 0
    """Seed for x_t sampling and timesteps."""
    classes: Optional[list[str]] = None
    """Erase only these classes (default: all)."""
    num_cpus: float = 1.0
    """CPUs reserved by each per-class Ray task."""
    num_gpus: float = 0.0
    """GPUs reserved by each per-class Ray task."""
    cache_dir: Optional[str] = None
    """Local model cache (default: ~/.cache/ray_dafusion)."""

    def validate(self) -> None:
        _one_of(self, "method", ERASE_METHODS)
        _positive(self, "iterations", "learning_rate", "num_inference_steps", "resolution")
        _positive(self, "negative_guidance", "start_guidance", "num_cpus", "num_gpus", allow_zero=True)


AUGMENT_MODES = ("da_fusion", "real_guidance")
RESIZE_MODES = ("squash", "keep_aspect")


@dataclass
class AugmentConfig(StageConfig):
    """Generate M img2img augmentations per real train image with a Ray Data actor pool."""

    real: str = ""
    """URI of the ingest output (its train/ split is augmented)."""
    model: str = "tiny"
    """Diffusion model: local dir, s3:// prefix, hub id, `tiny` or `sd15-shape`."""
    embeddings: Optional[str] = None
    """tokens.safetensors from `invert` (a file or the invert output dir); required for da_fusion."""
    erasure: Optional[str] = None
    """Output dir of `erase` (optional): each class's rows use that class's erased UNet."""
    output: str = ""
    """Output URI: synthetic parquet files, errors/ and manifest.json."""
    mode: str = "da_fusion"
    """da_fusion: prompts use learned tokens; real_guidance: the baseline that uses class words."""
    num_augmentations: int = 10
    """M: synthetic images per real image."""
    strengths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """t0 levels, one drawn per image; [0.5] is the paper's k=1 (real_guidance runs it in place of this default)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale."""
    num_inference_steps: int = 50
    """Scheduler steps for t0=1 (a t0 image runs about t0 x steps)."""
    prompt_templates: list[str] = field(default_factory=lambda: ["a photo of a {}"])
    """Prompt templates; {} becomes the class token (or the class name in real_guidance)."""
    resolution: int = 512
    """Side of the square the model sees; results are resized back to the source size."""
    resize: str = "squash"
    """squash (the paper) or keep_aspect (pad to square, crop back)."""
    seed: int = 0
    """Run seed; each image's seed derives from (seed, source id, augmentation index)."""
    batch_size: int = 4
    """Real rows per actor call (and per output file: batch_size x M images)."""
    max_images_per_call: int = 16
    """Largest number of images one pipeline call denoises at once."""
    min_actors: int = 1
    """Smallest size of the diffusion actor pool."""
    max_actors: int = 1
    """Largest size of the diffusion actor pool."""
    num_gpus: float = 0.0
    """GPUs per actor (1 on a GPU node: fp16)."""
    num_cpus: float = 0.5
    """CPUs per actor; keep below a node's CPUs so Ray Data's read tasks can run."""
    max_restarts: int = 3
    """Times Ray restarts a crashed actor (its batch is retried)."""
    cache_dir: Optional[str] = None
    """Local model cache (default: ~/.cache/ray_dafusion)."""

    def effective(self) -> "AugmentConfig":
        """The config as run: mode real_guidance with the default `strengths` uses t0 = 0.5."""
        if self.mode == "real_guidance" and self.strengths == AugmentConfig().strengths:
            return self.replace(strengths=[0.5])
        return self

    def validate(self) -> None:
        _one_of(self, "mode", AUGMENT_MODES)
        _one_of(self, "resize", RESIZE_MODES)
        _positive(self, "num_augmentations", "num_inference_steps", "resolution", "batch_size",
                  "max_images_per_call", "min_actors", "max_actors")
        _positive(self, "guidance_scale", "num_gpus", "num_cpus", "max_restarts", allow_zero=True)
        if not self.strengths:
            raise _bad("strengths", self.strengths, "needs at least one t0 level")
        for s in self.strengths:
            if not 0.0 < s <= 1.0:
                raise _bad("strengths", self.strengths, "every t0 must lie in (0, 1]")
        if self.min_actors > self.max_actors:
            raise _bad("min_actors", self.min_actors, f"must not exceed max_actors ({self.max_actors})")
        for t in self.prompt_templates:
            if t.count("{}") != 1:
                raise _bad("prompt_templates", t, "each template needs exactly one {}")


TRAIN_METHODS = ("baseline", "standard", "real_guidance", "da_fusion")
ARCHS = ("resnet50", "resnet18", "resnet34")
BACKBONES = ("linear_probe", "finetune")


@dataclass
class TrainConfig(StageConfig):
    """Ray Train classifier on alpha-mixed real/synthetic batches."""

    real: str = ""
    """URI of the ingest output (train/ and val/ splits)."""
    synthetic: Optional[str] = None
    """URI of an augment output; required when alpha > 0."""
    output: str = ""
    """Storage for checkpoints and metrics (a URI; s3:// works)."""
    name: Optional[str] = None
    """Run name under `output`; re-using it resumes from the last checkpoint (default: the method)."""
    method: str = "da_fusion"
    """baseline (alpha 0) | standard (alpha 0 + RandAugment) | real_guidance | da_fusion."""
    alpha: float = 0.5
    """Probability that a real example is replaced by one of its synthetic images."""
    arch: str = "resnet50"
    """torchvision ResNet depth."""
    backbone: str = "linear_probe"
    """linear_probe: frozen backbone (the paper); finetune: train everything."""
    weights: str = "none"
    """none | imagenet | a state-dict file (local or s3://)."""
    image_size: int = 256
    """Side of the square training input."""
    rotation: float = 15.0
    """Random rotation range in degrees."""
    num_workers: int = 1
    """Ray Train workers (DDP)."""
    use_gpu: bool = False
    """Train on GPUs (AMP)."""
    cpus_per_worker: float = 0.5
    """CPUs per training worker; leave some for Ray Data."""
    epochs: int = 10
    """Passes over the real train set."""
    batch_size: int = 32
    """Global batch size (split across workers)."""
    learning_rate: float = 1e-4
    """Adam learning rate."""
    seed: int = 0
    """Seeds mixing choices, model init and augmentation."""
    max_failures: int = 2
    """Worker failures Ray Train survives by restarting from the last checkpoint."""
    hflip: bool = True
    """Random horizontal flips in the train transform (RandAugment is added by method standard)."""
    num_to_keep: int = 2
    """Checkpoints kept besides the latest (the best on val_mean_class_acc are kept)."""
    steps_per_epoch: Optional[int] = None
    """Cap on optimiser steps per epoch (default: one full pass; a cap breaks exactness, for benchmarks)."""
    prefetch_batches: int = 2
    """Batches each worker reads and decodes ahead of the one being trained on."""
    shuffle_buffer: int = 512
    """Rows in each worker's local shuffle buffer (seeded by seed and epoch)."""
    debug_dir: Optional[str] = None
    """Testing aid: each worker writes its pid and the rows it trained on per epoch here."""

    def validate(self) -> None:
        _positive(self, "num_to_keep", "prefetch_batches", "shuffle_buffer", "steps_per_epoch")
        _one_of(self, "method", TRAIN_METHODS)
        _one_of(self, "arch", ARCHS)
        _one_of(self, "backbone", BACKBONES)
        _positive(self, "image_size", "num_workers", "epochs", "batch_size", "learning_rate", "cpus_per_worker")
        _positive(self, "rotation", "max_failures", allow_zero=True)
        if not 0.0 <= self.alpha <= 1.0:
            raise _bad("alpha", self.alpha, "must lie in [0, 1]")


@dataclass
class EvaluateConfig(StageConfig):
    """Score trained runs on the test split and write tables and plots."""

    real: str = ""
    """URI of the ingest output (test/ split)."""
    runs: list[str] = field(default_factory=list)
    """Train output run URIs (each holding checkpoints and train_result.json)."""
    output: str = ""
    """Where results.json, results.md and plots go."""
    split: str = "test"
    """Split to report on (the checkpoint is chosen on val)."""
    batch_size: int = 64
    """Evaluation batch size."""
    num_cpus: float = 0.5
    """CPUs per scoring actor (fractional leaves room for Ray Data's readers)."""
    num_gpus: float = 0.0
    """GPUs per scoring actor."""

    def validate(self) -> None:
        _positive(self, "num_cpus", "num_gpus", allow_zero=True)
        _one_of(self, "split", ("val", "test"))
        _positive(self, "batch_size")


@dataclass
class GalleryConfig(StageConfig):
    """Contact sheet: each real image beside its augmentations, captioned with t0."""

    synthetic: str = ""
    """URI of an augment output."""
    real: Optional[str] = None
    """URI of the ingest output (default: the one recorded in the synthetic manifest)."""
    output: Optional[str] = None
    """PNG file URI (default: <synthetic>/gallery.png)."""
    max_sources: int = 8
    """Real images shown (one row each)."""
    thumb_size: int = 96
    """Thumbnail side in pixels."""

    def validate(self) -> None:
        _positive(self, "max_sources", "thumb_size")


@dataclass
class PipelineConfig(StageConfig):
    """Every stage in order under one workdir; each skips outputs that are complete."""

    workdir: str = "./runs/demo"
    """URI under which each stage's default input and output lives."""
    run_erase: bool = False
    """Run concept erasure before augmenting (model-centric leakage prevention)."""
    methods: list[str] = field(default_factory=lambda: ["baseline", "da_fusion"])
    """Training methods to run and compare."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    """Ingest section; output defaults to <workdir>/real."""
    invert: InvertConfig = field(default_factory=InvertConfig)
    """Invert section; output defaults to <workdir>/tokens."""
    erase: EraseConfig = field(default_factory=EraseConfig)
    """Erase section (used when run_erase); output defaults to <workdir>/erasure."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augment section; output defaults to <workdir>/synthetic/<mode>."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Train section, shared by every method; output defaults to <workdir>/train."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluate section; output defaults to <workdir>/results."""

    def validate(self) -> None:
        for m in self.methods:
            if m not in TRAIN_METHODS:
                raise _bad("methods", self.methods, f"each must be one of {', '.join(TRAIN_METHODS)}")


CONFIGS: dict[str, type[StageConfig]] = {
    "ingest": IngestConfig,
    "invert": InvertConfig,
    "erase": EraseConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "gallery": GalleryConfig,
    "pipeline": PipelineConfig,
}


def load_config(stage: str, path: Optional[str] = None, **overrides: Any) -> StageConfig:
    """Load the config of `stage` from YAML (optional) with Python-valued overrides."""
    if stage not in CONFIGS:
        raise ConfigError(f"unknown stage '{stage}'; stages: {', '.join(CONFIGS)}")
    data = _read_yaml(path) if path else {}
    data.update(overrides)
    return CONFIGS[stage].from_dict(data)


def config_reference() -> str:
    """docs/configuration.md, generated from the config classes (a test keeps the file in step)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `ray_dafusion/config.py`; do not edit by hand. Regenerate with",
        "`python -c 'from ray_dafusion.config import config_reference as r; print(r(), end=\"\")' > docs/configuration.md`.",
        "",
        "Every field can be set in a YAML file (`--config FILE.yaml`) and overridden on the command line",
        "(`--field value`; lists as `--strengths 0.25,0.5` or `--strengths '[0.25, 0.5]'`). The pipeline",
        "takes one section per stage (`--augment.num_augmentations 5`).",
    ]
    hints_cache: dict[type, Any] = {}
    for stage, cls in CONFIGS.items():
        docs = field_help(cls)
        hints = hints_cache.setdefault(cls, typing.get_type_hints(cls))
        lines += ["", f"## `{stage}`: {cls.__name__}", "", (cls.__doc__ or "").strip(), "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if isinstance(default, StageConfig):
                shown = f"see `{type(default).__name__}`"
            else:
                shown = "`" + yaml.safe_dump(default, default_flow_style=True, width=10_000).strip().removesuffix("...").strip() + "`"
            tp = str(hints[f.name]).replace("typing.", "").replace("ray_dafusion.config.", "")
            tp = getattr(hints[f.name], "__name__", tp) if not typing.get_args(hints[f.name]) else tp
            lines.append(f"| `{f.name}` | `{tp}` | {shown} | {docs.get(f.name, '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"
