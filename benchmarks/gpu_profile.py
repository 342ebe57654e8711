"""Where one augment actor call spends its time on a GPU: UNet, VAE encoder, VAE decoder, the rest.

The GPU generation figure (3.68 images/s on an H200, docs/benchmarks.md) is about half of the
target, and a throughput figure alone does not say why. This runs `DiffusionAugmenter.__call__`
(the Ray job's actor, without Ray) with the `fast` settings of gpu_ray_job.py on the `sd15-shape`
model at 512 px, 50 steps, the paper's t0 mix, and reports for one call after a warm-up call:

* wall seconds and images/s;
* seconds spanned by the UNet's, the VAE encoder's and the VAE decoder's forwards (CUDA events
  recorded on the stream before and after each, summed; a span includes any wait for the CPU to
  launch the module's kernels), their shares of the wall time, and the rest (the pipeline's
  Python, the scheduler, resizing, PNG and parquet work that does not overlap, and idle GPU);
* model TFLOP/s over the UNet's spans (803 GFLOP per image forward at 512 px) against the
  measured bf16 GEMM ceiling;
* with `--trace`, one more call under torch.profiler: the GPU's kernel seconds as a share of that
  call's wall (below the spans' share: the GPU waited for the CPU inside the modules) and the 15
  costliest kernels.

    python3 benchmarks/gpu_profile.py --out $OUT/gpu_profile.json            # ~2 min on an H100/H200
    python3 benchmarks/gpu_profile.py --model tiny --num-real 2 --m 2 --steps 4 --resolution 64 --size 64
                                                                            # a check that it runs (CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from augment_overhead import write_real  # noqa: E402
from gpu_augment import gpu_finish, gpu_setup  # noqa: E402
from gpu_ray_job import CONFIGS, UNET_GFLOP, gemm_ceiling, write_tokens  # noqa: E402


class ModuleTimer:
    """Seconds spent in each named module's forward: CUDA events on a GPU (read after a
    synchronize), the wall clock on a CPU. A module called inside another is counted in both."""

    def __init__(self, modules: dict, cuda: bool) -> None:
        self.cuda, self.spans = cuda, {name: [] for name in modules}
        self.calls = {name: 0 for name in modules}
        self.rows = {name: 0 for name in modules}  # first-argument rows: images through the module
        self._open: dict = {}
        for name, module in modules.items():
            module.register_forward_pre_hook(self._start(name))
            module.register_forward_hook(self._stop(name))

    def _mark(self):
        import torch

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, name):
        def hook(module, args):
            if args and hasattr(args[0], "shape"):
                self.rows[name] += int(args[0].shape[0])
            self._open[name] = self._mark()
        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self.spans[name].append((self._open.pop(name), self._mark()))
            self.calls[name] += 1
        return hook

    def reset(self) -> None:
        self.spans = {name: [] for name in self.spans}
        self.calls = {name: 0 for name in self.calls}
        self.rows = {name: 0 for name in self.rows}

    def seconds(self) -> dict:
        if self.cuda:
            return {n: sum(a.elapsed_time(b) for a, b in s) / 1e3 for n, s in self.spans.items()}
        return {n: sum(b - a for a, b in s) for n, s in self.spans.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-shape")
    parser.add_argument("--num-real", type=int, default=12, help="rows of the profiled call (the fast config's batch)")
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--size", type=int, default=512, help="side of the real images")
    parser.add_argument("--config", default="fast", choices=sorted(CONFIGS), help="gpu_ray_job.py's settings")
    parser.add_argument("--trace", action="store_true", help="one more call under torch.profiler: top kernels")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()


    from ray_dafusion import models, schema, storage
    from ray_dafusion.augment import DiffusionAugmenter
    from ray_dafusion.config import AugmentConfig

    cuda, sync, result = gpu_setup(args, "gpu_profile.py")
    work = args.workdir or tempfile.mkdtemp(prefix="gpu-profile-")
    local = models.resolve_model(args.model)
    real = os.path.join(work, "real")
    write_real(real, args.num_real, args.size)
    emb = write_tokens(local, os.path.join(work, "tokens.safetensors"))
    settings = {k: v for k, v in CONFIGS[args.config].items()}
    cfg = AugmentConfig(real=real, output=os.path.join(work, "synthetic"), embeddings=emb, model=args.model,
                        num_augmentations=args.m, num_inference_steps=args.steps, resolution=args.resolution,
                        guidance_scale=7.5, strengths=[0.25, 0.5, 0.75, 1.0], num_gpus=int(cuda), **settings)
    actor = DiffusionAugmenter(cfg, schema.read_class_table(real))
    pipe = actor.pipe
    timer = ModuleTimer({"unet": pipe.unet, "vae_encoder": pipe.vae.encoder, "vae_decoder": pipe.vae.decoder}, cuda)
    table = storage.read_parquet(storage.join(real, "train")).sort_by("id")
    if cuda:
        result["gemm_bf16_tflops"] = round(gemm_ceiling(), 1)

    def one_call(tag: str) -> tuple[float, int]:
        actor.data_dir = os.path.join(work, tag)  # a fresh output: nothing is skipped
        sync()
        start = time.perf_counter()
        rows = actor(table).column("rows")[0].as_py()  # returns when its rows are written
        sync()
        return time.perf_counter() - start, rows

    warm, _ = one_call("warmup")
    timer.reset()
    wall, images = one_call("timed")
    parts = timer.seconds()
    result.update({"config": args.config, "settings": settings, "warmup_call_s": round(warm, 2), "wall_s": round(wall, 2),
                   "images": images, "images_per_s": round(images / wall, 3), "calls": dict(timer.calls),
                   "rows": dict(timer.rows),
                   "seconds": {k: round(v, 3) for k, v in parts.items()},
                   "share_of_wall": {k: round(v / wall, 3) for k, v in parts.items()}})
    result["share_of_wall"]["rest"] = round(1 - sum(result["share_of_wall"].values()), 3)
    if args.resolution == 512 and parts["unet"] > 0:
        # an image's forward is 803 GFLOP; the rows include guidance's doubled batch
        unet_images = timer.rows["unet"]
        tflops = unet_images * UNET_GFLOP["with_attention"] / 1e3 / parts["unet"]
        result["unet_image_forwards"] = unet_images
        result["unet_tflops"] = round(tflops, 1)
        if cuda:
            result["unet_pct_of_ceiling"] = round(100 * tflops / result["gemm_bf16_tflops"], 1)
    print(f"one call: {images} images in {wall:.1f} s = {images / wall:.2f} images/s (warm-up call {warm:.1f} s)")
    for name, share in result["share_of_wall"].items():
        print(f"  {name:<12} {share * 100:5.1f}% of the wall" + (f"  ({parts[name]:.2f} s, {timer.calls[name]} calls)"
                                                                if name in parts else ""))
    if "unet_tflops" in result:
        print(f"  UNet: {result['unet_tflops']} TFLOP/s over its own time"
              + (f" = {result['unet_pct_of_ceiling']}% of the measured GEMM ceiling" if cuda else ""))
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            traced_wall, _ = one_call("traced")
        key = "cuda_time_total" if cuda else "cpu_time_total"
        averages = prof.key_averages()
        if cuda:  # kernel time the GPU was busy (self time of every op, so nothing is counted twice)
            busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in averages)
            result["traced_kernel_s"] = round(busy_us / 1e6, 3)
            result["traced_wall_s"] = round(traced_wall, 2)
            result["traced_kernel_share"] = round(busy_us / 1e6 / traced_wall, 3)
            print(f"  kernels: {busy_us / 1e6:.2f} s of GPU time in the traced call's {traced_wall:.1f} s "
                  f"({result['traced_kernel_share'] * 100:.0f}% busy)")
        table_text = averages.table(sort_by=key, row_limit=15, max_name_column_width=60)
        print(table_text)
        result["top_kernels"] = table_text
    gpu_finish(result, cuda, args.out)


if __name__ == "__main__":
    main()
