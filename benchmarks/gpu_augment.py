"""GPU throughput of the augment actor: images/s at real sizes, fp16, without Ray.

Runs on one CUDA GPU with the `sd15-shape` model (Stable Diffusion 1.5's shapes, random weights,
so nothing is downloaded; the work per image is the real model's). Measures:

(a) ``DiffusionAugmenter.__call__`` over the real rows in batches of ``--batch-size`` rows, as a
    Ray Data actor runs it: decode, quarantine checks, t0 draws, grouping by t0, pipeline calls,
    resize back, PNG encoding, one parquet file per batch;
(b) diffusers' own pipeline call per chunk (prompt strings, PIL images, one generator per image:
    the VAE encodes one image at a time, the text encoder runs every call), over the same rows,
    prompts, t0 draws, seeds and chunking, with PNG encoding but no parquet: the ratio (a)/(b)
    is the actor's path (batched VAE encode, cached prompt embeddings, PNG and rows on a thread,
    parquet) against calling diffusers plainly, not Ray's cost;
(c) images/s of single pipeline calls of 1..32 images at t0 = 0.5 (the batch-size sweep);
(d) seconds of one call at t0 = 0.25 against t0 = 1.0.

Ray itself is not in the clock: the Ray job's own overhead is measured on CPU by
augment_overhead.py. Every timed region ends with ``torch.cuda.synchronize()``; model build and
load and one warm-up call per side are outside the clock.

    python benchmarks/gpu_augment.py --num-real 16 --m 8 --steps 50 --order abba --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from augment_overhead import write_real  # noqa: E402


def diffusers_loop(cfg, classes, threads: int) -> tuple[int, float]:
    """(b): diffusers' own img2img call per chunk, in this process, no parquet; (images, seconds)."""
    import torch

    from ray_dafusion import models, schema, storage, tokens, weights
    from ray_dafusion.augment import draw_augmentation, even_chunks, from_model_size, to_model_size

    torch.set_num_threads(threads)
    pipe = models.load_pipeline(cfg.model, cache_dir=cfg.cache_dir)
    weights.add_tokens(pipe, weights.load_embeddings(cfg.embeddings)[0])
    rows = sorted(storage.read_parquet(storage.join(cfg.real, "train")).to_pylist(), key=lambda r: r["id"])
    by_label = {c.label: c for c in classes}
    start, count = time.perf_counter(), 0
    for b in range(0, len(rows), cfg.batch_size):
        groups = defaultdict(list)
        for row in rows[b : b + cfg.batch_size]:
            source = schema.decode_image(row["image"]["bytes"])
            for k in range(cfg.num_augmentations):
                seed, strength, template = draw_augmentation(cfg.seed, row["id"], k, cfg.t0_levels(), cfg.prompt_templates)
                groups[strength].append((source, seed, tokens.make_prompt(template, by_label[row["label"]].token)))
        for strength, group in sorted(groups.items()):
            for chunk in even_chunks(group, cfg.max_images_per_call):
                images = pipe(
                    prompt=[p for _, _, p in chunk],
                    image=[to_model_size(s, cfg.resolution, cfg.resize) for s, _, _ in chunk],
                    strength=strength, guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps,
                    generator=[torch.Generator("cpu").manual_seed(seed) for _, seed, _ in chunk],
                ).images
                for (source, _, _), image in zip(chunk, images):
                    schema.encode_image(from_model_size(image, source.size, cfg.resize), "PNG")
                    count += 1
    return count, time.perf_counter() - start


