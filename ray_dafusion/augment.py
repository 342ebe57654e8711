"""Augment: M img2img variations of every real train image, on a Ray Data actor pool.

Shape of a run::

    real/train/*.parquet ─> read (skip finished rows) ─> repartition into batch-sized blocks
        ─> map_batches(DiffusionAugmenter, ActorPoolStrategy)   # each actor writes its own files
        ─> summaries (file, rows, errors, seconds) back to the driver ─> verify N x M ─> manifest

Exactly once: an actor writes ONE parquet file per batch, named from the (source_id, aug_index)
pairs it covers, atomically. A retried batch rewrites the same name with the same content; a
re-run reads only the committed pairs and generates the missing ones. The driver writes the
manifest last, after checking that every (source_id, aug_index) exists exactly once.

Reproducible per image: the seed, t0 and prompt template of augmentation k of source s are
drawn from (run seed, s, k) alone, so what an image is made from does not depend on batch size,
actors or order. Its pixels depend on them only through float rounding: images of one t0 are
denoised in one call, and a convolution over 5 images may round a value differently from one
over 1 (a grey level here and there on CPU; on a GPU, channels_last, compile, fused QKV and
cuDNN's kernel choice do the same). The same config and resources on the same hardware give the
same bytes; `pad_calls` fixes every call's shape, so call sizes stop mattering too.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from . import models, plan, schema, storage, tokens, weights
from .config import AugmentConfig, ConfigError, callable_stage_module
from .configlib import config_record
from .errors import StageError, one_line
from .modes import AUGMENT_MODES
from .runinfo import CostMeter, max_rss_bytes, versions
from .watchdog import Watchdog

__all__ = [
    "AugmentResult",
    "DiffusionAugmenter",
    "augment",
    "augment_batch",
    "draw_augmentation",
    "denoising_steps",
    "even_chunks",
    "image_seed",
    "class_prompts",
    "to_model_size",
    "from_model_size",
]


DATA_DIR = "data"
ERRORS_DIR = "errors"
_REAL_COLUMNS = ["id", "image", "label", "class_name"]

log = logging.getLogger(__name__)


@dataclass
class AugmentResult:
    """What `augment` produced; counts are of (source_id, aug_index) pairs unless named rows."""

    output: str
    real_rows: int
    synthetic_rows: int
    generated: int
    skipped_as_done: int
    errors: int
    wall_seconds: float
    images_per_second: float
    files_written: int = 0
    already_complete: bool = False


# --------------------------------------------------------------------------------------
# Per-image draws: pure functions of (run seed, source id, augmentation index)
# --------------------------------------------------------------------------------------


def image_seed(run_seed: int, source_id: str, aug_index: int) -> int:
    """Stable non-negative int64 seed of one synthetic image."""
    digest = hashlib.sha256(f"{run_seed}\x1f{source_id}\x1f{aug_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def draw_augmentation(
    run_seed: int, source_id: str, aug_index: int, strengths: Sequence[float], templates: Sequence[str]
) -> tuple[int, float, str]:
    """(seed, t0, template) of augmentation `aug_index` of `source_id`.

    t0 is drawn first, so adding templates does not change which t0 an image gets.
    """
    seed = image_seed(run_seed, source_id, aug_index)
    rng = np.random.default_rng(seed)
    strength = float(strengths[int(rng.integers(len(strengths)))])
    template = templates[int(rng.integers(len(templates)))]
    return seed, strength, template


def class_prompts(cfg: AugmentConfig, classes: Sequence[schema.ClassInfo]) -> dict[str, list[str]]:
    """Every prompt each class's rows can get in this run (what the leakage guard checks)."""
    mode = AUGMENT_MODES[cfg.mode]
    return {c.name: [tokens.make_prompt(t, mode.word(c.token, c.name)) for t in cfg.prompt_templates]
            for c in classes}


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """Scheduler steps diffusers' img2img runs for this t0 (its own rounding)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


# --------------------------------------------------------------------------------------
# Resizing between the source size and the model's square
# --------------------------------------------------------------------------------------


def to_model_size(image: Image.Image, resolution: int, resize: str) -> Image.Image:
    """squash: stretch to the square (the paper); keep_aspect: mirror-pad to a square first."""
    if resize == "keep_aspect" and image.width != image.height:
        w, h = image.size
        side = max(w, h)
        top, left = (side - h) // 2, (side - w) // 2
        pixels = np.asarray(image)  # (H, W, 3)
        pixels = np.pad(pixels, ((top, side - h - top), (left, side - w - left), (0, 0)), mode="symmetric")
        image = Image.fromarray(pixels)
    return image.resize((resolution, resolution), Image.BICUBIC)


def from_model_size(result: Image.Image, size: tuple[int, int], resize: str) -> Image.Image:
    """Undo `to_model_size`: back to the source's (width, height)."""
    w, h = size
    if resize == "keep_aspect" and w != h:
        side = max(w, h)
        top, left = (side - h) // 2, (side - w) // 2
        return result.resize((side, side), Image.BICUBIC).crop((left, top, left + w, top + h))
    return result.resize((w, h), Image.BICUBIC)


# --------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------


def _batch_name(pairs: Iterable[tuple[str, int]]) -> str:
    """File name determined by the (source_id, aug_index) pairs a batch covers."""
    text = "\n".join(f"{s}\t{k}" for s, k in sorted(pairs))
    return f"part-{hashlib.sha256(text.encode()).hexdigest()[:24]}.parquet"


