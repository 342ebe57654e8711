"""ESD concept erasure on the tiny model: the loss falls, the class prompt's noise prediction
moves toward the negative-guidance target (a sign error fails), xattn touches only cross-attention
parameters, the outputs apply per class to a loaded UNet and restore exactly."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ray_dafusion import storage
from ray_dafusion.config import EraseConfig
from ray_dafusion.erasure import erase, erase_concept, xattn_parameter_names
from ray_dafusion.models import load_pipeline
from ray_dafusion.weights import ErasureWeights

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


def _cfg(**kw) -> EraseConfig:
    base = dict(real="unused", output="unused", iterations=4, resolution=64, num_inference_steps=10,
                learning_rate=1e-3)
    return EraseConfig(**{**base, **kw})


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _paired_curves(tiny_model, method: str, iterations: int, lr: float):
    # k, the noise and t come from the seed only; x_t comes from the UNet being trained (as ESD),
    # so a run with a vanishing learning rate sees the same draws on a model that never moves.
    runs = {}
    for rate in (lr, 1e-30):
        pipe = _pipe(tiny_model)
        runs[rate] = (pipe, erase_concept(pipe, "cat", _cfg(method=method, iterations=iterations, learning_rate=rate),
                                          seed=0))
    return runs[lr], runs[1e-30][1]


def _assert_loss_fell(trained, control, k):
    trained, control = np.array(trained), np.array(control)
    assert trained[0] == pytest.approx(control[0], rel=1e-5)  # first step: both are the original
    assert trained[:k].mean() > trained[-k:].mean()
    assert trained[-k:].mean() < 0.7 * control[-k:].mean()
    assert (trained[-k:] < control[-k:]).mean() >= 0.8


def test_xattn_loss_falls_and_only_key_value_weights_change(tiny_model, one_thread):
    original = _pipe(tiny_model)
    unet_before, text_before = _state(original.unet), _state(original.text_encoder)
    (pipe, erased), control = _paired_curves(tiny_model, "xattn", iterations=30, lr=1e-3)
    _assert_loss_fell(erased.losses, control.losses, k=8)

    names = xattn_parameter_names(pipe.unet)
    assert names and all(".attn2." in n for n in names)  # ESD-x: every cross-attention parameter
    assert {n.split(".attn2.")[1].split(".")[0] for n in names} == {"to_q", "to_k", "to_v", "to_out"}
    assert sorted(erased.tensors) == sorted(names)
    after = _state(pipe.unet)
    for key, value in unet_before.items():
        if key in names:  # trained: the saved delta is exactly new - original
            assert not torch.equal(after[key], value), f"{key} did not move"
            assert torch.equal(erased.tensors[key], after[key] - value)
        else:
            assert torch.equal(after[key], value), f"{key} changed"
    assert all(torch.equal(v, text_before[k]) for k, v in _state(pipe.text_encoder).items())


def test_full_trains_and_saves_the_whole_unet(tiny_model, one_thread):
    # (whether it erases in the right direction: the negative-guidance test below)
    pipe = _pipe(tiny_model)
    erased = erase_concept(pipe, "cat", _cfg(method="full", iterations=6, learning_rate=1e-4), seed=0)
    assert len(erased.losses) == 6 and all(np.isfinite(erased.losses))
    after = _state(pipe.unet)
    assert sorted(erased.tensors) == sorted(after)
    assert all(torch.equal(erased.tensors[k], after[k]) for k in after)
    before = _state(_pipe(tiny_model).unet)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert len(changed) > len(xattn_parameter_names(pipe.unet))  # beyond cross-attention


@pytest.mark.parametrize("method", ["xattn", "full"])
def test_class_prediction_moves_toward_the_negative_guidance_target(tiny_model, one_thread, method):
    """After a few iterations the trained UNet's noise prediction for the class prompt is closer
    (cosine) to e0 - eta (e_c - e0) than before: a sign error in the target would move it away."""
    import torch.nn.functional as F

    from ray_dafusion.erasure import erase_prompt

    pipe = _pipe(tiny_model)
    tok = pipe.tokenizer

    def encode(prompt):
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    emb_0, emb_c = encode(""), encode(erase_prompt("cat"))
    g = torch.Generator().manual_seed(1)
    probes = [(torch.randn(4, 4, 8, 8, generator=g), torch.tensor(t)) for t in (900, 600, 300, 100)]
    eta = 4.0

    def predictions(unet, emb):
        with torch.no_grad():
            return torch.cat([unet(x, t, emb.expand(len(x), -1, -1)).sample.flatten(1) for x, t in probes])

    target = predictions(pipe.unet, emb_0) - eta * (predictions(pipe.unet, emb_c) - predictions(pipe.unet, emb_0))
    before = F.cosine_similarity(predictions(pipe.unet, emb_c), target).mean()
    # measured on this model: xattn 0.86 -> 0.96 (with the sign flipped: 0.75); full 0.86 -> 0.95 (flipped: 0.75)
    iterations, rate = (15, 1e-3) if method == "xattn" else (40, 5e-5)
    erase_concept(pipe, "cat", _cfg(method=method, iterations=iterations, learning_rate=rate, negative_guidance=eta),
                  seed=0)
    after = F.cosine_similarity(predictions(pipe.unet, emb_c), target).mean()
    assert after > before + 0.05, (float(before), float(after))


def test_erase_xattn_stage_applies_per_class_and_restores(ray_session, make_real, tiny_model, tmp_path):
    real = make_real(class_names=("cat", "dog"))
    out = str(tmp_path / "erasure")
    cfg = EraseConfig(real=real, model="tiny", output=out, method="xattn", iterations=4, resolution=64,
                      num_inference_steps=5, learning_rate=1e-3, num_cpus=0.5)

    # 1. one task per class name; per-class deltas, records and the manifest
    result = erase(cfg)
    assert sorted(result.trained) == ["cat", "dog"] and result.num_classes == 2 and result.method == "xattn"
    manifest = storage.read_manifest(out)
    assert manifest["method"] == "xattn" and sorted(manifest["classes"]) == ["cat", "dog"]
    for name, record in manifest["classes"].items():
        assert len(record["losses"]) == 4 and record["seconds"] > 0
        assert record["prompt"] == name  # ESD erases the bare concept
        assert storage.exists(storage.join(out, record["file"]))

    # 2. apply: original + delta on exactly the key/value weights; None restores bit for bit
    pipe = _pipe(tiny_model)
    unet = pipe.unet
    original = _state(unet)
    erasure = ErasureWeights(out)
    assert erasure.classes() == ["cat", "dog"]
    assert erasure.fingerprint("cat") == manifest["classes"]["cat"]["fingerprint"] != erasure.fingerprint("dog")
    deltas = {n: load_file(os.path.join(out, manifest["classes"][n]["file"])) for n in ("cat", "dog")}
    for name in ("cat", "dog", "cat"):
        erasure.apply(unet, name)
        state = _state(unet)
        for key, value in original.items():
            if key in deltas[name]:
                assert torch.allclose(state[key], value + deltas[name][key], atol=1e-7)
                assert not torch.equal(state[key], value)
            else:
                assert torch.equal(state[key], value), f"{key} changed"
    erasure.apply(unet, None)
    assert all(torch.equal(v, original[k]) for k, v in _state(unet).items())

    # 3. a class without an erasure is a clear error, and leaves the UNet alone
    erasure.apply(unet, "dog")
    with pytest.raises(ValueError, match=r"no erasure for class 'bird'.*cat, dog"):
        erasure.apply(unet, "bird")
    with pytest.raises(ValueError, match="'bird'"):
        erasure.fingerprint("bird")
    erasure.apply(unet, None)
    assert all(torch.equal(v, original[k]) for k, v in _state(unet).items())

    # 4. the erased UNet changes what the class prompt generates (and only while applied)
    def generate():
        return pipe(prompt="a photo of a cat", image=np.full((64, 64, 3), 0.5, np.float32), strength=0.75,
                    num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    plain = generate()
    erasure.apply(unet, "cat")
    erased = generate()
    erasure.apply(unet, None)
    assert np.abs(erased - plain).max() > 1e-4
    assert np.array_equal(generate(), plain)

    # 5. re-runs skip finished classes and leave the manifest as it was; another config is refused
    manifest_before = storage.read_bytes(storage.join(cfg.output, storage.MANIFEST))
    assert erase(cfg).skipped == ["cat", "dog"]
    assert storage.read_bytes(storage.join(cfg.output, storage.MANIFEST)) == manifest_before
    with pytest.raises(storage.StorageError, match="different config"):
        erase(cfg.replace(iterations=5))


def test_job_script_full_erasure(ray_session, make_real, tiny_model, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("erase_job", os.path.join(ROOT, "jobs", "erase.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    real = make_real(class_names=("cat", "dog"))
    out = str(tmp_path / "erasure-full")
    assert job.main(["--config", os.path.join(ROOT, "jobs", "configs", "erase.yaml"), "--real", real,
                     "--output", out, "--method", "full", "--iterations", "2", "--resolution", "64",
                     "--num_inference_steps", "5", "--classes", "dog", "--learning_rate", "1e-3"]) == 0
    assert out in capsys.readouterr().out
    erasure = ErasureWeights(out)
    assert erasure.method == "full" and erasure.classes() == ["dog"]
    unet = _pipe(tiny_model).unet
    original = _state(unet)
    erasure.apply(unet, "dog")
    saved = load_file(os.path.join(out, storage.read_manifest(out)["classes"]["dog"]["file"]))
    assert all(torch.equal(v, saved[k]) for k, v in _state(unet).items())
    assert any(not torch.equal(saved[k], original[k]) for k in original)
    erasure.apply(unet, None)
    assert all(torch.equal(v, original[k]) for k, v in _state(unet).items())
    with pytest.raises(ValueError, match="no erasure for class 'cat'.*dog"):
        erasure.apply(unet, "cat")


def test_erasure_weights_refuse_missing_or_changed_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `ray-dafusion erase`"):
        ErasureWeights(str(tmp_path / "nothing"))
    storage.write_manifest(str(tmp_path / "tokens"), {"stage": "invert"})
    with pytest.raises(ValueError, match="not an erase output"):
        ErasureWeights(str(tmp_path / "tokens"))
    out = str(tmp_path / "erasure")
    storage.write_bytes(storage.join(out, "classes", "cat.safetensors"), b"tampered")
    storage.write_manifest(out, {"stage": "erase", "method": "xattn", "classes": {
        "cat": {"name": "cat", "file": "classes/cat.safetensors", "fingerprint": "0" * 16}}})
    with pytest.raises(ValueError, match="changed since"):
        ErasureWeights(out).apply(torch.nn.Linear(2, 2), "cat")


def test_an_erasure_that_does_not_fit_leaves_the_unet_untouched(tmp_path):
    # the misfit is the last tensor: checking shapes while copying left the first one edited
    from safetensors.torch import save

    from ray_dafusion.models import file_fingerprint

    unet = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    out = str(tmp_path / "erasure")
    deltas = {"dog": {"0.weight": torch.ones(4, 4), "1.weight": torch.ones(4, 4)},
              "cat": {"0.weight": torch.ones(4, 4), "1.weight": torch.ones(3, 3)}}  # (3, 3): another model's
    classes = {}
    for name, tensors in deltas.items():
        data = save(tensors)
        storage.write_bytes(storage.join(out, "classes", f"{name}.safetensors"), data)
        classes[name] = {"name": name, "file": f"classes/{name}.safetensors", "fingerprint": file_fingerprint(data)}
    storage.write_manifest(out, {"stage": "erase", "method": "xattn", "classes": classes})
    erasure = ErasureWeights(out)
    with pytest.raises(ValueError, match=r"1.weight has shape \(3, 3\)"):
        erasure.apply(unet, "cat")
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in original.items())
    erasure.apply(unet, "dog")
    with pytest.raises(ValueError, match="made for another model"):
        erasure.apply(unet, "cat")
    assert torch.equal(unet[0].weight, original["0.weight"] + 1)  # still dog's, as the erasure believes
    erasure.apply(unet, None)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in original.items())


def test_class_names_that_differ_only_in_case_are_refused():
    # Cat.safetensors and cat.safetensors are one file on macOS and Windows filesystems
    from ray_dafusion.erasure import class_file_name
    from ray_dafusion.perclass import select_classes
    from ray_dafusion.schema import ClassInfo

    table = [ClassInfo("Leafy Spurge", 0, "<Leafy_Spurge>"), ClassInfo("leafy spurge", 1, "<leafy_spurge>")]
    with pytest.raises(ValueError, match=r"'Leafy Spurge' and 'leafy spurge' \(Leafy_Spurge.safetensors"):
        select_classes(table, None, lambda c: class_file_name(c.name))


def test_a_model_that_does_not_load_fails_once_before_any_task(make_real, tmp_path, monkeypatch):
    from ray_dafusion import perclass
    from ray_dafusion.errors import ConfigError

    def no_tasks(*args, **kwargs):
        raise AssertionError("class tasks started")

    monkeypatch.setattr(perclass, "run_class_tasks", no_tasks)
    cfg = EraseConfig(real=make_real(class_names=("cat", "dog")), output=str(tmp_path / "erased"),
                      model=str(tmp_path / "no-model"))
    with pytest.raises(ConfigError, match="config field 'model': cannot load .*no-model"):
        erase(cfg)


def test_erase_yaml_parses():
    cfg = EraseConfig.from_yaml(os.path.join(ROOT, "jobs", "configs", "erase.yaml"))
    assert (cfg.iterations, cfg.learning_rate, cfg.negative_guidance, cfg.start_guidance) == (1000, 1e-5, 1.0, 3.0)
    assert cfg.method == "full"  # as the reference runs ESD


def test_tokens_and_erasure_round_trip_through_the_augmenter(ray_session, make_real, tiny_model, tmp_path):
    from ray_dafusion import schema, weights
    from ray_dafusion.augment import DiffusionAugmenter
    from ray_dafusion.config import AugmentConfig, InvertConfig
    from ray_dafusion.inversion import invert
    from ray_dafusion.tokens import find_leak

    real = make_real(class_names=("cat", "dog"))
    tokens_out, erase_out = str(tmp_path / "tokens"), str(tmp_path / "erasure")
    invert(InvertConfig(real=real, output=tokens_out, steps=2, batch_size=2, resolution=64, num_cpus=0.5))
    erase(EraseConfig(real=real, output=erase_out, iterations=2, resolution=64, num_inference_steps=5,
                      learning_rate=1e-3, num_cpus=0.5))
    cfg = AugmentConfig(real=real, embeddings=tokens_out, erasure=erase_out, output=str(tmp_path / "synthetic"),
                        num_augmentations=1, strengths=[0.5], num_inference_steps=4, resolution=64)
    augmenter = DiffusionAugmenter(cfg, schema.read_class_table(real))

    tensors, fingerprint = weights.load_embeddings(tokens_out)
    rows = augmenter.pipe.text_encoder.get_input_embeddings().weight
    for token, tensor in tensors.items():
        assert torch.equal(rows[augmenter.pipe.tokenizer.convert_tokens_to_ids(token)], tensor)
    summary = augmenter(storage.read_parquet(storage.join(real, "train"))).to_pylist()[0]
    assert summary["rows"] == 4 and summary["errors"] == 0
    synthetic = storage.read_parquet(storage.join(cfg.output, "data")).to_pylist()
    erasure = ErasureWeights(erase_out)
    for row in synthetic:
        assert row["token"] in row["prompt"]
        assert find_leak(row["prompt"], ["cat", "dog"], list(tensors)) is None
        assert row["embeddings_fingerprint"] == fingerprint
        assert row["erasure_fingerprint"] == erasure.fingerprint(row["class_name"])


def test_erasure_weights_keep_a_bounded_number_of_classes_in_memory(tmp_path):
    """A `full` class is a whole UNet: the cache holds what fits in max_cache_bytes (at least the class in use)."""
    from safetensors.torch import save

    from ray_dafusion.models import file_fingerprint

    unet = torch.nn.Sequential(torch.nn.Linear(64, 64))
    out = str(tmp_path / "erasure")
    classes = {}
    for i, name in enumerate(("cat", "dog", "fox")):
        data = save({k: torch.full_like(v, float(i)) for k, v in unet.state_dict().items()})
        storage.write_bytes(storage.join(out, "classes", f"{name}.safetensors"), data)
        classes[name] = {"name": name, "file": f"classes/{name}.safetensors", "fingerprint": file_fingerprint(data)}
    storage.write_manifest(out, {"stage": "erase", "method": "full", "classes": classes})
    one_class = sum(v.numel() * v.element_size() for v in unet.state_dict().values())
    weights = ErasureWeights(out, max_cache_bytes=int(1.5 * one_class))
    for i, name in enumerate(("cat", "dog", "fox", "cat")):
        weights.apply(unet, name)
        assert torch.equal(unet[0].weight, torch.full_like(unet[0].weight, float(i % 3)))
        assert len(weights._cache) == 1 and weights.cached_bytes() <= 1.5 * one_class
    weights.apply(unet, None)
    roomy = ErasureWeights(out)  # the default budget (2 GiB) keeps all three small classes
    for name in ("cat", "dog", "fox"):
        roomy.apply(unet, name)
    assert len(roomy._cache) == 3
