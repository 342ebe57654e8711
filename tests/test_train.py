"""Training through Ray Train on tiny data: exact mixing per pass as seen by the workers, the
reference's step budget, DDP on two workers with fractional CPUs, a worker killed mid-run, resume,
bit-identical reruns, S3 storage and weights."""

from __future__ import annotations

import glob
import io
import json
import os
import re
import signal
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from ray_dafusion import schema, storage
from ray_dafusion.config import ConfigError, EvaluateConfig, TrainConfig
from ray_dafusion.evaluate import evaluate
from ray_dafusion.classifier import build_model, make_transform
from ray_dafusion.train import _synthetic_candidates, exact_batches, train

CLASSES = ("cat", "dog", "fox")


def write_synthetic(real: str, out: str, m: int = 3, skip_sources=(), complete: bool = True, endpoint_url=None,
                    mode: str = "da_fusion") -> str:
    """M synthetic rows per real train row (none for `skip_sources`), in the augment layout."""
    src = storage.read_parquet(storage.join(real, "train"), endpoint_url, columns=["id", "label", "class_name"])
    rows = []
    for r in src.to_pylist():
        if r["id"] in skip_sources:
            continue
        for a in range(m):
            img = Image.fromarray(np.full((32, 32, 3), 20 * a + 40 * r["label"], "uint8"))
            rows.append({
                "id": f"{r['id']}-{a}", "source_id": r["id"], "aug_index": a, "label": r["label"],
                "class_name": r["class_name"], "token": f"<{r['class_name']}>", "strength": 0.5, "seed": a,
                "prompt": "a photo of a x", "guidance_scale": 7.5, "num_inference_steps": 2,
                "model_fingerprint": "t", "embeddings_fingerprint": "t", "erasure_fingerprint": "",
                "image": schema.image_cell(schema.encode_image(img), f"{r['id']}-{a}.png"),
            })
    table = pa.Table.from_pylist(rows, schema=schema.synthetic_schema(list(CLASSES)))
    half = len(rows) // 2  # two files in nested folders: the reader must find both
    storage.write_parquet(table.slice(0, half), storage.join(out, "data", "a", "part-0.parquet"), endpoint_url)
    storage.write_parquet(table.slice(half), storage.join(out, "data", "b", "part-1.parquet"), endpoint_url)
    # augment quarantines bad rows under errors/ with another schema: not synthetic images; the
    # skipped sources are quarantined there, as augment would
    errors = [{"stage": "augment", "item": sid, "class_name": "cat", "reason": "r"} for sid in ("x", *skip_sources)]
    storage.write_parquet(schema.error_table(errors), storage.join(out, "errors", "part-0.parquet"), endpoint_url)
    if complete:
        storage.write_manifest(out, {"stage": "augment", "mode": mode, "counts": {"synthetic": len(rows)}},
                               endpoint_url)
    return out


def _epoch_rows(debug_dir: str) -> dict[int, dict[int, tuple[int, list]]]:
    """epoch -> rank -> (pid, rows [id, aug_index, label, pass]) of the last worker that trained that epoch.

    A restarted worker group (a killed worker, or a spontaneous failure on a loaded machine)
    trains an epoch again; its files are newer than those of the attempt that died.
    """
    out: dict[int, dict[int, tuple[int, list]]] = {}
    paths = sorted(glob.glob(os.path.join(debug_dir, "epoch*-rank*-*.json")), key=os.path.getmtime)
    for path in paths:
        epoch, rank, pid = map(int, re.match(r"epoch(\d+)-rank(\d+)-(\d+)\.json", os.path.basename(path)).groups())
        out.setdefault(epoch, {})[rank] = (pid, json.load(open(path)))
    return out


def _pids(debug_dir: str) -> set[int]:
    """Every worker process that ran the training loop."""
    return {int(re.search(r"-(\d+)\.json$", p).group(1)) for p in glob.glob(os.path.join(debug_dir, "pid-rank*-*.json"))}


def _check_exact(rows, real_ids: dict, skip=(), passes: int = 1):
    """In every pass each real id once (itself or one of its own synthetic images), same label."""
    by_pass: dict[int, Counter] = {}
    for rid, aug, label, p in rows:
        source = rid if aug == -1 else rid.rsplit("-", 1)[0]
        if aug != -1:
            assert rid == f"{source}-{aug}" and source not in skip  # only its own synthetic images
        assert label == real_ids[source]
        by_pass.setdefault(p, Counter())[source] += 1
    assert sorted(by_pass) == list(range(passes))
    for p, sources in by_pass.items():
        assert sources == Counter(list(real_ids)), f"every real train id exactly once in pass {p}"


def _real_ids(real):
    t = storage.read_parquet(storage.join(real, "train"), columns=["id", "label"]).to_pydict()
    return dict(zip(t["id"], t["label"]))


