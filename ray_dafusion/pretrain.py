"""Pretrain: a small Stable-Diffusion-shaped, text-conditional model from unlabelled images.

A domain base model for DA-Fusion where no public checkpoint fits (satellite, medical, industrial
images; the demo's handwritten digits). Shape of a run::

    source/**.{png,jpg,...}  (labels, if any, are ignored)
      ─> Ray Data: decode, squash to the shape's resolution, 8x8 grey features
      ─> captions, label-free: PCA + k-means over the images (and mirrors), one made-up word
         per cluster ("qbage"), captions "<random template> <word>", a share of them empty
      ─> Ray Train (DDP): 1. AutoencoderKL (MSE + small KL; kept as it is with ``init``)
                          2. UNet + CLIP text encoder
         (epsilon MSE on VAE latents, cosine schedule, EMA), checkpoints to resume from
      ─> output/: a diffusers StableDiffusionImg2ImgPipeline (EMA weights, DDIM sampler,
         the tokenizer with the caption words) + manifest.json (config, data fingerprint, loss curves)

With `mirror`, mirror images are in the data, because textual inversion flips its images (p 0.5,
its default): the model must know a mirrored image too. Where a mirror image is another class
(digits), leave both off. The text space carries meaning (the cluster words), so textual
inversion has somewhere to go: a learned class token lands near the words of its images.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import plan, storage
from .config import ConfigError, PretrainConfig, callable_stage_module
from .configlib import config_record
from .logs import setup_logging
from .runinfo import CostMeter, versions
from .tokens import INVERSION_TEMPLATES, make_prompt
from .watchdog import Watchdog, checkpoint_probe, sigint_kept

__all__ = ["PretrainResult", "pretrain", "caption_words", "cluster_captions", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CHECKPOINTS = "_checkpoints"
FEATURE_SIZE = 8  # side of the grey thumbnails the captions are clustered on
PCA_DIMS = 24


@dataclass
class PretrainResult:
    """What `pretrain` produced."""

    output: str
    """The diffusers directory (give it to `model`)."""
    num_images: int
    words: list[str] = field(default_factory=list)
    """The caption word of each cluster."""
    vae_steps: int = 0
    """Autoencoder steps taken (0 with `init`, whose VAE is kept)."""
    steps: int = 0
    final_loss: Optional[float] = None
    """Mean UNet loss over the last logged window."""
    seconds: float = 0.0
    already_complete: bool = False


# --------------------------------------------------------------------------------------
# Captions: label-free words for clusters of images
# --------------------------------------------------------------------------------------


def caption_words(k: int) -> list[str]:
    """`k` made-up words ("q" + consonant, vowel, consonant, vowel): no English word, no digit
    (CLIP's pre-tokenizer splits numbers), so never a class name."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    out: list[str] = []
    i = 0
    while len(out) < k:
        word = ("q" + consonants[i % 14] + vowels[(i // 14) % 5] + consonants[(i * 5 + 3) % 14]
                + vowels[(i * 3 + 1) % 5])
        if word not in out:
            out.append(word)
        i += 1
    return out


def cluster_captions(features: np.ndarray, k: int, seed: int, mirror: bool = True) -> np.ndarray:
    """Cluster of every image and of its mirror: features (N, S, S) grey thumbnails -> (N, 2);
    without `mirror`, the images alone are clustered and column 1 repeats column 0."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    n = len(features)
    views = [features, features[:, :, ::-1]] if mirror else [features]
    both = np.concatenate(views).reshape(len(views) * n, -1)  # originals, then mirrors
    dims = min(PCA_DIMS, both.shape[0], both.shape[1])
    reduced = PCA(dims, random_state=seed).fit_transform(both)
    labels = KMeans(min(k, len(both)), n_init=10, random_state=seed).fit(reduced).labels_
    labels = labels.reshape(len(views), n).T  # (N, views): [:, 0] the image, [:, 1] its mirror
    return labels if mirror else np.repeat(labels, 2, axis=1)


# --------------------------------------------------------------------------------------
# Reading the unlabelled images (Ray Data)
# --------------------------------------------------------------------------------------


def _decode(batch: dict[str, np.ndarray], resolution: int, endpoint_url: Optional[str]) -> dict[str, list]:
    """Image files -> squashed RGB pixels (uint8, R x R x 3) and an 8x8 grey thumbnail; bad files flagged."""
    from PIL import Image

    from .ingest import load_image_file
    from .schema import decode_image

    out: dict[str, list] = {"uri": [], "pixels": [], "thumb": [], "sha256": [], "error": []}
    for uri in batch["uri"]:
        uri = str(uri)
        pixels, thumb, digest, error = None, None, None, None
        try:
            data, _, _, digest = load_image_file(storage.read_bytes(uri, endpoint_url))
            image = decode_image(data).resize((resolution, resolution), Image.BICUBIC)
            pixels = np.asarray(image, dtype=np.uint8).tobytes()
            grey = image.convert("L").resize((FEATURE_SIZE, FEATURE_SIZE), Image.BILINEAR)
            thumb = (np.asarray(grey, dtype=np.float32) / 255.0).tobytes()
        except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:  # the image's own fault
            error = str(exc)
        # another OSError (a storage failure) fails the task, so Ray retries it: the image is not dropped
        out["uri"].append(uri)
        out["pixels"].append(pixels)
        out["thumb"].append(thumb)
        out["sha256"].append(digest)
        out["error"].append(error)
    return out


def _read_images(cfg: PretrainConfig, resolution: int) -> tuple[Any, list[dict[str, Any]]]:
    """(Ray dataset of decoded images, their small metadata), quarantining unreadable files."""
    import ray.data

    files = [f for f in storage.list_files(cfg.source, "", cfg.endpoint_url, recursive=True, skip_prefixes=(".",))
             if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {cfg.source}")
    ds = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=max(1, min(len(files) // 64, 64)))
    decoded = ds.map_batches(_decode, fn_kwargs={"resolution": resolution, "endpoint_url": cfg.endpoint_url},
                             batch_size=64, num_cpus=0.5).materialize()
    return decoded, decoded.select_columns(["uri", "thumb", "sha256", "error"]).take_all()


# --------------------------------------------------------------------------------------
# The training loop (each Ray Train worker)
# --------------------------------------------------------------------------------------


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine from 1 down to 0.1."""
    ramp = min(1.0, (step + 1) / max(warmup, 1))
    return ramp * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def _ema_update(ema: Any, model: Any, decay: float) -> None:
    import torch

    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _load_shard(shard: Any) -> tuple[Any, Any]:
    """This worker's images as float tensors (N, 3, R, R) in [-1, 1] and their clusters (N, 2), in uri order."""
    import torch

    uris, pixels, clusters = [], [], []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        uris += [str(u) for u in batch["uri"]]
        pixels += list(batch["pixels"])
        clusters += list(batch["cluster"])
    if not uris:
        raise RuntimeError("this worker's shard holds no images (pretrain splits them into one block per worker)")
    # batches arrive in the order Ray Data's tasks finish; a seeded draw by index needs a fixed order
    order = sorted(range(len(uris)), key=uris.__getitem__)
    side = int(round(math.sqrt(len(pixels[0]) / 3)))
    images = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(side, side, 3) for i in order])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, torch.from_numpy(np.stack([clusters[i] for i in order])).long()


class _Denoiser:
    """Wraps UNet and text encoder in one module, so DDP sees a single forward."""

    @staticmethod
    def build(unet: Any, text: Any) -> Any:
        import torch

        class Denoiser(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet, self.text = unet, text

            def forward(self, noisy, t, input_ids):  # (B, 4, h, w), (B,), (B, 77) -> (B, 4, h, w)
                return self.unet(noisy, t, self.text(input_ids)[0]).sample

        return Denoiser()


def _pretrain_loop(loop: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from .models import build_pretrain_components, load_pipeline, _tiny_tokenizer

    setup_logging()
    cfg = PretrainConfig.from_dict(loop["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    # 1. data, tokenizer and models (from the init pipeline or from scratch)
    x, clusters = _load_shard(ray.train.get_dataset_shard("images"))
    tokenizer = _tiny_tokenizer(loop["words"])
    if cfg.init:
        init = load_pipeline(cfg.init, device="cpu", torch_dtype=torch.float32, endpoint_url=cfg.endpoint_url)
        vae, unet, text = init.vae, init.unet, init.text_encoder
        tokenizer = init.tokenizer
        missing = [w for w in loop["words"] if w not in tokenizer.get_vocab() and w + "</w>" not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing)
            text.resize_token_embeddings(len(tokenizer))
    else:
        vae, unet, text = build_pretrain_components(cfg.shape, tokenizer, cfg.seed)
    vae, unet, text = vae.to(device), unet.to(device), text.to(device)
    state = _resume(vae, unet, text, rank)

    # 2. the autoencoder (from scratch only: an init's VAE is kept), then 3. the denoiser; both checkpoint and resume
    if state["phase"] == "vae" and cfg.vae_step_count() > 0:
        _train_vae(cfg, vae, x, rank, world, device, state)
    _train_denoiser(cfg, loop, vae, unet, text, tokenizer, x, clusters, rank, world, device, state)


def _resume(vae: Any, unet: Any, text: Any, rank: int) -> dict[str, Any]:
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"phase": "vae", "step": 0, "losses": {"vae": [], "unet": []}}
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
    vae.load_state_dict(state["vae"])
    if state.get("unet"):  # absent during the VAE phase: UNet and text encoder are still their seeded start
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
    if rank == 0:
        log.info("resuming at %s step %d from %s", state["phase"], state["step"], checkpoint.path)
    return state


def _report(state: dict[str, Any], rank: int, extra: dict[str, Any], final_dir: Optional[str] = None) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (and, at the end, the pipeline)."""
    import ray.train
    import torch

    metrics = {"phase": state["phase"], "step": state["step"],
               **{f"{k}_loss": (v[-1]["loss"] if v else None) for k, v in state["losses"].items()}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save({**state, **extra}, os.path.join(tmp, "state.pt"))
            if final_dir is not None:
                os.rename(final_dir, os.path.join(tmp, "pipeline"))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _log_window(losses: list[float], step: int, every: int, total: int) -> Optional[dict[str, float]]:
    """The mean loss of the last `every` steps at step 1, every `every` steps and at the end."""
    if (step + 1) % every and step and step + 1 != total:
        return None
    window = losses[-every:]
    return {"step": step + 1, "loss": round(float(np.mean(window)), 6)}


def _train_vae(cfg: PretrainConfig, vae: Any, x: Any, rank: int, world: int, device: Any,
               state: dict[str, Any]) -> None:
    """MSE reconstruction + a small KL; random flips; Adam with cosine decay. Gradients are averaged
    across workers by hand (encode and decode are called directly, not through a DDP forward)."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.vae_learning_rate)
    if state.get("vae_optimizer"):
        optimizer.load_state_dict(state["vae_optimizer"])
    local = max(1, cfg.vae_batch_size // world)
    recent: list[float] = []
    vae.train()
    steps = cfg.vae_step_count()
    for step in range(state["step"], steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))
        rng = np.random.default_rng([cfg.seed, rank, 0, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = torch.from_numpy(rng.integers(0, len(x), local))
        flip = torch.from_numpy((rng.random(local) < 0.5) & cfg.mirror)
        batch = torch.where(flip[:, None, None, None], x[idx].flip(-1), x[idx]).to(device)  # (B, 3, R, R)
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        loss = F.mse_loss(vae.decode(z).sample, batch) + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _allreduce_gradients(vae, world)
        optimizer.step()
        recent.append(float(loss.detach()))
        point = _log_window(recent, step, 100, steps)
        if point:
            state["losses"]["vae"].append(point)
        state["step"] = step + 1
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            _report(state, rank, {"vae": vae.state_dict(), "vae_optimizer": optimizer.state_dict()})
    state.update(phase="unet", step=0)


def _allreduce_gradients(module: Any, world: int) -> None:
    import torch.distributed as dist

    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _train_denoiser(cfg: PretrainConfig, loop: dict[str, Any], vae: Any, unet: Any, text: Any, tokenizer: Any,
                    x: Any, clusters: Any, rank: int, world: int, device: Any, state: dict[str, Any]) -> None:
    """Epsilon MSE on VAE latents with cluster-word captions; EMA weights are what is saved."""
    import ray.train.torch
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from .models import NOISE_SCHEDULE, assemble_pipeline

    # 1. the frozen autoencoder: its scaling factor, and every image's posterior (and its mirror's), once
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(torch.cat([x, x.flip(-1)]).to(device)).latent_dist
    n = len(x)
    means = posterior.mean.reshape(2, n, *posterior.mean.shape[1:]).transpose(0, 1).contiguous()  # (N, 2, 4, h, w)
    stds = posterior.std.reshape(2, n, *posterior.std.shape[1:]).transpose(0, 1).contiguous()
    if "scaling_factor" in state:  # resumed: the latent scale chosen when this phase began
        vae.register_to_config(scaling_factor=state["scaling_factor"])
    elif not cfg.init:  # unit variance latents, as Stable Diffusion's 0.18215 gives its VAE
        vae.register_to_config(scaling_factor=float(1.0 / _global_std(posterior.mean, world, device)))
    scale = state["scaling_factor"] = float(vae.config.scaling_factor)

    # 2. captions: every (cluster, template) tokenised once, and the empty caption
    words = loop["words"]
    ids = lambda prompt: tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,  # noqa: E731
                                   truncation=True, return_tensors="pt").input_ids[0]
    caption_ids = torch.stack([torch.stack([ids(make_prompt(t, w)) for t in INVERSION_TEMPLATES])
                               for w in words]).to(device)  # (K, T, 77)
    empty_ids = ids("").to(device)

    # 3. model, optimiser, EMA (restored when resuming)
    denoiser = _Denoiser.build(unet, text)
    model = ray.train.torch.prepare_model(denoiser, move_to_device=False)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    if state["phase"] == "unet" and state["step"] > 0:
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    local = max(1, cfg.batch_size // world)
    recent: list[float] = []
    denoiser.train()
    for step in range(state["step"], cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * _lr_factor(step, cfg.steps, cfg.warmup_steps)
        rng = np.random.default_rng([cfg.seed, rank, 1, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = torch.from_numpy(rng.integers(0, n, local))
        flip = torch.from_numpy(((rng.random(local) < 0.5) & cfg.mirror).astype(np.int64))
        latents = (means[idx, flip] + stds[idx, flip] * torch.randn(means[idx, flip].shape, generator=gen).to(device)) * scale
        templates = torch.from_numpy(rng.integers(0, len(INVERSION_TEMPLATES), local))
        input_ids = caption_ids[clusters[idx, flip].to(device), templates.to(device)]
        empty = torch.from_numpy(rng.random(local) < cfg.empty_caption_fraction).to(device)
        input_ids = torch.where(empty[:, None], empty_ids[None], input_ids)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (local,), generator=gen).to(device)
        loss = F.mse_loss(model(noise_scheduler.add_noise(latents, noise, t), t, input_ids), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _ema_update(ema, denoiser, min(cfg.ema_decay, (1 + step) / (10 + step)))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"pretrain loss became {value} at step {step}; lower learning_rate")
        recent.append(value)
        point = _log_window(recent, step, 100, cfg.steps)
        if point:
            state["losses"]["unet"].append(point)
        state.update(phase="unet", step=step + 1)
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            final = None
            if last and rank == 0:  # the pipeline: frozen VAE, EMA denoiser, DDIM sampler, caption tokenizer
                final = tempfile.mkdtemp(prefix="pipeline-")
                assemble_pipeline(vae.cpu(), copy.deepcopy(ema.unet).cpu().eval(), copy.deepcopy(ema.text).cpu().eval(),
                                  tokenizer).save_pretrained(final)
                vae.to(device)
            _report(state, rank, {"vae": vae.state_dict(), "unet": unet.state_dict(), "text": text.state_dict(),
                                  "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}, final)


def _global_std(values: Any, world: int, device: Any) -> float:
    """Standard deviation of `values` over every worker's shard (the VAE latent scale)."""
    import torch
    import torch.distributed as dist

    stats = torch.tensor([values.sum(), (values ** 2).sum(), values.numel()], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(stats)
    total, squares, count = stats.tolist()
    return math.sqrt(max(squares / count - (total / count) ** 2, 1e-12))


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


@storage.leased("pretrain")
def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train the pipeline in `cfg.output`; a complete output with the same config is left as it is."""
    from .models import PRETRAIN_SHAPES

    cfg.require("source", "output")
    started = time.time()
    meter = CostMeter(cfg.cost)
    if cfg.shape not in PRETRAIN_SHAPES:
        raise ConfigError(f"config field 'shape': must be one of {', '.join(PRETRAIN_SHAPES)} (got {cfg.shape!r})")
    resolution = PRETRAIN_SHAPES[cfg.shape]["resolution"]

    # 1. read and decode the images; fingerprint the data (sorted pixel hashes)
    decoded, meta = _read_images(cfg, resolution)
    good = [m for m in meta if m["error"] is None]
    bad = sorted((m for m in meta if m["error"] is not None), key=lambda m: m["uri"])
    for m in bad[:5]:
        log.warning("left out %s: %s", m["uri"], m["error"])
    if len(bad) > 5:
        log.warning("left out %d more unreadable images; every one with its reason goes to the manifest's left_out",
                    len(bad) - 5)
    _check_images(cfg, good)
    data_fp = storage.fingerprint(sorted(m["sha256"] for m in good))

    # 2. refuse another config's output; skip a complete one
    # vae_steps as the run takes it: unset and 1500 from scratch are one config (and the record of
    # outputs made when 1500 was the field's default)
    made_of = config_record(dataclasses.replace(cfg, vae_steps=cfg.vae_step_count()), data=data_fp)
    config_fp = storage.fingerprint(made_of)
    done = storage.ensure_fresh_output(cfg.output, "pretrain", config_fp, cfg.overwrite, cfg.endpoint_url, made_of)
    if done is not None:
        log.info("%s is complete (same config and data); nothing to do", cfg.output)
        return PretrainResult(cfg.output, done["counts"]["images"], done["words"], done["counts"]["vae_steps"],
                              done["counts"]["steps"], done.get("final_loss"), 0.0, already_complete=True)

    # 3. label-free captions: clusters of the images and their mirrors
    words, cluster_of = _caption_clusters(good, cfg.num_clusters, cfg.seed, cfg.mirror)
    log.info("%d images (%d left out), %d caption clusters", len(good), len(bad), len(words))

    # 4. Ray Train: autoencoder, then UNet and text encoder
    images = _training_images(decoded, cluster_of, cfg.num_workers)
    fitting = time.time()
    result = _fit(cfg, images, words, config_fp)
    meter.add_actor_seconds((time.time() - fitting) * cfg.num_workers, cfg.cpus_per_worker, 1.0 if cfg.use_gpu else 0.0)

    # 5. the pipeline from the last checkpoint into output/, then the manifest, last
    return _write_output(cfg, result, words, good, bad, data_fp, config_fp, started, meter)


def _check_images(cfg: PretrainConfig, good: list[dict[str, Any]]) -> None:
    """Enough readable images to train on, and at least one for every worker."""
    if len(good) < 2:
        raise ValueError(f"{cfg.source} holds {len(good)} readable images; pretraining needs many more")
    if len(good) < cfg.num_workers:
        raise ConfigError(f"config field 'num_workers': {cfg.num_workers} workers for {len(good)} readable images under "
                          f"{cfg.source}; every worker needs an image: set num_workers to at most {len(good)}")


def _caption_clusters(good: list[dict[str, Any]], k: int, seed: int,
                      mirror: bool) -> tuple[list[str], dict[str, list[int]]]:
    """(caption words, uri -> [cluster of the image, of its mirror]) for the readable images.

    The images are clustered in uri order: k-means and its cluster numbers depend on row order, and
    Ray Data returns rows in the order its tasks finish; a re-run (or a resumed run) must give every
    image the caption it had."""
    good = sorted(good, key=lambda m: m["uri"])
    thumbs = np.stack([np.frombuffer(m["thumb"], np.float32).reshape(FEATURE_SIZE, FEATURE_SIZE) for m in good])
    clusters = cluster_captions(thumbs, k, seed, mirror)  # (N, 2)
    return caption_words(int(clusters.max()) + 1), {m["uri"]: clusters[i].tolist() for i, m in enumerate(good)}


def _training_images(decoded: Any, cluster_of: dict[str, list[int]], num_workers: int) -> Any:
    """The readable images with their clusters, in one block per worker: split whole blocks without
    dropping rows (exact_split_config), every worker gets one block, none is left empty."""
    return decoded.filter(lambda row: row["error"] is None).map_batches(
        _attach_clusters, fn_kwargs={"cluster_of": cluster_of}, batch_format="pyarrow").repartition(num_workers)


def _attach_clusters(batch: Any, cluster_of: dict[str, list[int]]) -> Any:
    import pyarrow as pa

    uris = batch.column("uri").to_pylist()
    return pa.table({"uri": batch.column("uri"), "pixels": batch.column("pixels"),
                     "cluster": pa.array([cluster_of[u] for u in uris], pa.list_(pa.int64()))})


def _fit(cfg: PretrainConfig, images: Any, words: list[str], config_fp: str) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train import exact_split_config

    cap = plan.capacity()
    pin = plan.node_pinning(cfg.node_resource, 1.0 if cfg.use_gpu else 0.0, cap, "pretrain")
    plan.check("pretrain", plan.Demand(
        "training workers", cfg.num_workers, {"CPU": cfg.cpus_per_worker, "GPU": 1.0 if cfg.use_gpu else 0.0, **pin},
        size_fields={"cpus_per_worker": cfg.cpus_per_worker}), cap)
    fs, path = storage.resolve(cfg.output, cfg.endpoint_url)
    trainer = TorchTrainer(
        _pretrain_loop,
        train_loop_config={"config": cfg.to_dict(), "words": words, "config_fingerprint": config_fp},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **pin}),
        run_config=RunConfig(name=CHECKPOINTS, storage_path=path,
                             storage_filesystem=fs if storage.is_s3(cfg.output) else None,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets={"images": images},
        dataset_config=exact_split_config(),  # Ray Train's default split drops up to num_workers - 1 images
    )
    run_dir = storage.join(cfg.output, CHECKPOINTS)
    with Watchdog("pretrain", "checkpoint", cfg.stall_warning, cfg.stall_timeout, poll_seconds=10.0,
                  probe=checkpoint_probe(run_dir, cfg.endpoint_url),
                  hint=f"{cfg.num_workers} workers reserve cpus_per_worker {cfg.cpus_per_worker:g}"):
        with sigint_kept():
            return trainer.fit()


def _write_output(cfg: PretrainConfig, result: Any, words: list[str], good: list[dict[str, Any]],
                  bad: list[dict[str, Any]], data_fp: str, config_fp: str, started: float,
                  meter: CostMeter) -> PretrainResult:
    import torch

    ep = cfg.endpoint_url
    checkpoint = result.checkpoint
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
        pipeline_dir = os.path.join(d, "pipeline")
        if not os.path.isdir(pipeline_dir):
            raise RuntimeError(f"the last checkpoint {checkpoint.path} holds no pipeline; re-run to finish")
        storage.upload_dir(pipeline_dir, cfg.output, ep)
    losses = state["losses"]
    final = losses["unet"][-1]["loss"] if losses["unet"] else None
    seconds = round(time.time() - started, 1)
    storage.write_manifest(cfg.output, {
        "stage": "pretrain",
        "config": cfg.to_dict(),
        "config_fingerprint": config_fp,
        "data_fingerprint": data_fp,
        "words": words,
        "left_out": [{"item": m["uri"], "reason": m["error"]} for m in bad],  # unreadable images, quarantined
        "counts": {"images": len(good), "left_out": len(bad), "vae_steps": cfg.vae_step_count(), "steps": cfg.steps},
        "losses": losses,
        "final_loss": final,
        "seconds": seconds,
        "cost": meter.report(images=len(good)),
        "versions": versions(),
    }, ep)
    log.info("%s: pipeline trained on %d images (%d caption words), final loss %s, in %.0fs", cfg.output, len(good),
             len(words), f"{final:.4f}" if final is not None else "n/a", seconds)
    return PretrainResult(cfg.output, len(good), words, cfg.vae_step_count(), cfg.steps, final, seconds)


callable_stage_module(__name__)  # `from ray_dafusion import pretrain` may give this module: call it as the stage
