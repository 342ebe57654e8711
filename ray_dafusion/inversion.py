"""Textual inversion: learn one pseudo-word per class from that class's real train images.

``invert(cfg)`` runs one Ray task per class (or per ``cfg.classes_per_task`` classes). Each task
loads the diffusion model, adds its class tokens (initialised from ``cfg.initializer_token``), and
trains only those tokens' embedding rows: every other row of the embedding matrix is restored after
each step, and the UNet, VAE and text encoder stay frozen. Classes sharing a task share each forward
pass (their batches side by side) but not their losses: a token's gradient is its own class's, so
each class learns what it would alone, while a small model's per-call overhead is paid once. The
objective is the usual diffusion loss (MSE on the noise, or on the velocity for v-prediction
models) with random templates from ``tokens.INVERSION_TEMPLATES``, less those that name a class of
the data set (``tokens.templates_for``: the digits' class `one` drops "a photo of one {}").

Output (``cfg.output``)::

    classes/<name>.safetensors   one file per class, {token: tensor}; the re-run skip unit, its
                                 safetensors metadata holds the loss curve and timing
    tokens.safetensors           every class {token: tensor[dim]} (or [num_vectors, dim])
    manifest.json                config, fingerprints, per-class loss curves and seconds

``learn_tokens`` (``learn_token`` for one class) is the training loop on its own (no Ray), for tests
and notebooks.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from . import models, perclass, schema, storage
from .config import InvertConfig
from .errors import ConfigError
from .logs import setup_logging
from .models import file_fingerprint
from .runinfo import CostMeter, max_rss_bytes, versions
from .schema import ClassInfo
from .tokens import INVERSION_TEMPLATES, case_collision, make_prompt, taken_ignoring_case, templates_for
from .weights import EMBEDDINGS_FILE

__all__ = ["InvertResult", "LearnedToken", "invert", "learn_token", "learn_tokens", "class_file_name"]

CLASSES_DIR = "classes"
_PREDICTION_TYPES = ("epsilon", "v_prediction")
"""What the model may predict: the loss targets the noise or the velocity."""

log = logging.getLogger(__name__)


@dataclass
class InvertResult:
    """What `invert` produced."""

    output: str
    """The output directory."""
    embeddings: str
    """URI of tokens.safetensors (every class)."""
    num_classes: int
    """Classes in tokens.safetensors."""
    trained: list[str] = field(default_factory=list)
    """Classes learned by this run."""
    skipped: list[str] = field(default_factory=list)
    """Classes whose per-class file already existed."""
    seconds: float = 0.0
    """Wall time of the whole stage."""
    seconds_per_class: dict[str, float] = field(default_factory=dict)
    """Training time of each class learned by this run (inside its task)."""


@dataclass
class LearnedToken:
    """One trained token: its embedding and how training went."""

    token: str
    embedding: Any  # torch.Tensor (dim,) or (num_vectors, dim), fp32 on CPU
    losses: list[float]
    """Mean loss of each optimisation step."""
    seconds: float
    """Training time (shared by the classes learned together)."""
    device: str


def class_file_name(token: str) -> str:
    """File name (no directory) of a class's own embedding file: `<leafy_spurge>` -> `leafy_spurge.safetensors`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", token.strip("<>")) or "token"
    return f"{safe}.safetensors"


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


@storage.leased("invert")
def invert(cfg: InvertConfig) -> InvertResult:
    """Learn a token for every class of `cfg.real` (one Ray task per `classes_per_task` classes) and write `cfg.output`."""
    cfg.require("real", "output")
    start = time.time()
    meter = CostMeter(cfg.cost)

    # 1. classes to learn; the model checked once here, not in every task, before the output records this config
    table = schema.read_class_table(cfg.real, cfg.endpoint_url)
    classes = perclass.select_classes(table, cfg.classes, lambda c: class_file_name(c.token))
    _check_model(cfg, [c.token for c in classes])
    left_out = sorted(set(INVERSION_TEMPLATES) - set(templates_for([c.name for c in table])))
    if left_out:  # the prompts never name a class, here either
        log.info("inversion prompts leave out %s: they name a class of this data set", ", ".join(map(repr, left_out)))

    # 2. refuse another config's output, skip classes already learned
    plan = perclass.plan_classes("invert", cfg, classes, lambda c: _class_uri(cfg.output, c))
    if plan.complete is not None and not plan.todo:  # finished with this config: leave it untouched
        log.info("%s is complete (same config); nothing to do", cfg.output)
        return InvertResult(
            output=cfg.output, embeddings=storage.join(cfg.output, EMBEDDINGS_FILE),
            num_classes=len(plan.complete.get("embeddings", {}).get("tokens", [])),
            skipped=[c.name for c in plan.done], seconds=round(time.time() - start, 3),
        )

    # 3. one task per class (or group of classes); each reads its own rows and writes its classes' files
    records = perclass.run_class_tasks("invert", cfg, plan.todo, _invert_classes, _describe, meter,
                                       classes_per_task=cfg.classes_per_task)

    # 4. every class file under this config -> the combined file, then the manifest (last)
    result = _write_combined(cfg, plan, start, meter)
    result.seconds_per_class = {name: r["seconds"] for name, r in records.items()}
    log.info("%s: %d tokens in %s (%d learned now, %d earlier) in %.1fs", cfg.output, result.num_classes,
             EMBEDDINGS_FILE, len(result.trained), len(result.skipped), result.seconds)
    return result


