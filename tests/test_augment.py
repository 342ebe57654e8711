"""The augment stage: the actor without Ray, reproducibility, leakage, batching by t0, output
contract, exactly-once under kills and actor crashes, bad rows, S3, and the shipped config."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ray_dafusion import schema, storage, weights
from ray_dafusion.augment import (
    DiffusionAugmenter,
    augment,
    denoising_steps,
    draw_augmentation,
    even_chunks,
    from_model_size,
    to_model_size,
)
from ray_dafusion.config import AugmentConfig, ConfigError
from ray_dafusion.tokens import LeakageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 3
# Tiny model, 32 px, 4 steps: t0 0.25 -> 1 denoising step, 1.0 -> 4.
FAST = dict(num_augmentations=M, num_inference_steps=4, resolution=32, strengths=[0.25, 0.5, 1.0])
PIXEL_TOLERANCE = 2  # uint8 levels: batched vs single convolutions differ in float rounding only


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Like a Ray actor with under one CPU (Ray sets OMP_NUM_THREADS=1): on a shared 2-core
    machine, two spinning OpenMP threads per process make tiny-model calls 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _embeddings(path, names=("cat", "dog"), seed=0) -> str:
    g = torch.Generator().manual_seed(seed)
    save_file({f"<{n}>": torch.randn(32, generator=g) for n in names}, str(path))
    return str(path)


def _pixels(cell) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")).astype(int)


def _rows(table: pa.Table) -> dict[tuple[str, int], dict]:
    return {(r["source_id"], r["aug_index"]): r for r in table.to_pylist()}


def _real_rows(real: str) -> pa.Table:
    return storage.read_parquet(storage.join(real, "train"))


def _bad_rows(real: str, class_names=("cat", "dog")) -> None:
    """A second train shard with an undecodable image and a label out of range."""
    good = _real_rows(real).slice(0, 1).to_pylist()[0]
    bad = [
        {**good, "id": "bad-bytes", "image": schema.image_cell(b"not an image", "x.png")},
        {**good, "id": "bad-label", "label": 7},
    ]
    table = pa.Table.from_pylist(bad, schema=schema.real_schema(list(class_names)))
    storage.write_parquet(table, storage.join(real, "train", "part-00001.parquet"))


@pytest.fixture
def setup(tmp_path, make_real, tiny_model):
    real = make_real()
    emb = _embeddings(tmp_path / "tokens.safetensors")

    def cfg(**kw) -> AugmentConfig:
        base = dict(real=real, output=str(tmp_path / "out"), embeddings=emb, **FAST)
        return AugmentConfig(**{**base, **kw})

    return real, emb, cfg


# ---- the actor on its own ------------------------------------------------------------------


def test_call_without_ray_writes_one_file_and_returns_a_summary(setup, monkeypatch):
    from ray_dafusion import models

    real, _, cfg = setup
    c = cfg()
    load = models.load_pipeline

    def slow_load(*args, **kwargs):  # a model load that takes 0.3 s: billed with the first batch
        time.sleep(0.3)
        return load(*args, **kwargs)

    monkeypatch.setattr(models, "load_pipeline", slow_load)
    aug = DiffusionAugmenter(c, schema.read_class_table(real))
    summary = aug(_real_rows(real)).to_pylist()
    assert len(summary) == 1 and summary[0]["rows"] == 4 * M and summary[0]["errors"] == 0
    assert summary[0]["setup_seconds"] >= 0.3  # the model load is billed, with the first batch only
    assert aug(_real_rows(real).slice(0, 0)).to_pylist()[0]["setup_seconds"] == 0.0
    files = storage.list_files(storage.join(c.output, "data"), ".parquet")
    assert [os.path.basename(f) for f in files] == [summary[0]["file"]]
    out = pq.read_table(files[0])
    assert out.schema.names == list(schema.SYNTHETIC_COLUMNS)
    assert sorted(_rows(out)) == sorted((r, k) for r in _real_rows(real).column("id").to_pylist() for k in range(M))
    # the same batch again: the committed file is found and nothing is generated twice
    again = aug(_real_rows(real)).to_pylist()[0]
    assert again["rows"] == 0 and again["skipped"] == 4 * M
    assert len(storage.list_files(storage.join(c.output, "data"), ".parquet")) == 1


def test_matches_a_direct_diffusers_img2img_call(setup, tiny_model):
    from diffusers import StableDiffusionImg2ImgPipeline

    real, emb, cfg = setup
    c = cfg(strengths=[0.75], prompt_templates=["a photo of a {}", "a rendition of a {}"])
    aug = DiffusionAugmenter(c, schema.read_class_table(real))
    row = _real_rows(real).slice(2, 1)  # a dog
    aug(row)
    out = _rows(storage.read_parquet(storage.join(c.output, "data")))
    got = out[(row["id"][0].as_py(), 1)]

    seed, strength, template = draw_augmentation(0, row["id"][0].as_py(), 1, [0.75], c.prompt_templates)
    assert (got["seed"], got["strength"], got["prompt"]) == (seed, 0.75, template.format("<dog>"))
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    learned = weights.load_embeddings(emb)[0]
    pipe.load_textual_inversion(learned["<dog>"][None], token="<dog>", tokenizer=pipe.tokenizer,
                                text_encoder=pipe.text_encoder)
    source = schema.decode_image(row["image"][0]["bytes"].as_py())
    image = pipe(
        prompt=template.format("<dog>"), image=source.resize((32, 32), Image.BICUBIC), strength=0.75,
        guidance_scale=7.5, num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0].resize(source.size, Image.BICUBIC)
    expected = np.asarray(image).astype(int)
    assert np.abs(_pixels(got["image"]) - expected).max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize("speed", [
    dict(max_images_per_call=1),
    dict(max_images_per_call=3, pad_calls=True, io_threads=0),  # padded calls, results built inline
    dict(max_images_per_call=2, io_threads=2),
    dict(max_images_per_call=16, fuse_qkv=True),  # one matmul for each attention's Q, K and V
], ids=["per_image", "padded_inline", "two_io_threads", "fused_qkv"])
def test_outputs_do_not_depend_on_batch_size_order_or_speed_settings(setup, tmp_path, speed):
    real, _, cfg = setup
    classes = schema.read_class_table(real)
    table = _real_rows(real)
    one_call = DiffusionAugmenter(cfg(output=str(tmp_path / "a"), max_images_per_call=16), classes)
    one_call(table)
    per_row = DiffusionAugmenter(cfg(output=str(tmp_path / "b"), **speed), classes)
    fused = [getattr(m, "fused_projections", False) for m in per_row.pipe.unet.modules() if hasattr(m, "to_q")]
    assert fused and all(fused) == bool(speed.get("fuse_qkv"))
    for i in reversed(range(table.num_rows)):
        per_row(table.slice(i, 1))
    a = _rows(storage.read_parquet(str(tmp_path / "a" / "data")))
    b = _rows(storage.read_parquet(str(tmp_path / "b" / "data")))
    assert a.keys() == b.keys() and len(a) == 4 * M
    assert len({r["strength"] for r in a.values()}) > 1  # several t0 groups were exercised
    for key in a:
        for column in ("seed", "strength", "prompt", "label", "token"):
            assert a[key][column] == b[key][column]
        assert np.abs(_pixels(a[key]["image"]) - _pixels(b[key]["image"])).max() <= PIXEL_TOLERANCE


def test_compiled_modules_keep_one_graph_each_over_t0_levels_and_call_sizes(setup, tmp_path):
    """The GPU's compiled settings (pad_calls + fuse_qkv + compile), on CPU with dynamo's eager
    backend: the graphs inductor would compile are captured, so a graph break, or a recompile per
    t0 level or per call size, shows here; the images are the uncompiled actor's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ray_dafusion.models import compile_modules

    real, _, cfg = setup
    classes = schema.read_class_table(real)
    table = _real_rows(real)
    speed = dict(max_images_per_call=2, pad_calls=True, fuse_qkv=True)
    DiffusionAugmenter(cfg(output=str(tmp_path / "a"), **speed), classes)(table)
    compiled = DiffusionAugmenter(cfg(output=str(tmp_path / "b"), **speed), classes)
    names = [n for n, _ in compiled.pipe.unet.named_parameters()]
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_modules(compiled.pipe, static_shapes=True, backend="eager")
        # in place: the parameter names stay the checkpoint's, which erasure weights are keyed by
        assert [n for n, _ in compiled.pipe.unet.named_parameters()] == names
        compiled(table)
        frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    a = _rows(storage.read_parquet(str(tmp_path / "a" / "data")))
    b = _rows(storage.read_parquet(str(tmp_path / "b" / "data")))
    groups = [sum(1 for r in a.values() if r["strength"] == s) for s in {r["strength"] for r in a.values()}]
    calls = {len(c) for n in groups for c in even_chunks(range(n), 2)}
    assert len(groups) > 1 and len(calls) > 1  # several t0 levels, and calls of several sizes padded to one
    assert (frames, graphs, breaks) == (3, 3, {})  # the UNet, the VAE encoder, the VAE decoder: compiled once
    assert a.keys() == b.keys() and len(a) == 4 * M
    for key in a:
        assert np.abs(_pixels(a[key]["image"]) - _pixels(b[key]["image"])).max() <= PIXEL_TOLERANCE


