"""Textual inversion on the tiny model: only the token moves, the loss falls, the outputs load
into a fresh pipeline (ours and diffusers' loader), re-runs skip finished classes."""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ray_dafusion import storage, weights
from ray_dafusion.config import InvertConfig
from ray_dafusion.inversion import class_file_name, invert, learn_token, learn_tokens
from ray_dafusion.models import load_pipeline
from ray_dafusion.tokens import INVERSION_TEMPLATES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_thread():
    """Two shared cores: one intra-op thread avoids thrashing (and is what a Ray task gets)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pipe(tiny_model):
    return load_pipeline(tiny_model, device="cpu", torch_dtype=torch.float32)


def _images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = np.array([180, 40, 150])
    return [Image.fromarray(np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype("uint8"))
            for _ in range(n)]


def _cfg(**kw) -> InvertConfig:
    base = dict(real="unused", output="unused", steps=4, batch_size=2, resolution=64, learning_rate=0.05)
    return InvertConfig(**{**base, **kw})


def _generate(pipe, prompt: str) -> np.ndarray:
    image = _images(1, seed=7)[0].resize((64, 64))
    out = pipe(prompt=prompt, image=image, strength=0.75, num_inference_steps=4, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def test_only_the_token_moves(tiny_model, one_thread):
    pipe = _pipe(tiny_model)
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("unet", "vae", "text_encoder")}
    rows_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    the = rows_before[pipe.tokenizer.encode("the", add_special_tokens=False)[0]]

    learned = learn_token(pipe, "<cat>", _images(), _cfg(steps=4), seed=0)

    rows_after = pipe.text_encoder.get_input_embeddings().weight.detach()
    token_id = pipe.tokenizer.convert_tokens_to_ids("<cat>")
    assert token_id == rows_before.shape[0] and rows_after.shape[0] == rows_before.shape[0] + 1
    assert torch.equal(rows_after[:token_id], rows_before)  # every other row, bit for bit
    assert torch.equal(rows_after[token_id], learned.embedding)
    assert learned.embedding.shape == the.shape
    assert not torch.allclose(learned.embedding, the)  # the token itself did move
    for name, state in before.items():
        after = getattr(pipe, name).state_dict()
        assert set(after) == set(state)
        for key, value in state.items():
            if name == "text_encoder" and key.endswith("token_embedding.weight"):
                continue  # checked row by row above (it grew by the new token)
            assert torch.equal(after[key], value), f"{name}.{key} changed"


def test_loss_falls_because_the_token_learns(tiny_model, one_thread):
    # The draws (images, flips, noise, timesteps, templates) depend only on the seed, so a run
    # with a vanishing learning rate sees the very same batches: a paired control.
    steps, k = 60, 15
    curves = {}
    for lr in (0.05, 1e-30):
        curves[lr] = np.array(learn_token(_pipe(tiny_model), "<cat>", _images(), _cfg(steps=steps, batch_size=4,
                                                                                    learning_rate=lr), seed=0).losses)
    trained, control = curves[0.05], curves[1e-30]
    assert trained[0] == pytest.approx(control[0], rel=1e-6)  # step 0: both still hold "the"
    assert trained[:k].mean() > trained[-k:].mean()
    # ...and it falls by more than the batches alone explain: the learned token lowers the loss
    assert trained[:k].mean() - trained[-k:].mean() > control[:k].mean() - control[-k:].mean()
    assert (trained[-k:] < control[-k:]).mean() >= 0.8


def test_classes_learned_together_each_follow_their_own_path(tiny_model, one_thread):
    # one forward pass holds both classes' batches, but each token's gradient is its own class's:
    # the same draws and the same path as alone, up to float rounding of the larger batch
    cfg = _cfg(steps=8, batch_size=2, learning_rate=0.05)
    images = {"<cat>": _images(2, seed=0), "<dog>": _images(3, seed=5)}
    seeds = {"<cat>": 11, "<dog>": 12}
    alone = {tok: learn_token(_pipe(tiny_model), tok, imgs, cfg, seed=seeds[tok]) for tok, imgs in images.items()}
    pipe = _pipe(tiny_model)
    rows_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    together = learn_tokens(pipe, images, cfg, seeds)
    assert [t.token for t in together] == ["<cat>", "<dog>"]
    for t in together:
        assert not torch.allclose(t.embedding, alone["<dog>" if t.token == "<cat>" else "<cat>"].embedding)
        assert torch.allclose(t.embedding, alone[t.token].embedding, atol=1e-5, rtol=1e-4)
        assert np.allclose(t.losses, alone[t.token].losses, atol=1e-5, rtol=1e-4)
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(rows[:rows_before.shape[0]], rows_before)  # only the two new rows moved


def test_initializer_must_be_one_token(tiny_model):
    with pytest.raises(ValueError, match="exactly one"):
        learn_token(_pipe(tiny_model), "<cat>", _images(), _cfg(initializer_token="zebra crossing"), seed=0)


def test_what_would_fail_in_every_task_fails_once_before_any(make_real, tiny_model, tmp_path, monkeypatch):
    import json
    import shutil

    from ray_dafusion import perclass
    from ray_dafusion.errors import ConfigError

    def no_tasks(*args, **kwargs):
        raise AssertionError("class tasks started")

    monkeypatch.setattr(perclass, "run_class_tasks", no_tasks)
    real = make_real(class_names=("cat", "dog", "fox"))
    cfg = InvertConfig(real=real, output=str(tmp_path / "tokens"), model=tiny_model)
    with pytest.raises(ConfigError, match="initializer_token") as caught:
        invert(cfg.replace(initializer_token="zebra crossing"))
    assert str(caught.value).count("zebra crossing") == 1  # one message, not one per class
    with pytest.raises(ConfigError, match="config field 'model': cannot load"):
        invert(cfg.replace(model=str(tmp_path / "no-model")))
    sampler = str(tmp_path / "predicts-sample")
    shutil.copytree(tiny_model, sampler)
    path = os.path.join(sampler, "scheduler", "scheduler_config.json")
    with open(path) as f:
        schedule = json.load(f)
    with open(path, "w") as f:
        json.dump({**schedule, "prediction_type": "sample"}, f)
    with pytest.raises(ConfigError, match="predicts 'sample'"):
        invert(cfg.replace(model=sampler))


def test_tokens_that_differ_only_in_case_are_refused(tiny_model):
    # CLIP's tokenizer lowercases prompts: "<Cat>" reads as "<cat>", so two classes would share one row
    with pytest.raises(ValueError, match="'<Cat>' and '<cat>' differ only in case"):
        learn_tokens(_pipe(tiny_model), {"<Cat>": _images(), "<cat>": _images()}, _cfg(steps=1), {"<Cat>": 0, "<cat>": 1})
    pipe = _pipe(tiny_model)
    learn_token(pipe, "<cat>", _images(), _cfg(steps=1), seed=0)
    with pytest.raises(ValueError, match=r"\['<Cat>'\] already exist in the tokenizer \(as \['<cat>'\]"):
        learn_token(pipe, "<Cat>", _images(), _cfg(steps=1), seed=0)
    # the tokenizer also folds Unicode forms: "café" typed on Linux (é) and as a macOS file name (e + accent)
    composed, decomposed = "<caf\u00e9>", "<cafe\u0301>"
    with pytest.raises(ValueError, match="reads back as .* not as itself"):
        learn_tokens(_pipe(tiny_model), {composed: _images(), decomposed: _images()}, _cfg(steps=1),
                     {composed: 0, decomposed: 1})


def test_classes_whose_files_differ_only_in_case_are_refused():
    from ray_dafusion.perclass import select_classes
    from ray_dafusion.schema import ClassInfo

    table = [ClassInfo("Cat", 0, "<Cat>"), ClassInfo("dog", 1, "<dog>"), ClassInfo("cat", 2, "<cat>")]
    with pytest.raises(ValueError, match=r"'Cat' and 'cat' \(Cat.safetensors, cat.safetensors\)"):
        select_classes(table, None, lambda c: class_file_name(c.token))
    assert select_classes(table[:2], None, lambda c: class_file_name(c.token)) == table[:2]


def test_invert_outputs_load_and_rerun_skips(ray_session, make_real, tiny_model, tmp_path):
    real = make_real(class_names=("cat", "leafy spurge"))
    out = str(tmp_path / "tokens")
    cfg = InvertConfig(real=real, model="tiny", output=out, steps=6, batch_size=2, resolution=64,
                       learning_rate=0.05, num_cpus=0.5)

    # 1. one task per class; all tokens in one file, per-class files, loss curves
    result = invert(cfg)
    assert sorted(result.trained) == ["cat", "leafy spurge"] and result.num_classes == 2
    tensors, fingerprint = weights.load_embeddings(out)
    assert set(tensors) == {"<cat>", "<leafy_spurge>"}
    assert all(t.shape == (32,) and t.dtype == torch.float32 for t in tensors.values())
    manifest = storage.read_manifest(out)
    assert manifest["embeddings"]["fingerprint"] == fingerprint
    assert list(manifest["classes"]) == ["cat", "leafy spurge"]
    for record in manifest["classes"].values():
        assert len(record["losses"]) == 6 and all(np.isfinite(record["losses"]))
        assert record["seconds"] > 0 and record["num_images"] == 2
        assert storage.exists(storage.join(out, record["file"]))
        assert record["templates"] == list(INVERSION_TEMPLATES)  # none names cat or leafy spurge
    assert set(manifest["timings"]["seconds_per_class"]) == {"cat", "leafy spurge"}

    # 2. round trip into a fresh pipeline: the rows equal the learned tensors, the token matters
    pipe = _pipe(tiny_model)
    weights.add_tokens(pipe, tensors)
    rows = pipe.text_encoder.get_input_embeddings().weight
    for token, tensor in tensors.items():
        assert torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids(token)], tensor)
    with_token = _generate(pipe, "a photo of a <leafy_spurge>")
    with_the = _generate(pipe, "a photo of a the")
    assert with_token.shape == (64, 64, 3)
    assert np.abs(with_token - with_the).max() > 1e-3

    # 3. diffusers' own loader takes a per-class file, and the combined file as tokens + tensors
    one = _pipe(tiny_model)
    one.load_textual_inversion(storage.join(out, "classes", class_file_name("<cat>")))
    assert torch.equal(one.text_encoder.get_input_embeddings().weight[-1], tensors["<cat>"])
    every = _pipe(tiny_model)
    every.load_textual_inversion(list(tensors.values()), token=list(tensors))
    for token, tensor in tensors.items():
        assert torch.equal(every.text_encoder.get_input_embeddings().weight[every.tokenizer.convert_tokens_to_ids(token)],
                           tensor)

    # 4. re-runs: a complete output is all skipped; a lost class file is the only one redone
    assert invert(cfg).skipped == ["cat", "leafy spurge"]
    storage.delete(storage.join(out, "classes", class_file_name("<cat>")))
    storage.delete(storage.join(out, "manifest.json"))
    again = invert(cfg)
    assert again.trained == ["cat"] and again.skipped == ["leafy spurge"]
    tensors_again, _ = weights.load_embeddings(out)
    assert torch.equal(tensors_again["<leafy_spurge>"], tensors["<leafy_spurge>"])
    assert torch.equal(tensors_again["<cat>"], tensors["<cat>"])  # same seed, same result

    # 5. another config is refused rather than mixed in
    with pytest.raises(storage.StorageError, match="different config"):
        invert(cfg.replace(steps=7))

    # 6. both classes in one task: one forward pass per step, each token as it learns alone
    grouped = invert(cfg.replace(output=str(tmp_path / "grouped"), classes_per_task=2))
    assert sorted(grouped.trained) == ["cat", "leafy spurge"]
    records = storage.read_manifest(grouped.output)["classes"]
    assert [r["task_classes"] for r in records.values()] == [2, 2]
    tensors_grouped, _ = weights.load_embeddings(grouped.output)
    for token, tensor in tensors.items():
        assert torch.allclose(tensors_grouped[token], tensor, atol=1e-5, rtol=1e-4)


def test_job_script_multi_vector_token(ray_session, make_real, tiny_model, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("invert_job", os.path.join(ROOT, "jobs", "invert.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    real = make_real(class_names=("cat", "dog"))
    out = str(tmp_path / "tokens")
    assert job.main(["--config", os.path.join(ROOT, "jobs", "configs", "invert.yaml"), "--real", real,
                     "--output", out, "--steps", "2", "--resolution", "64", "--classes", "dog",
                     "--num_vectors", "2", "--learning_rate", "0.05"]) == 0
    assert out in capsys.readouterr().out
    tensors, _ = weights.load_embeddings(out)
    assert list(tensors) == ["<dog>"] and tensors["<dog>"].shape == (2, 32)
    # both loaders expand a multi-vector token to "<dog>", "<dog>_1"
    pipe = _pipe(tiny_model)
    weights.add_tokens(pipe, tensors)
    rows = pipe.text_encoder.get_input_embeddings().weight
    for i, name in enumerate(["<dog>", "<dog>_1"]):
        assert torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids(name)], tensors["<dog>"][i])
    fresh = _pipe(tiny_model)
    fresh.load_textual_inversion(weights.resolve_embeddings_uri(out))
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[-2:], tensors["<dog>"])
    assert _generate(fresh, "a photo of a <dog>").shape == (64, 64, 3)


def test_missing_or_malformed_embeddings_are_clear_errors(tmp_path, tiny_model):
    with pytest.raises(weights.EmbeddingsError, match="not found"):
        weights.load_embeddings(str(tmp_path / "nope.safetensors"))
    with pytest.raises(weights.EmbeddingsError, match="run `ray-dafusion invert`"):
        weights.load_embeddings(str(tmp_path))  # a directory without tokens.safetensors
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(weights.EmbeddingsError, match="not valid safetensors"):
        weights.load_embeddings(str(garbage))
    from safetensors.torch import save_file

    save_file({"<cat>": torch.zeros(2, 3, 32)}, str(tmp_path / "cube.safetensors"))
    with pytest.raises(weights.EmbeddingsError, match="expected a float tensor"):
        weights.load_embeddings(str(tmp_path / "cube.safetensors"))
    save_file({"<cat>": torch.zeros(0, 32)}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(weights.EmbeddingsError, match=r"'<cat>' in .* has no vectors \(shape \(0, 32\)\)"):
        weights.load_embeddings(str(tmp_path / "empty.safetensors"))
    save_file({"<cat>": torch.zeros(768)}, str(tmp_path / "wide.safetensors"))
    tensors, _ = weights.load_embeddings(str(tmp_path / "wide.safetensors"))
    with pytest.raises(weights.EmbeddingsError, match="another model"):
        weights.add_tokens(_pipe(tiny_model), tensors)


def test_embeddings_that_differ_only_in_case_are_refused(tmp_path, tiny_model):
    from safetensors.torch import save_file

    save_file({"<Cat>": torch.zeros(32), "<cat>": torch.ones(32)}, str(tmp_path / "both.safetensors"))
    with pytest.raises(weights.EmbeddingsError, match="'<Cat>' and '<cat>' in .* differ only in case"):
        weights.load_embeddings(str(tmp_path / "both.safetensors"))
    pipe = _pipe(tiny_model)
    weights.add_tokens(pipe, {"<cat>": torch.zeros(32)})
    with pytest.raises(weights.EmbeddingsError, match="'<Cat>' would read as the model's '<cat>'"):
        weights.add_tokens(pipe, {"<Cat>": torch.ones(32)})  # a file's token vs one the model has
    with pytest.raises(weights.EmbeddingsError, match="reads back as .* not as itself"):  # é vs e + accent
        weights.add_tokens(_pipe(tiny_model), {"<caf\u00e9>": torch.zeros(32), "<cafe\u0301>": torch.ones(32)})


def test_a_token_the_model_already_holds_with_another_vector_is_refused(tiny_model):
    # a model saved after textual inversion has the token: the file's vector must not be dropped silently
    pipe = _pipe(tiny_model)
    weights.add_tokens(pipe, {"<cat>": torch.zeros(32), "<dog>": torch.ones(2, 32)})
    weights.add_tokens(pipe, {"<cat>": torch.zeros(32), "<dog>": torch.ones(2, 32)})  # a reused pipeline: fine
    with pytest.raises(weights.EmbeddingsError, match="'<cat>' is already in the model with another vector"):
        weights.add_tokens(pipe, {"<cat>": torch.ones(32)})
    with pytest.raises(weights.EmbeddingsError, match="'<dog>' is already in the model with another vector"):
        weights.add_tokens(pipe, {"<dog>": torch.ones(32)})  # one row where the model holds two
    rows = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids("<cat>")], torch.zeros(32))


def test_invert_yaml_parses():
    cfg = InvertConfig.from_yaml(os.path.join(ROOT, "jobs", "configs", "invert.yaml"))
    assert (cfg.steps, cfg.batch_size, cfg.learning_rate, cfg.resolution) == (1000, 4, 5e-4, 512)
    assert cfg.initializer_token == "the" and cfg.num_vectors == 1 and cfg.scale_lr


def test_command_line_takes_exponent_learning_rates():
    # `--learning_rate 1e-5` is how docs/method.md writes it; YAML 1.1 alone would read a string
    assert InvertConfig.from_args(None, {"learning_rate": "1e-3"}).learning_rate == 1e-3
    from ray_dafusion.config import EraseConfig

    assert EraseConfig.from_args(None, {"learning_rate": "1e-05"}).learning_rate == 1e-5


def test_a_failing_class_is_named_and_the_others_are_kept(ray_session, make_real, tmp_path):
    real = make_real(class_names=("cat", "dog"))
    manifest = storage.read_manifest(real)
    manifest["classes"].append({"name": "bird", "label": 2, "token": "<bird>"})  # listed, but no images
    storage.write_manifest(real, manifest)
    out = str(tmp_path / "tokens")
    cfg = InvertConfig(real=real, output=out, steps=1, batch_size=1, resolution=64, num_cpus=0.5)
    with pytest.raises(RuntimeError, match=r"bird: .*has no train images"):
        invert(cfg)
    assert storage.read_manifest(out) is None  # not complete...
    done = storage.list_files(storage.join(out, "classes"), ".safetensors")
    assert [os.path.basename(u) for u in done] == ["cat.safetensors", "dog.safetensors"]  # ...but nothing lost


def test_the_images_a_token_learns_from_do_not_depend_on_the_file_layout(make_real):
    # rows_per_file never changes the output: the same rows in other files, in another order,
    # reach training in the same order (the draws pick images by position)
    import pyarrow.parquet as pq

    from ray_dafusion.inversion import _read_class_images

    one_file = make_real(class_names=("cat", "dog"), per_split={"train": 4, "val": 1, "test": 1})
    table = pq.read_table(storage.join(one_file, "train", "part-00000.parquet"))
    rows = table.take(list(range(len(table) - 1, -1, -1)))  # reversed
    two_files = make_real(class_names=("cat", "dog"), per_split={"train": 4, "val": 1, "test": 1})
    storage.delete(storage.join(two_files, "train"))
    storage.write_parquet(rows.slice(0, 3), storage.join(two_files, "train", "part-00000.parquet"))
    storage.write_parquet(rows.slice(3), storage.join(two_files, "train", "part-00001.parquet"))

    def pixels(real):
        return [np.asarray(img) for img in _read_class_images(real, "cat", None)]

    first, second = pixels(one_file), pixels(two_files)
    assert len(first) == 4 and all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], first[1])  # the images differ, so the order is seen


def test_a_stage_that_stops_early_cancels_its_running_class_tasks(ray_session, tmp_path):
    from ray_dafusion.perclass import run_class_tasks
    from ray_dafusion.schema import ClassInfo

    def task(cfg, infos):  # cat returns at once; dog marks itself finished after 8 s
        import pathlib
        import time

        name = infos[0].name
        (pathlib.Path(cfg.output) / f"started-{name}").touch()
        if name == "dog":
            time.sleep(8)
            (pathlib.Path(cfg.output) / f"finished-{name}").touch()
        return [{"seconds": 0.0}]

    def ctrl_c_once_dog_runs(record):  # the user's Ctrl-C (a stall_timeout is one too), dog in mid-training
        deadline = time.monotonic() + 120
        while not (tmp_path / "started-dog").exists():
            assert time.monotonic() < deadline, "the dog task never started"
            time.sleep(0.1)
        raise KeyboardInterrupt

    cfg = InvertConfig(real="unused", output=str(tmp_path), num_cpus=0.5)
    with pytest.raises(KeyboardInterrupt):
        run_class_tasks("invert", cfg, [ClassInfo("cat", 0, "<cat>"), ClassInfo("dog", 1, "<dog>")], task,
                        ctrl_c_once_dog_runs)
    time.sleep(10)  # long enough for a dog task left running to finish
    assert sorted(os.listdir(tmp_path)) == ["started-cat", "started-dog"]


def test_inversion_prompts_name_no_class_of_the_data_set():
    """The digits have a class `one`: "a photo of one <eight>" would teach the token beside a class name."""
    from ray_dafusion.sample_data import DIGIT_NAMES
    from ray_dafusion.tokens import find_leak, make_prompt, templates_for

    kept = templates_for(DIGIT_NAMES)
    assert set(INVERSION_TEMPLATES) - set(kept) == {"a photo of one {}"}
    assert all(find_leak(make_prompt(t, "<eight>"), DIGIT_NAMES, ["<eight>"]) is None for t in kept)
    assert set(INVERSION_TEMPLATES) - set(templates_for(["small car", "large"])) == {"a photo of the large {}"}
    with pytest.raises(ValueError, match="every inversion template names a class"):
        templates_for(["photo", "rendition"])


def test_per_class_seeds_are_hashed_not_added():
    from ray_dafusion.perclass import class_seed

    assert class_seed(1, "cat") != class_seed(0, "dog")  # `seed + label` made these equal
    assert class_seed(0, "cat") == class_seed(0, "cat") and class_seed(0, "cat") != class_seed(1, "cat")
    assert len({class_seed(s, c) for s in range(10) for c in ("cat", "dog", "fox")}) == 30


def test_a_class_draws_prompts_from_the_templates_it_was_given(tiny_model):
    """learn_tokens hands each class the data set's safe templates; its prompts come from those only."""
    from diffusers import DDPMScheduler

    from ray_dafusion.inversion import _ClassDraws

    pipe = _pipe(tiny_model)
    draws = _ClassDraws(["<eight>"], torch.zeros(2, 2, 4, 8, 8), torch.ones(2, 2, 4, 8, 8), np.random.default_rng(0),
                        torch.Generator().manual_seed(0), templates=("a dark photo of the {}",))
    *_, input_ids = draws.batch(_cfg(batch_size=8), pipe.tokenizer, DDPMScheduler.from_config(pipe.scheduler.config),
                                1.0, torch.device("cpu"))
    texts = pipe.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    assert len(texts) == 8 and all(t.startswith("a dark photo of the") for t in texts), texts


def test_learn_tokens_hands_its_templates_to_every_class(tiny_model, monkeypatch):
    from ray_dafusion import inversion

    given = []

    class Spy(inversion._ClassDraws):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            given.append(tuple(self.templates))

    monkeypatch.setattr(inversion, "_ClassDraws", Spy)
    templates = ("a dark photo of the {}", "a rendition of a {}")
    learn_tokens(_pipe(tiny_model), {"<cat>": _images(), "<dog>": _images(seed=1)}, _cfg(steps=1),
                 {"<cat>": 0, "<dog>": 1}, templates)
    assert given == [templates, templates]