def _check_model(cfg: InvertConfig, tokens: list[str]) -> None:
    """The model loads, its noise schedule is one we train, the initializer word is one token and
    every class token reads back as itself: from the tokenizer and scheduler config alone."""
    from diffusers import DDPMScheduler

    tokenizer, schedule = models.load_tokenizer_and_schedule(cfg.model, cfg.cache_dir, cfg.endpoint_url)
    prediction_type = DDPMScheduler.from_config(schedule).config.prediction_type  # with the scheduler's default
    if prediction_type not in _PREDICTION_TYPES:
        raise ConfigError(f"config field 'model': {cfg.model!r} predicts {prediction_type!r}; textual inversion "
                          f"trains models that predict {' or '.join(_PREDICTION_TYPES)}")
    _add_class_tokens(tokenizer, _token_names(tokens, cfg.num_vectors), cfg.initializer_token)


def _class_uri(output: str, info: ClassInfo) -> str:
    return storage.join(output, CLASSES_DIR, class_file_name(info.token))


def _describe(record: dict[str, Any]) -> str:
    shared = record.get("task_classes", 1)
    took = (f"done in {record['task_seconds']:.1f}s (one task for {shared} classes)" if shared > 1
            else f"done in {record['seconds']:.1f}s")
    return f"{took}, loss {_mean_head(record['losses']):.4f} -> {_mean_tail(record['losses']):.4f}"


def _write_combined(cfg: InvertConfig, plan: perclass.ClassPlan, start: float, meter: CostMeter) -> InvertResult:
    from safetensors.torch import save as save_safetensors

    records, combined = _collect(cfg.output, cfg.endpoint_url)
    data = save_safetensors(combined)
    embeddings_uri = storage.join(cfg.output, EMBEDDINGS_FILE)
    storage.write_bytes(embeddings_uri, data, cfg.endpoint_url)
    storage.write_manifest(cfg.output, {
        "stage": "invert",
        "config": cfg.to_dict(),
        "config_fingerprint": plan.config_fingerprint,
        "real": storage.absolute(cfg.real),  # as a path that works from any directory
        "model": cfg.model,
        "model_fingerprint": _one_value(r.get("model_fingerprint") for r in records),
        "embeddings": {"file": EMBEDDINGS_FILE, "fingerprint": file_fingerprint(data), "tokens": sorted(combined)},
        "classes": {r["name"]: r for r in records},
        "counts": {"classes": len(records), "trained": len(plan.todo), "skipped": len(plan.done)},
        "timings": {"total_seconds": round(time.time() - start, 3),
                    "seconds_per_class": {r["name"]: r["seconds"] for r in records}},
        "cost": meter.report(),
        "versions": versions(),
    }, cfg.endpoint_url)
    return InvertResult(
        output=cfg.output, embeddings=embeddings_uri, num_classes=len(combined),
        trained=[c.name for c in plan.todo], skipped=[c.name for c in plan.done],
        seconds=round(time.time() - start, 3),
    )


