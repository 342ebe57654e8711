"""GPU generation through the real Ray job: `augment(cfg)` on local Ray, one actor with num_gpus=1.

`sd15-shape` (Stable Diffusion 1.5's shapes, random weights: nothing is downloaded, the work per
image is the real model's) at 512 px, 50 steps, guidance 7.5, t0 drawn from {0.25, 0.5, 0.75, 1.0},
sources 512 px. Configurations, each a fresh job into its own output under this call's own
folder (`<workdir>/run-<time>/`, so a second call on a warm machine measures again instead of
finding the first call's outputs complete; a stage that still reports reused or skipped work is
an error, never a figure):

* eager: the settings before the GPU work (8 rows per actor call, <= 16 images per pipeline call,
  no channels_last, PNG encoding inline), on a fixed subset of the rows (`--eager-rows`);
* fast: 32 images per call, channels_last, PNG/parquet work on a background thread;
* compiled: fast + fused QKV projections + torch.compile of the UNet and VAE (in place), every
  call padded to 32 images (static shapes: one graph per module).

Per configuration: the job's wall time; steady-state images/s over every batch after the first
(the first holds the warm-up and any compiling); model TFLOP/s of those batches from the
committed rows' strengths on two bases (UNet forward at 512 px with attention matmuls 803 GFLOP,
without 677; x2 for guidance; int(steps x t0) + 1 UNet calls per image with PNDM; 3.6 TFLOP of VAE
encode + decode per image) as % of 989 TFLOP/s (the H100's dense bf16/fp16 peak) and of a
measured bf16 GEMM ceiling (useful work only: the padded images of `pad_calls` are not counted);
compile seconds (first batch minus its rows at the steady rate); the
actor's peak GPU memory; the largest pixel difference against eager on the rows both generated.

Then, if `--stages`: train (Ray Train, ResNet-50 at 224 px, use_gpu, the alpha-mixed real+synthetic
union in the workers' row cache as the stage does for a union this small, batches decoded in Ray
tasks, `decode_processes`; the streamed path's rate is train_overhead.py's), evaluate and score on the GPU, one line each, on the synthetic rows of fast (else
compiled, else eager) and the real set that synthetic set was made from (its manifest's `real`).
With `--configs ""` they use the synthetic sets of the latest call that made any
(`<workdir>/latest.json`); the real sets (`<workdir>/real-n<rows>-s<size>`, one per
`--num-real`/`--size`) are inputs, not measured, and are reused.

    python3 benchmarks/gpu_ray_job.py --out $OUT/gpu_ray_job.json          # the measurement, ~5 min
    python3 benchmarks/gpu_ray_job.py --num-real 4 --m 2 --steps 4 --resolution 256 --size 256 \\
        --configs eager,fast --stages                                       # a quick check that it runs

Without a GPU it runs only `--model tiny` (its stages train small_cnn at 32 px), as a check of the
script, e.g. `--model tiny --num-real 4 --eager-rows 2 --m 2 --steps 4 --resolution 64 --size 64`.

Results are written to `--out` after every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16/fp16
UNET_GFLOP = {"with_attention": 803.0, "without_attention": 677.0}  # one SD-1.5 UNet forward, one image, 512 px
VAE_GFLOP = 3600.0  # encode + decode of one 512 px image

CONFIGS = {
    "eager": dict(batch_size=8, max_images_per_call=16, channels_last=False, compile=False, io_threads=0),
    "fast": dict(batch_size=12, max_images_per_call=32, channels_last=True, compile=False, io_threads=1),
    # every call padded to 32 images: static shapes, one graph per module (dynamic shapes were still
    # compiling after ~3 min on the H200, 2026-11-26)
    "compiled": dict(batch_size=12, max_images_per_call=32, channels_last=True, compile=True, pad_calls=True,
                     fuse_qkv=True, io_threads=1),
}


def gemm_ceiling(n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of an n x n x n bf16 matrix product (3 warm-ups, mean of `repeats` timed)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def write_tokens(model_dir: str, path: str) -> str:
    """Small seeded embeddings for the two classes' tokens (<cat>, <dog>), as the invert stage
    writes them, at the width of the model's text encoder; returns `path`."""
    import torch
    from safetensors.torch import save_file

    with open(os.path.join(model_dir, "text_encoder", "config.json")) as f:
        hidden = json.load(f)["hidden_size"]
    g = torch.Generator().manual_seed(0)
    save_file({"<cat>": torch.randn(hidden, generator=g) * 0.01, "<dog>": torch.randn(hidden, generator=g) * 0.01}, path)
    return path


