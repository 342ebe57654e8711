"""Concept erasure (ESD): edit the UNet so a class name no longer steers generation.

For each class, a frozen copy of the original UNet gives e0 = eps(x_t, t, "") and
e_c = eps(x_t, t, c), where the concept c is the bare class name ("leafy spurge"); the trained
UNet's eps(x_t, t, c) is regressed (MSE) toward e0 - eta (e_c - e0), i.e. negative guidance away
from the concept. As in ESD, x_t comes from the UNet being trained (no gradient), run with
classifier-free guidance (start_guidance) on c from pure noise through k of the
num_inference_steps DDIM steps, k uniform; t is the DDIM timestep reached, so the noise level of
x_t and the t the UNet is told agree.

Two variants (``cfg.method``):

- ``full``: every UNet parameter (ESD as the reference runs it, the default); saved per class as
  the whole UNet state dict.
- ``xattn`` (ESD-x): every cross-attention parameter (``attn2``: query, key, value and output
  projections), saved per class as deltas (new - original): small enough to swap per batch.

Output (``cfg.output``)::

    classes/<name>.safetensors   one class's weights (full: a whole UNet, so possibly gigabytes)
    classes/<name>.json          its record (fingerprint, loss curve, seconds), written after the
                                 weights: the class is done, and skipped on re-run, once it exists
    manifest.json                method, per-class files, fingerprints, loss curves, seconds

``weights.ErasureWeights`` reads this output and applies a class's edit to a loaded UNet.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from . import models, perclass, schema, storage
from .config import EraseConfig
from .logs import setup_logging
from .modes import class_word
from .models import file_fingerprint
from .runinfo import CostMeter, max_rss_bytes, versions
from .schema import ClassInfo

__all__ = ["EraseResult", "ErasedConcept", "erase", "erase_concept", "erase_prompt", "xattn_parameter_names",
           "class_file_name", "ERASE_TEMPLATE"]

CLASSES_DIR = "classes"
ERASE_TEMPLATE = "{}"
"""The prompt whose concept is erased: the bare class name in words (ESD erases the concept itself)."""

log = logging.getLogger(__name__)


@dataclass
class EraseResult:
    """What `erase` produced."""

    output: str
    """The output directory (give it to augment as `erasure`)."""
    method: str
    """full or xattn."""
    num_classes: int
    """Classes with an erasure in the output."""
    trained: list[str] = field(default_factory=list)
    """Classes erased by this run."""
    skipped: list[str] = field(default_factory=list)
    """Classes whose file already existed."""
    seconds: float = 0.0
    """Wall time of the whole stage."""
    seconds_per_class: dict[str, float] = field(default_factory=dict)
    """Training time of each class erased by this run (inside its task)."""


@dataclass
class ErasedConcept:
    """One class's edit: the tensors to save and how training went."""

    tensors: dict[str, Any]
    """full: the UNet state dict; xattn: {parameter name: new - original} of the trained weights."""
    losses: list[float]
    """ESD loss of each iteration."""
    seconds: float
    device: str


def xattn_parameter_names(unet: Any) -> list[str]:
    """Names of every cross-attention parameter (ESD-x: what `xattn` trains)."""
    return [n for n, _ in unet.named_parameters() if ".attn2." in n]


def erase_prompt(class_name: str) -> str:
    """The concept erased for a class: its name in plain words."""
    return ERASE_TEMPLATE.replace("{}", class_word(class_name))


