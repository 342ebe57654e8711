"""Training throughput: the streaming alpha-mixed parquet pipeline vs tensors preloaded in memory.

Both modes run the same Ray Train TorchTrainer (same model, batch, workers, optimiser, steps,
fractional CPUs). Only the batch source differs:

* stream: the train stage's own path: parquet (real + M synthetic per real) -> Ray Data union ->
  streaming_split -> per-pass exact mixing filter on each block, a seeded shuffle buffer of the
  chosen rows, decode and train transforms ahead of the step (in a thread pool, or with
  `--decode-processes` in Ray tasks, the chunks then planned, submitted and fetched by a thread of
  the training process running ahead; `--no-run-ahead`: between steps) -> exact-size
  batches cut across passes (on a GPU, as in the train stage, the threads decode,
  resize and draw, and the timed step finishes flips, rotations and float conversion on the GPU);
* preloaded: the same rows, mixed, decoded and transformed once into tensors in worker memory
  before the clock starts, then cycled.

Both train as the stage does by default: the model and every batch in channels_last memory layout
(`TrainConfig.channels_last`; `--contiguous` turns it off on both sides).

Timed: the wall time of `--steps` optimiser steps after `--warmup` untimed steps, in the worker,
including the wait for each next batch (Ray start-up, dataset planning and the preload are not
timed). samples/s = steps x global batch / time. Prints both and their ratio (stream / preloaded).

    python benchmarks/train_overhead.py --arch resnet50 --image-size 128 --batch-size 16 --steps 12

`--step-wait-ms W` replaces the step by a wait of W ms that releases the interpreter lock, as a
training process waiting on a GPU does: on a CPU it measures what the batch supply still costs the
training process per step (preloaded then takes W ms a step; the ratio is W over the stream's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import numpy as np


def make_data(root: str, num_real: int, m: int, size: int, classes: int = 4) -> tuple[str, str]:
    """A real set (train/val) and a synthetic set with M images per real image, as parquet."""
    import pyarrow as pa
    from PIL import Image

    from ray_dafusion import schema, storage

    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(classes)]

    def image(label: int) -> dict:
        base = rng.integers(0, 255, (8, 8, 3)).astype("uint8")  # smooth-ish content: realistic PNG sizes
        img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
        return schema.image_cell(schema.encode_image(img), "x.png")

    real, synth = os.path.join(root, "real"), os.path.join(root, "synthetic")
    for split, n in (("train", num_real), ("val", classes)):
        rows = [{"id": f"{split}-{i}", "image": image(i % classes), "label": i % classes, "class_name": names[i % classes],
                 "source_path": "", "sha256": "", "width": size, "height": size} for i in range(n)]
        for part in range(4):  # a few files: several read tasks
            storage.write_parquet(pa.Table.from_pylist(rows[part::4], schema=schema.real_schema(names)),
                                  os.path.join(real, split, f"part-{part}.parquet"))
    storage.write_manifest(real, {"stage": "ingest", "classes": [{"name": n, "label": i, "token": f"<{n}>"}
                                                                for i, n in enumerate(names)]})
    rows = []
    for i in range(num_real):
        for a in range(m):
            rows.append({"id": f"train-{i}-{a}", "source_id": f"train-{i}", "aug_index": a, "label": i % classes,
                         "class_name": names[i % classes], "token": "", "strength": 0.5, "seed": a, "prompt": "",
                         "guidance_scale": 7.5, "num_inference_steps": 50, "model_fingerprint": "",
                         "embeddings_fingerprint": "", "erasure_fingerprint": "", "image": image(i % classes)})
    table = pa.Table.from_pylist(rows, schema=schema.synthetic_schema(names))
    bounds = np.linspace(0, len(rows), 9).astype(int)
    for part in range(8):
        storage.write_parquet(table.slice(bounds[part], bounds[part + 1] - bounds[part]),
                              os.path.join(synth, "data", f"part-{part}.parquet"))
    storage.write_manifest(synth, {"stage": "augment", "mode": "da_fusion"})
    return real, synth


class _GpuSampler:
    """Mean of the driver's GPU utilisation (NVML, percent of time a kernel ran), sampled every 50 ms."""

    def __init__(self) -> None:
        import threading

        self.samples: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self.done.wait(0.05):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # no NVML bindings: the step share alone
                return

    def start(self) -> None:
        self.thread.start()

    def stop(self):
        self.done.set()
        self.thread.join()
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def _bench_loop(loop: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from ray_dafusion.config import TrainConfig
    from ray_dafusion.classifier import build_model, make_transform
    from ray_dafusion.train import _stream_pass, augments_in_step, batch_images, exact_batches, train_step

    cfg = TrainConfig.from_dict(loop["config"])
    if loop["no_run_ahead"]:  # the chunks planned, submitted and fetched between steps, as before the thread
        import ray_dafusion.train as stage

        stage._CHUNKS_AHEAD = 0
    world = ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    model = build_model(cfg.arch, loop["num_classes"], "none", cfg.backbone)
    if cfg.channels_last:  # as the train stage's _prepare_model: the layout before DDP wraps it
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    local_batch = cfg.batch_size // world
    shard = ray.train.get_dataset_shard("train")
    tf = make_transform(cfg.image_size, True, cfg.rotation, cfg.hflip, False)

    rank = ray.train.get_context().get_world_rank()

    def stream(in_step: bool):  # pass after pass of the train stage's exact mixed stream, batches cut across them
        carry: list = []
        for epoch in itertools.count():
            chunks = _stream_pass(shard, cfg, loop, tf, epoch, rank, local_batch, 0, in_step)
            yield from exact_batches(chunks, local_batch, carry, last=False)

    total = loop["warmup"] + loop["steps"]
    if loop["mode"] == "preloaded":
        gen = stream(False)
        batches = list(itertools.islice(gen, total))  # decoded + transformed before the clock starts
        gen.close()  # stops the Ray Data execution, which would otherwise compete for CPU
        source = iter(batches)
    else:
        source = stream(augments_in_step(cfg, device))  # as the train stage: on a GPU the step finishes the transform
    times, waits = [], []
    sampler = _GpuSampler() if device.type == "cuda" else None
    for step in range(total):
        if step == loop["warmup"] and sampler:
            sampler.start()
        t0 = time.perf_counter()
        x, y, _, _, _, *drawn = next(source)
        waits.append(time.perf_counter() - t0)  # waiting for the next batch: the GPU idles
        x = batch_images(tf, x, drawn, device)
        if loop["step_wait"]:  # a GPU step as the training process sees it: a wait without the interpreter lock
            time.sleep(loop["step_wait"])
        else:
            loss = train_step(model, optimizer, scaler, x, y, device, cfg.channels_last)
            float(loss)  # wait for the step to finish (CUDA is asynchronous)
        times.append(time.perf_counter() - t0)
    timed = sum(times[loop["warmup"]:])
    late = loop["warmup"] + loop["steps"] // 2  # the second half: a wait there is not the stream's ramp-up
    busy = {"step_share": 1 - sum(waits[loop["warmup"]:]) / timed,  # share of the time spent inside steps
            "step_share_second_half": 1 - sum(waits[late:]) / sum(times[late:]),
            "step_own_s_median": float(np.median([t - w for t, w in zip(times[loop["warmup"]:], waits[loop["warmup"]:])]))}
    if sampler:
        busy["nvml_utilization"] = sampler.stop()
    if ray.train.get_context().get_world_rank() == 0:  # V2 Result.metrics only carry checkpointed reports
        with open(loop["result_file"], "w") as f:
            json.dump({"samples_per_s": loop["steps"] * cfg.batch_size / timed, "seconds": timed,
                       "torch_threads": torch.get_num_threads(), "decode_threads": cfg.decode_threads,
                       "decode_processes": cfg.decode_processes, "gpu_busy": busy,
                       "channels_last": cfg.channels_last,
                       "step_s": times[loop["warmup"]:]}, f)


def run(mode: str, args, real: str, synth: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_dafusion.config import TrainConfig
    from ray_dafusion.train import decode_thread_count, exact_split_config, streaming_data

    cfg = TrainConfig(real=real, synthetic=synth, output=args.workdir, arch=args.arch, image_size=args.image_size,
                      batch_size=args.batch_size, backbone=args.backbone, num_workers=args.workers,
                      use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, alpha=args.alpha,
                      shuffle_buffer=max(64, args.batch_size * 4), decode_threads=args.decode_threads,
                      decode_processes=args.decode_processes,
                      channels_last=not args.contiguous)
    cfg = cfg.replace(decode_threads=decode_thread_count(cfg))  # as the train stage hands its workers
    data = streaming_data(cfg, cfg.alpha)
    result_file = os.path.join(args.workdir, f"result-{mode}-{time.time_ns()}.json")
    trainer = TorchTrainer(
        _bench_loop,
        train_loop_config={"config": cfg.to_dict(), "mode": mode, "alpha": cfg.alpha, "candidates": data.candidates,
                           "num_classes": len(data.classes), "rows_per_real": data.rows_per_real,
                           "warmup": args.warmup, "steps": args.steps, "result_file": result_file,
                           "step_wait": args.step_wait_ms / 1e3, "no_run_ahead": args.no_run_ahead},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name=f"bench-{mode}-{time.time_ns()}", storage_path=args.workdir),
        datasets={"train": data.train, "val": data.val},
        dataset_config=exact_split_config(),
    )
    trainer.fit()
    with open(result_file) as f:
        return json.load(f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--source-size", type=int, default=160, help="side of the stored PNGs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--decode-threads", type=int, default=0,
                   help="train config decode_threads (rows decoded in parallel; 0, the default: one per whole CPU)")
    p.add_argument("--decode-processes", type=int, default=0,
                   help="train config decode_processes (Ray tasks of one CPU that decode batches; 0: the threads)")
    p.add_argument("--step-wait-ms", type=float, default=0.0,
                   help="replace the training step by a wait of this many ms that holds no interpreter lock (how a GPU "
                        "step looks to the training process): on a CPU, what the batch supply still costs it per step")
    p.add_argument("--no-run-ahead", action="store_true",
                   help="with --decode-processes: plan, submit and fetch chunks between steps, not in a thread ahead")
    p.add_argument("--contiguous", action="store_true",
                   help="train config channels_last false on both sides (the stage's default is true)")
    p.add_argument("--backbone", default="finetune")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--m", type=int, default=4, help="synthetic images per real image")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two modes this many times")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    args = p.parse_args()
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="train-bench-"))

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    num_real = args.batch_size * (args.steps + args.warmup)  # one epoch covers every timed step
    real, synth = make_data(os.path.join(args.workdir, "data"), num_real, args.m, args.source_size)
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    from ray_dafusion import plan

    # as the train stage: workers that leave Ray Data no CPU for its read tasks are an error, not a hang
    gpu = 1.0 if args.use_gpu else 0.0
    plan.check("train_overhead", plan.Demand("training workers", args.workers, {"CPU": args.cpus_per_worker, "GPU": gpu},
                                             size_fields={"cpus_per_worker": args.cpus_per_worker}))
    results: dict[str, list[float]] = {"stream": [], "preloaded": []}
    busy: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode in ("preloaded", "stream"):
            metrics = run(mode, args, real, synth)
            results[mode].append(metrics["samples_per_s"])
            busy[mode] = metrics["gpu_busy"]
            print(f"{mode:>9}: {metrics['samples_per_s']:.3f} samples/s over {args.steps} steps "
                  f"({metrics['seconds']:.1f}s; step s median {np.median(metrics['step_s']):.3f}; "
                  f"busy {metrics['gpu_busy']}; "
                  f"torch threads {metrics['torch_threads']}, decode threads {metrics['decode_threads']}, "
                  f"decode processes {metrics['decode_processes']}, "
                  f"channels_last {metrics['channels_last']})", flush=True)
    stream, preloaded = float(np.median(results["stream"])), float(np.median(results["preloaded"]))
    summary = {"decode_threads": metrics["decode_threads"], "decode_processes": metrics["decode_processes"], "channels_last": metrics["channels_last"], "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
               "steps": args.steps, "warmup": args.warmup, "alpha": args.alpha, "m": args.m, "backbone": args.backbone,
               "stream_samples_per_s": stream, "preloaded_samples_per_s": preloaded, "ratio": stream / preloaded,
               "runs": results, "busy_last_run": busy, "use_gpu": args.use_gpu, "step_wait_ms": args.step_wait_ms,
               "run_ahead": bool(args.decode_processes) and not args.no_run_ahead}
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    print(f"ratio stream / preloaded = {stream / preloaded:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
