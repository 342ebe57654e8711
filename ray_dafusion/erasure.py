"""Concept erasure (ESD): edit the UNet so a class name no longer steers generation.

For each class, a frozen copy of the original UNet gives e0 = eps(x_t, t, "") and
e_c = eps(x_t, t, "a photo of a <class name>"); the trained UNet's eps(x_t, t, class prompt) is
regressed (MSE) toward e0 - eta (e_c - e0), i.e. negative guidance away from the concept.
x_t comes from running the frozen model with classifier-free guidance (start_guidance) from pure
noise through k of the num_inference_steps DDIM steps, k uniform; t is the DDIM timestep reached,
so the noise level of x_t and the t the UNet is told agree.

Two variants (``cfg.method``):

- ``full``: every UNet parameter (the paper); saved per class as the whole UNet state dict.
- ``xattn``: only the cross-attention key/value projections (``attn2.to_k`` / ``attn2.to_v``),
  saved per class as deltas (new - original): small enough to swap per batch.

Output (``cfg.output``)::

    classes/<name>.safetensors   one class's weights (full: a whole UNet, so possibly gigabytes)
    classes/<name>.json          its record (fingerprint, loss curve, seconds), written after the
                                 weights: the class is done, and skipped on re-run, once it exists
    manifest.json                method, per-class files, fingerprints, loss curves, seconds

``weights.ErasureWeights`` reads this output and applies a class's edit to a loaded UNet.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import schema, storage
from .config import EraseConfig
from .schema import ClassInfo

__all__ = ["EraseResult", "ErasedConcept", "erase", "erase_concept", "xattn_parameter_names", "class_file_name", "ERASE_TEMPLATE"]

CLASSES_DIR = "classes"
ERASE_TEMPLATE = "a photo of a {}"
"""The prompt whose concept is erased; {} becomes the class name (the real words, not the token)."""

_NOT_FINGERPRINTED = ("overwrite", "endpoint_url", "num_cpus", "num_gpus", "cache_dir", "classes")


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
    """Names of the cross-attention key/value projection weights (what `xattn` trains)."""
    return [n for n, _ in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]


def class_file_name(class_name: str) -> str:
    """File name of a class's erasure: `leafy spurge` -> `leafy_spurge.safetensors`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(class_name.split())) or "class"
    return f"{safe}.safetensors"


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def erase(cfg: EraseConfig) -> EraseResult:
    """Erase every class name of `cfg.real` from the UNet (one Ray task per class)."""
    import ray

    cfg.require("real", "output")
    start = time.time()

    # 1. classes and their files
    table = _select_classes(schema.read_class_table(cfg.real, cfg.endpoint_url), cfg.classes)
    class_uri = {c.name: storage.join(cfg.output, CLASSES_DIR, class_file_name(c.name)) for c in table}
    record_uri = {name: uri[: -len(".safetensors")] + ".json" for name, uri in class_uri.items()}

    # 2. refuse another config's output; finished classes are skipped
    config_fp = storage.fingerprint({k: v for k, v in cfg.to_dict().items() if k not in _NOT_FINGERPRINTED})
    complete = storage.ensure_fresh_output(cfg.output, "erase", config_fp, cfg.overwrite, cfg.endpoint_url)
    done = [c for c in table if storage.exists(record_uri[c.name], cfg.endpoint_url)]
    todo = [c for c in table if c not in done]
    if complete is not None and not todo:  # finished with this config: leave it untouched
        print(f"[erase] {cfg.output} is complete (same config); nothing to do", flush=True)
        return EraseResult(
            output=cfg.output, method=cfg.method, num_classes=len(complete.get("classes", {})),
            skipped=[c.name for c in done], seconds=round(time.time() - start, 3),
        )
    for c in done:
        print(f"[erase] {c.name}: {record_uri[c.name]} exists, skipped", flush=True)

    # 3. one task per class name
    task = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)(_erase_class)
    pending = {task.remote(cfg, c, class_uri[c.name]): c for c in todo}
    seconds_per_class: dict[str, float] = {}
    failures: dict[str, str] = {}
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        info = pending.pop(ref)
        try:
            record = ray.get(ref)
        except Exception as exc:  # keep the other classes going; report every failure at the end
            failures[info.name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"
            print(f"[erase] {info.name}: FAILED {failures[info.name]}", flush=True)
            continue
        seconds_per_class[info.name] = record["seconds"]
        losses = record["losses"]
        k = max(1, min(10, len(losses) // 2))
        print(f"[erase] {info.name}: done in {record['seconds']:.1f}s, ESD loss "
              f"{sum(losses[:k]) / k:.5f} -> {sum(losses[-k:]) / k:.5f}", flush=True)
    if failures:
        raise RuntimeError(
            "erasure failed for " + "; ".join(f"{n}: {why}" for n, why in sorted(failures.items()))
            + f". Finished classes are kept in {cfg.output}/{CLASSES_DIR}; re-run to retry the others."
        )

    # 4. manifest (last): every class file of this config, with its fingerprint and loss curve
    records = [storage.read_json(uri, cfg.endpoint_url)
               for uri in storage.list_files(storage.join(cfg.output, CLASSES_DIR), ".json", cfg.endpoint_url)]
    records.sort(key=lambda r: r["label"])
    storage.write_manifest(cfg.output, {
        "stage": "erase",
        "method": cfg.method,
        "config": cfg.to_dict(),
        "config_fingerprint": config_fp,
        "real": cfg.real,
        "model": cfg.model,
        "model_fingerprint": ",".join(sorted({r["model_fingerprint"] for r in records})),
        "prompt_template": ERASE_TEMPLATE,
        "classes": {r["name"]: r for r in records},
        "counts": {"classes": len(records), "trained": len(todo), "skipped": len(done)},
        "timings": {"total_seconds": round(time.time() - start, 3),
                    "seconds_per_class": {r["name"]: r["seconds"] for r in records}},
        "versions": _versions(),
    }, cfg.endpoint_url)
    return EraseResult(
        output=cfg.output, method=cfg.method, num_classes=len(records),
        trained=[c.name for c in todo], skipped=[c.name for c in done],
        seconds=round(time.time() - start, 3), seconds_per_class=seconds_per_class,
    )


def _erase_class(cfg: EraseConfig, info: ClassInfo, out_uri: str) -> dict[str, Any]:
    """Ray task: erase one class name, write its weights, then its record. Returns the record."""
    import torch
    from safetensors.torch import save as save_safetensors

    from .models import load_pipeline, model_fingerprint, resolve_model

    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    local = resolve_model(cfg.model, cfg.cache_dir, cfg.endpoint_url)
    pipe = load_pipeline(local, device=device, torch_dtype=torch.float32)
    print(f"[erase] {info.name}: {cfg.method}, {cfg.iterations} iterations on {device}", flush=True)
    erased = erase_concept(pipe, info.name, cfg, seed=cfg.seed + info.label)
    record = {
        "name": info.name, "label": info.label, "method": cfg.method,
        "file": f"{CLASSES_DIR}/{class_file_name(info.name)}", "prompt": ERASE_TEMPLATE.replace("{}", info.name),
        "iterations": cfg.iterations, "seconds": round(erased.seconds, 3), "device": erased.device,
        "model_fingerprint": model_fingerprint(local), "losses": erased.losses,
    }
    data = save_safetensors({k: v.contiguous() for k, v in erased.tensors.items()},
                            metadata={"method": cfg.method, "class_name": info.name})
    storage.write_bytes(out_uri, data, cfg.endpoint_url)
    record["fingerprint"] = _fingerprint(data)
    record["bytes"] = len(data)
    storage.write_json(out_uri[: -len(".safetensors")] + ".json", record, cfg.endpoint_url)
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
            raise ValueError("this UNet has no cross-attention key/value projections (attn2.to_k / attn2.to_v)")
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
    emb_c = encode(ERASE_TEMPLATE.replace("{}", class_name))
    emb_both = torch.cat([emb_0, emb_c])

    # 3. the DDIM schedule x_t is drawn on
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.num_inference_steps, device=device)
    timesteps = scheduler.timesteps  # high noise -> low noise
    size = cfg.resolution // pipe.vae_scale_factor
    shape = (1, unet.config.in_channels, size, size)

    def frozen_eps(x: Any, t: Any) -> tuple[Any, Any]:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            e0, ec = frozen(torch.cat([x, x]), t, emb_both).sample.float().chunk(2)
        return e0, ec

    # 4. ESD iterations; every random draw comes from `gen`, independent of the weights
    gen = torch.Generator(device="cpu").manual_seed(seed)
    losses: list[float] = []
    for _ in range(cfg.iterations):
        k = int(torch.randint(0, len(timesteps), (1,), generator=gen))
        x = torch.randn(shape, generator=gen).to(device) * scheduler.init_noise_sigma  # (1, 4, R/8, R/8)
        for t in timesteps[:k]:  # sample x_t with the frozen model and classifier-free guidance
            e0, ec = frozen_eps(x, t)
            x = scheduler.step(e0 + cfg.start_guidance * (ec - e0), t, x).prev_sample
        t = timesteps[k]
        e0, ec = frozen_eps(x, t)
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
    del frozen
    return ErasedConcept(tensors=tensors, losses=losses, seconds=time.time() - start, device=str(device))


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _select_classes(table: list[ClassInfo], wanted: Optional[list[str]]) -> list[ClassInfo]:
    files = [class_file_name(c.name) for c in table]
    dupes = sorted({f for f in files if files.count(f) > 1})
    if dupes:
        raise ValueError(f"class names collide as file names {dupes}: rename the classes")
    if wanted is None:
        return table
    names = {c.name for c in table}
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ValueError(f"classes {unknown} are not in the data set; its classes: {sorted(names)}")
    return [c for c in table if c.name in wanted]


def _fingerprint(data: bytes) -> str:
    from .models import file_fingerprint

    return file_fingerprint(data)


def _versions() -> dict[str, str]:
    import diffusers
    import ray
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__}