class DiffusionAugmenter:
    """Generates and writes the synthetic rows of one batch of real rows per call.

    Loads the pipeline, the learned tokens and the optional erasure weights once. ``__call__``
    takes a batch of real rows (a pyarrow Table or a dict of columns), writes one parquet file
    under ``<output>/data/`` and, for bad rows, one under ``<output>/errors/``, and returns one
    summary row: file, rows, errors, skipped, seconds.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        classes: Sequence[schema.ClassInfo],
        present: Optional[dict[str, list[int]]] = None,
        expected_fingerprints: Optional[dict[str, str]] = None,
        _faults: Optional[dict[str, Any]] = None,
    ) -> None:
        import torch

        setup_started = time.perf_counter()
        self.cfg = cfg = cfg.replace(strengths=cfg.t0_levels())
        self.mode = AUGMENT_MODES[cfg.mode]
        self.classes = list(classes)
        self.by_label = {c.label: c for c in self.classes}
        self.class_names = [c.name for c in self.classes]
        self.present = {k: set(v) for k, v in (present or {}).items()}
        self.faults = dict(_faults or {})
        self.batches_done = 0
        self.torch = torch

        self.model_fingerprint = models.model_fingerprint(
            models.resolve_model(cfg.model, cfg.cache_dir, cfg.endpoint_url), cfg.cache_dir
        )
        self.embeddings_fingerprint = ""
        self.tokens: set[str] = set()
        tensors: dict[str, Any] = {}
        if self.mode.needs_tokens:
            if not cfg.embeddings:
                raise weights.EmbeddingsError(f"mode {cfg.mode} needs `embeddings` (the invert stage's tokens.safetensors)")
            tensors, self.embeddings_fingerprint = weights.load_embeddings(cfg.embeddings, cfg.endpoint_url)
            self.tokens = set(tensors)
        # tasks keep the loaded pipeline in their process for the next batch and the next job (an erasing
        # run edits the UNet in place, so it loads its own); actors load theirs once anyway
        reuse = cfg.compute == "tasks" and not cfg.erasure
        key = (self.model_fingerprint, self.embeddings_fingerprint, cfg.fuse_qkv, cfg.compile, cfg.channels_last,
               cfg.pad_calls)  # what speed_up did to the cached pipeline
        self.pipe = _PIPELINES.get(key) if reuse else None
        if self.pipe is None:
            self.pipe = models.load_pipeline(cfg.model, cache_dir=cfg.cache_dir, endpoint_url=cfg.endpoint_url)
            if tensors:
                weights.add_tokens(self.pipe, tensors)
            done = models.speed_up(self.pipe, compile=cfg.compile, channels_last=cfg.channels_last,
                                   static_shapes=cfg.pad_calls, fuse_qkv=cfg.fuse_qkv)
            if done:
                log.info("pipeline on %s: %s", self.pipe.device, ", ".join(done))
            if reuse:
                _PIPELINES.put(key, self.pipe)
        self.channels_last = cfg.channels_last and self.pipe.device.type == "cuda"
        self._embeds: dict[str, tuple[Any, Any]] = {}  # prompt -> (embeddings, negative embeddings)
        self.erasure = None
        self.erasure_fingerprints: dict[str, str] = {}
        if cfg.erasure:
            self.erasure = weights.ErasureWeights(cfg.erasure, endpoint_url=cfg.endpoint_url)
            self.erasure_fingerprints = {c: self.erasure.fingerprint(c) for c in self.erasure.classes()}
        mine = {"model": self.model_fingerprint, "embeddings": self.embeddings_fingerprint,
                "erasure": self.erasure_fingerprints}
        for key, value in (expected_fingerprints or {}).items():
            if key in mine and mine[key] != value:
                raise RuntimeError(
                    f"{key} fingerprint on this worker is {mine[key]} but the driver planned with {value}: "
                    f"the {key} changed during the run"
                )
        self.schema = schema.synthetic_schema(self.class_names)
        self.data_dir = storage.join(cfg.output, DATA_DIR)
        self.errors_dir = storage.join(cfg.output, ERRORS_DIR)
        self._setup_seconds = time.perf_counter() - setup_started  # billed with the first batch

    def _summary(self, file: str, rows: int, errors: int, skipped: int, seconds: float) -> pa.Table:
        setup, self._setup_seconds = self._setup_seconds, 0.0
        return _summary(file, rows, errors, skipped, seconds, setup)

    # ---- one batch -------------------------------------------------------------------

    def __call__(self, batch: Any) -> pa.Table:
        start = time.perf_counter()
        rows = batch.to_pylist() if isinstance(batch, pa.Table) else _dict_rows(batch)
        m = self.cfg.num_augmentations

        # 1. which augmentations of these rows are still missing
        missing: list[tuple[dict[str, Any], list[int]]] = []
        skipped = 0
        for row in rows:
            done = self.present.get(row["id"], set())
            todo = [k for k in range(m) if k not in done]
            skipped += m - len(todo)
            if todo:
                missing.append((row, todo))
        pairs = [(row["id"], k) for row, todo in missing for k in todo]
        if not pairs:
            return self._summary("", 0, 0, skipped, time.perf_counter() - start)
        name = _batch_name(pairs)
        data_uri = storage.join(self.data_dir, name)
        if storage.exists(data_uri, self.cfg.endpoint_url):  # a retried batch whose file got committed
            return self._summary(name, 0, 0, skipped + len(pairs), time.perf_counter() - start)

        # 2. quarantine bad rows, plan the good ones
        jobs, errors = [], []
        for row, todo in missing:
            info, source, reason = self._check_row(row)
            if reason is not None:
                errors.append({"stage": "augment", "item": row["id"], "class_name": row.get("class_name"), "reason": reason})
                continue
            for k in todo:
                seed, strength, template = draw_augmentation(
                    self.cfg.seed, row["id"], k, self.cfg.strengths, self.cfg.prompt_templates
                )
                word = self.mode.word(info.token, info.name)
                jobs.append({
                    "row": row, "info": info, "source": source, "aug_index": k, "seed": seed,
                    "strength": strength, "prompt": tokens.make_prompt(template, word),
                })
        if errors:
            storage.write_parquet(
                schema.error_table(errors),
                storage.join(self.errors_dir, _batch_name((e["item"], -1) for e in errors)),
                self.cfg.endpoint_url,
            )

        # 3. one pipeline call per (class if erasing, t0) group, chunked
        if self.faults.get("sleep_seconds"):  # test hook: a batch that takes long (the watchdog's case)
            time.sleep(float(self.faults["sleep_seconds"]))
        out_rows = self._generate(jobs)

        # 4. commit this batch's rows as one file
        self._maybe_crash("before_write")
        if out_rows:
            out_rows.sort(key=lambda r: (r["source_id"], r["aug_index"]))
            table = pa.Table.from_pylist(out_rows, schema=self.schema)
            storage.write_parquet(table, data_uri, self.cfg.endpoint_url)
        self._maybe_crash("after_write")
        self.batches_done += 1
        return self._summary(name if out_rows else "", len(out_rows), len(errors), skipped, time.perf_counter() - start)

    def _check_row(self, row: dict[str, Any]) -> tuple[Any, Any, Optional[str]]:
        label = row.get("label")
        info = self.by_label.get(label) if label is not None else None
        if info is None:
            return None, None, f"label {label!r} out of range 0..{len(self.classes) - 1}"
        if row.get("class_name") not in (None, info.name):
            return None, None, f"class_name {row.get('class_name')!r} does not match label {label} ({info.name!r})"
        if self.mode.needs_tokens and info.token not in self.tokens:
            return None, None, f"class without a token: {info.token!r} is not in the embeddings file"
        if self.erasure is not None and info.name not in self.erasure_fingerprints:
            return None, None, f"class without erasure weights: {info.name!r}"
        cell = row.get("image") or {}
        try:
            source = schema.decode_image(cell.get("bytes") if isinstance(cell, dict) else None)
        except ValueError as exc:
            return None, None, f"undecodable image: {exc}"
        return info, source, None

    def _generate(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One pipeline call per (class if erasing, t0) group, chunked; each call's results are
        resized back and PNG-encoded on `io_threads` threads while the next call runs."""
        cfg = self.cfg
        groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        for job in jobs:
            groups[(job["info"].name if self.erasure is not None else "", job["strength"])].append(job)
        pool = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="augment-io") if cfg.io_threads else None
        parts: list[Any] = []  # per call: a future of its rows (io_threads > 0) or the rows
        try:
            for (class_name, strength), group in sorted(groups.items()):
                if self.erasure is not None:  # a few in-place tensor copies; a no-op for the same class
                    self.erasure.apply(self.pipe.unet, class_name)
                for chunk in even_chunks(group, cfg.max_images_per_call):
                    pixels = self._denoise(chunk, strength)
                    parts.append(pool.submit(self._rows, chunk, pixels) if pool else self._rows(chunk, pixels))
            return [row for part in parts for row in (part.result() if pool else part)]
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _denoise(self, chunk: Sequence[dict[str, Any]], strength: float) -> np.ndarray:
        """One img2img call: uint8 (n, H, W, 3) results at the model's resolution.

        The same images as ``pipe(prompt=..., image=[PIL...], generator=[one per image])``: the VAE
        encodes the chunk in one batch (diffusers encodes one image at a time when given a list of
        generators) and each image's latent sample and start noise come from its own generator, in
        the order diffusers draws them. Prompt embeddings are cached per prompt; the results become
        uint8 on the device, so only a quarter of the bytes cross to the host.
        """
        torch, cfg, n = self.torch, self.cfg, len(chunk)
        sources = [to_model_size(j["source"], cfg.resolution, cfg.resize) for j in chunk]
        generators = [torch.Generator("cpu").manual_seed(j["seed"]) for j in chunk]
        prompts = [j["prompt"] for j in chunk]
        pad = cfg.max_images_per_call - n if cfg.pad_calls else 0
        if pad > 0:  # copies of the last image with their own generators; their results are dropped
            sources += sources[-1:] * pad
            prompts += prompts[-1:] * pad
            generators += [torch.Generator("cpu").manual_seed(chunk[-1]["seed"]) for _ in range(pad)]
        with torch.inference_mode():
            image = self._encode(sources, generators)
            embeds, negative = self._prompt_embeds(prompts)
            result = self.pipe(
                prompt_embeds=embeds, negative_prompt_embeds=negative, image=image, strength=strength,
                guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps,
                generator=generators, output_type="pt",
            ).images[:n]
            # exactly diffusers' PIL conversion: float32, x255, round half to even, uint8
            pixels = (result.float() * 255).round().clamp(0, 255).to(torch.uint8)
            return pixels.permute(0, 2, 3, 1).cpu().numpy()

    def _encode(self, sources: list[Image.Image], generators: list[Any]) -> Any:
        """Scaled VAE latents of the sources in one batch, sampled image by image with each image's
        own generator; the PIL list itself for a VAE whose latents the pipeline would not recognise."""
        pipe, torch = self.pipe, self.torch
        if pipe.vae.config.latent_channels != 4:  # img2img takes 4-channel tensors as latents
            return sources
        from diffusers.utils.torch_utils import randn_tensor

        pixels = pipe.image_processor.preprocess(sources).to(device=pipe.device, dtype=pipe.vae.dtype)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        dist = pipe.vae.encode(pixels).latent_dist
        latents = [dist.mean[i : i + 1] + dist.std[i : i + 1]
                   * randn_tensor(dist.mean[i : i + 1].shape, generator=g, device=dist.mean.device, dtype=dist.mean.dtype)
                   for i, g in enumerate(generators)]
        return pipe.vae.config.scaling_factor * torch.cat(latents)

    def _prompt_embeds(self, prompts: list[str]) -> tuple[Any, Any]:
        """(prompt, negative) embeddings of a call, each prompt encoded once per actor."""
        guided = self.cfg.guidance_scale > 1.0
        new = sorted(set(prompts) - set(self._embeds))
        if new:
            embeds, negative = self.pipe.encode_prompt(new, self.pipe.device, 1, guided)
            for i, p in enumerate(new):
                self._embeds[p] = (embeds[i : i + 1], negative[i : i + 1] if guided else None)
        embeds = self.torch.cat([self._embeds[p][0] for p in prompts])
        negative = self.torch.cat([self._embeds[p][1] for p in prompts]) if guided else None
        return embeds, negative

    def _rows(self, chunk: Sequence[dict[str, Any]], pixels: np.ndarray) -> list[dict[str, Any]]:
        return [self._row(job, from_model_size(Image.fromarray(p), job["source"].size, self.cfg.resize))
                for job, p in zip(chunk, pixels)]

    def _row(self, job: dict[str, Any], image: Image.Image) -> dict[str, Any]:
        row, info, k = job["row"], job["info"], job["aug_index"]
        return {
            "id": f"{row['id']}-{k}",
            "source_id": row["id"],
            "aug_index": k,
            "label": info.label,
            "class_name": info.name,
            "token": info.token if self.mode.prompt_word == "token" else "",
            "strength": job["strength"],
            "seed": job["seed"],
            "prompt": job["prompt"],
            "guidance_scale": self.cfg.guidance_scale,
            "num_inference_steps": self.cfg.num_inference_steps,
            "model_fingerprint": self.model_fingerprint,
            "embeddings_fingerprint": self.embeddings_fingerprint,
            "erasure_fingerprint": self.erasure_fingerprints.get(info.name, "") if self.erasure is not None else "",
            "image": schema.image_cell(schema.encode_image(image, "PNG"), f"{row['id']}-{k}.png"),
        }

    def _maybe_crash(self, point: str) -> None:
        """Test hook: kill this actor process once (a marker file keeps its restart alive)."""
        crash = self.faults.get("crash_actor")
        if not crash or crash.get("point", "after_write") != point or self.batches_done != crash.get("after_batches", 0):
            return
        marker = crash["marker"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)


