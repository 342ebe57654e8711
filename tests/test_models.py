"""Model loading: built-in tiny model, local directories, s3:// prefixes and hub ids."""

import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ray_dafusion import models, storage


def _img2img(pipe, seed=0):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return pipe(prompt=["a photo of the"], image=img, strength=0.5, num_inference_steps=4,
                guidance_scale=7.5, generator=[torch.Generator().manual_seed(seed)], output_type="np").images[0]


def test_tiny_model_is_built_once_and_loads_like_a_checkpoint(tiny_model, model_cache):
    assert os.path.exists(os.path.join(tiny_model, "model_index.json"))
    mtime = os.path.getmtime(os.path.join(tiny_model, "model_index.json"))
    assert models.resolve_model("tiny", cache_dir=model_cache) == tiny_model
    assert os.path.getmtime(os.path.join(tiny_model, "model_index.json")) == mtime  # not rebuilt
    pipe = models.load_pipeline("tiny", device="cpu", cache_dir=model_cache)
    assert pipe.unet.dtype == torch.float32 and pipe.safety_checker is None
    start = time.perf_counter()
    out = _img2img(pipe)
    print(f"tiny 64x64 img2img, 4 steps: {time.perf_counter() - start:.3f}s")
    assert out.shape == (64, 64, 3)
    # the initializer word of textual inversion must be a single token
    assert len(pipe.tokenizer("the", add_special_tokens=False).input_ids) == 1


def test_same_seed_same_image_and_stable_fingerprint(tiny_model, model_cache):
    pipe = models.load_pipeline("tiny", device="cpu", cache_dir=model_cache)
    np.testing.assert_array_equal(_img2img(pipe, 1), _img2img(pipe, 1))
    assert not np.array_equal(_img2img(pipe, 1), _img2img(pipe, 2))
    fp = models.model_fingerprint(tiny_model)
    assert fp == models.model_fingerprint(tiny_model) and len(fp) == 16


def test_local_directory_and_file_uri(tiny_model, tmp_path, model_cache):
    local = str(tmp_path / "my-model")
    shutil.copytree(tiny_model, local)
    assert models.resolve_model(local) == local
    assert models.resolve_model("file://" + local) == local
    pipe = models.load_pipeline(local, device="cpu", cache_dir=model_cache)
    reference = models.load_pipeline("tiny", device="cpu", cache_dir=model_cache)
    np.testing.assert_array_equal(_img2img(pipe), _img2img(reference))
    assert models.model_fingerprint(local) == models.model_fingerprint(tiny_model)


def test_a_home_relative_model_directory_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    local = tmp_path / "models" / "sd"
    local.mkdir(parents=True)
    (local / "model_index.json").write_text("{}")
    assert models.resolve_model("~/models/sd", cache_dir=str(tmp_path / "cache")) == str(local)
    with pytest.raises(FileNotFoundError, match=f"not found: {tmp_path}/models/none"):
        models.resolve_model("~/models/none", cache_dir=str(tmp_path / "cache"))


def test_s3_prefix_is_staged_once_per_node(tiny_model, tmp_path, s3_bucket):
    bucket = s3_bucket("models")
    storage.upload_dir(tiny_model, f"{bucket}/sd-tiny")
    cache = str(tmp_path / "cache")
    staged = models.resolve_model(f"{bucket}/sd-tiny", cache_dir=cache)
    assert staged.startswith(cache) and os.path.exists(os.path.join(staged, ".complete"))
    assert models.model_fingerprint(staged) == models.model_fingerprint(tiny_model)
    marker = os.path.join(staged, "unet", "config.json")
    mtime = os.path.getmtime(marker)
    assert models.resolve_model(f"{bucket}/sd-tiny", cache_dir=cache) == staged
    assert os.path.getmtime(marker) == mtime  # second call reuses the staged copy
    pipe = models.load_pipeline(f"{bucket}/sd-tiny", device="cpu", cache_dir=cache)
    assert _img2img(pipe).shape == (64, 64, 3)
    # uploaded again to the same prefix (another scheduler config): staged again, not served stale
    storage.write_bytes(f"{bucket}/sd-tiny/scheduler/scheduler_config.json",
                        storage.read_bytes(f"{bucket}/sd-tiny/scheduler/scheduler_config.json").replace(b"}", b', "x": 1}'))
    assert models.resolve_model(f"{bucket}/sd-tiny", cache_dir=cache) == staged
    assert b'"x": 1' in open(os.path.join(staged, "scheduler", "scheduler_config.json"), "rb").read()
    assert models.model_fingerprint(staged) != models.model_fingerprint(tiny_model)
    # the endpoint is part of the copy's name: the same prefix on another S3 is another model
    endpoint = os.environ["AWS_ENDPOINT_URL"]  # the test server, named explicitly
    assert models.resolve_model(f"{bucket}/sd-tiny", cache_dir=cache, endpoint_url=endpoint) != staged
    storage.write_bytes(f"{bucket}/not-a-model/readme.txt", b"hello")
    with pytest.raises(ValueError, match="no model_index.json"):
        models.resolve_model(f"{bucket}/not-a-model", cache_dir=cache)