def _invert_classes(cfg: InvertConfig, infos: list[ClassInfo]) -> list[dict[str, Any]]:
    """Ray task: learn the tokens of these classes together, write each class's file. Returns their records (small)."""
    import torch
    from safetensors.torch import save as save_safetensors

    from .models import load_pipeline, model_fingerprint, resolve_model

    task_started = time.time()
    setup_logging()
    # 1. each class's images (few-shot: read here, not shipped through the task arguments)
    images = {info.token: _read_class_images(cfg.real, info.name, cfg.endpoint_url) for info in infos}
    # 2. the model in fp32 (learn_tokens runs fp16 autocast on a GPU)
    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    local = resolve_model(cfg.model, cfg.cache_dir, cfg.endpoint_url)
    pipe = load_pipeline(local, device=device, torch_dtype=torch.float32)
    for info in infos:
        log.info("%s: %d images, token %s, %d steps on %s", info.name, len(images[info.token]), info.token, cfg.steps,
                 device)
    # 3. train, on prompts that name no class of the data set
    seeds = {info.token: perclass.class_seed(cfg.seed, info.name) for info in infos}
    templates = templates_for([c.name for c in schema.read_class_table(cfg.real, cfg.endpoint_url)])
    learned = learn_tokens(pipe, images, cfg, seeds, templates)
    # 4. each class file: {token: tensor}, its record in the metadata
    setup = max(0.0, time.time() - task_started - learned[0].seconds) if learned else 0.0  # reads and model load
    fingerprint, records = model_fingerprint(local, cfg.cache_dir), []
    for info, tok in zip(infos, learned):
        record = {
            "name": info.name, "label": info.label, "token": info.token,
            "file": f"{CLASSES_DIR}/{class_file_name(info.token)}", "num_images": len(images[info.token]),
            "steps": cfg.steps, "seconds": round(tok.seconds / len(infos), 3),  # this class's share of the task
            "task_seconds": round(tok.seconds, 3), "task_classes": len(infos),
            "setup_seconds": round(setup / len(infos), 3),  # this class's share of the task's reads and model load
            "device": tok.device, "model_fingerprint": fingerprint, "losses": tok.losses, "templates": list(templates),
            "max_rss_bytes": max_rss_bytes(),
        }
        data = save_safetensors({info.token: tok.embedding.contiguous()}, metadata={"record": json.dumps(record)})
        storage.write_bytes(_class_uri(cfg.output, info), data, cfg.endpoint_url)
        records.append(record)
    return records


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def learn_token(pipe: Any, token: str, images: Sequence[Any], cfg: InvertConfig, seed: int) -> LearnedToken:
    """Add `token` to `pipe` and learn its embedding from `images` (PIL): `learn_tokens` for one class."""
    return learn_tokens(pipe, {token: images}, cfg, {token: seed})[0]


@dataclass
class _ClassDraws:
    """One class's images (as VAE posteriors) and its own random streams: the draws a class makes
    do not depend on which classes share its task."""

    names: list[str]
    means: Any  # (N, 2, 4, R/8, R/8); [:, 1] is the mirror image
    stds: Any
    rng: Any
    gen: Any
    templates: Sequence[str] = INVERSION_TEMPLATES
    order: list[int] = field(default_factory=list)

    def batch(self, cfg: InvertConfig, tokenizer: Any, scheduler: Any, scaling: float, device: Any) -> tuple:
        """(noisy latents, timesteps, target, input ids) of one micro-batch of this class."""
        import torch

        picks = []
        for _ in range(cfg.batch_size):  # epochs of shuffled images, repeated as needed
            if not self.order:
                self.order = list(self.rng.permutation(len(self.means)))
            picks.append(self.order.pop())
        idx = torch.tensor(picks)
        flip = torch.from_numpy((self.rng.random(cfg.batch_size) < 0.5) & cfg.hflip).long()
        placeholder = " ".join(self.names)
        prompts = [make_prompt(str(self.rng.choice(self.templates)), placeholder) for _ in picks]
        mean = self.means[idx, flip]
        eps = torch.randn(mean.shape, generator=self.gen).to(device)
        latents = (mean + self.stds[idx, flip] * eps) * scaling  # (B, 4, R/8, R/8)
        noise = torch.randn(latents.shape, generator=self.gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=self.gen).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        input_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device)
        return noisy, t, target, input_ids