def image_gflop(strength: float, steps: int, unet_gflop: float) -> float:
    """Model GFLOP of one img2img image: guided UNet calls plus the VAE."""
    from ray_dafusion.augment import denoising_steps

    return 2 * (denoising_steps(steps, strength) + 1) * unet_gflop + VAE_GFLOP


def make_real(work: str, num_real: int, size: int, holdout_per_class: int = 8) -> str:
    """A two-class ingest output: `num_real` train rows plus val and test, smooth random `size` px
    images written as an image folder and read by the ingest stage (so every later stage accepts it).
    One folder and one output per (num_real, size): a call with other arguments makes its own
    instead of finding another config's output; the same arguments reuse it (an input, not measured)."""
    from PIL import Image

    from ray_dafusion.config import IngestConfig
    from ray_dafusion.ingest import ingest

    key = f"n{num_real}-s{size}"
    folder, out = os.path.join(work, f"folder-{key}"), os.path.join(work, f"real-{key}")
    rng = np.random.default_rng(0)
    per_class = num_real // 2 + 2 * holdout_per_class
    for name in ("cat", "dog"):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(per_class):
            coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(os.path.join(folder, name, f"{i:04d}.png"))
    ingest(IngestConfig(source=folder, output=out, examples_per_class=num_real // 2,
                        val_per_class=holdout_per_class, test_per_class=holdout_per_class))
    return out


def subset_real(real: str, out: str, rows: int) -> str:
    """The first `rows` train rows of `real` (same ids and images) with its val and test splits, as
    another ingest output: complete, so that the stages can also train and evaluate on it."""
    from ray_dafusion import storage

    table = storage.read_parquet(storage.join(real, "train")).sort_by("id").slice(0, rows)
    storage.write_parquet(table, storage.join(out, "train", "part-00000.parquet"))
    for split in ("val", "test"):
        storage.write_parquet(storage.read_parquet(storage.join(real, split)),
                              storage.join(out, split, "part-00000.parquet"))
    manifest = storage.read_manifest(real)
    manifest["config_fingerprint"] = storage.fingerprint({"first_train_rows": rows, "of": manifest["config_fingerprint"]})
    counts = manifest["counts"]
    counts["splits"]["train"] = table.num_rows
    labels = table.column("class_name").to_pylist()
    counts["per_class"]["train"] = {name: labels.count(name) for name in counts["per_class"]["train"]}
    shots = set(counts["per_class"]["train"].values())  # evaluate names the shots from it; None: it counts them
    manifest["config"]["examples_per_class"] = shots.pop() if len(shots) == 1 else None
    storage.write_manifest(out, manifest)
    return out


class StaleResult(RuntimeError):
    """A stage reported reused or skipped work: its seconds would not be a measurement."""


def run_config(name: str, settings: dict, real: str, emb: str, work: str, args: argparse.Namespace) -> dict:
    """One augment job; its figures from the manifest and the committed rows."""
    from ray_dafusion import storage
    from ray_dafusion.augment import augment
    from ray_dafusion.config import AugmentConfig

    cfg = AugmentConfig(
        real=real, output=os.path.join(work, name), embeddings=emb, model=args.model,
        num_augmentations=args.m, num_inference_steps=args.steps, resolution=args.resolution, guidance_scale=7.5,
        strengths=[0.25, 0.5, 0.75, 1.0], num_gpus=int(args.gpu), num_cpus=1, max_actors=1, **settings,
    )
    start = time.perf_counter()
    result = augment(cfg)
    wall = time.perf_counter() - start
    if result.already_complete or result.skipped_as_done or not result.generated:
        raise StaleResult(f"{cfg.output}: augment generated {result.generated} of {result.synthetic_rows} images "
                          f"({result.skipped_as_done} found done, already complete: {result.already_complete}); "
                          "its figures would not be measured")
    manifest = storage.read_manifest(cfg.output)
    batches = manifest["timings"]["batches"]
    strengths = {}
    for b in batches:
        t = storage.read_parquet(storage.join(cfg.output, "data", b["file"]), columns=["strength"])
        strengths[b["file"]] = t.column("strength").to_pylist()
    steady = batches[1:] or batches
    steady_rows = sum(b["rows"] for b in steady)
    steady_s = sum(b["seconds"] for b in steady)
    rate = steady_rows / steady_s
    out = {
        "settings": settings, "images": result.generated, "batches": len(batches), "job_wall_s": round(wall, 1),
        "job_images_per_s": round(result.generated / wall, 3), "steady_images_per_s": round(rate, 3),
        "steady_images": steady_rows, "steady_s": round(steady_s, 2),
        "first_batch_s": batches[0]["seconds"],
        "compile_or_warmup_s": round(batches[0]["seconds"] - batches[0]["rows"] / rate, 1),
        "max_gpu_gib": round(manifest["timings"]["max_gpu_bytes"] / 2**30, 2),
    }
    if args.resolution == 512:
        for basis, unet in UNET_GFLOP.items():
            gflop = sum(image_gflop(s, args.steps, unet) for b in steady for s in strengths[b["file"]])
            tflops = gflop / 1e3 / steady_s
            out[f"tflops_{basis}"] = round(tflops, 1)
            out[f"pct_of_989_{basis}"] = round(100 * tflops / PEAK_TFLOPS, 1)
            if args.ceiling:
                out[f"pct_of_ceiling_{basis}"] = round(100 * tflops / args.ceiling, 1)
    print(f"{name}: {out}", flush=True)
    return out


