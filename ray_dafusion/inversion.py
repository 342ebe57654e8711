"""Textual inversion: learn one pseudo-word per class from that class's real train images.

``invert(cfg)`` runs one Ray task per class. Each task loads the diffusion model, adds the class
token (initialised from ``cfg.initializer_token``), and trains only that token's embedding rows:
every other row of the embedding matrix is restored after each step, and the UNet, VAE and text
encoder stay frozen. The objective is the usual diffusion loss (MSE on the noise, or on the
velocity for v-prediction models) with random templates from ``tokens.INVERSION_TEMPLATES``.

Output (``cfg.output``)::

    classes/<name>.safetensors   one file per class, {token: tensor}; the re-run skip unit, its
                                 safetensors metadata holds the loss curve and timing
    tokens.safetensors           every class {token: tensor[dim]} (or [num_vectors, dim])
    manifest.json                config, fingerprints, per-class loss curves and seconds

``learn_token`` is the training loop on its own (no Ray), for tests and notebooks.
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

from . import perclass, schema, storage
from .config import InvertConfig
from .logs import setup_logging
from .models import file_fingerprint
from .runinfo import CostMeter, max_rss_bytes, versions
from .schema import ClassInfo
from .tokens import INVERSION_TEMPLATES, make_prompt
from .weights import EMBEDDINGS_FILE

__all__ = ["InvertResult", "LearnedToken", "invert", "learn_token", "class_file_name"]

CLASSES_DIR = "classes"

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
    """Learn a token for every class of `cfg.real` (one Ray task per class) and write `cfg.output`."""
    cfg.require("real", "output")
    start = time.time()
    meter = CostMeter(cfg.cost)

    # 1. classes to learn; refuse another config's output, skip classes already learned
    classes = perclass.select_classes(schema.read_class_table(cfg.real, cfg.endpoint_url), cfg.classes,
                                      lambda c: class_file_name(c.token))
    plan = perclass.plan_classes("invert", cfg, classes, lambda c: _class_uri(cfg.output, c))
    if plan.complete is not None and not plan.todo:  # finished with this config: leave it untouched
        log.info("%s is complete (same config); nothing to do", cfg.output)
        return InvertResult(
            output=cfg.output, embeddings=storage.join(cfg.output, EMBEDDINGS_FILE),
            num_classes=len(plan.complete.get("embeddings", {}).get("tokens", [])),
            skipped=[c.name for c in plan.done], seconds=round(time.time() - start, 3),
        )

    # 2. one task per class; each reads its own rows and writes its own file
    records = perclass.run_class_tasks("invert", cfg, plan.todo, _invert_class, _describe, meter)

    # 3. every class file under this config -> the combined file, then the manifest (last)
    result = _write_combined(cfg, plan, start, meter)
    result.seconds_per_class = {name: r["seconds"] for name, r in records.items()}
    log.info("%s: %d tokens in %s (%d learned now, %d earlier) in %.1fs", cfg.output, result.num_classes,
             EMBEDDINGS_FILE, len(result.trained), len(result.skipped), result.seconds)
    return result


def _class_uri(output: str, info: ClassInfo) -> str:
    return storage.join(output, CLASSES_DIR, class_file_name(info.token))


def _describe(record: dict[str, Any]) -> str:
    return (f"done in {record['seconds']:.1f}s, loss {_mean_head(record['losses']):.4f} "
            f"-> {_mean_tail(record['losses']):.4f}")


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
        "real": cfg.real,
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


def _invert_class(cfg: InvertConfig, info: ClassInfo) -> dict[str, Any]:
    """Ray task: learn one class's token and write its file. Returns the record (small)."""
    import torch
    from safetensors.torch import save as save_safetensors

    from .models import load_pipeline, model_fingerprint, resolve_model

    setup_logging()
    # 1. this class's images (few-shot: read here, not shipped through the task arguments)
    images = _read_class_images(cfg.real, info.name, cfg.endpoint_url)
    # 2. the model in fp32 (learn_token runs fp16 autocast on a GPU)
    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    local = resolve_model(cfg.model, cfg.cache_dir, cfg.endpoint_url)
    pipe = load_pipeline(local, device=device, torch_dtype=torch.float32)
    log.info("%s: %d images, token %s, %d steps on %s", info.name, len(images), info.token, cfg.steps, device)
    # 3. train
    learned = learn_token(pipe, info.token, images, cfg, seed=perclass.class_seed(cfg.seed, info.name))
    # 4. the class file: {token: tensor}, the record in its metadata
    record = {
        "name": info.name, "label": info.label, "token": info.token, "file": f"{CLASSES_DIR}/{class_file_name(info.token)}",
        "num_images": len(images), "steps": cfg.steps, "seconds": round(learned.seconds, 3),
        "device": learned.device, "model_fingerprint": model_fingerprint(local, cfg.cache_dir), "losses": learned.losses,
        "max_rss_bytes": max_rss_bytes(),
    }
    data = save_safetensors({info.token: learned.embedding.contiguous()}, metadata={"record": json.dumps(record)})
    storage.write_bytes(_class_uri(cfg.output, info), data, cfg.endpoint_url)
    return record


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def learn_token(pipe: Any, token: str, images: Sequence[Any], cfg: InvertConfig, seed: int) -> LearnedToken:
    """Add `token` to `pipe` and learn its embedding from `images` (PIL); only its rows change.

    Uses cfg's steps, batch_size, gradient_accumulation_steps, learning_rate (scaled when
    scale_lr), resolution, num_vectors and initializer_token. The pipeline keeps the token.
    On CUDA the frozen VAE and UNet run in fp16 under autocast with a GradScaler while the
    embedding matrix (the master copy) stays fp32; on CPU everything is fp32.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    if not images:
        raise ValueError(f"no images to learn {token} from")
    start = time.time()
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    device = unet.device
    use_amp = device.type == "cuda"

    # 1. the new token(s), initialised from the initializer word's embedding
    init_ids = tokenizer.encode(cfg.initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(
            f"initializer_token {cfg.initializer_token!r} is {len(init_ids)} tokens for this tokenizer; "
            "it must be exactly one (e.g. 'the')"
        )
    # diffusers' multi-vector convention: "<tok>", "<tok>_1", ... (load_textual_inversion expands prompts)
    names = [token] + [f"{token}_{i}" for i in range(1, cfg.num_vectors)]
    taken = [n for n in names if n in tokenizer.get_vocab()]
    if taken:
        raise ValueError(f"token(s) {taken} already exist in the tokenizer; pick another class token")
    tokenizer.add_tokens(names)
    token_ids = tokenizer.convert_tokens_to_ids(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[token_ids] = embeddings[init_ids[0]].clone()

    # 2. freeze everything but the embedding matrix; remember the rows that must not move
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
        module.eval()
    embeddings.requires_grad_(True)
    keep = torch.ones(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    keep[token_ids] = False
    original = embeddings.detach().clone()

    # 3. optimiser and noise schedule (METHOD.md defaults)
    processes = 1  # one class per task, one process per task
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.batch_size * cfg.gradient_accumulation_steps * processes
    optimizer = torch.optim.AdamW([embeddings], lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")

    # 4. images squashed to the resolution; VAE posterior of each image and its mirror, once
    pixels = torch.stack([_to_tensor(img, cfg.resolution) for img in images]).to(device)  # (N, 3, R, R)
    with torch.no_grad():  # fp32: a one-off cost, and fp16 VAEs can overflow
        posteriors = [vae.encode(torch.stack([p, p.flip(-1)])).latent_dist for p in pixels]
    means = torch.stack([p.mean for p in posteriors]).float()  # (N, 2, 4, R/8, R/8); [:, 1] is flipped
    stds = torch.stack([p.std for p in posteriors]).float()

    # 5. train; every random draw comes from these generators, independent of the weights
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    placeholder = " ".join(names)
    order: list[int] = []
    losses: list[float] = []
    for _ in range(cfg.steps):
        step_loss = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = []
            for _ in range(cfg.batch_size):  # epochs of shuffled images, repeated as needed
                if not order:
                    order = list(rng.permutation(len(images)))
                batch.append(order.pop())
            idx = torch.tensor(batch)
            flip = torch.from_numpy((rng.random(cfg.batch_size) < 0.5) & cfg.hflip).long()
            prompts = [make_prompt(str(rng.choice(INVERSION_TEMPLATES)), placeholder) for _ in batch]
            eps = torch.randn(means[idx, flip].shape, generator=gen).to(device)
            latents = (means[idx, flip] + stds[idx, flip] * eps) * vae.config.scaling_factor  # (B, 4, R/8, R/8)
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
            input_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                hidden = text_encoder(input_ids)[0]  # (B, 77, dim)
                pred = unet(noisy, t, hidden).sample
            loss = F.mse_loss(pred.float(), target.float())
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            step_loss += loss.item() / cfg.gradient_accumulation_steps
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # only the new token moves: put every other row back
            embeddings[keep] = original[keep]
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became {step_loss} at step {len(losses)} while learning {token}")
        losses.append(step_loss)

    embeddings.requires_grad_(False)
    learned = embeddings[token_ids].detach().float().cpu().clone()  # (num_vectors, dim)
    return LearnedToken(
        token=token,
        embedding=learned[0] if cfg.num_vectors == 1 else learned,
        losses=[round(v, 6) for v in losses],
        seconds=time.time() - start,
        device=str(device),
    )


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
    """Decoded train images of one class (few-shot: a handful of rows)."""
    import pyarrow.parquet as pq

    train = storage.join(real, "train")
    files = storage.parquet_files(train, endpoint_url)
    if not files:
        raise FileNotFoundError(f"no parquet files under {train}; run `ray-dafusion ingest` first")
    images = []
    for uri in files:
        fs, path = storage.resolve(uri, endpoint_url)
        rows = pq.read_table(path, filesystem=fs, columns=["id", "image", "class_name"],
                             filters=[("class_name", "=", class_name)]).to_pylist()
        for row in rows:
            try:
                images.append(schema.decode_image((row["image"] or {}).get("bytes")))
            except ValueError as exc:
                raise ValueError(f"train row {row['id']} of class {class_name!r} in {uri}: {exc}") from None
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
