"""Pretrain: a small text-conditional pipeline from unlabelled images, loadable like any checkpoint;
the shipped `digits` model is what its recorded command makes from the recorded data."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ray_dafusion import storage
from ray_dafusion.models import SHIPPED_MODELS, load_pipeline, model_fingerprint
from ray_dafusion.pretrain import caption_words, cluster_captions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_caption_words_are_made_up_and_clusters_cover_mirrors():
    words = caption_words(40)
    assert len(set(words)) == 40 and all(w.isalpha() and w.startswith("q") for w in words)
    from ray_dafusion.sample_data import DIGIT_NAMES

    assert not set(words) & set(DIGIT_NAMES)
    rng = np.random.default_rng(0)
    left = np.zeros((8, 8)); left[:, :3] = 1.0  # a bar on the left; its mirror has it on the right
    feats = np.stack([left + 0.05 * rng.random((8, 8)) for _ in range(10)])
    clusters = cluster_captions(feats, 2, seed=0)
    assert clusters.shape == (10, 2) and len(set(clusters[:, 0])) == 1 and set(clusters[:, 0]) != set(clusters[:, 1])


def test_captions_do_not_depend_on_the_order_ray_data_returns_the_images():
    """k-means numbers its clusters by row order; the same images in another order get the same captions."""
    from ray_dafusion.pretrain import _caption_clusters

    rng = np.random.default_rng(0)
    good = [{"uri": f"s3://b/img{i:02d}.png", "thumb": rng.random((8, 8), dtype=np.float32).tobytes()}
            for i in range(40)]
    words, cluster_of = _caption_clusters(good, 4, seed=0, mirror=True)
    for order in range(3):
        shuffled = [good[i] for i in np.random.default_rng(order).permutation(len(good))]
        assert _caption_clusters(shuffled, 4, seed=0, mirror=True) == (words, cluster_of)


def test_a_workers_images_are_in_uri_order_whatever_order_its_batches_arrive_in():
    """Batches are drawn by index: the shard's row order must not be the order Ray Data's tasks finished."""
    from ray_dafusion.pretrain import _load_shard

    rng = np.random.default_rng(0)
    rows = [(f"img{i}.png", rng.integers(0, 256, (2, 2, 3), dtype=np.uint8).tobytes(), [i, i + 10]) for i in range(6)]

    class Shard:
        def __init__(self, batches):
            self.batches = batches

        def iter_batches(self, batch_size, batch_format):
            for batch in self.batches:
                yield {"uri": np.array([r[0] for r in batch]), "pixels": np.array([r[1] for r in batch], dtype=object),
                       "cluster": np.array([r[2] for r in batch])}

    x, clusters = _load_shard(Shard([rows[3:], rows[:3]]))
    assert clusters[:, 0].tolist() == list(range(6)) and x.shape == (6, 3, 2, 2)
    same_x, same_clusters = _load_shard(Shard([rows[:3], rows[3:]]))
    assert torch.equal(x, same_x) and torch.equal(clusters, same_clusters)


def test_init_keeps_its_vae_so_vae_steps_must_be_zero():
    """The docs promise an init's VAE is kept frozen (and its latent scale is kept): training it is refused."""
    from ray_dafusion.config import ConfigError, PretrainConfig

    with pytest.raises(ConfigError, match=r"'vae_steps': must be 0 \(or unset\) with init 'digits', whose VAE is "
                                          r"kept frozen.*1500"):
        PretrainConfig(source="s", output="o", init="digits", vae_steps=1500)
    # unset, it is what the run needs: none with init, 1500 from scratch
    assert PretrainConfig(source="s", output="o", init="digits").vae_step_count() == 0
    assert PretrainConfig(source="s", output="o", init="digits", vae_steps=0).vae_step_count() == 0
    assert PretrainConfig(source="s", output="o").vae_step_count() == 1500
    with pytest.raises(ConfigError, match="'vae_steps': must be > 0 when training from scratch"):
        PretrainConfig(source="s", output="o", vae_steps=0)


def test_fewer_readable_images_than_workers_is_refused_on_the_driver():
    """Every worker needs an image: with fewer, each one crashed after the whole decode."""
    from ray_dafusion.config import ConfigError, PretrainConfig
    from ray_dafusion.pretrain import _check_images

    cfg = PretrainConfig(source="/data/few", output="o", num_workers=4)
    with pytest.raises(ConfigError, match=r"'num_workers': 4 workers for 3 readable images under /data/few.*at most 3"):
        _check_images(cfg, [{"uri": f"{i}.png"} for i in range(3)])
    _check_images(cfg, [{"uri": f"{i}.png"} for i in range(4)])