def learn_tokens(pipe: Any, classes: dict[str, Sequence[Any]], cfg: InvertConfig, seeds: dict[str, int],
                 templates: Sequence[str] = INVERSION_TEMPLATES) -> list[LearnedToken]:
    """Add each token of `classes` ({token: PIL images}) to `pipe` and learn its embedding from its
    images; only the new rows change. One forward pass per step holds every class's batch; the
    loss is the sum of the per-class losses, so each token's gradient is its own class's and
    (AdamW being elementwise) each token follows the path it would alone, up to float rounding.

    Prompts are drawn from `templates` (those naming no class of the data set: `tokens.templates_for`).
    Uses cfg's steps, batch_size, gradient_accumulation_steps, learning_rate (scaled when
    scale_lr), resolution, num_vectors and initializer_token. The pipeline keeps the tokens.
    On CUDA the frozen VAE and UNet run in fp16 under autocast with a GradScaler while the
    embedding matrix (the master copy) stays fp32; on CPU everything is fp32.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    for token, images in classes.items():
        if not images:
            raise ValueError(f"no images to learn {token} from")
    start = time.time()
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    device = unet.device
    use_amp = device.type == "cuda"

    # 1. the new tokens, initialised from the initializer word's embedding
    names = _token_names(classes, cfg.num_vectors)
    init_id, token_ids = _add_class_tokens(tokenizer, names, cfg.initializer_token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = text_encoder.get_input_embeddings().weight
    new_rows = [i for ids in token_ids.values() for i in ids]
    with torch.no_grad():
        embeddings[new_rows] = embeddings[init_id].clone()

    # 2. freeze everything but the embedding matrix; remember the rows that must not move
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
        module.eval()
    embeddings.requires_grad_(True)
    keep = torch.ones(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    keep[new_rows] = False
    original = embeddings.detach().clone()

    # 3. optimiser and noise schedule (docs/method.md defaults)
    processes = 1  # one process per task
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.batch_size * cfg.gradient_accumulation_steps * processes
    optimizer = torch.optim.AdamW([embeddings], lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r} ({' or '.join(_PREDICTION_TYPES)})")

    # 4. per class: images squashed to the resolution, the VAE posterior of each image and its mirror
    # (once), and its own generators: every random draw comes from them, independent of the weights
    draws = []
    for token, images in classes.items():
        pixels = torch.stack([_to_tensor(img, cfg.resolution) for img in images]).to(device)  # (N, 3, R, R)
        with torch.no_grad():  # fp32: a one-off cost, and fp16 VAEs can overflow
            posteriors = [vae.encode(torch.stack([p, p.flip(-1)])).latent_dist for p in pixels]
        draws.append(_ClassDraws(names[token], torch.stack([p.mean for p in posteriors]).float(),
                                 torch.stack([p.std for p in posteriors]).float(), np.random.default_rng(seeds[token]),
                                 torch.Generator(device="cpu").manual_seed(seeds[token]), templates))

    # 5. train: each step, every class's micro-batch in one forward pass, the loss summed over classes
    losses: list[list[float]] = [[] for _ in draws]
    scaling, b = vae.config.scaling_factor, cfg.batch_size
    for _ in range(cfg.steps):
        step_loss = [0.0] * len(draws)
        for _ in range(cfg.gradient_accumulation_steps):
            noisy, t, target, input_ids = (torch.cat(cols) for cols in zip(
                *(d.batch(cfg, tokenizer, noise_scheduler, scaling, device) for d in draws)))
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                hidden = text_encoder(input_ids)[0]  # (C*B, 77, dim)
                pred = unet(noisy, t, hidden).sample
            per_class = [F.mse_loss(pred[i * b:(i + 1) * b].float(), target[i * b:(i + 1) * b].float())
                         for i in range(len(draws))]
            scaler.scale(torch.stack(per_class).sum() / cfg.gradient_accumulation_steps).backward()
            for i, loss in enumerate(per_class):
                step_loss[i] += loss.item() / cfg.gradient_accumulation_steps
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # only the new tokens move: put every other row back
            embeddings[keep] = original[keep]
        for token, curve, value in zip(classes, losses, step_loss):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {len(curve)} while learning {token}")
            curve.append(value)

    embeddings.requires_grad_(False)
    seconds = time.time() - start
    out = []
    for token, curve in zip(classes, losses):
        learned = embeddings[token_ids[token]].detach().float().cpu().clone()  # (num_vectors, dim)
        out.append(LearnedToken(token=token, embedding=learned[0] if cfg.num_vectors == 1 else learned,
                                losses=[round(v, 6) for v in curve], seconds=seconds, device=str(device)))
    return out


def _token_names(tokens: Sequence[str], num_vectors: int) -> dict[str, list[str]]:
    """Each token's names in the tokenizer; diffusers' multi-vector convention: "<tok>", "<tok>_1", ...
    (load_textual_inversion expands prompts)."""
    return {token: [token] + [f"{token}_{i}" for i in range(1, num_vectors)] for token in tokens}


def _add_class_tokens(tokenizer: Any, names: dict[str, list[str]],
                      initializer_token: str) -> tuple[int, dict[str, list[int]]]:
    """Add every token's names to `tokenizer`, refusing any that would not read back as its own ids.
    Returns (the initializer word's id, {token: ids of its names})."""
    init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ConfigError(
            f"config field 'initializer_token': {initializer_token!r} is {len(init_ids)} tokens for this "
            "tokenizer; it must be exactly one (e.g. 'the')"
        )
    every = [n for group in names.values() for n in group]
    clash = case_collision(every)
    if clash:
        raise ValueError(f"tokens {clash[0]!r} and {clash[1]!r} differ only in case: CLIP's tokenizer lowercases "
                         "prompts, so both would read as one token; rename one of their classes")
    taken = taken_ignoring_case(every, tokenizer.get_vocab())
    if taken:
        raise ValueError(f"token(s) {list(taken)} already exist in the tokenizer (as {list(taken.values())}; case "
                         "does not count, prompts are lowercased); pick another class token")
    tokenizer.add_tokens(every)
    token_ids = {token: tokenizer.convert_tokens_to_ids(group) for token, group in names.items()}
    for token, group in names.items():
        read = tokenizer.encode(" ".join(group), add_special_tokens=False)
        if read != token_ids[token]:
            raise ValueError(f"token {token!r} reads back as {tokenizer.convert_ids_to_tokens(read)} with this "
                             "tokenizer, not as itself (prompts are lowercased and normalised); rename its class")
    return init_ids[0], token_ids


def _to_tensor(image: Any, resolution: int) -> Any:
    """PIL image -> (3, R, R) float tensor in [-1, 1], squashed (aspect not kept), bicubic."""
    import numpy as np
    import torch
    from PIL import Image

    image = image.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _read_class_images(real: str, class_name: str, endpoint_url: Optional[str]) -> list[Any]:
    """Decoded train images of one class (few-shot: a handful of rows), in `id` order."""
    import pyarrow.parquet as pq

    train = storage.join(real, "train")
    files = storage.parquet_files(train, endpoint_url)
    if not files:
        raise FileNotFoundError(f"no parquet files under {train}; run `ray-dafusion ingest` first")
    rows = []
    for uri in files:
        fs, path = storage.resolve(uri, endpoint_url)
        table = pq.read_table(path, filesystem=fs, columns=["id", "image", "class_name"],
                              filters=[("class_name", "=", class_name)])
        rows += [(row["id"], uri, row["image"]) for row in table.to_pylist()]
    # the draws index images by position: ordered by id, the token does not depend on how ingest
    # split the rows into files (rows_per_file), nor on the order the files are listed in
    rows.sort(key=lambda row: row[0])
    images = []
    for row_id, uri, image in rows:
        try:
            images.append(schema.decode_image((image or {}).get("bytes")))
        except ValueError as exc:
            raise ValueError(f"train row {row_id} of class {class_name!r} in {uri}: {exc}") from None
    if not images:
        raise ValueError(f"class {class_name!r} has no train images under {train}")
    return images


def _read_class_record(data: bytes) -> dict[str, Any]:
    """The record a per-class file carries in its safetensors metadata."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    return json.loads(header.get("__metadata__", {}).get("record", "{}"))


def _collect(output: str, endpoint_url: Optional[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every per-class file of the output: (records by label, {token: tensor})."""
    from safetensors.torch import load as load_safetensors

    records, combined = [], {}
    for uri in storage.list_files(storage.join(output, CLASSES_DIR), ".safetensors", endpoint_url):
        data = storage.read_bytes(uri, endpoint_url)
        record = _read_class_record(data)
        tensors = load_safetensors(data)
        if set(tensors) != {record.get("token")}:
            raise ValueError(f"{uri} does not hold exactly its class token {record.get('token')!r}: {sorted(tensors)}")
        record["fingerprint"] = file_fingerprint(data)
        records.append(record)
        combined.update(tensors)
    return sorted(records, key=lambda r: r["label"]), combined


def _one_value(values: Any) -> Optional[str]:
    found = sorted({v for v in values if v})
    return found[0] if len(found) == 1 else (",".join(found) or None)


def _mean_head(values: list[float], k: int = 10) -> float:
    head = values[: max(1, min(k, len(values) // 2 or 1))]
    return sum(head) / len(head)


def _mean_tail(values: list[float], k: int = 10) -> float:
    tail = values[-max(1, min(k, len(values) // 2 or 1)):]
    return sum(tail) / len(tail)