def gpu_setup(args: argparse.Namespace, script: str) -> tuple[bool, Callable[[], None], dict]:
    """CUDA or refuse (CPU runs only the tiny model, as a smoke test); a synchronize function;
    the start of the result record (device, torch, arguments)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and args.model != "tiny":
        raise SystemExit(f"{script} needs a CUDA GPU (on CPU it runs only --model tiny, as a smoke test)")
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    return cuda, sync, {"device": device, "torch": torch.__version__, "args": vars(args)}


def gpu_finish(result: dict, cuda: bool, out: str | None) -> None:
    """Add the peak GPU memory to the record, print it, and write the record as JSON to `out`."""
    import torch

    if cuda:
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"peak GPU memory {result['max_memory_gib']} GiB", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-shape")
    parser.add_argument("--num-real", type=int, default=16)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--size", type=int, default=256, help="side of the real images")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="real rows per actor call")
    parser.add_argument("--max-images-per-call", type=int, default=16)
    parser.add_argument("--sweep", default="1,4,8,16,32", help="images per call for (c)")
    parser.add_argument("--order", default="abba", help="sides to run in turn, each a fresh run (a or b)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if not args.order or set(args.order) - set("ab") or not set(args.order) >= set("ab"):
        parser.error(f"--order must use both a and b and nothing else, got {args.order!r}")

    import torch
    from safetensors.torch import save_file

    from ray_dafusion import models, schema, storage
    from ray_dafusion.augment import DiffusionAugmenter
    from ray_dafusion.config import AugmentConfig

    cuda, sync, result = gpu_setup(args, "gpu_augment.py")
    work = args.workdir or tempfile.mkdtemp(prefix="gpu-bench-")

    start = time.perf_counter()
    local = models.resolve_model(args.model)  # builds and saves a built-in model once
    result["build_seconds"] = round(time.perf_counter() - start, 1)
    print(f"model {args.model} ready in {result['build_seconds']}s on {result['device']}", flush=True)

    real = os.path.join(work, "real")
    write_real(real, args.num_real, args.size)
    with open(os.path.join(local, "text_encoder", "config.json")) as f:
        hidden = json.load(f)["hidden_size"]  # the token embeddings' width
    emb = os.path.join(work, "tokens.safetensors")
    save_file({"<cat>": torch.randn(hidden) * 0.01, "<dog>": torch.randn(hidden) * 0.01}, emb)
    cfg = AugmentConfig(
        real=real, output=os.path.join(work, "synthetic"), embeddings=emb, model=args.model,
        num_augmentations=args.m, num_inference_steps=args.steps, resolution=args.resolution,
        batch_size=args.batch_size, max_images_per_call=args.max_images_per_call, num_gpus=1,
    )
    classes = schema.read_class_table(real)
    n_images = args.num_real * args.m

    # (a) the actor's __call__
    start = time.perf_counter()
    actor = DiffusionAugmenter(cfg, classes)
    result["actor_load_seconds"] = round(time.perf_counter() - start, 1)
    print(f"actor loaded in {result['actor_load_seconds']}s, dtype {actor.pipe.unet.dtype}", flush=True)

    table = storage.read_parquet(storage.join(real, "train")).sort_by("id")
    actor.data_dir = os.path.join(work, "warmup")  # one warm-up batch into a throwaway output
    actor(table.slice(0, 1))
    sync()

    def run_a(i: int) -> float:
        actor.data_dir = os.path.join(work, f"synthetic-{i}")  # a fresh output: nothing is skipped
        start, written = time.perf_counter(), 0
        for b in range(0, table.num_rows, args.batch_size):
            written += actor(table.slice(b, args.batch_size)).column("rows")[0].as_py()
        sync()
        seconds = time.perf_counter() - start
        assert written == n_images, (written, n_images)
        print(f"(a) actor __call__: {n_images} images in {seconds:.1f}s = {n_images / seconds:.2f} images/s", flush=True)
        return seconds

    def run_b() -> float:  # loads its own pipeline (not counted); kernels are warm from the actor
        count, seconds = diffusers_loop(cfg, classes, threads=torch.get_num_threads())
        sync()
        assert count == n_images, (count, n_images)
        print(f"(b) diffusers loop: {count} images in {seconds:.1f}s = {count / seconds:.2f} images/s", flush=True)
        return seconds

    times: dict[str, list[float]] = {"a": [], "b": []}
    for i, side in enumerate(args.order):
        times[side].append(run_a(i) if side == "a" else run_b())
    seconds_a, seconds_b = (sum(times[k]) / len(times[k]) for k in "ab")
    pipe = actor.pipe
    actor = None  # drop the actor; its pipeline lives on as `pipe`
    result.update(images=n_images, order=args.order, actor_seconds=[round(t, 2) for t in times["a"]],
                  loop_seconds=[round(t, 2) for t in times["b"]],
                  actor_images_per_s=round(n_images / seconds_a, 3), loop_images_per_s=round(n_images / seconds_b, 3),
                  ratio=round(seconds_b / seconds_a, 3))
    print(f"ratio (a)/(b) images/s, mean seconds over order {args.order}: {result['ratio']}", flush=True)

    # (c) images per call at t0 = 0.5, (d) t0 cost
    from PIL import Image

    image = Image.new("RGB", (args.resolution, args.resolution), (120, 80, 40))

    def call(n: int, strength: float) -> float:
        sync()
        t = time.perf_counter()
        pipe(prompt=["a photo of a <cat>"] * n, image=[image] * n, strength=strength, guidance_scale=7.5,
             num_inference_steps=args.steps, generator=[torch.Generator("cpu").manual_seed(i) for i in range(n)])
        sync()
        return time.perf_counter() - t

    call(2, 0.5)
    result["sweep"] = {}
    for n in (int(x) for x in args.sweep.split(",")):
        seconds = call(n, 0.5)
        result["sweep"][n] = {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 3)}
        print(f"(c) {n:3d} images per call, t0=0.5: {seconds:6.2f}s = {n / seconds:.2f} images/s", flush=True)
    n = args.max_images_per_call
    s1, s4 = call(n, 1.0), call(n, 0.25)
    result["t0_cost"] = {"images": n, "t0_1.0_seconds": round(s1, 2), "t0_0.25_seconds": round(s4, 2),
                         "ratio": round(s4 / s1, 3)}
    print(f"(d) {n} images: t0=1.0 {s1:.2f}s, t0=0.25 {s4:.2f}s, ratio {s4 / s1:.3f}", flush=True)
    gpu_finish(result, cuda, args.out)


if __name__ == "__main__":
    main()
