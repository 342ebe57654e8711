"""One typed config per stage.

Each config is a dataclass whose fields carry a one-line docstring underneath; the docstrings
become the ``--help`` text. Configs load from YAML, take ``--field value`` overrides, and
validate on construction: a bad value raises :class:`ConfigError` naming the field and value.
Each field's kind (``resource(...)``, ``extent(...)``, ``location(...)``, or by default
``output``) decides whether changing it makes a different output; see ``configlib.identity``.
The machinery lives in ``configlib.py``; this module holds only the configs.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .configlib import (
    ConfigError,
    StageConfig,
    bad,
    extent,
    field_default,
    field_help,
    field_kind,
    location,
    one_of,
    positive,
    read_yaml,
    resource,
)
from .modes import AUGMENT_MODES, SCORERS, SWEEP_VARIANTS, TRAIN_METHODS

ARCHS = ("resnet50", "resnet18", "resnet34", "small_cnn")
"""Classifier architectures: torchvision ResNets, or classifier.small_cnn for small images on a CPU."""

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
    "ScoreConfig",
    "ReportConfig",
    "PretrainConfig",
    "PipelineConfig",
    "SweepConfig",
    "STAGES",
    "CONFIGS",
    "load_config",
    "field_help",
    "config_reference",
    "callable_stage_module",
]


# --------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------

FORMATS = ("folder", "voc", "coco", "real")


@dataclass
class IngestConfig(StageConfig):
    """Turn labelled images into real/{train,val,test} parquet shards."""

    source: str = ""
    """Input: an image folder root/<class>/* (or root/{train,val,test}/<class>/* for given splits), a VOC root (Annotations/, JPEGImages/), a COCO instances JSON, or (format real) an ingest output made with examples_per_class null."""
    format: str = "folder"
    """Layout of `source`: folder | voc | coco | real (a k-shot subset of an earlier ingest's pool: rows copied, val/test kept)."""
    output: str = location("")
    """Output URI; gets train/, val/, test/, errors/ and manifest.json."""
    examples_per_class: Optional[int] = 4
    """Train images per class: the first k of a `seed`-permuted train pool, so smaller sets nest in larger (null: the whole pool, for format real to subset later)."""
    val_per_class: Optional[int] = None
    """Validation images per class, fixed by split_seed; default: a quarter of the class (half of a given holdout)."""
    test_per_class: Optional[int] = None
    """Test images per class, fixed by split_seed; default: a quarter of the class (the other half of a given holdout)."""
    split_seed: int = 0
    """Seed that draws val and test per class; they never depend on examples_per_class or seed."""
    seed: int = 0
    """Seed of the permutation of the train pool whose first examples_per_class images are train."""
    holdout_source: Optional[str] = None
    """COCO only: the official held-out instances JSON (e.g. instances_val2017.json); val and test are drawn from it."""
    holdout_images_dir: Optional[str] = None
    """COCO only: directory of the holdout's images (default: the holdout JSON's directory)."""
    images_dir: Optional[str] = None
    """COCO only: directory of the images (default: the JSON's directory)."""
    allow_fewer: bool = False
    """Keep a class that has fewer than examples_per_class usable images (all go to train) instead of refusing."""
    classes: Optional[list[str]] = None
    """Keep only these class names (default: every class found)."""
    max_image_size: Optional[int] = None
    """Downscale images whose longer side exceeds this many pixels (default: keep the size)."""
    rows_per_file: int = resource(512)
    """Largest number of images in one parquet shard."""

    def validate(self) -> None:
        one_of(self, "format", FORMATS)
        positive(self, "examples_per_class", "rows_per_file", "max_image_size")
        positive(self, "val_per_class", "test_per_class", allow_zero=True)


@dataclass
class InvertConfig(StageConfig):
    """Textual inversion: learn one token per class from its real train images."""

    real: str = ""
    """URI of the ingest output (its train/ split is used)."""
    model: str = "tiny"
    """Diffusion model: local dir, s3:// prefix, hub id, `tiny` or `sd15-shape`."""
    output: str = location("")
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
    hflip: bool = True
    """Random horizontal flips of the class's images (p 0.5, as the reference); off where a mirror image is another class (digits, text)."""
    seed: int = 0
    """Seed for noise, timesteps, templates and flips."""
    classes: Optional[list[str]] = extent(None)
    """Learn only these classes (default: all)."""
    classes_per_task: int = resource(1)
    """Classes learned together in one task, their batches side by side in each forward pass (each token still learns from its own class's loss only): fewer model loads and better use of a core for small models; 1 spreads classes over most workers."""
    num_cpus: float = resource(1.0)
    """CPUs reserved by each per-class Ray task."""
    num_gpus: float = resource(0.0)
    """GPUs reserved by each per-class Ray task (fp16 mixed precision when > 0)."""
    node_resource: Optional[str] = resource("gen_gpu")
    """Custom resource of the node type this stage's tasks should run on (cluster.yaml: gen_gpu, train_gpu); used only when the cluster defines it."""
    stall_warning: Optional[float] = resource(1800.0)
    """Seconds without a finished class (one class of textual inversion can take many minutes on a CPU) before the stage logs what it is waiting on (null: never)."""
    cache_dir: Optional[str] = resource(None)
    """Local model cache (default: ~/.cache/ray_dafusion)."""

    def validate(self) -> None:
        positive(self, "steps", "learning_rate", "batch_size", "gradient_accumulation_steps",
                  "resolution", "num_vectors", "classes_per_task")
        positive(self, "num_cpus", "num_gpus", allow_zero=True)


ERASE_METHODS = ("full", "xattn")


@dataclass
class EraseConfig(StageConfig):
    """ESD concept erasure: one UNet edit per class name."""

    real: str = ""
    """URI of the ingest output (for the class table)."""
    model: str = "tiny"
    """Diffusion model: local dir, s3:// prefix, hub id, `tiny` or `sd15-shape`."""
    output: str = location("")
    """Output URI: one safetensors file per class and manifest.json."""
    method: str = "full"
    """full: every UNet parameter (ESD as the reference runs it); xattn: every cross-attention (attn2) parameter (ESD-x), saved as deltas."""
    iterations: int = 1000
    """Optimisation steps per class."""
    learning_rate: float = 1e-5
    """Adam learning rate."""
    negative_guidance: float = 1.0
    """eta: the target is e0 - eta * (e_c - e0)."""
    start_guidance: float = 3.0
    """Guidance used to sample the partially denoised latent x_t (with the UNet being trained, as ESD does)."""
    num_inference_steps: int = 50
    """DDIM steps of the schedule x_t is drawn on."""
    resolution: int = 512
    """Latent size is resolution / 8."""
    seed: int = 0
    """Seed for x_t sampling and timesteps."""
    classes: Optional[list[str]] = extent(None)
    """Erase only these classes (default: all)."""
    num_cpus: float = resource(1.0)
    """CPUs reserved by each per-class Ray task."""
    num_gpus: float = resource(0.0)
    """GPUs reserved by each per-class Ray task."""
    node_resource: Optional[str] = resource("gen_gpu")
    """Custom resource of the node type this stage's tasks should run on (cluster.yaml: gen_gpu, train_gpu); used only when the cluster defines it."""
    stall_warning: Optional[float] = resource(3600.0)
    """Seconds without a finished class (one class of ESD can take an hour on a CPU) before the stage logs what it is waiting on (null: never)."""
    cache_dir: Optional[str] = resource(None)
    """Local model cache (default: ~/.cache/ray_dafusion)."""

    def validate(self) -> None:
        one_of(self, "method", ERASE_METHODS)
        positive(self, "iterations", "learning_rate", "num_inference_steps", "resolution")
        positive(self, "negative_guidance", "start_guidance", "num_cpus", "num_gpus", allow_zero=True)


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
    output: str = location("")
    """Output URI: synthetic parquet files, errors/ and manifest.json."""
    mode: str = "da_fusion"
    """da_fusion: prompts use learned tokens; real_guidance: the baseline that uses class words (see modes.py)."""
    num_augmentations: int = 10
    """M: synthetic images per real image."""
    strengths: Optional[list[float]] = None
    """t0 levels, one drawn per image; default: the mode's (da_fusion 0.25,0.5,0.75,1.0; real_guidance 0.5); [0.5] is the paper's k=1."""
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
    batch_size: int = resource(4)
    """Real rows per actor call (and per output file: batch_size x M images)."""
    max_images_per_call: int = resource(16)
    """Largest number of images one pipeline call denoises at once (a GPU wants 32: fuller calls run faster)."""
    pad_calls: bool = resource(False)
    """Pad every pipeline call to max_images_per_call images (the padding is discarded): one batch shape, so a compiled graph is reused; costs the padded images' work."""
    compile: bool = resource(False)
    """CUDA only: torch.compile the UNet and the VAE in place (a minute or two at actor start; same images up to float rounding)."""
    channels_last: bool = resource(True)
    """CUDA only: UNet and VAE convolutions in channels_last memory layout (same images up to float rounding)."""
    fuse_qkv: bool = resource(False)
    """Fuse each attention's query, key and value projections into one matmul in the UNet and the VAE (diffusers' fuse_qkv_projections): fewer, larger matrix products; the same images up to float rounding. Not with `erasure`, whose weights are per projection."""
    io_threads: int = resource(1)
    """Threads that resize results back, encode PNGs and build rows while the next pipeline call runs (0: inline)."""
    min_actors: int = resource(1)
    """Smallest size of the diffusion actor pool."""
    max_actors: int = resource(1)
    """Largest size of the diffusion actor pool."""
    num_gpus: float = resource(0.0)
    """GPUs per actor (1 on a GPU node: fp16)."""
    num_cpus: float = resource(0.5)
    """CPUs per actor; keep below a node's CPUs so Ray Data's read tasks can run."""
    node_resource: Optional[str] = resource("gen_gpu")
    """Custom resource of the node type this stage's actors should run on (cluster.yaml: gen_gpu, train_gpu); used only when the cluster defines it."""
    max_restarts: int = resource(3)
    """Times Ray restarts a crashed actor (its batch is retried)."""
    compute: str = resource("actors")
    """actors: a pool of actors, each loading the model once (GPU clusters); tasks: Ray tasks that keep the loaded model in their worker process for the next batch and the next job (small runs, many jobs in one session: a sweep)."""
    cache_dir: Optional[str] = resource(None)
    """Local model cache (default: ~/.cache/ray_dafusion)."""

    def t0_levels(self) -> list[float]:
        """The t0 levels this run draws from: `strengths`, or the mode's default when unset."""
        if self.strengths is not None:
            return list(self.strengths)
        return list(AUGMENT_MODES[self.mode].default_strengths)

    def validate(self) -> None:
        one_of(self, "mode", AUGMENT_MODES)
        one_of(self, "resize", RESIZE_MODES)
        one_of(self, "compute", ("actors", "tasks"))
        positive(self, "num_augmentations", "num_inference_steps", "resolution", "batch_size",
                  "max_images_per_call", "min_actors", "max_actors")
        positive(self, "guidance_scale", "num_gpus", "num_cpus", "max_restarts", "io_threads", allow_zero=True)
        if self.strengths is not None and not self.strengths:
            raise bad("strengths", self.strengths, "needs at least one t0 level")
        for s in self.strengths or ():
            if not 0.0 < s <= 1.0:
                raise bad("strengths", self.strengths, "every t0 must lie in (0, 1]")
        if self.min_actors > self.max_actors:
            raise bad("min_actors", self.min_actors, f"must not exceed max_actors ({self.max_actors})")
        if self.fuse_qkv and self.erasure:
            raise bad("fuse_qkv", self.fuse_qkv, "cannot be used with erasure: erasure weights replace the separate "
                      "query, key and value projections that fusing removes")
        for t in self.prompt_templates:
            if t.count("{}") != 1:
                raise bad("prompt_templates", t, "each template needs exactly one {} (on the command line a comma "
                          "separates templates; a template with a comma is written as YAML: "
                          "--prompt_templates '[\"a photo of a {}, close up\"]')")


BACKBONES = ("linear_probe", "finetune")


@dataclass
class TrainConfig(StageConfig):
    """Ray Train classifier on alpha-mixed real/synthetic batches."""

    real: str = ""
    """URI of the ingest output (train/ and val/ splits)."""
    synthetic: Optional[str] = None
    """URI of an augment output; required when alpha > 0."""
    output: str = location("")
    """Storage for checkpoints and metrics (a URI; s3:// works)."""
    name: Optional[str] = location(None)
    """Run name under `output`; re-using it resumes from the last checkpoint (default: the method)."""
    method: str = "da_fusion"
    """baseline (alpha 0) | standard (alpha 0 + RandAugment) | real_guidance | da_fusion (see modes.py)."""
    alpha: float = 0.5
    """Probability that a real example is replaced by one of its synthetic images."""
    arch: str = "resnet50"
    """resnet50 | resnet18 | resnet34 (torchvision), or small_cnn (~100k parameters, for small images on a CPU)."""
    backbone: str = "linear_probe"
    """linear_probe: frozen backbone (the paper); finetune: train everything."""
    weights: str = "none"
    """none | imagenet | a state-dict file (local or s3://)."""
    image_size: int = 256
    """Side of the square training input."""
    rotation: float = 15.0
    """Random rotation range in degrees."""
    fill: int = 0
    """Grey level (0-255) of the corners a rotation or RandAugment shear uncovers: the images' background (255 for dark on white, e.g. the digits)."""
    num_workers: int = resource(1)
    """Ray Train workers (DDP); 0 trains in the calling process (no worker group to start: for small runs, e.g. a sweep's)."""
    use_gpu: bool = resource(False)
    """Train on GPUs (AMP)."""
    cpus_per_worker: float = resource(0.5)
    """CPUs per training worker; leave some for Ray Data."""
    node_resource: Optional[str] = resource("train_gpu")
    """Custom resource of the node type this stage's workers should run on (cluster.yaml: gen_gpu, train_gpu); used only when the cluster defines it."""
    stall_warning: Optional[float] = resource(1800.0)
    """Seconds without a finished epoch before the stage logs what it is waiting on (null: never)."""
    epochs: int = extent(50)
    """Epochs, each of about iterations_per_epoch optimiser steps (the reference: 50 x 200)."""
    iterations_per_epoch: int = 200
    """Optimiser steps per epoch, made of whole passes over the real train set (so every shot count trains as long)."""
    batch_size: int = 32
    """Global batch size, split evenly across workers (so a multiple of num_workers)."""
    learning_rate: float = 1e-4
    """Adam learning rate."""
    seed: int = 0
    """Seeds mixing choices, model init and augmentation."""
    max_failures: int = resource(2)
    """Worker failures Ray Train survives by restarting from the last checkpoint."""
    hflip: bool = True
    """Random horizontal flips in the train transform."""
    randaugment: Optional[bool] = None
    """Standard augmentation (RandAugment) on top of flips and rotation; default: the method's (on for standard only)."""
    synthetic_filter: Optional[str] = None
    """Keep only synthetic images whose stored scores pass, e.g. "classifier.p_label >= 0.5 and source_distance.value >= 0.05" (see `ray-dafusion score`)."""
    num_to_keep: int = resource(2)
    """Checkpoints kept besides the latest (the best on val_mean_class_acc are kept)."""
    prefetch_batches: int = resource(2)
    """Batches each worker decodes ahead of the one being trained on."""
    channels_last: bool = resource(True)
    """Train in the channels-last memory layout (faster convolutions on CPUs and on GPUs under AMP: 31.6 vs 46.0 ms per small_cnn step on one core, benchmarks/sweep_parts.py)."""
    decode_threads: int = resource(0)
    """Threads per training worker that decode and transform the images of a batch; 0: one per whole CPU the worker reserves (cpus_per_worker, at least 1). Any number trains the same bytes; on a GPU node fewer than the worker's CPUs feed the GPU fewer images."""
    decode_processes: int = resource(0)
    """Ray tasks (one CPU each; Ray places them on the worker's node while it has CPUs free, else on another) that decode and transform a training worker's batches, this many batches at once; 0: threads in the training process (decode_threads). On a GPU node they leave the training process the step alone: threads share its interpreter and CPU time with it; leave about half the node's CPUs besides the workers' to Ray Data (on a 16-CPU H200 node with a 2-CPU worker, 6 fed ResNet-50 at 0.70 of the preloaded rate, 12 at 0.34). Trains the same bytes either way."""
    augment_in_step: Optional[bool] = resource(None)
    """Where a batch's flips, rotations and float conversion run: in the training step on the training device (true) or in the decoding threads (false); null: in the step when training on a GPU, so the threads only decode and resize. The same images on a CPU; on a GPU up to a rare pixel on a rounding tie of the rotation. With RandAugment the whole transform stays in the threads."""
    cache_mb: float = resource(1024.0)
    """Keep each worker's share of the encoded real+synthetic rows in memory after the first read when the whole union is at most this many MB; larger unions stream from storage on every pass."""
    shuffle_buffer: int = resource(512)
    """Chosen rows in each worker's shuffle buffer when streaming (seeded by seed, epoch, pass and rank)."""
    debug_dir: Optional[str] = resource(None)
    """Testing aid: each worker writes its pid and the rows it trained on per epoch here."""

    def validate(self) -> None:
        positive(self, "num_to_keep", "prefetch_batches", "shuffle_buffer", "iterations_per_epoch")
        positive(self, "cache_mb", "decode_threads", "decode_processes", allow_zero=True)
        one_of(self, "method", TRAIN_METHODS)
        one_of(self, "arch", ARCHS)
        one_of(self, "backbone", BACKBONES)
        positive(self, "image_size", "epochs", "batch_size", "learning_rate", "cpus_per_worker")
        positive(self, "num_workers", allow_zero=True)
        if self.num_workers > 1 and self.batch_size % self.num_workers:
            raise bad("batch_size", self.batch_size, f"must be a multiple of num_workers ({self.num_workers}): each "
                      "worker takes batch_size / num_workers images a step, and the step budget counts batch_size")
        positive(self, "rotation", "max_failures", allow_zero=True)
        if not 0 <= self.fill <= 255:
            raise bad("fill", self.fill, "must be a grey level in [0, 255]")
        if not 0.0 <= self.alpha <= 1.0:
            raise bad("alpha", self.alpha, "must lie in [0, 1]")
        if self.synthetic_filter is not None:
            from .filters import parse_filter

            parse_filter(self.synthetic_filter, None)  # its form now, before any stage runs; its columns at train


@dataclass
class EvaluateConfig(StageConfig):
    """Score trained runs on the test split and write tables and plots."""

    real: str = ""
    """URI of the ingest output (test/ split)."""
    runs: list[str] = field(default_factory=list)
    """Train output run URIs (each holding checkpoints and train_result.json)."""
    output: str = location("")
    """Where results.json, results.md and plots go."""
    split: str = "test"
    """Split to report on (the checkpoint is chosen on val)."""
    batch_size: int = resource(64)
    """Evaluation batch size."""
    num_cpus: float = resource(0.5)
    """CPUs per scoring actor (fractional leaves room for Ray Data's readers)."""
    num_gpus: float = resource(0.0)
    """GPUs per scoring actor."""
    node_resource: Optional[str] = resource("train_gpu")
    """Custom resource of the node type this stage's scoring actor should run on (cluster.yaml: gen_gpu, train_gpu); used only when the cluster defines it."""

    def validate(self) -> None:
        positive(self, "num_cpus", "num_gpus", allow_zero=True)
        one_of(self, "split", ("val", "test"))
        positive(self, "batch_size")
        places = [_same_place(run) for run in self.runs]
        repeated = sorted({run for run, place in zip(self.runs, places) if places.count(place) > 1})
        if repeated:  # one run counted twice would weigh double in every mean over seeds
            raise bad("runs", repeated, "names the same run more than once")


@dataclass
class GalleryConfig(StageConfig):
    """Contact sheet: each real image beside its augmentations, captioned with t0."""

    synthetic: str = ""
    """URI of an augment output."""
    real: Optional[str] = None
    """URI of the ingest output (default: the one recorded in the synthetic manifest)."""
    output: Optional[str] = location(None)
    """PNG file URI (default: <synthetic>/gallery.png)."""
    max_sources: int = 8
    """Real images shown (one row each)."""
    thumb_size: int = 96
    """Thumbnail side in pixels."""
    score: Optional[str] = None
    """A stored score (scorer.column, e.g. classifier.p_label) to caption each image with and sort each row by."""
    threshold: Optional[float] = None
    """With `score`: images scoring below it are framed in red (what a filter `score >= threshold` would drop)."""

    def validate(self) -> None:
        positive(self, "max_sources", "thumb_size")
        if self.score is not None and self.score.count(".") != 1:
            raise bad("score", self.score, "must be scorer.column, e.g. classifier.p_label")
        if self.threshold is not None and self.score is None:
            raise bad("threshold", self.threshold, "needs `score` to compare with")


@dataclass
class ScoreConfig(StageConfig):
    """Quality scores per synthetic image, stored beside the augment output (<synthetic>/scores/<scorer>/, where train's synthetic_filter and gallery read them)."""

    synthetic: str = ""
    """URI of an augment output."""
    real: Optional[str] = None
    """URI of the ingest output the synthetic set was made from (default: the one its augment manifest records), e.g. when that set has moved; it must be the same set (its ingest fingerprint is checked)."""
    run: Optional[str] = None
    """A train run (e.g. the baseline's) whose best checkpoint the classifier scorer uses."""
    scorers: list[str] = field(default_factory=lambda: ["classifier", "source_distance"])
    """classifier | source_distance | text (text needs clip_model)."""
    clip_model: Optional[str] = None
    """CLIP model (transformers CLIPModel: local dir, s3:// prefix or hub id) for the text scorer."""
    batch_size: int = resource(64)
    """Synthetic images per actor call (and per output file)."""
    min_actors: int = resource(1)
    """Smallest size of the scoring actor pool."""
    max_actors: int = resource(1)
    """Largest size of the scoring actor pool."""
    num_cpus: float = resource(0.5)
    """CPUs per scoring actor."""
    num_gpus: float = resource(0.0)
    """GPUs per scoring actor."""
    node_resource: Optional[str] = resource("gen_gpu")
    """Custom resource of the node type this stage's actors should run on (cluster.yaml: gen_gpu, train_gpu); used only when the cluster defines it."""
    compute: str = resource("actors")
    """actors: a pool of scoring actors, each loading its models once; tasks: Ray tasks that keep the loaded models in their worker process for the next batch (many small jobs at once, as a sweep's trials: an actor pool per job can leave each job's read tasks without a CPU)."""
    cache_dir: Optional[str] = resource(None)
    """Local model cache (default: ~/.cache/ray_dafusion)."""

    def validate(self) -> None:
        one_of(self, "compute", ("actors", "tasks"))
        for s in self.scorers:
            if s not in SCORERS:
                raise bad("scorers", self.scorers, f"each must be one of {', '.join(SCORERS)}")
        positive(self, "batch_size", "min_actors", "max_actors")
        positive(self, "num_cpus", "num_gpus", allow_zero=True)


@dataclass
class ReportConfig(StageConfig):
    """One table of every stage under a workdir: time, work, device-seconds, cost, links."""

    workdir: str = ""
    """URI whose stage outputs (every manifest.json under it) are reported."""
    output: Optional[str] = location(None)
    """Where report.md goes (default: <workdir>/report.md)."""


@dataclass
class PretrainConfig(StageConfig):
    """Train a small Stable-Diffusion-shaped text-conditional model on unlabelled images (Ray Train)."""

    source: str = ""
    """Unlabelled images: every image file under this folder (local or s3://), sub-folder names ignored."""
    output: str = location("")
    """Output: a diffusers pipeline directory (give it to `model`), manifest.json, and _checkpoints/ to resume."""
    init: Optional[str] = None
    """Continue from this pipeline (a model URI; its VAE is kept frozen, so vae_steps is 0) instead of starting from scratch."""
    shape: str = "small32"
    """Architecture from models.PRETRAIN_SHAPES (small32: 32 px, 8x8x4 latents, 8.6 MB)."""
    num_clusters: int = 32
    """Caption words: the images (and mirrors) are clustered into this many groups, one made-up word each."""
    empty_caption_fraction: float = 0.15
    """Share of captions left empty, so classifier-free guidance has an unconditional model."""
    mirror: bool = True
    """Also train on mirror images (textual inversion flips its images by default); off where a mirror is another class (digits)."""
    vae_steps: Optional[int] = None
    """Autoencoder steps (null: 1500 when training from scratch, 0 with `init`, whose VAE is kept as it is; with `init` only 0 is taken)."""
    vae_batch_size: int = 32
    """Images per autoencoder step (global)."""
    vae_learning_rate: float = 2e-3
    """Adam learning rate of the autoencoder (cosine decay to 0)."""
    kl_weight: float = 1e-6
    """Weight of the KL term of the autoencoder loss."""
    steps: int = 2400
    """UNet and text-encoder steps."""
    batch_size: int = 64
    """Images per UNet step (global, split across workers)."""
    learning_rate: float = 1e-3
    """AdamW learning rate of UNet and text encoder (warm-up, then cosine to a tenth)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average whose weights are saved."""
    seed: int = 0
    """Seeds clustering, initialisation, batches, noise and captions."""
    checkpoint_every: int = 200
    """Steps between checkpoints (a killed run resumes from the last)."""
    num_workers: int = resource(1)
    """Ray Train workers (DDP)."""
    use_gpu: bool = resource(False)
    """Train on GPUs."""
    cpus_per_worker: float = resource(1.0)
    """CPUs per training worker."""
    node_resource: Optional[str] = resource("train_gpu")
    """Custom resource of the node type this stage's workers should run on (cluster.yaml: gen_gpu, train_gpu); used only when the cluster defines it."""
    max_failures: int = resource(2)
    """Worker failures survived by restarting from the last checkpoint."""
    stall_warning: Optional[float] = resource(1800.0)
    """Seconds without a checkpoint before the stage logs what it is waiting on (null: never)."""

    def validate(self) -> None:
        positive(self, "num_clusters", "steps", "batch_size", "learning_rate", "vae_batch_size", "vae_learning_rate",
                 "checkpoint_every", "num_workers", "cpus_per_worker")
        positive(self, "warmup_steps", "kl_weight", "max_failures", allow_zero=True)
        if self.vae_steps is not None:
            positive(self, "vae_steps", allow_zero=True)
        if not 0.0 <= self.empty_caption_fraction < 1.0:
            raise bad("empty_caption_fraction", self.empty_caption_fraction, "must lie in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise bad("ema_decay", self.ema_decay, "must lie in [0, 1)")
        if self.vae_steps == 0 and not self.init:
            raise bad("vae_steps", self.vae_steps, "must be > 0 when training from scratch (no init)")
        if self.vae_steps and self.init:  # the denoiser keeps the init's latent scale, which fits only its own VAE
            raise bad("vae_steps", self.vae_steps, f"must be 0 (or unset) with init {self.init!r}, whose VAE is kept "
                      "frozen; leave init out to train a VAE from scratch")

    def vae_step_count(self) -> int:
        """The autoencoder steps of this run: `vae_steps`, or when unset 1500 from scratch and 0 with init."""
        if self.vae_steps is not None:
            return self.vae_steps
        return 0 if self.init else 1500


@dataclass
class PipelineConfig(StageConfig):
    """Every stage in order under one workdir; each skips outputs that are complete."""

    workdir: str = location("./runs/demo")
    """URI under which each stage's default input and output lives."""
    run_erase: bool = False
    """Run concept erasure before augmenting (model-centric leakage prevention)."""
    methods: list[str] = field(default_factory=lambda: ["baseline", "da_fusion"])
    """Training methods to run and compare."""
    real_guidance_strengths: Optional[list[float]] = None
    """t0 levels of the real_guidance synthetic set (default: the mode's, 0.5); `augment.strengths` is DA-Fusion's."""
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
        if not self.methods:
            raise bad("methods", self.methods, f"needs at least one of {', '.join(TRAIN_METHODS)}")
        for m in self.methods:
            if m not in TRAIN_METHODS:
                raise bad("methods", self.methods, f"each must be one of {', '.join(TRAIN_METHODS)}")
        _no_repeats(self, "methods")
        modes = sorted({TRAIN_METHODS[m].synthetic_mode for m in self.methods} - {None})
        if len(modes) > 1 and self.augment.output:
            raise bad("augment.output", self.augment.output, f"would hold the synthetic sets of {' and '.join(modes)} "
                      "at once (the second refused, or with overwrite deleting the first): leave it unset, each "
                      "then goes to <workdir>/synthetic/<mode>")
        if self.real_guidance_strengths is not None and (
                not self.real_guidance_strengths or not all(0 < s <= 1 for s in self.real_guidance_strengths)):
            raise bad("real_guidance_strengths", self.real_guidance_strengths, "needs t0 levels in (0, 1]")
        _one_model(self, self.methods, ["invert"] + (["erase"] if self.run_erase else []))


@dataclass
class SweepConfig(StageConfig):
    """The paper's experiment as a Ray Tune sweep: shots x seeds x methods, stage outputs reused."""

    source: str = ""
    """Labelled images (an image folder, VOC or COCO as ingest takes them), ingested once, subsets per (shots, seed); `digits`: the experiment half of scikit-learn's digits, written under the workdir."""
    workdir: str = location("./runs/sweep")
    """URI under which the pool, every subset, token set, synthetic set, run, the trials and the results live."""
    shots: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Examples per class of each trial (every class's train pool must hold the largest, checked before any trial, unless ingest.allow_fewer: then the summary marks a row whose classes fell short, e.g. `8 (min 5)`)."""
    seeds: list[int] = field(default_factory=lambda: list(range(10)))
    """Seeds: which shots are drawn, and the seed of every stage of the trial."""
    methods: list[str] = field(default_factory=lambda: ["baseline", "standard", "real_guidance", "da_fusion"])
    """Compared methods (modes.SWEEP_VARIANTS): baseline, standard, real_guidance, da_fusion, da_fusion_k1 (k=1 ablation), da_fusion_filtered (da_fusion's images kept only where the seed's baseline classifier gives their label)."""
    max_concurrent_trials: int = resource(1)
    """Trials run at once (1 on a 2-core machine; more where the cluster has room)."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    """Ingest section (split sizes, split_seed, format); examples_per_class and seed are the trial's."""
    invert: InvertConfig = field(default_factory=InvertConfig)
    """Invert section, shared by every trial that needs tokens."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augment section; mode and t0 levels come from each method."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Train section, shared by every method; method and seed are the trial's."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """Score section, for methods with a filter (da_fusion_filtered); synthetic, run and scorers are the trial's."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluate section (scores every run on the pool's fixed test split; `split` must stay test: checkpoints are chosen on val)."""

    def validate(self) -> None:
        if not self.methods:
            raise bad("methods", self.methods, f"needs at least one of {', '.join(SWEEP_VARIANTS)}")
        if self.train.synthetic_filter is not None:
            raise bad("train.synthetic_filter", self.train.synthetic_filter, "would filter every method's synthetic "
                      "images; the sweep filters only da_fusion_filtered, with its own filter: leave it unset")
        for name in self.methods:
            if name not in SWEEP_VARIANTS:
                raise bad("methods", self.methods, f"each must be one of {', '.join(SWEEP_VARIANTS)}")
        positive(self, "max_concurrent_trials")
        if not self.shots or any(k < 1 for k in self.shots):
            raise bad("shots", self.shots, "needs one or more shot counts >= 1")
        if not self.seeds:
            raise bad("seeds", self.seeds, "needs at least one seed")
        _no_repeats(self, "shots", "seeds", "methods")
        if self.evaluate.split != "test":
            raise bad("evaluate.split", self.evaluate.split, "each run's checkpoint is chosen on val, so its val "
                      "accuracy is optimistic and the summary reports test; leave it at test")
        _one_model(self, [SWEEP_VARIANTS[m].method for m in self.methods], ["invert"])


def _no_repeats(cfg: Any, *names: str) -> None:
    """Each of these list fields names each value once (a method trained twice under one name, or a
    seed counted twice, fails late or weighs double)."""
    for name in names:
        values = getattr(cfg, name)
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise bad(name, values, f"names {', '.join(map(str, repeated))} more than once; give each once")


def _same_place(model: str) -> str:
    """A model name as a place: a local path absolute with ~ expanded, no trailing slash."""
    from .storage import absolute

    return absolute(model).rstrip("/")


def _one_model(cfg: Any, methods: list[str], sections: list[str]) -> None:
    """Tokens (and erasures) are made for one diffusion model: when a method augments with tokens,
    the sections that make them must name augment's model (augment checks the fingerprints too,
    but only after they were made)."""
    modes = {TRAIN_METHODS[m].synthetic_mode for m in methods} - {None}
    if not any(AUGMENT_MODES[mode].needs_tokens for mode in modes):
        return
    for name in sections:
        model = getattr(cfg, name).model
        if _same_place(model) != _same_place(cfg.augment.model):
            raise bad(f"{name}.model", model, f"differs from augment.model {cfg.augment.model!r}: tokens and "
                      "erasures work only on the model they were made on; name the same model in each section")


@dataclass(frozen=True)
class Stage:
    """One entry of the stage registry: its function (imported on first use) and its config."""

    module: str
    function: str
    config: type[StageConfig]
    summary: str = ""


# The one registry of stages: the package's lazy imports, the command line and the docs read it.
STAGES: dict[str, Stage] = {
    "ingest": Stage("ray_dafusion.ingest", "ingest", IngestConfig),
    "invert": Stage("ray_dafusion.inversion", "invert", InvertConfig),
    "erase": Stage("ray_dafusion.erasure", "erase", EraseConfig),
    "augment": Stage("ray_dafusion.augment", "augment", AugmentConfig),
    "train": Stage("ray_dafusion.train", "train", TrainConfig),
    "evaluate": Stage("ray_dafusion.evaluate", "evaluate", EvaluateConfig),
    "gallery": Stage("ray_dafusion.gallery", "gallery", GalleryConfig),
    "score": Stage("ray_dafusion.score", "score", ScoreConfig),
    "report": Stage("ray_dafusion.report", "report", ReportConfig),
    "pretrain": Stage("ray_dafusion.pretrain", "pretrain", PretrainConfig),
    "pipeline": Stage("ray_dafusion.pipeline", "pipeline", PipelineConfig),
    "sweep": Stage("ray_dafusion.sweep", "sweep", SweepConfig),
    "demo": Stage("ray_dafusion.pipeline", "demo", PipelineConfig,
                  "Run the whole pipeline on the embedded default: local Ray, ./runs/demo, the digits model, "
                  "handwritten digits. Takes the pipeline's options."),
}

CONFIGS: dict[str, type[StageConfig]] = {name: s.config for name, s in STAGES.items() if name != "demo"}
"""Stage name -> config class (every stage with a config of its own)."""


class _StageModule(types.ModuleType):
    """A stage module named like its stage function (``ray_dafusion.augment``), callable as it.

    Once ``ray_dafusion.augment`` is imported, Python binds the package attribute ``augment`` to
    the module, so ``from ray_dafusion import augment`` yields the module; calling it calls the
    stage function, so ``augment(AugmentConfig(...))`` works whichever the import gave.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def callable_stage_module(module_name: str) -> None:
    """Make the module `module_name` callable as its stage function (see _StageModule)."""
    sys.modules[module_name].__class__ = _StageModule


def load_config(stage: str, path: Optional[str] = None, **overrides: Any) -> StageConfig:
    """Load the config of `stage` from YAML (optional) with Python-valued overrides."""
    if stage not in CONFIGS:
        raise ConfigError(f"unknown stage '{stage}'; stages: {', '.join(CONFIGS)}")
    data = read_yaml(path) if path else {}
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
        "",
        "The `kind` column says what a field is to the stage's output. `output`: changing it makes a different",
        "output, so a re-run with another value is refused unless `overwrite: true`. `extent`: how much of the",
        "same work (more `epochs`, another `classes` subset) continues an output. `resource` and `location`:",
        "where and with what the stage runs; they never refuse a re-run.",
    ]
    hints_cache: dict[type, Any] = {}
    for stage, cls in CONFIGS.items():
        docs = field_help(cls)
        hints = hints_cache.setdefault(cls, typing.get_type_hints(cls))
        lines += ["", f"## `{stage}`: {cls.__name__}", "", (cls.__doc__ or "").strip(), "",
                  "| field | type | default | kind | meaning |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = field_default(f)
            if isinstance(default, StageConfig):
                shown = f"see `{type(default).__name__}`"
            else:
                shown = "`" + yaml.safe_dump(default, default_flow_style=True, width=10_000).strip().removesuffix("...").strip() + "`"
            tp = str(hints[f.name]).replace("typing.", "").replace("ray_dafusion.config.", "")
            tp = getattr(hints[f.name], "__name__", tp) if not typing.get_args(hints[f.name]) else tp
            lines.append(f"| `{f.name}` | `{tp}` | {shown} | {field_kind(f)} | {docs.get(f.name, '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"