def pixel_difference(work: str, a: str, b: str) -> dict:
    """Largest and mean absolute uint8 difference between the images two runs both generated."""
    from PIL import Image

    from ray_dafusion import storage

    def images(name: str) -> dict:
        t = storage.read_parquet(storage.join(work, name, "data"), columns=["id", "image"])
        return {i: cell["bytes"] for i, cell in zip(t.column("id").to_pylist(), t.column("image").to_pylist())}

    ia, ib = images(a), images(b)
    common = sorted(set(ia) & set(ib))
    diffs = [np.abs(np.asarray(Image.open(io.BytesIO(ia[k])), dtype=int) - np.asarray(Image.open(io.BytesIO(ib[k])),
                                                                                      dtype=int)) for k in common]
    return {"images": len(common), "max": int(max(d.max() for d in diffs)) if diffs else None,
            "mean": round(float(np.mean([d.mean() for d in diffs])), 3) if diffs else None}


def stages(real: str, synthetic: str, run_dir: str, args: argparse.Namespace) -> dict:
    """Train (row cache, batches decoded in Ray tasks), evaluate and score on the GPU, one line each, into `run_dir`."""
    import shutil

    from ray_dafusion.config import EvaluateConfig, ScoreConfig, TrainConfig
    from ray_dafusion.evaluate import evaluate
    from ray_dafusion.score import score
    from ray_dafusion.train import train

    out = {"real": real, "synthetic": synthetic}
    start = time.perf_counter()
    arch, size = ("resnet50", 224) if args.gpu else ("small_cnn", 32)  # on a CPU, a check of the script
    tcfg = TrainConfig(real=real, synthetic=synthetic, output=os.path.join(run_dir, "train"), method="da_fusion",
                       arch=arch, image_size=size, batch_size=32, epochs=2, iterations_per_epoch=args.train_steps,
                       num_workers=1, use_gpu=args.gpu, cpus_per_worker=4 if args.gpu else 0.5, backbone="finetune",
                       decode_processes=4 if args.gpu else 1)
    tr = train(tcfg)
    if tr.optimizer_steps == 0 or not tr.metrics:
        raise StaleResult(f"{tr.output}: train took no optimiser step; its samples/s would not be measured")
    out["train"] = {"seconds": round(time.perf_counter() - start, 1), "cache_mb": tcfg.cache_mb, "result": _plain(tr),
                    "samples_per_s_by_epoch": [m.get("samples_per_s") for m in tr.metrics]}
    print(f"train on GPU (row cache, decode_processes {tcfg.decode_processes}): {out['train']}", flush=True)
    start = time.perf_counter()
    ev = evaluate(EvaluateConfig(real=real, runs=[tr.output], output=os.path.join(run_dir, "eval"),
                                 num_gpus=int(args.gpu), num_cpus=1))
    if not ev.seconds:
        raise StaleResult(f"{ev.output}: evaluate reported an earlier output as complete")
    out["evaluate"] = {"seconds": round(time.perf_counter() - start, 1), "result": _plain(ev)}
    print(f"evaluate on GPU: {out['evaluate']}", flush=True)
    # scores live beside the images: an earlier call's scores of this synthetic set would be found
    # complete (source_distance does not depend on the run), so they go before this call scores
    shutil.rmtree(os.path.join(synthetic, "scores"), ignore_errors=True)
    start = time.perf_counter()
    sc = score(ScoreConfig(synthetic=synthetic, run=tr.output, num_gpus=int(args.gpu), num_cpus=1))
    if sc.skipped or not sc.scored:
        raise StaleResult(f"{synthetic}: score skipped {sc.skipped or 'every scorer'}; its seconds would not be measured")
    out["score"] = {"seconds": round(time.perf_counter() - start, 1), "scored": sc.scored, "result": _plain(sc)}
    print(f"score on GPU: {out['score']}", flush=True)
    return out