def test_every_worker_gets_images_and_none_is_dropped(ray_session):
    """Ray Train's default split (equal=True) dropped up to num_workers - 1 images; a split of whole
    blocks gives every readable image to exactly one worker, and each worker at least one."""
    import threading

    import ray.data

    from ray_dafusion.pretrain import _training_images
    from ray_dafusion.train import exact_split_config

    rows = [{"uri": f"{i}.png", "pixels": bytes(12), "error": None} for i in range(5)]
    rows.append({"uri": "bad.png", "pixels": None, "error": "not an image"})
    decoded = ray.data.from_items(rows, override_num_blocks=1)
    cluster_of = {r["uri"]: [0, 0] for r in rows[:5]}
    splits = exact_split_config().configure({"images": _training_images(decoded, cluster_of, 3)}, world_size=3,
                                            worker_handles=None, worker_node_ids=None)
    got: list[list[str]] = [[] for _ in splits]

    def consume(i: int) -> None:  # split iterators are read together, as the workers do
        for batch in splits[i]["images"].iter_batches(batch_format="numpy"):
            got[i] += [str(u) for u in batch["uri"]]

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(splits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(got) and sorted(sum(got, [])) == sorted(cluster_of)


def _job():
    spec = importlib.util.spec_from_file_location("pretrain_job", os.path.join(ROOT, "jobs", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_recorded_command_trains_and_loads(ray_session, tmp_path, capsys):
    """The shipped model's command, shortened: it trains, writes a manifest and loads as a pipeline."""
    from ray_dafusion.sample_data import write_digits

    source = str(tmp_path / "unlabelled")
    write_digits(source, per_class=4, half="pretrain", labelled=False)
    assert not any(os.path.isdir(os.path.join(source, d)) for d in os.listdir(source))  # no class folders
    with open(os.path.join(source, "broken.png"), "wb") as f:  # left out, with its reason on record
        f.write(b"not a png")
    Image.new("RGB", (16, 16), "gray").save(os.path.join(source, "_named_so.png"))  # an image like any other
    out = str(tmp_path / "model")
    config = os.path.join(ROOT, "jobs", "configs", "pretrain_digits.yaml")
    assert _job().main(["--config", config, "--source", source, "--output", out, "--vae_steps", "3",
                        "--steps", "4", "--checkpoint_every", "2", "--num_clusters", "6", "--batch_size", "8",
                        "--cpus_per_worker", "0.5"]) == 0
    assert f"pretrain: pipeline {out} from 41 images" in capsys.readouterr().out
    manifest = storage.read_manifest(out)
    assert manifest["counts"] == {"images": 41, "left_out": 1, "vae_steps": 3, "steps": 4}
    assert [e["item"] for e in manifest["left_out"]] == [storage.join(source, "broken.png")] and manifest["left_out"][0]["reason"]
    assert len(manifest["words"]) == 6 and manifest["data_fingerprint"] and manifest["losses"]["unet"]
    pipe = load_pipeline(out, device="cpu", torch_dtype=torch.float32)
    assert all(w in pipe.tokenizer.get_vocab() or w + "</w>" in pipe.tokenizer.get_vocab() for w in manifest["words"])
    image = pipe(prompt=[f"a photo of a {manifest['words'][0]}"], image=[Image.new("RGB", (32, 32), "white")],
                 strength=1.0, num_inference_steps=4, generator=[torch.Generator().manual_seed(0)]).images[0]
    assert image.size == (32, 32)
    # the training state is not part of the model: its fingerprint covers the pipeline's files only
    before = model_fingerprint(out)
    storage.write_bytes(storage.join(out, "_checkpoints", "extra.bin"), b"x")
    assert model_fingerprint(out) == before
    # a complete output is left as it is
    again = _job().main(["--config", config, "--source", source, "--output", out, "--vae_steps", "3", "--steps", "4",
                         "--checkpoint_every", "2", "--num_clusters", "6", "--batch_size", "8",
                         "--cpus_per_worker", "0.5"])
    assert again == 0 and "nothing to do" in capsys.readouterr().err


def test_the_shipped_digits_model_records_its_command_and_data():
    """The weights in the package were made by jobs/configs/pretrain_digits.yaml from the pretraining
    half of the digits: same config, same data fingerprint; they load and fit in 10 MB."""
    import yaml

    from ray_dafusion.config import PretrainConfig
    from ray_dafusion.configlib import identity
    from ray_dafusion.ingest import load_image_file
    from ray_dafusion.sample_data import digit_halves

    path = SHIPPED_MODELS["digits"]
    manifest = storage.read_manifest(path)
    recorded = PretrainConfig.from_dict({**yaml.safe_load(open(os.path.join(ROOT, "jobs", "configs",
                                                                          "pretrain_digits.yaml")))})
    assert identity(PretrainConfig.from_dict(manifest["config"])) == identity(recorded)
    assert "ray-dafusion pretrain --config jobs/configs/pretrain_digits.yaml" in " ".join(manifest["commands"])
    # the data fingerprint is the pretraining half as write_digits writes it (pixels hashed, sorted)
    import io

    from sklearn.datasets import load_digits

    digits = load_digits()
    hashes = []
    for index in digit_halves()["pretrain"]:
        gray = (255 - digits.images[index] / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(gray).resize((32, 32), Image.BICUBIC).save(buf, format="PNG")
        hashes.append(load_image_file(buf.getvalue())[3])
    assert manifest["data_fingerprint"] == storage.fingerprint(sorted(hashes))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    assert size < 10 * 2**20
    pipe = load_pipeline("digits", device="cpu", torch_dtype=torch.float32)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 64