def test_bad_model_uris_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        models.resolve_model("./no/such/model", cache_dir=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        models.resolve_model(str(empty), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unsupported model URI"):
        models.resolve_model("gs://bucket/model", cache_dir=str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.resolve_model("CompVis/stable-diffusion-v1-4", cache_dir=str(tmp_path)) == "CompVis/stable-diffusion-v1-4"
    with pytest.raises(OSError, match="cannot load diffusion model 'CompVis/stable-diffusion-v1-4'"):
        models.load_pipeline("CompVis/stable-diffusion-v1-4", device="cpu", cache_dir=str(tmp_path))


def test_sd15_shape_has_stable_diffusion_15_sizes():
    """The GPU benchmark model: SD 1.5's shapes (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        pipe = models.build_pipeline("sd15-shape")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(pipe.unet) / 1e6) == 860  # SD 1.x UNet: 859.5M parameters
    assert round(count(pipe.vae) / 1e6) == 84
    assert pipe.text_encoder.config.hidden_size == 768 and pipe.text_encoder.config.num_hidden_layers == 12
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.vae_scale_factor == 8


def test_fingerprint_sees_any_changed_weight_and_remembers_big_files(tmp_path, model_cache):
    import json as _json

    from ray_dafusion.models import model_fingerprint

    model = tmp_path / "m"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    weights = model / "unet" / "w.bin"
    weights.write_bytes(bytes(5 << 20))  # 5 MiB of zeros
    before = model_fingerprint(str(model), model_cache)
    memo = _json.load(open(os.path.join(model_cache, "file-hashes.json")))
    assert any(k.startswith(str(weights)) for k in memo)  # remembered: read once per node
    assert model_fingerprint(str(model), model_cache) == before
    data = bytearray(weights.read_bytes())
    data[(5 << 20) // 2] = 1  # one byte in the middle, far from the first and last MiB
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(model), model_cache) != before


def test_fingerprint_sees_a_file_rewritten_in_place_with_its_old_mtime(tmp_path, model_cache):
    from ray_dafusion.models import model_fingerprint

    model = tmp_path / "m"
    model.mkdir()
    weights = model / "w.bin"
    weights.write_bytes(bytes(5 << 20))  # big enough to be memoised
    before = model_fingerprint(str(model), model_cache)
    stat = os.stat(weights)
    time.sleep(0.05)  # past the filesystem's timestamp tick, so the rewrite's ctime differs
    with open(weights, "r+b") as f:  # same inode, same size
        f.seek(1 << 20)
        f.write(b"\x01")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `rsync -t` or a restore puts it back
    assert (os.stat(weights).st_size, os.stat(weights).st_mtime_ns, os.stat(weights).st_ino) == (
        stat.st_size, stat.st_mtime_ns, stat.st_ino)
    assert model_fingerprint(str(model), model_cache) != before


def test_fingerprint_follows_a_linked_folder_and_survives_a_link_loop(tmp_path, model_cache):
    from ray_dafusion.models import model_fingerprint

    for name, byte in (("unet-a", b"\x00"), ("unet-b", b"\x01")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_bytes(byte * 1024)
    model = tmp_path / "m"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    (model / "unet").symlink_to(tmp_path / "unet-a", target_is_directory=True)
    before = model_fingerprint(str(model), model_cache)
    (model / "unet").unlink()
    (model / "unet").symlink_to(tmp_path / "unet-b", target_is_directory=True)  # other weights, same names
    after = model_fingerprint(str(model), model_cache)
    assert after != before
    (tmp_path / "unet-b" / "loop").symlink_to(model, target_is_directory=True)
    assert model_fingerprint(str(model), model_cache) == after  # the loop adds nothing, and the walk ends