def test_draws_are_stable_uniform_and_per_image():
    strengths = [0.25, 0.5, 0.75, 1.0]
    draws = [draw_augmentation(0, f"img{i}", k, strengths, ["{}"]) for i in range(500) for k in range(4)]
    assert draws[7] == draw_augmentation(0, "img1", 3, strengths, ["{}"])
    assert len({d[0] for d in draws}) == len(draws)  # every image its own seed
    counts = np.bincount([strengths.index(d[1]) for d in draws], minlength=4)
    assert counts.min() > 400  # 2000 uniform draws over 4 levels: ~500 each
    assert draw_augmentation(1, "img1", 3, strengths, ["{}"])[0] != draws[7][0]


def test_even_chunks_cover_every_item_once_in_order():
    assert [len(c) for c in even_chunks(list(range(19)), 16)] == [10, 9]
    assert [len(c) for c in even_chunks(list(range(32)), 16)] == [16, 16]
    assert [len(c) for c in even_chunks(list(range(3)), 16)] == [3]
    assert even_chunks([], 16) == []
    for n in range(0, 40):
        chunks = even_chunks(list(range(n)), 7)
        assert [x for c in chunks for x in c] == list(range(n))
        assert all(1 <= len(c) <= 7 for c in chunks) and len(chunks) == -(-n // 7)


def test_t0_quarter_costs_a_quarter_of_the_denoising(setup):
    real, _, cfg = setup
    calls = {}
    for strength in (0.25, 1.0):
        c = cfg(output=f"{cfg().output}-{strength}", strengths=[strength], num_inference_steps=50, num_augmentations=1)
        aug = DiffusionAugmenter(c, schema.read_class_table(real))
        forward, count = aug.pipe.unet.forward, [0]

        def counted(*args, _f=forward, _n=count, **kwargs):
            _n[0] += 1
            return _f(*args, **kwargs)

        aug.pipe.unet.forward = counted
        aug(_real_rows(real).slice(0, 2))  # 2 images of one class and t0 -> one pipeline call
        calls[strength] = count[0]
    # UNet calls (the CFG pair batched in each) = int(t0 x 50) scheduler steps, plus the one
    # warm-up evaluation PNDM's PLMS adds whatever t0: 13 vs 51, about a quarter
    assert calls[1.0] - calls[0.25] == denoising_steps(50, 1.0) - denoising_steps(50, 0.25)
    assert abs(calls[0.25] / calls[1.0] - 0.25) < 0.01, calls


def test_resize_back_to_source_size_squash_and_keep_aspect(setup, tmp_path):
    real, _, cfg = setup
    yy, xx = np.mgrid[0:20, 0:44]
    wide = Image.fromarray(np.stack([xx * 5, yy * 12, xx + yy], -1).astype(np.uint8))  # smooth, not square
    row = {**_real_rows(real).slice(0, 1).to_pylist()[0], "id": "wide", "width": 44, "height": 20,
           "image": schema.image_cell(schema.encode_image(wide), "wide.png")}
    table = pa.Table.from_pylist([row], schema=schema.real_schema(["cat", "dog"]))
    for resize in ("squash", "keep_aspect"):
        c = cfg(output=str(tmp_path / resize), resize=resize, num_augmentations=1)
        DiffusionAugmenter(c, schema.read_class_table(real))(table)
        out = storage.read_parquet(storage.join(c.output, "data")).to_pylist()[0]
        assert Image.open(io.BytesIO(out["image"]["bytes"])).size == (44, 20)
    # keep_aspect puts the source undistorted in the middle of the square and crops it back
    square = to_model_size(wide, 64, "keep_aspect")
    assert square.size == (64, 64)
    back = np.asarray(from_model_size(square, (44, 20), "keep_aspect")).astype(int)
    assert np.abs(back - np.asarray(wide).astype(int)).mean() < 3


def test_bad_rows_go_to_errors_with_reasons(setup, tmp_path):
    real, _, cfg = setup
    _bad_rows(real)
    only_cat = _embeddings(tmp_path / "cat.safetensors", names=("cat",))
    c = cfg(embeddings=only_cat)
    summary = DiffusionAugmenter(c, schema.read_class_table(real))(_real_rows(real)).to_pylist()[0]
    errors = {r["item"]: r["reason"] for r in storage.read_parquet(storage.join(c.output, "errors")).to_pylist()}
    assert "undecodable image" in errors["bad-bytes"]
    assert "out of range" in errors["bad-label"]
    assert {k for k, v in errors.items() if "class without a token" in v} == {"train-1-0", "train-1-1"}
    assert summary["errors"] == 4 and summary["rows"] == 2 * M  # the cats still came out


def test_real_guidance_uses_class_words_and_no_tokens(tmp_path, make_real, tiny_model):
    real = make_real(class_names=("leafy_spurge", "dog"))
    fast = {k: v for k, v in FAST.items() if k != "strengths"}  # the default list: real_guidance means t0 0.5
    c = AugmentConfig(real=real, output=str(tmp_path / "rg"), mode="real_guidance", **fast)
    assert c.strengths is None and c.t0_levels() == [0.5]  # the mode table's default
    assert c.replace(strengths=[0.75]).t0_levels() == [0.75]  # a list the user chose is kept
    assert c.replace(mode="da_fusion").t0_levels() == [0.25, 0.5, 0.75, 1.0]
    DiffusionAugmenter(c, schema.read_class_table(real))(_real_rows(real))
    out = storage.read_parquet(str(tmp_path / "rg" / "data")).to_pylist()
    assert {r["prompt"] for r in out} == {"a photo of a leafy spurge", "a photo of a dog"}
    assert {r["token"] for r in out} == {""} and {r["strength"] for r in out} == {0.5}
    assert {r["embeddings_fingerprint"] for r in out} == {""}


# ---- refusals before any work ------------------------------------------------------------


def test_leaking_template_is_refused_naming_class_and_prompt(setup):
    _, _, cfg = setup
    c = cfg(prompt_templates=["a photo of a {}", "a Cat-like {} in the grass"])
    with pytest.raises(LeakageError, match=r"'a Cat-like <cat> in the grass'.*'cat'"):
        augment(c)
    assert not storage.exists(c.output)  # refused before anything was written


def test_leak_check_matches_case_underscore_and_space_variants_as_whole_words():
    from ray_dafusion.tokens import check_prompts, find_leak

    names, toks = ["leafy_spurge", "cat"], ["<leafy_spurge>", "<cat>"]
    for prompt in ("a photo of a Leafy Spurge", "a LEAFY_SPURGE in a field", "leafy spurge.", "a CAT"):
        assert find_leak(prompt, names, toks) is not None, prompt
        with pytest.raises(LeakageError, match="contains the class name"):
            check_prompts({"cat": [prompt]}, names, toks)
    for prompt in ("a photo of a <leafy_spurge>", "a photo of a <cat>", "a category of <cat>", "leafyspurge"):
        assert find_leak(prompt, names, toks) is None, prompt
    check_prompts({"leafy_spurge": ["a photo of a <leafy_spurge>"]}, names, toks)
    # plurals, and a hyphenated class written with a space or an underscore
    names, toks = ["dog", "glass", "T-shirt"], ["<dog>", "<glass>", "<T-shirt>"]
    for prompt in ("two dogs, <dog>", "Glasses on a table", "a t shirt", "a T_shirt", "t-shirts"):
        assert find_leak(prompt, names, toks) is not None, prompt
    for prompt in ("a photo of a <T-shirt>", "dogsled", "a doge", "shirts"):
        assert find_leak(prompt, names, toks) is None, prompt
    assert find_leak("a photo of <it> in its habitat", ["it"], ["<it>"]) is None  # short names: no plural


def test_missing_or_malformed_embeddings_are_errors(setup, tmp_path):
    _, _, cfg = setup
    with pytest.raises(ConfigError, match="embeddings"):
        augment(cfg(embeddings=None))
    with pytest.raises(weights.EmbeddingsError, match="not found"):
        augment(cfg(embeddings=str(tmp_path / "nope.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(weights.EmbeddingsError, match="not valid safetensors"):
        augment(cfg(embeddings=str(tmp_path / "junk.safetensors")))
    save_file({"<cat>": torch.randn(64)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(weights.EmbeddingsError, match="dimension 64"):
        augment(cfg(embeddings=str(tmp_path / "wide.safetensors")))
    with pytest.raises(weights.EmbeddingsError):  # the actor refuses too, never falls back
        DiffusionAugmenter(cfg(embeddings=str(tmp_path / "junk.safetensors")), [])
    assert not storage.exists(cfg().output)


def test_shipped_configs_parse():
    for name in ("augment.yaml", "augment_real_guidance.yaml"):
        c = AugmentConfig.from_yaml(os.path.join(REPO, "jobs", "configs", name))
        assert isinstance(c, AugmentConfig) and 0 < c.num_cpus < 1
    assert AugmentConfig.from_yaml(os.path.join(REPO, "jobs", "configs", "augment_real_guidance.yaml")).strengths == [0.5]


# ---- the Ray job -------------------------------------------------------------------------


def _check_complete(output: str, real_ids: list[str], quarantined=(), endpoint_url=None) -> pa.Table:
    table = storage.read_parquet(storage.join(output, "data"), endpoint_url)
    pairs = list(zip(table.column("source_id").to_pylist(), table.column("aug_index").to_pylist()))
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {(r, k) for r in real_ids if r not in quarantined for k in range(M)}
    return table


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, tiny_model, ray_session):
    """One complete Ray job: 2 actors, 1 row per batch, a shard with bad rows."""
    from conftest import write_real_dataset

    root = tmp_path_factory.mktemp("ray-run")
    real = write_real_dataset(str(root / "real"))
    _bad_rows(real)
    # `real` relative to this directory, as a user types it: the manifest records it absolute
    cfg = AugmentConfig(real=os.path.relpath(real), output=str(root / "out"),
                        embeddings=_embeddings(root / "t.safetensors"), batch_size=1, min_actors=2, max_actors=2,
                        num_cpus=0.5, **FAST)
    return cfg, augment(cfg)


def test_ray_job_output_contract(ray_run):
    cfg, result = ray_run
    ids = _real_rows(cfg.real).column("id").to_pylist()
    table = _check_complete(cfg.output, ids, quarantined={"bad-bytes", "bad-label"})
    assert (result.real_rows, result.synthetic_rows, result.errors) == (6, 4 * M, 2)
    assert result.files_written == 4  # one file per batch
    manifest = storage.read_manifest(cfg.output)
    assert manifest["counts"]["synthetic_rows"] == 4 * M and manifest["counts"]["errors"] == 2
    assert manifest["model_fingerprint"] and manifest["embeddings_fingerprint"]
    assert manifest["real"] == os.path.abspath(cfg.real) != cfg.real  # score and gallery work from anywhere
    assert manifest["timings"]["images_per_second"] > 0 and manifest["config"]["num_augmentations"] == M
    # lineage
    real = {r["id"]: r for r in _real_rows(cfg.real).to_pylist()}
    for row in table.to_pylist():
        src = real[row["source_id"]]
        assert row["id"] == f"{row['source_id']}-{row['aug_index']}"
        assert (row["label"], row["class_name"], row["token"]) == (src["label"], src["class_name"], f"<{src['class_name']}>")
        assert row["strength"] in cfg.strengths and row["prompt"] == f"a photo of a <{src['class_name']}>"
        assert row["model_fingerprint"] == manifest["model_fingerprint"]
        assert Image.open(io.BytesIO(row["image"]["bytes"])).format == "PNG"
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (src["width"], src["height"])
    # readable by pandas, Ray Data and datasets (which decodes images and class labels)
    import datasets
    import pandas as pd
    import ray.data

    assert len(pd.read_parquet(storage.join(cfg.output, "data"))) == 4 * M
    assert ray.data.read_parquet(storage.join(cfg.output, "data")).count() == 4 * M
    hf = datasets.load_dataset("parquet", data_files=storage.parquet_files(storage.join(cfg.output, "data")),
                               split="train")
    assert hf.features["label"].names == ["cat", "dog"] and isinstance(hf[0]["image"], Image.Image)


def test_ray_job_matches_the_actor_run_in_process(ray_run, tmp_path):
    """2 actors with 1-row batches give the images one in-process call gives."""
    cfg, _ = ray_run
    local = cfg.replace(output=str(tmp_path / "local"))
    DiffusionAugmenter(local, schema.read_class_table(cfg.real))(_real_rows(cfg.real))
    a = _rows(storage.read_parquet(storage.join(cfg.output, "data")))
    b = _rows(storage.read_parquet(storage.join(local.output, "data")))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["seed"] == b[key]["seed"] and a[key]["strength"] == b[key]["strength"]
        assert np.abs(_pixels(a[key]["image"]) - _pixels(b[key]["image"])).max() <= PIXEL_TOLERANCE


def test_rerun_skips_and_other_config_is_refused_unless_overwrite(ray_run, tmp_path):
    cfg, _ = ray_run
    # resources (and overwrite itself) don't change images: never a refusal, never a rerun
    again = augment(cfg.replace(batch_size=2, max_actors=1, min_actors=1, num_cpus=0.25, overwrite=True))
    assert again.already_complete and again.generated == 0
    with pytest.raises(storage.StorageError, match=r"different config \(seed: 0 -> 1; fingerprint"):
        augment(cfg.replace(seed=1))
    # overwrite replaces it (on a copy, so the module's run stays intact)
    copy = str(tmp_path / "copy")
    for f in storage.list_files(cfg.output, recursive=True):
        storage.write_bytes(storage.join(copy, os.path.relpath(f, cfg.output)), storage.read_bytes(f))
    with pytest.raises(storage.StorageError, match="different config"):  # (the copy has no _run.json record)
        augment(cfg.replace(output=copy, num_augmentations=2))
    assert storage.read_manifest(copy)["num_augmentations"] == M  # the refusal touched nothing
    replaced = augment(cfg.replace(output=copy, num_augmentations=1, overwrite=True))
    assert replaced.synthetic_rows == 4 and replaced.skipped_as_done == 0
    assert storage.read_manifest(copy)["num_augmentations"] == 1


def test_duplicated_file_is_refused_with_what_to_do(ray_run, tmp_path):
    from ray_dafusion.errors import StageError

    cfg, _ = ray_run
    copy = str(tmp_path / "dup")
    for f in storage.list_files(cfg.output, recursive=True):
        if not f.endswith("manifest.json"):  # an interrupted run: no manifest yet
            storage.write_bytes(storage.join(copy, os.path.relpath(f, cfg.output)), storage.read_bytes(f))
    storage.write_bytes(storage.join(copy, "_run.json"), storage.read_bytes(storage.join(cfg.output, "_run.json")))
    first = storage.parquet_files(storage.join(copy, "data"))[0]
    storage.write_bytes(storage.join(copy, "data", "part-extra-copy.parquet"), storage.read_bytes(first))
    with pytest.raises(StageError, match="cannot repair") as err:
        augment(cfg.replace(output=copy))
    assert "part-extra-copy.parquet" in str(err.value) or os.path.basename(first) in str(err.value)
    assert "overwrite: true" in str(err.value) and storage.read_manifest(copy) is None


def test_killed_job_resumes_to_exactly_n_times_m(tmp_path, make_real, tiny_model, ray_session):
    real = make_real(per_split={"train": 3, "val": 1, "test": 1})
    ids = _real_rows(real).column("id").to_pylist()
    cfg = AugmentConfig(real=real, output=str(tmp_path / "out"), embeddings=_embeddings(tmp_path / "t.safetensors"),
                        batch_size=1, **FAST)
    with pytest.raises(RuntimeError, match="injected stop"):
        augment(cfg, _faults={"stop_after_batches": 2})
    assert storage.read_manifest(cfg.output) is None
    files = storage.list_files(storage.join(cfg.output, "data"), ".parquet")
    assert len(files) >= 2
    if len(files) == len(ids):  # batches in flight may have finished: lose one, as a kill could
        storage.delete(files.pop())
    # make one committed row partial: only its aug 0 survives
    first = pq.read_table(files[0])
    keep = first.filter(pa.compute.equal(first.column("aug_index"), 0))
    storage.write_parquet(keep, files[0])
    before = _rows(storage.read_parquet(storage.join(cfg.output, "data")))

    result = augment(cfg)
    table = _check_complete(cfg.output, ids)
    assert result.skipped_as_done == len(before) and result.generated == len(ids) * M - len(before)
    after = _rows(table)
    for key, row in before.items():  # nothing committed was rewritten
        assert after[key]["image"] == row["image"]
    assert storage.read_manifest(cfg.output)["counts"]["synthetic_rows"] == len(ids) * M


def test_sigkilled_driver_resumes_to_exactly_n_times_m(tmp_path, make_real, tiny_model, ray_session):
    """A real kill: the job's driver process gets SIGKILL after its first committed batch."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    real = make_real(per_split={"train": 16, "val": 1, "test": 1})  # enough batches to be halfway
    ids = _real_rows(real).column("id").to_pylist()
    cfg = AugmentConfig(real=real, output=str(tmp_path / "out"), model=tiny_model, batch_size=1,
                        embeddings=_embeddings(tmp_path / "t.safetensors"), **FAST)
    config = tmp_path / "augment.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    data = storage.join(cfg.output, "data")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "ray_dafusion.cli", "augment", "--config", str(config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (storage.exists(data) and storage.list_files(data, ".parquet")):
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before its first batch"
        assert time.time() < deadline, "no batch committed in 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # Ray ends a dead driver's actors; wait until no more files appear
    count, stable_since = -1, time.time()
    while time.time() - stable_since < 5:
        now = len(storage.list_files(data, ".parquet"))
        if now != count:
            count, stable_since = now, time.time()
        time.sleep(0.5)
    assert storage.read_manifest(cfg.output) is None  # killed: not marked complete
    print(f"driver killed with {count} of {len(ids)} batches committed")
    assert 1 <= count < len(ids), count  # halfway

    result = augment(cfg)
    _check_complete(cfg.output, ids)
    assert result.skipped_as_done == count * M and result.generated == (len(ids) - count) * M


def test_crashed_actor_is_restarted_and_its_batch_retried(tmp_path, make_real, tiny_model, ray_session):
    real = make_real()
    ids = _real_rows(real).column("id").to_pylist()
    marker = str(tmp_path / "crashed")
    cfg = AugmentConfig(real=real, output=str(tmp_path / "out"), embeddings=_embeddings(tmp_path / "t.safetensors"),
                        batch_size=2, max_restarts=2, **FAST)
    # the actor exits right after committing its first file; the retry must not duplicate it
    result = augment(cfg, _faults={"crash_actor": {"marker": marker, "point": "after_write", "after_batches": 0}})
    assert os.path.exists(marker)
    _check_complete(cfg.output, ids)
    assert result.synthetic_rows == len(ids) * M
    # the crashed call's images were made by this run: counted, though its retry generated nothing
    assert result.generated == len(ids) * M and result.files_written == len(ids) // 2
    assert storage.read_manifest(cfg.output)["counts"]["generated"] == len(ids) * M


def test_s3_input_and_output(s3_bucket, s3_server, tmp_path, tiny_model, ray_session):
    from conftest import write_real_dataset

    bucket = s3_bucket("augment-test")
    real = write_real_dataset(f"{bucket}/real", endpoint_url=s3_server)
    emb = f"{bucket}/tokens/tokens.safetensors"
    storage.write_bytes(emb, open(_embeddings(tmp_path / "t.safetensors"), "rb").read(), s3_server)
    cfg = AugmentConfig(real=real, output=f"{bucket}/synthetic", embeddings=f"{bucket}/tokens",
                        endpoint_url=s3_server, batch_size=2, **FAST)
    result = augment(cfg)
    ids = storage.read_parquet(storage.join(real, "train"), s3_server, columns=["id"]).column("id").to_pylist()
    _check_complete(cfg.output, ids, endpoint_url=s3_server)
    assert result.synthetic_rows == len(ids) * M
    assert storage.read_manifest(cfg.output, s3_server)["counts"]["synthetic_rows"] == len(ids) * M


def _erasure(root, deltas: dict[str, float]) -> str:
    """A hand-made `xattn` erase output: per class, random deltas of scale `deltas[class]` on every
    cross-attention key and value weight (the files `erase --method xattn` writes)."""
    from safetensors.torch import save

    from ray_dafusion.models import file_fingerprint, load_pipeline

    unet = load_pipeline("tiny").unet
    keys = {n: p.shape for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}
    g = torch.Generator().manual_seed(0)
    classes = {}
    for name, value in deltas.items():
        data = save({n: value * torch.randn(shape, generator=g) for n, shape in keys.items()})
        storage.write_bytes(storage.join(root, "classes", f"{name}.safetensors"), data)
        classes[name] = {"name": name, "file": f"classes/{name}.safetensors", "fingerprint": file_fingerprint(data)}
    storage.write_manifest(root, {"stage": "erase", "method": "xattn", "classes": classes})
    return root


def test_erasure_is_applied_per_class_group(setup, tmp_path):
    real, _, cfg = setup
    classes = schema.read_class_table(real)
    plain = cfg(output=str(tmp_path / "plain"))
    DiffusionAugmenter(plain, classes)(_real_rows(real))
    # cat's keys change a lot; dog's delta is zero, so dog rows must equal the plain run,
    # which only holds if cat's edit was undone before dog's group (the batch has both)
    erased = cfg(output=str(tmp_path / "erased"), erasure=_erasure(str(tmp_path / "erase"), {"cat": 2.0, "dog": 0.0}))
    DiffusionAugmenter(erased, classes)(_real_rows(real))
    a = _rows(storage.read_parquet(str(tmp_path / "plain" / "data")))
    b = _rows(storage.read_parquet(str(tmp_path / "erased" / "data")))
    diff = {key: np.abs(_pixels(a[key]["image"]) - _pixels(b[key]["image"])).max() for key in a}
    assert all(diff[k] > PIXEL_TOLERANCE for k in diff if a[k]["class_name"] == "cat")
    assert all(diff[k] <= PIXEL_TOLERANCE for k in diff if a[k]["class_name"] == "dog")
    assert {r["erasure_fingerprint"] for r in b.values() if r["class_name"] == "cat"} == {
        weights.ErasureWeights(erased.erasure).fingerprint("cat")}
    # a class the erase output lacks goes to errors/ instead of being generated unerased
    only_cat = cfg(output=str(tmp_path / "only-cat"), erasure=_erasure(str(tmp_path / "erase-cat"), {"cat": 2.0}))
    summary = DiffusionAugmenter(only_cat, classes)(_real_rows(real)).to_pylist()[0]
    assert (summary["rows"], summary["errors"]) == (2 * M, 2)


def test_an_erasure_changed_since_the_driver_planned_is_refused_by_the_worker(setup):
    real, _, cfg = setup
    with pytest.raises(RuntimeError, match="erasure fingerprint on this worker is \\{\\} but the driver planned"):
        DiffusionAugmenter(cfg(), schema.read_class_table(real), expected_fingerprints={"erasure": {"cat": "e1"}})


def test_the_actor_pool_may_lose_actors_while_they_start(ray_session, setup):
    from ray_dafusion.augment import _map_augmenter

    import ray.data

    real, _, cfg = setup
    before = ray.data.DataContext.get_current().max_consecutive_actor_init_deaths
    ds = storage.ray_dataset(storage.list_files(storage.join(real, "train"), ".parquet"), None, None)
    mapped = _map_augmenter(ds, cfg(max_restarts=5), schema.read_class_table(real), {},
                            {"model": "m", "embeddings": "e"}, None, 1, {})
    assert mapped.context.max_consecutive_actor_init_deaths == 5 != before  # this run's own context
    assert ray.data.DataContext.get_current().max_consecutive_actor_init_deaths == before  # no leak into later runs


def test_tokens_and_erasures_of_another_model_or_data_set_are_refused(setup, tmp_path, monkeypatch):
    """Tokens learned, or classes erased, on another model of the same shape pass every shape check:
    the invert and erase manifests' model fingerprints must be augment's model's."""
    import shutil

    from ray_dafusion.augment import _prepare_conditioning
    from ray_dafusion.models import model_fingerprint, resolve_model

    real, emb, cfg = setup
    classes = schema.read_class_table(real)
    tiny = model_fingerprint(resolve_model("tiny"))
    inverted = tmp_path / "invert"
    inverted.mkdir()
    shutil.copy(emb, inverted / weights.EMBEDDINGS_FILE)
    for where in (str(inverted), str(inverted / weights.EMBEDDINGS_FILE)):  # the directory or its file
        storage.write_manifest(str(inverted), {"stage": "invert", "model_fingerprint": "elsewhere"})
        with pytest.raises(ConfigError, match="'embeddings': .* made on another model .*elsewhere"):
            augment(cfg(embeddings=where))
        storage.write_manifest(str(inverted), {"stage": "invert", "model_fingerprint": tiny})
        assert _prepare_conditioning(cfg(embeddings=where), classes)[0]["model"] == tiny
    monkeypatch.chdir(inverted)  # the file by its bare name: its directory is this one
    storage.write_manifest(str(inverted), {"stage": "invert", "model_fingerprint": "elsewhere"})
    with pytest.raises(ConfigError, match="made on another model"):
        _prepare_conditioning(cfg(embeddings=weights.EMBEDDINGS_FILE), classes)
    erase = _erasure(str(tmp_path / "erase"), {"cat": 1.0})
    manifest = storage.read_manifest(erase)
    storage.write_manifest(erase, {**manifest, "model_fingerprint": "elsewhere"})
    with pytest.raises(ConfigError, match="'erasure': .* made on another model"):
        augment(cfg(erasure=erase))
    storage.write_manifest(erase, {**manifest, "model_fingerprint": tiny})
    assert set(_prepare_conditioning(cfg(erasure=erase), classes)[0]["erasure"]) == {"cat"}
    zebra = _erasure(str(tmp_path / "erase-zebra"), {"zebra": 1.0})
    with pytest.raises(ConfigError, match="erased none of this data set's classes"):
        augment(cfg(erasure=zebra))
    assert not storage.exists(cfg().output)


def test_command_line_and_job_script_refuse_a_leaking_prompt(setup, ray_session, capsys):
    import importlib.util

    from ray_dafusion.cli import main

    real, emb, cfg = setup
    args = ["--real", real, "--embeddings", emb, "--output", cfg().output, "--prompt_templates", "a {} cat"]
    assert main(["augment", *args]) == 1
    assert "contains the class name 'cat'" in capsys.readouterr().err
    spec = importlib.util.spec_from_file_location("augment_job", os.path.join(REPO, "jobs", "augment.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(args) == 1  # one line on stderr, no traceback
    err = capsys.readouterr().err
    assert "contains the class name 'cat'" in err and "Traceback" not in err
    assert not storage.exists(cfg().output)
