"""Load Stable Diffusion img2img pipelines from anywhere, and build offline stand-ins.

``load_pipeline(uri)`` takes a local directory, an ``s3://`` prefix (copied once per node and
endpoint into a local cache under a file lock, and again when the files there change), a hub id (``HF_HUB_OFFLINE`` is respected by diffusers), or one of
two built-in names:

- ``tiny``: a Stable-Diffusion-shaped pipeline with about a million random parameters. It runs
  every code path in seconds on a CPU; its images carry no meaning.
- ``sd15-shape``: the shapes of SD 1.5 (860M-parameter UNet) with random weights, for measuring
  real GPU throughput without a download. Its images carry no meaning either.

Both are built once into the cache with ``save_pretrained`` and then loaded through the very
same ``from_pretrained`` code as a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Optional, Sequence

from .errors import ConfigError, one_line

log = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS",
    "default_cache_dir",
    "resolve_model",
    "load_pipeline",
    "load_tokenizer_and_schedule",
    "build_pipeline",
    "model_fingerprint",
    "file_fingerprint",
    "SHIPPED_MODELS",
    "PRETRAIN_SHAPES",
    "NOISE_SCHEDULE",
    "build_pretrain_components",
    "assemble_pipeline",
    "ship_model",
    "DIGITS_COMMANDS",
]

BUILTIN_MODELS = ("tiny", "sd15-shape")
_BUILD_VERSION = "1"  # bump when a built-in model's shape or seed changes

SHIPPED_MODELS = {"digits": os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits")}
"""Pretrained models that ship with the package (a diffusers directory each, with its manifest)."""

DIGITS_COMMANDS = (
    "python -c \"from ray_dafusion.sample_data import write_digits; "
    "write_digits('runs/digits-pretrain', half='pretrain', labelled=False)\"",
    "ray-dafusion pretrain --config jobs/configs/pretrain_digits.yaml",
)
"""What made the shipped `digits` model (`make digits-model` runs them, then ship_model)."""


def default_cache_dir(cache_dir: Optional[str] = None) -> str:
    """The local cache for built and staged models (`cache_dir`, RAY_DAFUSION_CACHE, ~/.cache)."""
    path = cache_dir or os.environ.get("RAY_DAFUSION_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ray_dafusion"
    )
    os.makedirs(path, exist_ok=True)
    return path


def _lock(path: str):
    from filelock import FileLock

    return FileLock(path + ".lock")


def _staged(uri: str, cache: str, endpoint_url: Optional[str], marker: str, what: str) -> str:
    """The local copy of an s3:// model, one per node and endpoint, staged again when the files
    under the prefix changed (size or time): a model uploaded again to the same prefix is not
    served stale. Without S3 at hand, a complete copy is used as it is, with a warning."""
    import shutil

    from . import storage

    key = hashlib.sha256(f"{endpoint_url or ''} {uri.rstrip('/')}".encode()).hexdigest()[:16]
    target = os.path.join(cache, "s3", key)
    done = os.path.join(target, ".complete")  # what was staged: the listing of the prefix
    with _lock(target):  # one copy per node even when several actors start at once
        staged = json.load(open(done)) if os.path.exists(done) else None
        try:
            listing = storage.listing(uri, endpoint_url)
        except (OSError, storage.StorageError) as exc:
            if staged is None:
                raise
            log.warning("%s: cannot list it (%s); using the copy staged earlier in %s", uri, exc, target)
            return target
        if listing == staged:
            return target
        fresh = target + ".staging"
        shutil.rmtree(fresh, ignore_errors=True)
        storage.download_dir(uri, fresh, endpoint_url)
        if not os.path.exists(os.path.join(fresh, marker)):
            shutil.rmtree(fresh, ignore_errors=True)
            raise ValueError(f"{uri} is not {what}: it has no {marker}")
        with open(os.path.join(fresh, ".complete"), "w") as f:
            json.dump(listing, f)
        if staged is not None:
            log.info("%s changed since it was staged: staging it again", uri)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(fresh, target)
    return target


def resolve_model(uri: str, cache_dir: Optional[str] = None, endpoint_url: Optional[str] = None,
                  marker: str = "model_index.json") -> str:
    """Turn a model URI into something `from_pretrained` takes: a local dir or a hub id.

    `marker` is the file a directory must hold: a diffusers pipeline's model_index.json by
    default, config.json for a transformers model (the score stage's CLIP).
    """
    what = "a diffusers pipeline" if marker == "model_index.json" else f"a model directory (no {marker})"
    if not uri:
        raise ValueError("model URI is empty; use a local directory, s3:// prefix, hub id, 'digits' or 'tiny'")
    if uri in SHIPPED_MODELS:
        path = SHIPPED_MODELS[uri]
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"the shipped model {uri!r} is missing from {path}; reinstall ray-dafusion")
        return path
    cache = default_cache_dir(cache_dir)
    if uri in BUILTIN_MODELS:
        target = os.path.join(cache, f"{uri}-v{_BUILD_VERSION}")
        with _lock(target):
            if not os.path.exists(os.path.join(target, "model_index.json")):
                build_pipeline(uri).save_pretrained(target)
        return target
    if uri.startswith("s3://"):
        return _staged(uri, cache, endpoint_url, marker, what)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if uri.startswith("~"):  # a home-relative directory, as storage paths take them; never a hub id
        uri = os.path.expanduser(uri)
    if os.path.isdir(uri):
        if not os.path.exists(os.path.join(uri, marker)):
            raise ValueError(f"{uri} is not {what} directory: it has no {marker}")
        return os.path.abspath(uri)
    if "://" in uri:
        raise ValueError(f"unsupported model URI {uri!r}; use a local directory, s3://, a hub id, 'digits' or 'tiny'")
    if os.path.sep in uri and (uri.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"model directory not found: {uri}")
    return uri  # a hub id such as "CompVis/stable-diffusion-v1-4"


def load_pipeline(
    uri: str,
    device: Optional[str] = None,
    torch_dtype: Any = None,
    cache_dir: Optional[str] = None,
    endpoint_url: Optional[str] = None,
):
    """A StableDiffusionImg2ImgPipeline with the safety checker and progress bar off.

    fp16 on CUDA, fp32 on CPU unless `torch_dtype` says otherwise.
    """
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    source = resolve_model(uri, cache_dir, endpoint_url)
    try:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            source, torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
        )
    except OSError as exc:
        raise OSError(
            f"cannot load diffusion model {uri!r}: {exc}. Offline machines need a local directory, "
            "an s3:// prefix or model: tiny (set HF_HUB_OFFLINE=1 to fail fast on hub ids)."
        ) from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_tokenizer_and_schedule(uri: str, cache_dir: Optional[str] = None,
                                endpoint_url: Optional[str] = None) -> tuple[Any, dict[str, Any]]:
    """A pipeline's tokenizer and scheduler config, without its weights: what a per-class stage's
    driver checks before every task loads the whole model. A model that does not load is a ConfigError."""
    from diffusers import DDPMScheduler  # any scheduler class reads the config file
    from transformers import CLIPTokenizer

    try:
        local = resolve_model(uri, cache_dir, endpoint_url)
        tokenizer = CLIPTokenizer.from_pretrained(local, subfolder="tokenizer")
        schedule = DDPMScheduler.load_config(local, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"config field 'model': cannot load {uri!r}: {one_line(exc)}. Offline machines need a local directory, "
            "an s3:// prefix or model: tiny (set HF_HUB_OFFLINE=1 to fail fast on hub ids)."
        ) from None
    return tokenizer, schedule


def speed_up(pipe: Any, compile: bool = False, channels_last: bool = True, static_shapes: bool = False,
             fuse_qkv: bool = False) -> list[str]:
    """Make a loaded pipeline faster on CUDA, computing the same images up to float rounding (each
    option reorders or fuses arithmetic; cuDNN's timed kernel choice may differ between runs);
    returns what was done.

    channels_last: the UNet's and VAE's convolutions in NHWC (cuDNN's fast layout on tensor cores);
    cuDNN picks its fastest kernels per shape (`cudnn.benchmark`). `compile`: torch.compile of the
    UNet and the VAE's encoder and decoder *in place* (`Module.compile`), so parameter names stay
    those of the checkpoint and `weights.ErasureWeights` can still copy a class's weights in (the
    compiled graph reads the parameters as inputs). Batch sizes vary per t0 group, so the graphs
    are compiled with dynamic shapes, once, for any batch, unless `static_shapes` (every call
    padded to one size, `pad_calls`): then one graph per module for that batch (dynamic shapes were
    still compiling after ~3 minutes on an H200), at the cost of the padded images' work.
    `fuse_qkv` (asked for explicitly; never with erasure, whose weights name the separate
    projections): each attention's query, key and value projections become one matmul, on any
    device (so CPU tests cover it), before any compile. Otherwise on CPU nothing changes: the test
    model is too small to gain and compiling it costs more than it runs.
    """
    import torch

    done = []
    if fuse_qkv:
        pipe.fuse_qkv_projections(unet=True, vae=True)
        done.append("fused QKV projections")
    if pipe.device.type != "cuda":
        return done
    done.append("cudnn.benchmark")
    torch.backends.cudnn.benchmark = True
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if compile:
        done.append(compile_modules(pipe, static_shapes))
    return done


def compile_modules(pipe: Any, static_shapes: bool, backend: str = "inductor") -> str:
    """torch.compile the UNet and the VAE's encoder and decoder in place; returns what was done.
    `backend` other than inductor is for tests: dynamo's "eager" backend captures the same graphs
    (so graph breaks and recompiles show on CPU) without generating kernels."""
    dynamic = not static_shapes
    for module in (pipe.unet, pipe.vae.encoder, pipe.vae.decoder):
        module.compile(dynamic=dynamic, backend=backend)
    return f"torch.compile(unet, vae.encoder, vae.decoder; {'dynamic' if dynamic else 'static'} shapes)"


def _tiny_tokenizer(extra_words: Sequence[str] = ()):
    """A byte-level BPE CLIP tokenizer written here: every byte is a token, common prompt
    words merge into one token (so "the" can initialise textual inversion), and so does each of
    `extra_words` (the caption words of a pretrained model)."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    words = "a an the of photo picture close-up cropped bright dark good one small large blurry clean rendition"
    for word in words.split() + list(extra_words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            merged = parts[0] + parts[1]
            if merged not in vocab:
                vocab.append(merged)
            parts = [merged] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    merges = list(dict.fromkeys(merges))
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)
    return tok


def build_pipeline(name: str):
    """Build a built-in randomly initialised pipeline (`tiny` or `sd15-shape`)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {BUILTIN_MODELS}")
    torch.manual_seed(0)  # the same weights on every machine, so fingerprints agree
    tokenizer = _tiny_tokenizer()
    if name == "tiny":
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:  # SD 1.5's shapes
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        text_config = CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    return StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ---- small text-conditional models trained here (`pretrain`) ---------------------------------------

PRETRAIN_SHAPES: dict[str, dict[str, Any]] = {
    "small32": {
        "resolution": 32,
        "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
                    layers_per_block=1, norm_num_groups=8, sample_size=32),
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
                     down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, projection_dim=64),
    },
}
"""Shapes `pretrain` builds from scratch. small32: 32 px images, 8x8x4 latents (VAE factor 4),
a 1.8M-parameter UNet with cross-attention, a 2-layer 64-wide CLIP text encoder: 8.6 MB in fp32."""

NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                      clip_sample=False)
"""The noise schedule `pretrain` trains with (cosine, epsilon prediction)."""


def build_pretrain_components(shape: str, tokenizer: Any, seed: int = 0) -> tuple[Any, Any, Any]:
    """(vae, unet, text_encoder) of a PRETRAIN_SHAPES entry, randomly initialised from `seed`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = PRETRAIN_SHAPES[shape]
    torch.manual_seed(seed)
    vae = AutoencoderKL(**spec["vae"])
    unet = UNet2DConditionModel(**spec["unet"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                        **spec["text"]))
    return vae, unet, text


def assemble_pipeline(vae: Any, unet: Any, text_encoder: Any, tokenizer: Any):
    """An img2img pipeline around trained components, with the DDIM sampler they are meant for.

    `leading` spacing with steps_offset 1 starts t0 = 1.0 at t = 981, not 999: on the cosine
    schedule with epsilon prediction, t = 999 (alpha_bar 2e-9) magnifies the noise error ~600x.
    """
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    scheduler = DDIMScheduler(**NOISE_SCHEDULE, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1)
    return StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def ship_model(source: str, name: str, commands: Sequence[str]) -> str:
    """Copy a pretrained pipeline (model_index.json, its component folders) and its manifest, with
    the commands that made it, into the package's assets as SHIPPED_MODELS[name]."""
    import shutil

    target = SHIPPED_MODELS[name]
    with open(os.path.join(source, "model_index.json")) as f:
        components = [k for k, v in json.load(f).items() if isinstance(v, list) and v[0] is not None]
    with open(os.path.join(source, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("stage") != "pretrain":
        raise ValueError(f"{source} is not a complete pretrain output")
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    shutil.copy2(os.path.join(source, "model_index.json"), target)
    for component in components:
        shutil.copytree(os.path.join(source, component), os.path.join(target, component))
    with open(os.path.join(target, "manifest.json"), "w") as f:
        json.dump({**manifest, "commands": list(commands)}, f, indent=2, sort_keys=True)
        f.write("\n")
    return target


def file_fingerprint(path_or_bytes: Any) -> str:
    """sha256 (16 hex chars) of a file's bytes or of a bytes object."""
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray)):
        h.update(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def model_fingerprint(local_dir: str, cache_dir: Optional[str] = None) -> str:
    """Hash of a pipeline directory: every file's path, size and full content, so any changed
    weight changes it. A file's hash is remembered in the local cache under its (path, size,
    mtime, ctime, inode), so a multi-GB checkpoint is read once per node, not once per actor start."""
    if not os.path.isdir(local_dir):
        return hashlib.sha256(local_dir.encode()).hexdigest()[:16]  # a hub id: its name
    h = hashlib.sha256()
    walked: set[str] = set()
    # followlinks: a folder linked in (a unet/ swapped for another) is weights too; a link loop is walked once
    for root, dirs, names in os.walk(local_dir, followlinks=True):
        if os.path.realpath(root) in walked:
            dirs[:] = []
            continue
        walked.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))  # a pretrain run's checkpoints are not weights
        for name in sorted(names):
            if name.startswith((".", "_")) or (root == local_dir and name == "manifest.json"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            h.update(f"{rel}:{os.path.getsize(path)}:{_file_hash(path, cache_dir)}\n".encode())
    return h.hexdigest()[:16]


def _file_hash(path: str, cache_dir: Optional[str]) -> str:
    """sha256 of a file's bytes, memoised on disk by (path, size, mtime_ns, ctime_ns, inode): ctime too, since
    a file rewritten in place can get its old mtime back (os.utime, rsync -t) but never its ctime."""
    stat = os.stat(path)
    if stat.st_size <= 1 << 20:  # small files: hashing is cheaper than the bookkeeping
        return file_fingerprint(path)
    key = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    memo = os.path.join(default_cache_dir(cache_dir), "file-hashes.json")
    with _lock(memo):
        known = _read_memo(memo)
        if key in known:
            return known[key]
        digest = file_fingerprint(path)
        known[key] = digest
        tmp = f"{memo}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(known, f)
        os.replace(tmp, memo)
    return digest


def _read_memo(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}
