"""Overhead of the augment system: the whole Ray job against its augmenter called in this process.

Same inputs, model, steps, batch size, t0 draws and per-image seeds in both:

(a) ``augment(cfg)`` as a user runs it on an already started local Ray: driver checks, Ray Data
    read + repartition, actor start and model load, generation, PNG encoding, parquet writes,
    the N x M verification and the manifest. ``ray.init`` is timed separately, not included.
(b) the actor's own class, ``DiffusionAugmenter``, built in this process and called on the real
    rows in batches of ``batch_size`` (by id): decode, grouping by t0, its pipeline calls (batched
    VAE encode, cached prompt embeddings), resize back, PNG and rows on its io threads, one parquet
    file per batch into an output of its own. The same algorithm as (a), so the ratio is Ray's own
    cost (Ray Data, actor start and model load, verification, manifest), not a difference between
    two ways of calling the pipeline. Building the augmenter (model load) is not included.

Both use the same number of torch threads (an actor with num_cpus < 1 gets OMP_NUM_THREADS=1
from Ray; the loop calls torch.set_num_threads). (a) also prints the seconds its actor spent
inside ``__call__``, so the system's own cost (wall minus actor time) can be read even when a
shared machine's load changes between (a) and (b); ``--order ab`` runs them the other way round.
Also measured: the cost of one t0=0.25 image against one t0=1.0 image (UNet calls and seconds).

    .venv/bin/python benchmarks/augment_overhead.py --num-real 16 --m 8 --resolution 128 --steps 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def write_real(root: str, num_real: int, size: int) -> list[str]:
    """A two-class real data set in the ingest output layout, smooth random images."""
    import pyarrow as pa
    from PIL import Image

    from ray_dafusion import schema, storage
    from ray_dafusion.tokens import class_token

    rng = np.random.default_rng(0)
    names = ["cat", "dog"]
    rows = []
    for i in range(num_real):
        label = i % 2
        coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        data = schema.encode_image(image)
        rid = f"real-{i:04d}"
        rows.append({"id": rid, "image": schema.image_cell(data, f"{rid}.png"), "label": label,
                     "class_name": names[label], "source_path": f"{rid}.png",
                     "sha256": storage.sha256_bytes(data), "width": size, "height": size})
    storage.write_parquet(pa.Table.from_pylist(rows, schema=schema.real_schema(names)),
                          storage.join(root, "train", "part-00000.parquet"))
    storage.write_manifest(root, {"stage": "ingest", "config_fingerprint": "benchmark",
                                  "classes": [{"name": n, "label": i, "token": class_token(n)}
                                              for i, n in enumerate(names)]})
    return [r["id"] for r in rows]


def augmenter_loop(cfg, classes, threads: int) -> tuple[int, float]:
    """(b): `DiffusionAugmenter`, as the actor runs it, called in this process on the real rows in
    batches of `cfg.batch_size`; (images written, seconds). `cfg.output` must be an output of its own."""
    import torch

    from ray_dafusion import storage
    from ray_dafusion.augment import DiffusionAugmenter

    torch.set_num_threads(threads)
    augmenter = DiffusionAugmenter(cfg, classes)  # loads the model: outside the clock
    table = storage.read_parquet(storage.join(cfg.real, "train")).sort_by("id")
    start, count = time.perf_counter(), 0
    for b in range(0, table.num_rows, cfg.batch_size):
        count += augmenter(table.slice(b, cfg.batch_size)).column("rows")[0].as_py()
    return count, time.perf_counter() - start


def t0_cost(cfg, threads: int, images: int) -> dict[float, tuple[int, float]]:
    """UNet calls and seconds of one pipeline call of `images` images at t0 0.25 and 1.0."""
    import torch
    from PIL import Image

    from ray_dafusion import models

    torch.set_num_threads(threads)
    pipe = models.load_pipeline(cfg.model, cache_dir=cfg.cache_dir)
    calls = [0]
    forward = pipe.unet.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    pipe.unet.forward = counted
    image = Image.new("RGB", (cfg.resolution, cfg.resolution), (120, 80, 40))
    out = {}
    for strength in (1.0, 0.25, 1.0, 0.25):  # second pass is the one reported (warm)
        calls[0] = 0
        start = time.perf_counter()
        pipe(prompt=["a photo of a thing"] * images, image=[image] * images, strength=strength,
             num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
             generator=[torch.Generator("cpu").manual_seed(i) for i in range(images)])
        out[strength] = (calls[0], time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-real", type=int, default=16, help="real images (N)")
    parser.add_argument("--m", type=int, default=8, help="augmentations per real image (M)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--size", type=int, default=128, help="side of the real images")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-images-per-call", type=int, default=16)
    parser.add_argument("--strengths", default="0.25,0.5,0.75,1.0")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in (b); (a)'s actor gets 1 from Ray")
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per actor in (a)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor in (a)")
    parser.add_argument("--order", choices=("ba", "ab"), default="ba",
                        help="run (b) then (a), or (a) then (b): on a shared machine, run both orders")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file

    import ray
    from ray_dafusion import schema, storage
    from ray_dafusion.augment import augment
    from ray_dafusion.config import AugmentConfig

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = args.workdir or tempfile.mkdtemp(prefix="augment-bench-")
    real = os.path.join(work, "real")
    write_real(real, args.num_real, args.size)
    emb = os.path.join(work, "tokens.safetensors")
    save_file({"<cat>": torch.randn(32), "<dog>": torch.randn(32)}, emb)
    cfg = AugmentConfig(
        real=real, output=os.path.join(work, f"synthetic-{time.time_ns()}"), embeddings=emb, model=args.model,
        num_augmentations=args.m, strengths=[float(s) for s in args.strengths.split(",")],
        num_inference_steps=args.steps, resolution=args.resolution, batch_size=args.batch_size,
        max_images_per_call=args.max_images_per_call, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
    )
    classes = schema.read_class_table(real)
    n_images = args.num_real * args.m
    print(f"N={args.num_real} real x M={args.m} = {n_images} images; model {args.model} at {args.resolution}px, "
          f"{args.steps} steps, t0 in {cfg.strengths}, batch {args.batch_size} rows, "
          f"<= {args.max_images_per_call} images per call, {args.threads} torch thread(s)")

    def run_b() -> float:
        count, seconds = augmenter_loop(cfg.replace(output=os.path.join(work, f"loop-{time.time_ns()}")), classes,
                                        args.threads)
        assert count == n_images, (count, n_images)
        print(f"(b) in-process:  {count} images in {seconds:7.1f}s = {count / seconds:.3f} images/s"
              f"  (load average {os.getloadavg()[0]:.1f})")
        return seconds

    def run_a() -> float:
        from ray_dafusion.models import resolve_model

        resolve_model(cfg.model, cfg.cache_dir)  # a built-in model is built once, outside the timing
        start = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"    ray.init (not included in (a)): {time.perf_counter() - start:.1f}s")
        start = time.perf_counter()
        result = augment(cfg)
        seconds = time.perf_counter() - start
        assert result.synthetic_rows == n_images
        print(f"(a) Ray job:     {result.synthetic_rows} images in {seconds:7.1f}s = {n_images / seconds:.3f} images/s"
              f"  (actors busy {storage.read_manifest(cfg.output)['timings']['actor_seconds']:.1f}s, "
              f"load average {os.getloadavg()[0]:.1f})")
        ray.shutdown()
        return seconds

    if args.order == "ba":
        seconds_b, seconds_a = run_b(), run_a()
    else:
        seconds_a, seconds_b = run_a(), run_b()
    print(f"ratio (a)/(b) images/s: {seconds_b / seconds_a:.3f}")

    cost = t0_cost(cfg, args.threads, images=args.batch_size)
    (c1, s1), (c4, s4) = cost[1.0], cost[0.25]
    print(f"t0 cost, {args.batch_size} images per call: t0=1.0 {c1} UNet calls {s1:.2f}s; "
          f"t0=0.25 {c4} UNet calls {s4:.2f}s; ratio calls {c4 / c1:.3f}, seconds {s4 / s1:.3f}")


if __name__ == "__main__":
    main()