class _PipelineCache:
    """The few most recent pipelines this process loaded (tasks mode), by model and token fingerprints."""

    def __init__(self, size: int = 2) -> None:
        self.size, self.items = size, collections.OrderedDict()

    def get(self, key: tuple) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key: tuple, pipe: Any) -> None:
        self.items[key] = pipe
        while len(self.items) > self.size:
            self.items.popitem(last=False)


_PIPELINES = _PipelineCache()


def augment_batch(batch: pa.Table, cfg: AugmentConfig, classes: Sequence[schema.ClassInfo],
                  present: Optional[dict[str, list[int]]] = None, expected_fingerprints: Optional[dict[str, str]] = None,
                  _faults: Optional[dict[str, Any]] = None) -> pa.Table:
    """One batch as a Ray Data task (compute: tasks): the augmenter around this process's cached pipeline."""
    return DiffusionAugmenter(cfg, classes, present, expected_fingerprints, _faults)(batch)


def _dict_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{k: _plain(batch[k][i]) for k in names} for i in range(n)]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def even_chunks(items: Sequence[Any], max_size: int) -> list[Sequence[Any]]:
    """Split `items` into the fewest chunks of at most `max_size`, sizes differing by at most one.

    19 images at 16 per call become 10 + 9, not 16 + 3: on a GPU a call of 3 images costs
    nearly as much as a call of 10, so even chunks finish the group sooner.
    """
    count = max(1, math.ceil(len(items) / max_size))
    base, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        if size:
            out.append(items[start : start + size])
        start += size
    return out