def _plain(result) -> dict:
    """A result dataclass as JSON-able scalars."""
    fields = getattr(result, "__dict__", {})
    keep = {k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for k, v in fields.items():  # short lists of small records (evaluate's runs: their accuracies)
        if isinstance(v, list) and len(v) <= 8 and all(isinstance(x, dict) for x in v):
            keep[k] = [{kk: vv for kk, vv in x.items() if isinstance(vv, (int, float, str, bool))} for x in v]
    return keep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-shape")
    parser.add_argument("--num-real", type=int, default=24, help="real rows for fast and compiled")
    parser.add_argument("--eager-rows", type=int, default=16, help="the first rows, which eager also generates")
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--size", type=int, default=512, help="side of the real images")
    parser.add_argument("--configs", default="eager,fast,compiled", help="empty: none (with --stages and the "
                        "--workdir of an earlier call: the stages alone, on that call's synthetic sets)")
    parser.add_argument("--stages", action="store_true", help="then train, evaluate and score on the GPU")
    parser.add_argument("--train-steps", type=int, default=20, help="optimiser steps per training epoch")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray
    import torch

    from ray_dafusion import models

    args.gpu = torch.cuda.is_available()
    if not args.gpu and args.model != "tiny":
        raise SystemExit("gpu_ray_job.py needs a CUDA GPU (on CPU it runs only --model tiny, as a check of the script)")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="gpu-ray-job-"))
    # every measured output of this call goes here: nothing an earlier call left can pass for a figure
    run_dir = os.path.join(work, f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.makedirs(run_dir)
    names = [c for c in args.configs.split(",") if c]
    record: dict = {"device": torch.cuda.get_device_name(0) if args.gpu else "cpu", "torch": torch.__version__,
                    "args": vars(args), "run_dir": run_dir}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=2)

    args.ceiling = record["gemm_bf16_tflops"] = round(gemm_ceiling(), 1) if args.gpu else None
    print(f"{record['device']}: bf16 GEMM 8192^3 {args.ceiling} TFLOP/s", flush=True)
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=True)
    start = time.perf_counter()
    local = models.resolve_model(args.model)  # builds and saves a built-in model once
    record["model_build_s"] = round(time.perf_counter() - start, 1)
    if names:
        real = make_real(work, args.num_real, args.size)
        eager_real = subset_real(real, f"{real}-first{min(args.eager_rows, args.num_real)}",
                                 min(args.eager_rows, args.num_real))
        emb = write_tokens(local, os.path.join(work, "tokens.safetensors"))
    save()

    record["configs"] = {}
    made: dict[str, str] = {}  # configuration -> its synthetic set, made by this call
    for name in names:
        try:
            record["configs"][name] = run_config(name, CONFIGS[name], eager_real if name == "eager" else real,
                                                 emb, run_dir, args)
            made[name] = os.path.join(run_dir, name)
            if name != "eager" and "eager" in made:
                record["configs"][name]["vs_eager_pixels"] = pixel_difference(run_dir, name, "eager")
                record["configs"][name]["speedup_vs_eager"] = round(
                    record["configs"][name]["steady_images_per_s"] / record["configs"]["eager"]["steady_images_per_s"], 3)
        except Exception as exc:  # one configuration failing must not lose the others' figures
            traceback.print_exc()
            record["configs"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        save()
    latest = os.path.join(work, "latest.json")  # where a later --configs "" call finds synthetic sets
    if made:
        with open(latest, "w") as f:
            json.dump({"run_dir": run_dir, "synthetic": made, "args": record["args"]}, f, indent=2)
    if args.stages:
        try:
            record["stages"] = stages(*_stage_inputs(made, latest), run_dir, args)
        except Exception as exc:
            traceback.print_exc()
            record["stages"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        save()
    print(json.dumps(record, indent=2), flush=True)
    failed = [n for n, r in record["configs"].items() if "error" in r]
    failed += ["stages"] if "error" in record.get("stages", {}) else []
    if failed:  # the figures of the others are kept above; the exit code says that not everything ran
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _stage_inputs(made: dict[str, str], latest: str) -> tuple[str, str]:
    """(real, synthetic) for the stages: fast's synthetic set, else compiled's, else eager's, from this
    call or else from the latest call that made any; the real set is the one it was made from."""
    from ray_dafusion import storage

    if not made and os.path.exists(latest):
        with open(latest) as f:
            made = json.load(f)["synthetic"]
    synthetic = next((made[n] for n in ("fast", "compiled", "eager") if n in made), None)
    if synthetic is None:
        raise FileNotFoundError(f"no synthetic set: this call made none and {latest} names none; "
                                "run with --configs fast (or gpu_run.sh generate) first")
    manifest = storage.read_manifest(synthetic)
    if manifest is None:
        raise FileNotFoundError(f"{synthetic} holds no complete augment output")
    return manifest["real"], synthetic


if __name__ == "__main__":
    sys.exit(main())