def test_mixed_stream_exact_per_epoch_then_resume(ray_session, make_real, tmp_path):
    real = make_real(class_names=CLASSES, per_split={"train": 4, "val": 2, "test": 2}, size=32)
    skip = ("train-0-0", "train-2-3")
    synthetic = write_synthetic(real, str(tmp_path / "synthetic"), m=3, skip_sources=skip)
    debug = str(tmp_path / "debug")
    # 12 real images, batch 4, 6 steps per epoch: 2 whole passes per epoch
    cfg = TrainConfig(real=real, synthetic=synthetic, output=str(tmp_path / "runs"), name="mix", method="da_fusion",
                      alpha=0.5, arch="resnet18", backbone="finetune", image_size=32, epochs=2, batch_size=4,
                      iterations_per_epoch=6, num_workers=1, cpus_per_worker=0.5, debug_dir=debug)
    handler = signal.getsignal(signal.SIGINT)
    result = train(cfg)
    # Ray Train's fit() leaves its own SIGINT handler behind; train gives the process its own back,
    # so that Ctrl-C and stall_timeout still interrupt the stages that follow in this process
    assert signal.getsignal(signal.SIGINT) is handler
    assert result.epochs_completed == 2 and [m["epoch"] for m in result.metrics] == [0, 1]
    assert result.optimizer_steps == 12 and [m["steps"] for m in result.metrics] == [6, 6]
    ids = _real_ids(real)
    seen = _epoch_rows(debug)
    assert sorted(seen) == [0, 1]
    n_synth = 0
    choices = []
    for epoch, by_rank in seen.items():
        rows = by_rank[0][1]
        _check_exact(rows, ids, skip, passes=2)
        n_synth += sum(aug != -1 for _, aug, _, _ in rows)
        choices += [sorted((rid, aug) for rid, aug, _, p in rows if p == q) for q in (0, 1)]
    assert 0 < n_synth < 4 * len(ids)  # alpha 0.5 mixes both kinds
    assert len({tuple(c) for c in choices}) == 4  # the mixing choice is drawn afresh in every pass
    for m in result.metrics:
        assert m["train_samples"] == 2 * len(ids) and 0.0 <= m["val_mean_class_acc"] <= 1.0
    written = json.load(open(os.path.join(result.output, "train_result.json")))
    assert written["method"] == "da_fusion" and written["alpha"] == 0.5 and len(written["metrics"]) == 2
    assert written["best_checkpoint"] and os.path.exists(os.path.join(written["best_checkpoint"], "model.pt"))
    assert [c["name"] for c in written["classes"]] == list(CLASSES)

    # evaluate rebuilds the best checkpoint and the eval transform exactly: same val accuracy
    scored = evaluate(EvaluateConfig(real=real, runs=[result.output], output=str(tmp_path / "eval"), split="val"))
    assert scored.runs[0]["mean_class_acc"] == pytest.approx(result.best_val_mean_class_acc)

    # Re-submitting the same name and storage continues after the last checkpoint.
    first_pids = _pids(debug)
    resumed = train(cfg.replace(epochs=3))
    assert [m["epoch"] for m in resumed.metrics] == [0, 1, 2]
    assert resumed.metrics[:2] == result.metrics
    new_pids = _pids(debug) - first_pids
    trained_again = {e for e, by_rank in _epoch_rows(debug).items() if by_rank[0][0] in new_pids}
    assert new_pids and trained_again == {2}, "epochs 0 and 1 were not trained again"
    _check_exact(_epoch_rows(debug)[2][0][1], ids, skip, passes=2)


def test_the_same_config_gives_the_same_checkpoint_bytes(ray_session, make_real, tmp_path):
    """Seeds mean results: mixing, order and every random transform are drawn from the seed."""
    real = make_real(class_names=CLASSES, per_split={"train": 3, "val": 1, "test": 1}, size=32)
    synthetic = write_synthetic(real, str(tmp_path / "synthetic"), m=2)
    base = dict(real=real, synthetic=synthetic, method="da_fusion", alpha=0.5, arch="resnet18", backbone="finetune",
                image_size=32, epochs=1, batch_size=3, iterations_per_epoch=6, rotation=15.0, num_workers=1)
    runs = [train(TrainConfig(**base, output=str(tmp_path / d))) for d in ("a", "b")]
    runs.append(train(TrainConfig(**{**base, "seed": 1}, output=str(tmp_path / "c"))))
    runs.append(train(TrainConfig(**{**base, "decode_threads": 3}, output=str(tmp_path / "d"))))
    runs.append(train(TrainConfig(**{**base, "decode_processes": 2}, output=str(tmp_path / "g"))))
    weights = [storage.read_bytes(storage.join(r.best_checkpoint, "model.pt")) for r in runs]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    assert weights[0] == weights[3], "decoding threads changed what was trained on"
    assert weights[0] == weights[4], "decoding in Ray tasks changed what was trained on"
    # the tasks' time is in the epoch's metrics (and billed); the threads' is the worker's own
    assert runs[4].metrics[0]["decode_task_seconds"] > 0 and "decode_task_seconds" not in runs[0].metrics[0]
    # streamed from storage on every pass (cache_mb 0; its order follows the blocks' arrival, so
    # not compared by bytes), decoded in Ray tasks, the step finishing the transform: exact per pass
    debug = str(tmp_path / "debug")
    train(TrainConfig(**{**base, "cache_mb": 0, "augment_in_step": True, "decode_processes": 2, "debug_dir": debug},
                      output=str(tmp_path / "s")))
    _check_exact(_epoch_rows(debug)[0][0][1], _real_ids(real), passes=2)
    # decode_threads 0 (the default): one thread per whole CPU the worker reserves
    from ray_dafusion import train as train_module

    train_module._POOLS.pop(2, None)
    train(TrainConfig(**{**base, "num_workers": 0, "cpus_per_worker": 2.5}, output=str(tmp_path / "e")))
    assert 2 in train_module._POOLS  # num_workers 0 trains in this process, so its pool is visible here
    # the training step finishing each batch's transform (the default on a GPU) trains the same bytes
    in_step = train(TrainConfig(**{**base, "augment_in_step": True}, output=str(tmp_path / "f")))
    assert storage.read_bytes(storage.join(in_step.best_checkpoint, "model.pt")) == weights[0]