def class_file_name(class_name: str) -> str:
    """File name of a class's erasure: `leafy spurge` -> `leafy_spurge.safetensors`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(class_name.split())) or "class"
    return f"{safe}.safetensors"


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


@storage.leased("erase")
def erase(cfg: EraseConfig) -> EraseResult:
    """Erase every class name of `cfg.real` from the UNet (one Ray task per class)."""
    cfg.require("real", "output")
    start = time.time()
    meter = CostMeter(cfg.cost)

    # 1. classes to erase; the model checked once here, not in every task, before the output records this config
    classes = perclass.select_classes(schema.read_class_table(cfg.real, cfg.endpoint_url), cfg.classes,
                                      lambda c: class_file_name(c.name))
    models.load_tokenizer_and_schedule(cfg.model, cfg.cache_dir, cfg.endpoint_url)

    # 2. refuse another config's output, skip classes already erased
    plan = perclass.plan_classes("erase", cfg, classes, lambda c: _record_uri(cfg.output, c))
    if plan.complete is not None and not plan.todo:  # finished with this config: leave it untouched
        log.info("%s is complete (same config); nothing to do", cfg.output)
        return EraseResult(
            output=cfg.output, method=cfg.method, num_classes=len(plan.complete.get("classes", {})),
            skipped=[c.name for c in plan.done], seconds=round(time.time() - start, 3),
        )

    # 3. one task per class name
    records = perclass.run_class_tasks("erase", cfg, plan.todo, _erase_classes, _describe, meter)

    # 4. manifest (last): every class file of this config, with its fingerprint and loss curve
    result = _write_manifest(cfg, plan, start, meter)
    result.seconds_per_class = {name: r["seconds"] for name, r in records.items()}
    log.info("%s: %d classes erased (%s; %d now, %d earlier) in %.1fs", cfg.output, result.num_classes,
             cfg.method, len(result.trained), len(result.skipped), result.seconds)
    return result


def _weights_uri(output: str, info: ClassInfo) -> str:
    return storage.join(output, CLASSES_DIR, class_file_name(info.name))


def _record_uri(output: str, info: ClassInfo) -> str:
    return _weights_uri(output, info)[: -len(".safetensors")] + ".json"


def _describe(record: dict[str, Any]) -> str:
    losses = record["losses"]
    k = max(1, min(10, len(losses) // 2))
    return f"done in {record['seconds']:.1f}s, ESD loss {sum(losses[:k]) / k:.5f} -> {sum(losses[-k:]) / k:.5f}"


def _write_manifest(cfg: EraseConfig, plan: perclass.ClassPlan, start: float, meter: CostMeter) -> EraseResult:
    records = [storage.read_json(uri, cfg.endpoint_url)
               for uri in storage.list_files(storage.join(cfg.output, CLASSES_DIR), ".json", cfg.endpoint_url)]
    records.sort(key=lambda r: r["label"])
    storage.write_manifest(cfg.output, {
        "stage": "erase",
        "method": cfg.method,
        "config": cfg.to_dict(),
        "config_fingerprint": plan.config_fingerprint,
        "real": storage.absolute(cfg.real),  # as a path that works from any directory
        "model": cfg.model,
        "model_fingerprint": ",".join(sorted({r["model_fingerprint"] for r in records})),
        "prompt_template": ERASE_TEMPLATE,
        "classes": {r["name"]: r for r in records},
        "counts": {"classes": len(records), "trained": len(plan.todo), "skipped": len(plan.done)},
        "timings": {"total_seconds": round(time.time() - start, 3),
                    "seconds_per_class": {r["name"]: r["seconds"] for r in records}},
        "cost": meter.report(),
        "versions": versions(),
    }, cfg.endpoint_url)
    return EraseResult(
        output=cfg.output, method=cfg.method, num_classes=len(records),
        trained=[c.name for c in plan.todo], skipped=[c.name for c in plan.done],
        seconds=round(time.time() - start, 3),
    )


def _erase_classes(cfg: EraseConfig, infos: list[ClassInfo]) -> list[dict[str, Any]]:
    """Ray task: `_erase_class` for each class of `infos` (always one: erase has no classes_per_task)."""
    return [_erase_class(cfg, info) for info in infos]


def _erase_class(cfg: EraseConfig, info: ClassInfo) -> dict[str, Any]:
    """Erase one class name, write its weights, then its record. Returns the record."""
    import torch
    from safetensors.torch import save as save_safetensors

    from .models import load_pipeline, model_fingerprint, resolve_model

    setup_started = time.time()
    setup_logging()
    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    local = resolve_model(cfg.model, cfg.cache_dir, cfg.endpoint_url)
    pipe = load_pipeline(local, device=device, torch_dtype=torch.float32)
    setup = time.time() - setup_started
    log.info("%s: %s, %d iterations on %s", info.name, cfg.method, cfg.iterations, device)
    erased = erase_concept(pipe, info.name, cfg, seed=perclass.class_seed(cfg.seed, info.name))
    record = {
        "name": info.name, "label": info.label, "method": cfg.method,
        "file": f"{CLASSES_DIR}/{class_file_name(info.name)}", "prompt": erase_prompt(info.name),
        "iterations": cfg.iterations, "seconds": round(erased.seconds, 3), "setup_seconds": round(setup, 3),
        "device": erased.device,
        "model_fingerprint": model_fingerprint(local, cfg.cache_dir), "losses": erased.losses,
        "max_rss_bytes": max_rss_bytes(),
    }
    data = save_safetensors({k: v.contiguous() for k, v in erased.tensors.items()},
                            metadata={"method": cfg.method, "class_name": info.name})
    storage.write_bytes(_weights_uri(cfg.output, info), data, cfg.endpoint_url)
    record["fingerprint"] = file_fingerprint(data)
    record["bytes"] = len(data)
    storage.write_json(_record_uri(cfg.output, info), record, cfg.endpoint_url)
    return record


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


def erase_concept(pipe: Any, class_name: str, cfg: EraseConfig, seed: int) -> ErasedConcept:
    """Train `pipe.unet` in place to erase `class_name` (ESD); returns what to save.

    Uses cfg's method, iterations, learning_rate, negative_guidance, start_guidance,
    num_inference_steps and resolution. On CUDA forward passes run in fp16 autocast with a
    GradScaler over fp32 weights; on CPU everything is fp32.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler

    start = time.time()
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    device = unet.device
    use_amp = device.type == "cuda"

    # 1. frozen original UNet; the trained parameters depend on the method
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    text_encoder.requires_grad_(False)
    unet.requires_grad_(False)
    unet.train()
    if cfg.method == "full":
        trained = dict(unet.named_parameters())
    else:
        names = xattn_parameter_names(unet)
        if not names:
            raise ValueError("this UNet has no cross-attention (attn2) parameters to train with method xattn")
        params = dict(unet.named_parameters())
        trained = {n: params[n] for n in names}
    for p in trained.values():
        p.requires_grad_(True)
    originals = {n: p.detach().clone() for n, p in trained.items()} if cfg.method == "xattn" else {}
    optimizer = torch.optim.Adam(trained.values(), lr=cfg.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    # 2. the two conditionings: empty prompt and the class's real words
    def encode(prompt: str) -> Any:
        ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            return text_encoder(ids)[0]  # (1, 77, dim)

    emb_0 = encode("")
    emb_c = encode(erase_prompt(class_name))
    emb_both = torch.cat([emb_0, emb_c])

    # 3. the DDIM schedule x_t is drawn on
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.num_inference_steps, device=device)
    timesteps = scheduler.timesteps  # high noise -> low noise
    size = cfg.resolution // pipe.vae_scale_factor
    shape = (1, unet.config.in_channels, size, size)

    def eps(model: Any, x: Any, t: Any) -> tuple[Any, Any]:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            e0, ec = model(torch.cat([x, x]), t, emb_both).sample.float().chunk(2)
        return e0, ec

    # 4. ESD iterations; every random draw comes from `gen`, independent of the weights
    gen = torch.Generator(device="cpu").manual_seed(seed)
    losses: list[float] = []
    for _ in range(cfg.iterations):
        k = int(torch.randint(0, len(timesteps), (1,), generator=gen))
        x = torch.randn(shape, generator=gen).to(device) * scheduler.init_noise_sigma  # (1, 4, R/8, R/8)
        unet.eval()
        for t in timesteps[:k]:  # sample x_t with the UNet being trained and classifier-free guidance
            e0, ec = eps(unet, x, t)
            x = scheduler.step(e0 + cfg.start_guidance * (ec - e0), t, x).prev_sample
        unet.train()
        t = timesteps[k]
        e0, ec = eps(frozen, x, t)  # the target comes from the original model
        target = e0 - cfg.negative_guidance * (ec - e0)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            pred = unet(x, t, emb_c).sample
        loss = F.mse_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"ESD loss became {value} at iteration {len(losses)} while erasing {class_name!r}")
        losses.append(round(value, 8))

    # 5. what to save
    unet.requires_grad_(False)
    unet.eval()
    if cfg.method == "full":
        tensors = {n: v.detach().float().cpu().clone() for n, v in unet.state_dict().items()}
    else:
        tensors = {n: (p.detach() - originals[n]).float().cpu() for n, p in trained.items()}
    return ErasedConcept(tensors=tensors, losses=losses, seconds=time.time() - start, device=str(device))