def _summary(file: str, rows: int, errors: int, skipped: int, seconds: float, setup_seconds: float = 0.0) -> pa.Table:
    """One batch's summary row; `setup_seconds`: the actor's model load, on its first batch only."""
    return pa.table({
        "file": pa.array([file], pa.string()),
        "rows": pa.array([rows], pa.int64()),
        "errors": pa.array([errors], pa.int64()),
        "skipped": pa.array([skipped], pa.int64()),
        "seconds": pa.array([seconds], pa.float64()),
        "setup_seconds": pa.array([setup_seconds], pa.float64()),
        "max_rss_bytes": pa.array([max_rss_bytes()], pa.int64()),
        "max_gpu_bytes": pa.array([_max_gpu_bytes()], pa.int64()),
    })


def _max_gpu_bytes() -> int:
    """Peak CUDA memory this process allocated so far (0 without CUDA)."""
    import sys

    torch = sys.modules.get("torch")  # an actor has it loaded; never import it just for this
    return int(torch.cuda.max_memory_allocated()) if torch is not None and torch.cuda.is_initialized() else 0


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


def _text_encoder_dim(local_model: str) -> Optional[int]:
    path = os.path.join(local_model, "text_encoder", "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(json.load(f)["hidden_size"])


def _committed_pairs(output: str, endpoint_url: Optional[str]) -> pa.Table:
    """(source_id, aug_index) of every committed synthetic row; reads only those columns."""
    data_dir = storage.join(output, DATA_DIR)
    if not storage.list_files(data_dir, ".parquet", endpoint_url):
        return pa.table({"source_id": pa.array([], pa.string()), "aug_index": pa.array([], pa.int32())})
    return storage.read_parquet(data_dir, endpoint_url, columns=["source_id", "aug_index"])


def _actor_plan(cfg: AugmentConfig) -> tuple[int, dict[str, float]]:
    """(actors to start, custom resources pinning them to generation nodes), checked against the
    cluster so that Ray Data's read and write tasks keep a CPU (else the job would hang)."""
    cap = plan.capacity()
    pin = plan.node_pinning(cfg.node_resource, cfg.num_gpus, cap, "augment")
    demand = plan.Demand("diffusion actors", cfg.max_actors, {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus, **pin},
                         count_field="max_actors", size_fields={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus})
    return plan.check("augment", demand, cap), pin


def _map_augmenter(ds: Any, cfg: AugmentConfig, classes: list[schema.ClassInfo], partial: dict[str, list[int]],
                   fingerprints: dict[str, Any], faults: Optional[dict[str, Any]], actors: int,
                   pin: dict[str, float]) -> Any:
    """The actor pool stage: resources, pool size and fault tolerance from the config."""
    import ray.data

    kwargs = {
        "cfg": cfg,
        "classes": classes,
        "present": partial,
        "expected_fingerprints": {"model": fingerprints["model"], "embeddings": fingerprints["embeddings"],
                                  "erasure": fingerprints.get("erasure", {})},
        "_faults": faults,
    }
    if cfg.compute == "tasks":
        udf: Any = augment_batch
        options: dict[str, Any] = {"fn_kwargs": kwargs, "compute": ray.data.TaskPoolStrategy(size=actors),
                                   "max_retries": cfg.max_restarts}
    else:
        udf = DiffusionAugmenter
        # An actor that was starting on a node as the node was lost dies "during initialization", and Ray
        # Data's default (0 such deaths) then fails the whole job: a lost node may cost max_restarts. The
        # dataset's own context (a copy taken when it was read; the global one would not reach this run).
        ds.context.max_consecutive_actor_init_deaths = max(ds.context.max_consecutive_actor_init_deaths,
                                                           cfg.max_restarts)
        options = {"fn_constructor_kwargs": kwargs,
                   "compute": ray.data.ActorPoolStrategy(min_size=min(cfg.min_actors, actors), max_size=actors),
                   # Ray Data's defaults are unlimited restarts; bound them so a broken node fails the job.
                   "max_restarts": cfg.max_restarts, "max_task_retries": cfg.max_restarts}
    return ds.map_batches(
        udf,
        **options,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        **({"resources": pin} if pin else {}),
    )


@storage.leased("augment")
def augment(cfg: AugmentConfig, *, _faults: Optional[dict[str, Any]] = None) -> AugmentResult:
    """Generate `num_augmentations` synthetic rows per real train row into `cfg.output`.

    `_faults` is a test hook: {"stop_after_batches": k} stops the driver after k summaries (a
    killed job); {"crash_actor": {"marker": path, "point": "after_write"}} kills one actor once.
    """
    started = time.time()
    meter = CostMeter(cfg.cost)
    cfg = _check_inputs(cfg)
    ep = cfg.endpoint_url

    # 1. classes, model, tokens, erasure: everything that can fail fails before any actor starts
    classes = schema.read_class_table(cfg.real, ep)
    fingerprints, token_set = _prepare_conditioning(cfg, classes)

    # 2. every prompt of the run, checked before any GPU work
    prompts = class_prompts(cfg, [c for c in classes if not AUGMENT_MODES[cfg.mode].needs_tokens or c.token in token_set])
    if AUGMENT_MODES[cfg.mode].leakage_guard:
        tokens.check_prompts(prompts, [c.name for c in classes], sorted(token_set))

    # 3. refuse another config's output; find what a previous run already committed
    real_manifest = storage.read_manifest(cfg.real, ep) or {}
    made_of = config_record(cfg, **fingerprints, real={
        "config_fingerprint": real_manifest.get("config_fingerprint"), "classes": real_manifest.get("classes")})
    config_fp = storage.fingerprint(made_of)
    done_manifest = storage.ensure_fresh_output(cfg.output, "augment", config_fp, cfg.overwrite, ep, made_of)
    if done_manifest is not None:
        return _already_complete(cfg, done_manifest, started)
    real_ids, train_files = _real_train_ids(cfg)
    progress = _progress(cfg, real_ids)
    log.info("%d real rows x M=%d: %d finished earlier, %d to do", len(real_ids), cfg.num_augmentations,
             len(progress.finished), progress.todo_rows)

    # 4. the actor pool: read -> skip finished rows -> batch-sized blocks -> DiffusionAugmenter
    summaries = _generate(cfg, classes, train_files, progress, fingerprints, _faults) if progress.todo_rows else []

    # 5. verify exactly N x M unique pairs (minus quarantined rows), then the manifest, last
    pairs, quarantined = _verify(cfg, real_ids)
    for s in summaries:
        meter.add_actor_seconds(s["seconds"] + s.get("setup_seconds", 0.0), cfg.num_cpus, cfg.num_gpus,
                                s.get("max_rss_bytes", 0))
    return _write_manifest(cfg, classes, real_ids, pairs, quarantined, summaries, progress, fingerprints, config_fp,
                           started, meter)


def _check_inputs(cfg: AugmentConfig) -> AugmentConfig:
    """Required fields, the t0 levels made explicit (from the mode table when unset), steps per level."""
    cfg.require("real", "output", "model")
    mode = AUGMENT_MODES[cfg.mode]
    if mode.needs_tokens:
        cfg.require("embeddings")
    levels = cfg.t0_levels()
    source = "strengths" if cfg.strengths is not None else f"the {cfg.mode} default"
    log.info("mode %s: %s; t0 levels %s (%s)", cfg.mode, mode.summary, ", ".join(f"{s:g}" for s in levels), source)
    cfg = cfg.replace(strengths=levels)
    for s in levels:
        if denoising_steps(cfg.num_inference_steps, s) < 1:
            raise ConfigError(
                f"config field 'strengths': t0={s} with num_inference_steps={cfg.num_inference_steps} "
                "denoises 0 steps; raise num_inference_steps or t0"
            )
    return cfg


def _prepare_conditioning(cfg: AugmentConfig, classes: list[schema.ClassInfo]) -> tuple[dict[str, Any], set[str]]:
    """Fingerprints of the model, tokens and erasure (checked against the data set and the model)."""
    ep = cfg.endpoint_url
    local_model = models.resolve_model(cfg.model, cfg.cache_dir, ep)
    fingerprints: dict[str, Any] = {"model": models.model_fingerprint(local_model, cfg.cache_dir), "embeddings": ""}
    token_set: set[str] = set()
    if AUGMENT_MODES[cfg.mode].needs_tokens:
        tensors, fingerprints["embeddings"] = weights.load_embeddings(cfg.embeddings, ep)
        token_set = set(tensors)
        dim = _text_encoder_dim(local_model)
        for token, tensor in tensors.items():
            if dim is not None and tensor.shape[-1] != dim:
                raise weights.EmbeddingsError(
                    f"token {token!r} has dimension {tensor.shape[-1]} but model {cfg.model!r} uses {dim}: "
                    "the embeddings were learned on another model"
                )
        missing = [c.name for c in classes if c.token not in token_set]
        if len(missing) == len(classes):
            raise weights.EmbeddingsError(
                f"the embeddings file {cfg.embeddings} holds none of this data set's tokens "
                f"({', '.join(c.token for c in classes)}); was it learned on another data set?"
            )
        if missing:
            log.warning("classes without a token (their rows go to errors/): %s", ", ".join(missing))
        embeddings = storage.absolute(cfg.embeddings)  # a bare file name has its directory too
        embeddings_dir = embeddings.rsplit("/", 1)[0] if embeddings.endswith(".safetensors") else embeddings
        made = storage.read_manifest(embeddings_dir, ep) or {}
        if made.get("stage") == "invert":
            _check_same_model(cfg, "embeddings", made.get("model_fingerprint"), fingerprints["model"])
    if cfg.erasure:
        erasure = weights.ErasureWeights(cfg.erasure, endpoint_url=ep)
        _check_same_model(cfg, "erasure", erasure.model_fingerprint, fingerprints["model"])
        erased = set(erasure.classes())
        missing = [c.name for c in classes if c.name not in erased]
        if len(missing) == len(classes):
            raise ConfigError(
                f"config field 'erasure': {cfg.erasure} erased none of this data set's classes "
                f"({', '.join(c.name for c in classes)}); was it made from another data set?"
            )
        if missing:
            log.warning("classes without an erasure (their rows go to errors/): %s", ", ".join(missing))
        fingerprints["erasure"] = {c: erasure.fingerprint(c) for c in erasure.classes()}
    return fingerprints, token_set


def _check_same_model(cfg: AugmentConfig, field: str, made_with: Optional[str], model_fp: str) -> None:
    """Tokens and erasures belong to the model they were made on: on another model of the same
    shape the tokens mean nothing, and a `full` erasure would swap in that model's whole UNet while
    every row's lineage named this one."""
    if made_with and made_with != model_fp:
        raise ConfigError(
            f"config field '{field}': {getattr(cfg, field)} was made on another model (fingerprint {made_with}) "
            f"than augment's model {cfg.model!r} ({model_fp}); use the same `model` in every stage"
        )


def _already_complete(cfg: AugmentConfig, manifest: dict[str, Any], started: float) -> AugmentResult:
    counts = manifest.get("counts", {})
    log.info("%s is complete (same config, %d images); nothing to do", cfg.output, counts.get("synthetic_rows", 0))
    return AugmentResult(
        output=cfg.output, real_rows=counts.get("real_rows", 0), synthetic_rows=counts.get("synthetic_rows", 0),
        generated=0, skipped_as_done=counts.get("synthetic_rows", 0), errors=counts.get("errors", 0),
        wall_seconds=time.time() - started, images_per_second=0.0, already_complete=True,
    )


def _real_train_ids(cfg: AugmentConfig) -> tuple[list[str], list[str]]:
    """(ids of the real train rows, their parquet files); duplicate ids are refused."""
    ep = cfg.endpoint_url
    train_files = storage.parquet_files(storage.join(cfg.real, "train"), ep)
    if not train_files:
        raise FileNotFoundError(f"no train shards under {storage.join(cfg.real, 'train')}")
    real_ids = storage.read_parquet(storage.join(cfg.real, "train"), ep, columns=["id"]).column("id").to_pylist()
    if len(set(real_ids)) != len(real_ids):
        raise ValueError(f"{cfg.real}/train has duplicate ids; re-run ingest (ids must be unique)")
    return real_ids, train_files


@dataclass
class _Progress:
    """What earlier runs of this config committed."""

    finished: set[str]
    """Real ids with all M images, or quarantined."""
    partial: dict[str, list[int]]
    """Real id -> aug indices already committed, for rows begun but not finished."""
    todo_rows: int
    skipped: int
    """Images committed earlier."""
    files: int
    """Data files committed earlier."""


def _progress(cfg: AugmentConfig, real_ids: list[str]) -> _Progress:
    committed = _committed_pairs(cfg.output, cfg.endpoint_url)
    present: dict[str, set[int]] = defaultdict(set)
    for sid, k in zip(committed.column("source_id").to_pylist(), committed.column("aug_index").to_pylist()):
        present[sid].add(k)
    quarantined = schema.quarantined_items(cfg.output, cfg.endpoint_url)
    finished = {sid for sid, ks in present.items() if len(ks) >= cfg.num_augmentations} | quarantined
    partial = {sid: sorted(ks) for sid, ks in present.items() if sid not in finished}
    files = len(storage.list_files(storage.join(cfg.output, DATA_DIR), ".parquet", cfg.endpoint_url))
    return _Progress(finished, partial, sum(1 for i in real_ids if i not in finished),
                     sum(len(ks) for ks in present.values()), files)


def _generate(cfg: AugmentConfig, classes: list[schema.ClassInfo], train_files: list[str], progress: _Progress,
              fingerprints: dict[str, Any], faults: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream the unfinished real rows through the actor pool; returns one summary per batch."""
    from ray.data.expressions import col

    ep = cfg.endpoint_url
    actors, pin = _actor_plan(cfg)
    ds = storage.ray_dataset(train_files, _REAL_COLUMNS, ep)
    if progress.finished:
        ds = ds.filter(expr=col("id").not_in(sorted(progress.finished)))
    # The few-shot real set is small: one block per batch spreads it over every actor.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts / max_task_retries only as **ray_remote_args, which it
        # flags as deprecated for 2.64 while offering no named parameter for them yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = _map_augmenter(ds, cfg, classes, progress.partial, fingerprints, faults, actors, pin)
    hint = (f"each of {actors} actors reserves num_cpus {cfg.num_cpus:g} and num_gpus {cfg.num_gpus:g}"
            + (f" on nodes with {', '.join(pin)}" if pin else "") + "; lower them or max_actors, or add nodes"
            + ("; with other jobs on a small cluster at once (a sweep's trials), set compute: tasks"
               if cfg.compute == "actors" else ""))
    summaries: list[dict[str, Any]] = []
    error = _drain(ds, summaries, cfg, hint, (faults or {}).get("stop_after_batches"))
    if error is not None:
        # Ray Data keeps a failed run's actors alive (for lineage) as long as this driver lives,
        # holding their CPUs/GPUs: a re-run is a new command (a new driver), as the message says.
        raise StageError(f"augment stopped after {len(summaries)} batches: {error}. Every committed batch is kept; "
                         "re-run the same command (a new process) to generate the rest")
    return summaries


def _drain(ds: Any, summaries: list[dict[str, Any]], cfg: AugmentConfig, hint: str,
           stop_after: Optional[int]) -> Optional[str]:
    """Run the actor pool to its end, appending each batch's summary; the error as text, if any
    (logged with its traceback here, so that no reference to the run outlives this call)."""
    try:
        with Watchdog("augment", "batch", cfg.stall_warning, cfg.stall_timeout, hint=hint) as watchdog:
            for summary in ds.iter_rows():
                watchdog.progress()
                summaries.append(summary)
                if summary["rows"]:
                    log.info("wrote %s (%d images, %.1fs)", summary["file"], summary["rows"], summary["seconds"])
                if stop_after is not None and len(summaries) >= stop_after:
                    raise RuntimeError(f"injected stop after {len(summaries)} batches")
    except Exception as exc:
        log.warning("augment run failed", exc_info=True)
        # Stop the pool's actors now, so that nothing of this run commits after it has reported its
        # failure (Ray Data 2.60 exposes the running execution only as this attribute; an error from
        # Ray Data itself has already shut it down, gently, and this is then a no-op).
        executor = getattr(ds, "_current_executor", None)
        if executor is not None:
            executor.shutdown(force=True)
        return one_line(exc)  # the traceback is in the log above
    return None


def _verify(cfg: AugmentConfig, real_ids: list[str]) -> tuple[list[tuple[str, int]], set[str]]:
    """Every (source_id, aug_index) of the non-quarantined real rows exactly once, or a StageError
    that says which files to remove or what to re-run."""
    ep = cfg.endpoint_url
    data_dir = storage.join(cfg.output, DATA_DIR)
    files = storage.list_files(data_dir, ".parquet", ep)
    quarantined = schema.quarantined_items(cfg.output, ep)
    where: dict[tuple[str, int], list[str]] = defaultdict(list)
    for uri in files:
        t = storage.read_parquet(uri, ep, columns=["source_id", "aug_index"])
        for pair in zip(t.column("source_id").to_pylist(), t.column("aug_index").to_pylist()):
            where[pair].append(os.path.basename(uri))
    pairs = [p for p, names in where.items() for _ in names]
    expected = {(sid, k) for sid in real_ids if sid not in quarantined for k in range(cfg.num_augmentations)}
    duplicated = {p: names for p, names in where.items() if len(names) > 1}
    missing = expected - set(where)
    unexpected = set(where) - expected
    if duplicated or unexpected:
        bad_files = sorted({n for names in duplicated.values() for n in names[1:]}
                           | {n for p in unexpected for n in where[p]})
        raise StageError(
            f"augment output {cfg.output} is inconsistent: {len(duplicated)} (source_id, aug_index) pairs are written "
            f"more than once and {len(unexpected)} do not belong to {cfg.real}/train. A re-run cannot repair that: "
            f"remove the extra files from {data_dir} ({', '.join(bad_files[:5])}{', ...' if len(bad_files) > 5 else ''}) "
            "and re-run, or re-run with overwrite: true to generate everything again"
        )
    if missing:
        raise StageError(f"augment output {cfg.output} misses {len(missing)} images (e.g. {sorted(missing)[:3]}); "
                         "re-run the same command to generate them")
    return pairs, quarantined


def _write_manifest(cfg: AugmentConfig, classes: list[schema.ClassInfo], real_ids: list[str],
                    pairs: list[tuple[str, int]], quarantined: set[str], summaries: list[dict[str, Any]],
                    progress: _Progress, fingerprints: dict[str, Any], config_fp: str, started: float,
                    meter: CostMeter) -> AugmentResult:
    ep = cfg.endpoint_url
    wall = time.time() - started
    # the verified pairs less those committed before this run: a batch whose actor crashed after its
    # commit returns no summary, and its retry finds the file and generates nothing, yet this run made it
    generated = len(pairs) - progress.skipped
    counts = {
        "real_rows": len(real_ids),
        "synthetic_rows": len(pairs),
        "generated": generated,
        "skipped_as_done": progress.skipped,
        "errors": len(quarantined),
        "files": len(storage.list_files(storage.join(cfg.output, DATA_DIR), ".parquet", ep)),
    }
    manifest = {
        "stage": "augment",
        "config": cfg.to_dict(),
        "config_fingerprint": config_fp,
        "mode": cfg.mode,
        "real": storage.absolute(cfg.real),  # as a path that works from any directory
        "model": cfg.model,
        "model_fingerprint": fingerprints["model"],
        "embeddings_fingerprint": fingerprints["embeddings"],
        "erasure_fingerprints": fingerprints.get("erasure", {}),
        "classes": [{"name": c.name, "label": c.label, "token": c.token} for c in classes],
        "num_augmentations": cfg.num_augmentations,
        "counts": counts,
        "timings": {"wall_seconds": wall, "images_per_second": generated / wall if wall > 0 else 0.0,
                    "actor_seconds": sum(s["seconds"] for s in summaries),
                    # in the order the driver received them: the first includes warm-up (and compiling)
                    "batches": [{"file": s["file"], "rows": s["rows"], "seconds": round(s["seconds"], 3)}
                                for s in summaries if s["rows"]],
                    "max_gpu_bytes": max((s.get("max_gpu_bytes", 0) for s in summaries), default=0)},
        "cost": meter.report(images=generated),
        "versions": versions(),
    }
    storage.write_manifest(cfg.output, manifest, ep)
    log.info("%s: %d synthetic images (%d generated now, %d earlier), %d real rows quarantined in %s/, %d files, "
             "%.1fs (%.2f images/s)", cfg.output, len(pairs), generated, progress.skipped, len(quarantined),
             ERRORS_DIR, counts["files"], wall, manifest["timings"]["images_per_second"])
    return AugmentResult(
        output=cfg.output, real_rows=len(real_ids), synthetic_rows=len(pairs), generated=generated,
        skipped_as_done=progress.skipped, errors=len(quarantined), wall_seconds=wall,
        images_per_second=manifest["timings"]["images_per_second"],
        files_written=counts["files"] - progress.files,
    )


callable_stage_module(__name__)  # `from ray_dafusion import augment` may give this module: call it as the stage