def _random_pngs(n: int, seed: int) -> list[bytes]:
    """n PNGs of 30 x 40 random pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_rows_transform_the_same_on_any_number_of_threads():
    from ray_dafusion.train import _transform_rows

    data = _random_pngs(9, seed=0)
    tf = make_transform(24, True, rotation=30, hflip=True, randaugment=True, fill=255)
    args = (tf, 24, np.array(data, dtype=object), np.zeros(9), np.full(9, -1), np.arange(9).astype(str))
    one = _transform_rows(*args, list(range(9)), 0, threads=1)
    many = _transform_rows(*args, list(range(9)), 0, threads=4)
    assert torch.equal(one[0], many[0]) and one[0].shape == (9, 3, 24, 24)
    other = _transform_rows(*args, list(range(1, 10)), 0, threads=4)
    assert not torch.equal(one[0], other[0])  # the seeds decide the draws
    with pytest.raises(TypeError, match="seeded rows need a TrainTransform"):
        _transform_rows(make_transform(24, False), *args[1:], list(range(9)), 0)


def test_the_training_step_can_finish_the_transform():
    # in_step: the decoding threads hand over uint8 images and each row's flip and angle, the step
    # finishes them on its device; on the CPU the very same tensors, through the collate and re-cutting
    from ray_dafusion.train import _transform_rows, batch_images, exact_batches, item_seed

    data = np.array(_random_pngs(11, seed=2), dtype=object)
    ids = np.array([f"r{i}" for i in range(11)], dtype=object)
    seeds = [item_seed(5, 0, 0, i) for i in ids]
    cpu = torch.device("cpu")
    tf = make_transform(24, True, rotation=30, hflip=True, fill=255)
    ra = make_transform(24, True, rotation=30, hflip=True, randaugment=True, fill=255)
    for transform in (tf, ra):
        for threads in (1, 3):
            made = [_transform_rows(transform, 24, data, np.arange(11) % 3, np.full(11, -1), ids, seeds, 0, threads, s)
                    for s in (False, True)]
            assert len(made[0]) == 5 and len(made[1]) == (7 if transform is tf else 5)
            for (x, *_), (raw, _, _, _, _, *drawn) in zip(exact_batches([made[0]], 4), exact_batches([made[1]], 4)):
                if transform is tf:
                    assert raw.dtype == torch.uint8 and len(drawn) == 2
                finished = batch_images(transform, raw, drawn, cpu)
                assert torch.equal(finished, x)
                if drawn:
                    assert torch.equal(batch_images(transform, raw, drawn, cpu), x), "finishing changed its input"


def test_epochs_trained_before_a_call_come_from_the_latest_checkpoint(tmp_path):
    from ray_dafusion.classifier import CHECKPOINT_META
    from ray_dafusion.train import _epochs_trained

    run = str(tmp_path / "run")
    assert _epochs_trained(run, None) == 0  # a new run
    for epoch in range(3):
        storage.write_json(os.path.join(run, f"checkpoint_{epoch:06d}", CHECKPOINT_META),
                           {"epoch": epoch, "history": [{"epoch": e} for e in range(epoch + 1)]})
    os.makedirs(os.path.join(run, "checkpoint_000003"))  # being written when the call stopped
    os.makedirs(os.path.join(run, "other"))
    assert _epochs_trained(run, None) == 3
    # Ray Train's names sort by time; a truncated record is skipped like a missing one
    ray_run = str(tmp_path / "ray-run")
    for stamp, epochs in (("2026-11-28_01-49-32.636061", 1), ("2026-11-28_01-50-02.000001", 2)):
        storage.write_json(os.path.join(ray_run, f"checkpoint_{stamp}", CHECKPOINT_META),
                           {"history": [{"epoch": e} for e in range(epochs)]})
    storage.write_bytes(os.path.join(ray_run, "checkpoint_2026-11-28_01-51-00.000000", CHECKPOINT_META), b'{"hist')
    assert _epochs_trained(ray_run, None) == 2


def test_ray_tasks_decode_the_same_chunks_as_threads(ray_session, monkeypatch):
    # decode_processes: chunks decoded in Ray tasks come back in order, the same tensors and arrays
    # (uint8 images with each row's flip and angle when the step finishes them) as the threads make
    from ray_dafusion import train as train_module

    data = np.array(_random_pngs(10, seed=4), dtype=object)
    rows = {"id": np.array([f"r{i}" for i in range(10)], dtype=object), "image_bytes": data,
            "label": np.arange(10) % 3, "aug_index": np.array([-1, 0, 1, -1, 2, 0, -1, -1, 1, 0])}
    chunks = [(p, {c: v[s:s + 3] for c, v in rows.items()}) for p, s in ((0, 0), (0, 3), (1, 6), (1, 9))]
    tf = make_transform(24, True, rotation=30, hflip=True, fill=255)
    for in_step in (False, True):
        made = []
        for processes in (0, 2):
            cfg = TrainConfig(seed=7, image_size=24, prefetch_batches=1, decode_threads=2, decode_processes=processes)
            made.append(list(train_module._decoded_ahead(iter(chunks), cfg, tf, 3, in_step)))
        threads, tasks = made
        assert [len(c[1]) for c in tasks] == [3, 3, 3, 1] and len(tasks[0]) == (7 if in_step else 5)
        for a, b in zip(threads, tasks):
            for x, y in zip(a, b):
                assert type(x) is type(y)
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else np.array_equal(x, y)
        assert tasks[0][0].dtype == (torch.uint8 if in_step else torch.float32)
        assert list(tasks[2][4]) == [1, 1, 1] and list(tasks[1][3]) == ["r3", "r4", "r5"]
    # at most decode_processes tasks at once; a stream stopped early cancels those it had asked for
    # (the thread running ahead holds at most 2 decoded chunks and one in hand, then stops)
    import ray

    cancelled, submitted = [], []
    cfg = TrainConfig(seed=7, image_size=24, decode_processes=2)
    decoder_submit = train_module._TaskDecoder.submit

    def counted(self, *args):
        decoder_submit(self, *args)
        submitted.append(len(self.pending))
        assert threading.current_thread().name == "chunks ahead"  # planned and submitted ahead of the step

    monkeypatch.setattr(train_module._TaskDecoder, "submit", counted)
    monkeypatch.setattr(ray, "cancel", lambda ref, **kw: cancelled.append(ref))
    stream = train_module._decoded_ahead(iter(chunks * 3), cfg, tf, 3, True)
    next(stream)
    stream.close()
    # taken 1, then at most 2 ready and 1 in hand: the 2 in flight were asked for by at most 4 yields
    assert max(submitted) == 2 and len(cancelled) == 2 and len(submitted) <= 6


def test_chunks_run_ahead_in_a_thread_in_order_and_stop_with_the_consumer():
    # _run_ahead: the same items in the same order; an error in the producer reaches the consumer;
    # a consumer that stops early stops the producer, which closes its generator in its own thread
    from ray_dafusion.train import _run_ahead

    assert list(_run_ahead(iter(range(50)), 2)) == list(range(50))
    log = {"made": 0, "closed_in": None}

    def source(fail_at=None):
        try:
            for i in range(1000):
                if i == fail_at:
                    raise ValueError(f"bad chunk {i}")
                log["made"] += 1
                yield i
        finally:
            log["closed_in"] = threading.current_thread().name

    with pytest.raises(ValueError, match="bad chunk 5"):
        assert list(_run_ahead(source(fail_at=5), 2)) == []
    log["made"] = 0
    stream = _run_ahead(source(), 2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert log["closed_in"] == "chunks ahead" and log["made"] <= 3 + 2 + 1
    assert not [t for t in threading.enumerate() if t.name == "chunks ahead"]
    with pytest.raises(ValueError, match="at least 1"):
        next(_run_ahead(source(), 0))


def test_a_consumer_that_stops_never_waits_on_a_hung_read(monkeypatch):
    # an error in the step (or the stall watchdog's interrupt) leaves a thread stuck in a read behind
    # after _STOP_WAIT, cancelling what it had asked for; the thread closes its source once it wakes
    from ray_dafusion import train as train_module

    monkeypatch.setattr(train_module, "_STOP_WAIT", 0.2)
    release, abandoned, closed_in = threading.Event(), [], []

    def hung():
        try:
            yield 0
            release.wait(30)  # a read that does not return
            yield 1
        finally:
            closed_in.append(threading.current_thread().name)

    stream = train_module._run_ahead(hung(), 2, abandon=lambda: abandoned.append(True))
    assert next(stream) == 0
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="step failed"):
        try:
            raise RuntimeError("step failed")
        finally:
            stream.close()
    assert time.perf_counter() - start < 5 and abandoned == [True] and closed_in == []
    release.set()
    for _ in range(100):
        if closed_in:
            break
        time.sleep(0.05)
    assert closed_in == ["chunks ahead"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_finishes_a_batch_as_the_cpu_does():
    # the default on a GPU (augment_in_step): the same images, but for a rare rotation rounding tie
    from ray_dafusion.train import batch_images

    rng = np.random.default_rng(3)
    tf = make_transform(224, True, rotation=15, hflip=True, fill=0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 160, 160), dtype=np.uint8)) for _ in range(32)]
    x, flips, angles = tf.draw(images, [torch.Generator().manual_seed(s) for s in range(32)])
    on_cpu = batch_images(tf, x, [flips, angles], torch.device("cpu"))
    on_gpu = batch_images(tf, x, [flips, angles], torch.device("cuda")).cpu()
    assert on_gpu.shape == on_cpu.shape and (on_gpu != on_cpu).float().mean() < 1e-3


def test_seeded_randaugment_is_torchvisions():
    # RandAugment with its draws from a generator == torchvision's under the same global seed, exactly,
    # over enough seeds to reach every op and both signs; the global generator is left alone
    from torchvision.transforms import v2

    from ray_dafusion.classifier import seeded_randaugment

    rng = np.random.default_rng(1)
    ra = v2.RandAugment(fill=255)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 24, 20), dtype=np.uint8)) for _ in range(4)]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    ours = [seeded_randaugment(ra, images[s % 4], torch.Generator().manual_seed(s)) for s in range(60)]
    assert torch.equal(torch.random.get_rng_state(), before)
    for s, out in enumerate(ours):
        torch.manual_seed(s)
        assert torch.equal(out, ra(images[s % 4])), f"seed {s}"
    assert len({out.sum().item() for out in ours}) > 30


def test_rotation_fills_the_uncovered_corners():
    tf = make_transform(32, True, rotation=45, hflip=False, fill=255)
    black = torch.zeros(3, 32, 32, dtype=torch.uint8)
    outs = [tf(black, torch.Generator().manual_seed(s)) for s in range(8)]
    corners = [float(o[:, 0, 0].mean()) for o in outs]  # normalised: 255 -> 1.0, 0 -> -1.0
    assert max(corners) == 1.0 and min(float(o[:, 16, 16].mean()) for o in outs) == -1.0


def test_batched_transform_is_the_per_image_transform():
    # TrainTransform.many (one grid sample for the batch) == each image through __call__, exactly:
    # odd and even sizes, flips, angles of both signs, quarter turns, non-square sources
    from torchvision.transforms.v2 import functional as TF

    from ray_dafusion.classifier import rotate_batch

    rng = np.random.default_rng(0)
    for size, source in ((32, (32, 32)), (23, (40, 30))):
        tf = make_transform(size, True, rotation=30, hflip=True, fill=255)
        images = [torch.from_numpy(rng.integers(0, 256, (3, *source), dtype=np.uint8)) for _ in range(16)]
        one = torch.stack([tf(im, torch.Generator().manual_seed(s)) for s, im in enumerate(images)])
        batch = tf.many(images, [torch.Generator().manual_seed(s) for s in range(16)])
        assert torch.equal(one, batch)
    square = torch.from_numpy(rng.integers(0, 256, (4, 3, 17, 17), dtype=np.uint8))
    angles = [90.0, -180.0, 7.5, -33.0]
    expected = torch.stack([TF.rotate(im, a, fill=9.0) for im, a in zip(square, angles)])
    assert torch.equal(rotate_batch(square, angles, 9.0), expected)
    assert not torch.equal(rotate_batch(square, [1.0, 2.0, 3.0, 4.0], 9.0), expected)
    # many angles at the sizes training uses: no pixel may round to another source than torchvision's
    for size in (32, 224):
        images = torch.from_numpy(rng.integers(0, 256, (48, 3, size, size), dtype=np.uint8))
        angles = [float(a) for a in rng.uniform(-30, 30, 48)] + [0.0, 45.0, -15.0, 12.5]
        images = torch.cat([images, images[:4]])
        expected = torch.stack([TF.rotate(im, a, fill=127.0) for im, a in zip(images, angles)])
        assert torch.equal(rotate_batch(images, angles, 127.0), expected)


def ddp_kill_config(make_real, tmp_path) -> tuple[TrainConfig, str, str]:
    """Two DDP workers streamed from storage on every pass (cache_mb 0): 15 real images, batch 4,
    2 passes per epoch, each worker logging its rows to `debug`; (config, real URI, debug dir)."""
    real = make_real(class_names=CLASSES, per_split={"train": 5, "val": 2, "test": 1}, size=32)
    synthetic = write_synthetic(real, str(tmp_path / "synthetic"), m=2)
    debug = str(tmp_path / "debug")
    cfg = TrainConfig(real=real, synthetic=synthetic, output=str(tmp_path / "runs"), name="ddp", alpha=1.0,
                      arch="resnet18", backbone="finetune", image_size=64, epochs=2, batch_size=4,
                      iterations_per_epoch=4, cache_mb=0, num_workers=2, cpus_per_worker=0.5, max_failures=1,
                      debug_dir=debug, shuffle_buffer=4)
    return cfg, real, debug


def test_two_workers_survive_a_killed_worker(ray_session, make_real, tmp_path):
    cfg, real, debug = ddp_kill_config(make_real, tmp_path)
    killed = []

    def kill_rank0_after_first_epoch():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            for path in glob.glob(os.path.join(debug, "epoch0-rank0-*.json")):
                pid = int(re.search(r"-(\d+)\.json$", path).group(1))
                os.kill(pid, signal.SIGKILL)  # the Ray Train worker process itself
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank0_after_first_epoch, daemon=True)
    killer.start()
    result = train(cfg)
    killer.join(timeout=1)
    assert killed, "the worker was never killed"
    assert [m["epoch"] for m in result.metrics] == [0, 1]
    ids = _real_ids(real)
    started = _pids(debug)
    assert len(started) >= 4 and killed[0] in started, "a new worker group took over after the kill"
    seen = _epoch_rows(debug)
    for epoch in range(2):
        # the last pair of ranks that trained this epoch saw each real id exactly once between them
        assert set(seen[epoch]) == {0, 1}
        both = seen[epoch][0][1] + seen[epoch][1][1]
        _check_exact(both, ids, passes=2)
        assert all(aug != -1 for _, aug, _, _ in both)  # alpha 1: no real row where every source has synthetics
    assert all(m["train_samples"] == 2 * len(ids) and m["synthetic_fraction"] == 1.0 for m in result.metrics)
    # the shards are uneven (7 and 8 real ids); the workers still end every epoch with one optimizer
    # state, and each cut batches across its two streamed passes: 14 rows are 7 steps of 2, not 2 x 3
    assert sorted(len(seen[1][r][1]) for r in (0, 1)) == [14, 16]
    states = {r: json.load(open(glob.glob(os.path.join(debug, f"optimizer-epoch1-rank{r}-{seen[1][r][0]}.json"))[0]))
              for r in (0, 1)}
    assert states[0]["optimizer"] == states[1]["optimizer"]
    assert [states[r]["steps"] for r in (0, 1)] == [len(seen[1][r][1]) // 2 for r in (0, 1)]


def test_s3_storage_state_dict_weights_linear_probe(ray_session, make_real, s3_bucket, tmp_path):
    bucket = s3_bucket("train-runs")
    real = make_real(class_names=CLASSES, per_split={"train": 2, "val": 1, "test": 1}, size=32)
    donor = build_model("resnet18", 1000, "none")
    buf = __import__("io").BytesIO()
    torch.save(donor.state_dict(), buf)
    storage.write_bytes(f"{bucket}/weights/r18.pt", buf.getvalue())
    cfg = TrainConfig(real=real, output=f"{bucket}/runs", method="standard", alpha=0.5, arch="resnet18",
                      weights=f"{bucket}/weights/r18.pt", backbone="linear_probe", image_size=32, epochs=2,
                      batch_size=2, iterations_per_epoch=2, num_workers=1, cpus_per_worker=0.5)
    result = train(cfg)
    assert result.output == f"{bucket}/runs/standard" and result.alpha == 0.0  # standard: alpha 0 + RandAugment
    assert result.best_checkpoint.startswith(f"{bucket}/runs/standard/checkpoint_")
    written = storage.read_json(f"{result.output}/train_result.json")
    assert written["randaugment"] is True and written["num_synthetic"] == 0
    assert [m["train_samples"] for m in written["metrics"]] == [6, 6]  # one whole pass of 6 rows per epoch
    assert [m["steps"] for m in written["metrics"]] == [3, 3] and written["optimizer_steps"] == 6
    state = torch.load(__import__("io").BytesIO(storage.read_bytes(f"{result.best_checkpoint}/model.pt")),
                       weights_only=True)
    # linear probe: the backbone is exactly the loaded weights, only the head moved
    assert torch.equal(state["conv1.weight"], donor.state_dict()["conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_mean"], donor.state_dict()["layer4.1.bn2.running_mean"])
    assert state["fc.weight"].shape == (3, 512)


def test_clear_errors_before_training(make_real, tmp_path):
    real = make_real(class_names=CLASSES, per_split={"train": 2, "val": 1, "test": 1}, size=32)
    base = dict(real=real, output=str(tmp_path / "runs"), arch="resnet18", image_size=32, epochs=1)
    with pytest.raises(ConfigError, match="synthetic"):
        train(TrainConfig(**base, method="da_fusion", alpha=0.5))
    partial = write_synthetic(real, str(tmp_path / "partial"), complete=False)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        train(TrainConfig(**base, method="real_guidance", synthetic=partial))
    other = make_real(class_names=CLASSES, per_split={"train": 2, "val": 1, "test": 1}, size=32, seed=1)
    foreign = write_synthetic(real, str(tmp_path / "foreign"))
    t = storage.read_parquet(foreign + "/data/a/part-0.parquet")
    storage.write_parquet(t.set_column(t.schema.get_field_index("source_id"), "source_id",
                                       pa.array(["elsewhere"] * t.num_rows)), foreign + "/data/a/part-0.parquet")
    with pytest.raises(ValueError, match="not in"):
        train(TrainConfig(**{**base, "real": other}, method="da_fusion", synthetic=foreign))
    # a synthetic set made from fewer shots covers part of the real train set: refused, unless augment
    # quarantined the rest
    fewer = write_synthetic(real, str(tmp_path / "fewer"))
    t = storage.read_parquet(fewer + "/data/b/part-1.parquet")
    gone = sorted(set(t.column("source_id").to_pylist()) - set(storage.read_parquet(
        fewer + "/data/a/part-0.parquet").column("source_id").to_pylist()))
    storage.write_parquet(t.filter(pc.invert(pc.is_in(t.column("source_id"), pa.array(gone)))),
                          fewer + "/data/b/part-1.parquet")
    with pytest.raises(ValueError, match=f"no images of {len(gone)} of the 6 images .* augment this real set"):
        train(TrainConfig(**base, method="da_fusion", synthetic=fewer))
    storage.write_parquet(schema.error_table([{"stage": "augment", "item": s, "class_name": None, "reason": "r"}
                                              for s in gone]), fewer + "/errors/part-1.parquet")
    _, candidates, _ = _synthetic_candidates(TrainConfig(**base, method="da_fusion", synthetic=fewer),
                                             {r["id"]: r["label"] for r in storage.read_parquet(
                                                 real + "/train", columns=["id", "label"]).to_pylist()}, list(CLASSES))
    assert len(candidates) == 6 - len(gone) and not set(gone) & set(candidates)
    # a synthetic set of another mode than the method names is refused
    guided = write_synthetic(real, str(tmp_path / "guided"), mode="real_guidance")
    with pytest.raises(ConfigError, match="made in mode 'real_guidance'"):
        train(TrainConfig(**base, method="da_fusion", synthetic=guided))
    wrong = str(tmp_path / "r34.pt")
    torch.save(build_model("resnet34", 10, "none").state_dict(), wrong)
    with pytest.raises(ConfigError, match="does not match"):
        build_model("resnet18", 3, wrong)
    junk = str(tmp_path / "junk.pt")
    open(junk, "wb").write(b"not a checkpoint")
    with pytest.raises(ConfigError, match="weights_only"):
        build_model("resnet18", 3, junk)
    with pytest.raises(ConfigError, match="no such"):
        build_model("resnet18", 3, str(tmp_path / "missing.pt"))


def test_local_runner_resumes_from_file_uris_and_keeps_to_its_runner(ray_session, make_real, tmp_path, caplog):
    """num_workers 0 resumes from its own record (file:// outputs too), skips records of checkpoints a
    killed prune deleted, and a switch to Ray Train is refused rather than retraining finished epochs."""
    real = make_real(class_names=CLASSES, per_split={"train": 2, "val": 1, "test": 1}, size=32)
    cfg = TrainConfig(real=real, output=f"file://{tmp_path}/runs", method="baseline", arch="resnet18", image_size=32,
                      epochs=1, batch_size=3, iterations_per_epoch=2, num_workers=0, num_to_keep=1)
    first = train(cfg)
    # the default backbone without pretrained weights trains a head on random features: said once, as a warning
    assert "linear head on a frozen, randomly initialised resnet18" in caplog.text
    resumed = train(cfg.replace(epochs=3))
    assert [m["epoch"] for m in resumed.metrics] == [0, 1, 2] and resumed.metrics[0] == first.metrics[0]
    run = tmp_path / "runs" / "baseline"
    record = json.loads((run / "_local_checkpoints.json").read_text())
    assert all(os.path.isdir(r["path"][len("file://"):]) for r in record)  # pruned after the record was written
    # a record naming a checkpoint that is gone (a kill between record and delete in older runs) is skipped
    (run / "manifest.json").unlink()
    gone = {"path": f"file://{run}/checkpoint_000009", "metrics": {**record[-1]["metrics"], "epoch": 9}}
    (run / "_local_checkpoints.json").write_text(json.dumps(record + [gone]))
    again = train(cfg.replace(epochs=3))
    assert again.metrics == resumed.metrics
    (run / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="started with num_workers 0 .* not with num_workers 1"):
        train(cfg.replace(epochs=3, num_workers=1, cpus_per_worker=0.5))


def test_a_run_of_a_remade_input_is_not_taken_as_finished(ray_session, make_real, tmp_path):
    """A finished run is reused only for the same inputs by content: a synthetic set made again
    with another config (the same path) makes the re-run refuse, naming the input that changed."""
    real = make_real(class_names=CLASSES, per_split={"train": 2, "val": 1, "test": 1}, size=32)
    synthetic = write_synthetic(real, str(tmp_path / "synthetic"), m=1)
    storage.write_manifest(synthetic, {**storage.read_manifest(synthetic), "config_fingerprint": "first"})
    cfg = TrainConfig(real=real, synthetic=synthetic, output=str(tmp_path / "runs"), method="da_fusion", alpha=0.5,
                      arch="resnet18", image_size=32, epochs=1, batch_size=3, iterations_per_epoch=2, num_workers=0)
    first = train(cfg)
    assert train(cfg).best_checkpoint == first.best_checkpoint  # the same inputs: finished, nothing to do
    storage.write_manifest(synthetic, {**storage.read_manifest(synthetic), "config_fingerprint": "second"})
    with pytest.raises(storage.StorageError, match="synthetic.*first.*second"):
        train(cfg)
    # a run made before inputs were recorded holds the fingerprint of its config alone: it stands as
    # finished (its records take the identity with inputs, once)
    from ray_dafusion.configlib import config_record

    run = tmp_path / "runs" / "da_fusion"
    older = storage.fingerprint(config_record(cfg, alpha=0.5))
    for name in ("manifest.json", "_run.json"):
        record = json.loads((run / name).read_text())
        (run / name).write_text(json.dumps({**record, "config_fingerprint": older}))
    assert train(cfg).best_checkpoint == first.best_checkpoint
    assert json.loads((run / "manifest.json").read_text())["config_fingerprint"] != older
    with pytest.raises(storage.StorageError, match="different config"):  # another config's older run: refused
        train(cfg.replace(seed=1))


def test_exact_batches_recut_without_loss():
    chunks = [(torch.zeros(n, 1), torch.arange(n), np.full(n, -1), np.array([f"{i}-{k}" for k in range(n)]))
              for i, n in enumerate([3, 0, 5, 1, 6])]
    sizes = [len(b[1]) for b in exact_batches(chunks, 4)]
    assert sizes == [4, 4, 7]  # the remainder joins the last batch
    assert [len(b[1]) for b in exact_batches(chunks[:1], 4)] == [3]
    ids = np.concatenate([b[3] for b in exact_batches(chunks, 4)])
    assert sorted(ids) == sorted(np.concatenate([c[3] for c in chunks]))


def test_a_run_saved_without_amp_resumes_with_amp(tmp_path):
    """A run started on CPU (no AMP: the scaler saves {}) and resumed with use_gpu (a resource field,
    so the resume is allowed) starts a fresh scale instead of failing on the empty state."""
    import contextlib
    import types

    from ray_dafusion.classifier import save_checkpoint
    from ray_dafusion.train import _resume

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    save_checkpoint(str(tmp_path), model.state_dict(), {"optimizer": optimizer.state_dict(), "scaler": saved},
                    {"epoch": 3, "history": [{"epoch": e} for e in range(4)]})
    session = types.SimpleNamespace(device=torch.device("cpu"), rank=0,
                                    latest_checkpoint=lambda: contextlib.nullcontext(str(tmp_path)))
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    assert _resume(model, optimizer, scaler, session)[0] == 4
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16


def test_streamed_passes_cut_batches_across_their_boundaries():
    chunks = [(torch.zeros(3, 1), torch.arange(3), np.full(3, -1), np.array([f"{p}-{k}" for k in range(3)]))
              for p in range(3)]
    carry: list = []
    sizes = [[len(b[1]) for b in exact_batches([chunk], 4, carry, last=p == 2)] for p, chunk in enumerate(chunks)]
    assert sizes == [[], [4], [5]] and carry == []  # 9 rows: 4 + 5 (the remainder joins the last batch)


def test_a_streamed_pass_shuffles_the_rows_it_chose():
    """The mixing choice comes before the shuffle buffer: a block of real rows then a block of their
    synthetic versions (M per real) still give batches of both kinds, not all-real then all-synthetic."""
    import types

    from ray_dafusion.train import _stream_pass

    png = _random_pngs(1, seed=0)[0]
    n, m = 24, 10

    def block(ids, sources, aug):
        return {"id": np.array(ids, dtype=object), "source_id": np.array(sources, dtype=object),
                "aug_index": np.array(aug, dtype=np.int64), "label": np.zeros(len(ids), np.int64),
                "image_bytes": np.array([png] * len(ids), dtype=object)}

    real = block([f"r{i}" for i in range(n)], [f"r{i}" for i in range(n)], [-1] * n)
    synthetic = block([f"r{i}-{a}" for i in range(n) for a in range(m)], [f"r{i}" for i in range(n) for a in range(m)],
                      [a for _ in range(n) for a in range(m)])
    shard = types.SimpleNamespace(iter_batches=lambda **kw: iter([real, synthetic]))
    cfg = TrainConfig(seed=3, shuffle_buffer=512, decode_threads=1)
    loop = {"candidates": {f"r{i}": list(range(m)) for i in range(n)}, "alpha": 0.5}
    chunks = list(_stream_pass(shard, cfg, loop, make_transform(8, True), 0, 0, 6, 0, False))
    assert sorted(str(i).split("-")[0] for c in chunks for i in c[3]) == sorted(real["id"])  # each real id once
    kinds = [set((c[2] >= 0).tolist()) for c in chunks]
    assert len(chunks) == 4 and sum(kind == {True, False} for kind in kinds) >= 3, kinds
    # a buffer smaller than what a pass chooses: drawn from while the blocks stream, nothing lost or repeated
    small = list(_stream_pass(shard, cfg.replace(shuffle_buffer=8), loop, make_transform(8, True), 0, 0, 6, 0, False))
    assert sorted(str(i).split("-")[0] for c in small for i in c[3]) == sorted(real["id"])
    assert [len(c[3]) for c in small] == [6, 6, 6, 6]
    from ray_dafusion import mixing

    assert mixing.keep_mask(real["source_id"], real["aug_index"], loop["candidates"], 3, 0, 0.5, 0).sum() >= 8
    assert set((small[0][2] >= 0).tolist()) == {False}  # drawn while only the real block had arrived


def test_shipped_train_yaml_parses():
    root = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "train.yaml")
    cfg = TrainConfig.from_yaml(root)
    assert cfg.arch == "resnet50" and cfg.method in ("baseline", "standard", "real_guidance", "da_fusion")


def test_relative_paths_reach_the_train_workers(ray_session, make_real, tmp_path, monkeypatch):
    """A workdir, starting weights and debug directory given relative to the driver (the demo's
    `runs/demo`) are still found by Ray Train workers, which run in a directory of their own."""
    real = make_real(class_names=CLASSES, per_split={"train": 2, "val": 1, "test": 1}, size=32)
    synthetic = write_synthetic(real, str(tmp_path / "synthetic"), m=1)
    torch.save(build_model("small_cnn", len(CLASSES)).state_dict(), tmp_path / "start.pt")
    monkeypatch.chdir(tmp_path)
    result = train(TrainConfig(real=os.path.relpath(real), synthetic=os.path.relpath(synthetic), output="out",
                               method="da_fusion", alpha=0.5, arch="small_cnn", image_size=32, epochs=1, batch_size=2,
                               iterations_per_epoch=2, num_workers=1, cpus_per_worker=0.5, weights="start.pt",
                               debug_dir="debug"))
    assert result.optimizer_steps >= 2 and os.path.isdir(tmp_path / "out" / "da_fusion")
    assert glob.glob(str(tmp_path / "debug" / "pid-rank0-*.json"))  # the worker wrote where the driver looks
