"""Load Stable Diffusion img2img pipelines from anywhere, and build offline stand-ins.

``load_pipeline(uri)`` takes a local directory, an ``s3://`` prefix (copied once per node into a
local cache under a file lock), a hub id (``HF_HUB_OFFLINE`` is respected by diffusers), or one of
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
import os
from typing import Any, Optional

__all__ = [
    "BUILTIN_MODELS",
    "default_cache_dir",
    "resolve_model",
    "load_pipeline",
    "build_pipeline",
    "model_fingerprint",
    "file_fingerprint",
]

BUILTIN_MODELS = ("tiny", "sd15-shape")
_BUILD_VERSION = "1"  # bump when a built-in model's shape or seed changes


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


def resolve_model(uri: str, cache_dir: Optional[str] = None, endpoint_url: Optional[str] = None) -> str:
    """Turn a model URI into something `from_pretrained` takes: a local dir or a hub id."""
    from . import storage

    if not uri:
        raise ValueError("model URI is empty; use a local directory, s3:// prefix, hub id or 'tiny'")
    cache = default_cache_dir(cache_dir)
    if uri in BUILTIN_MODELS:
        target = os.path.join(cache, f"{uri}-v{_BUILD_VERSION}")
        with _lock(target):
            if not os.path.exists(os.path.join(target, "model_index.json")):
                build_pipeline(uri).save_pretrained(target)
        return target
    if uri.startswith("s3://"):
        key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
        target = os.path.join(cache, "s3", key)
        done = os.path.join(target, ".complete")
        with _lock(target):  # one copy per node even when several actors start at once
            if not os.path.exists(done):
                storage.download_dir(uri, target, endpoint_url)
                if not os.path.exists(os.path.join(target, "model_index.json")):
                    raise ValueError(f"{uri} is not a diffusers pipeline: it has no model_index.json")
                open(done, "w").close()
        return target
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if os.path.isdir(uri):
        if not os.path.exists(os.path.join(uri, "model_index.json")):
            raise ValueError(f"{uri} is not a diffusers pipeline directory: it has no model_index.json")
        return os.path.abspath(uri)
    if "://" in uri:
        raise ValueError(f"unsupported model URI {uri!r}; use a local directory, s3://, a hub id or 'tiny'")
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


def _tiny_tokenizer():
    """A byte-level BPE CLIP tokenizer written here: every byte is a token, common prompt
    words merge into one token (so "the" can initialise textual inversion)."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    words = "a an the of photo picture close-up cropped bright dark good one small large blurry clean rendition"
    for word in words.split():
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


def model_fingerprint(local_dir: str) -> str:
    """Hash of a pipeline directory: configs in full, weight files by size and their first and
    last MiB (hashing gigabytes of weights on every actor start would cost minutes)."""
    if not os.path.isdir(local_dir):
        return hashlib.sha256(local_dir.encode()).hexdigest()[:16]  # a hub id: its name
    h = hashlib.sha256()
    for root, _, names in sorted(os.walk(local_dir)):
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            size = os.path.getsize(path)
            h.update(f"{rel}:{size}\n".encode())
            with open(path, "rb") as f:
                if size <= 2 << 20:
                    h.update(f.read())
                else:
                    h.update(f.read(1 << 20))
                    f.seek(size - (1 << 20))
                    h.update(f.read())
    return h.hexdigest()[:16]

