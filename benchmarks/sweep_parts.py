"""The sweep's per-trial parts, each measured with and without its speed-up (docs/benchmarks.md).

On the digits sweep's own settings (the `digits` model, 32 px, 1 shot of seed 0 from the
experiment half, jobs/configs/sweep_digits.yaml), in one local Ray session of 2 CPUs:

- ``invert``: textual inversion of the 10 classes (100 steps, batch 4) as ten tasks of 0.5 CPU
  (`classes_per_task: 1`) and as one task of 1 CPU (`classes_per_task: 10`): wall seconds and the
  machine's busy core-seconds (/proc/stat), each after a warm-up job so that worker start-up and
  imports are not counted; and the largest difference between the two runs' tokens.
- ``transform``: the train transform (rotation 10, white fill) of 32 px digits, per image
  (`TrainTransform.__call__`) vs per batch of 32 (`TrainTransform.many`): ms per image, one thread.
- ``step``: one Adam step of `small_cnn` on a batch of 32 at 32 px, contiguous vs channels_last:
  ms per step, one thread.

    .venv/bin/python benchmarks/sweep_parts.py            # all three
    .venv/bin/python benchmarks/sweep_parts.py step transform
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def busy_core_seconds() -> float:
    """Core-seconds this machine has spent busy since boot (all of /proc/stat's non-idle time)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def sweep_cell(workdir: str):
    """The sweep config and the 1-shot, seed-0 cell's real data under `workdir`."""
    from ray_dafusion import sweep as sw
    from ray_dafusion.config import SweepConfig
    from ray_dafusion.ingest import ingest

    cfg = SweepConfig.from_yaml(os.path.join(os.path.dirname(HERE), "jobs", "configs", "sweep_digits.yaml"))
    cfg = cfg.replace(workdir=workdir)
    cfg = cfg.replace(source=sw._write_digits(cfg))
    ingest(dataclasses.replace(cfg.ingest, source=cfg.source, output=os.path.join(workdir, "real", "pool"),
                               examples_per_class=None))
    stages = sw._stage_configs(cfg, sw.Trial("da_fusion", 1, 0))
    ingest(stages["real"])
    return stages


def bench_invert(workdir: str) -> list[str]:
    from ray_dafusion import weights
    from ray_dafusion.inversion import invert

    base = sweep_cell(workdir)["invert"]
    shapes = {"10 tasks x 0.5 CPU (classes_per_task 1)": dict(classes_per_task=1, num_cpus=0.5),
              "1 task x 1 CPU (classes_per_task 10)": dict(classes_per_task=10, num_cpus=1.0)}
    rows, tokens = [], {}
    for name, shape in shapes.items():
        invert(base.replace(output=os.path.join(workdir, "warm", str(shape["classes_per_task"])), steps=2, **shape))
        out = os.path.join(workdir, "tokens", str(shape["classes_per_task"]))
        busy, start = busy_core_seconds(), time.perf_counter()
        invert(base.replace(output=out, **shape))
        wall, cores = time.perf_counter() - start, busy_core_seconds() - busy
        tokens[name] = weights.load_embeddings(out)[0]
        rows.append(f"| invert, 10 classes x {base.steps} steps | {name} | {wall:.1f} s wall, {cores:.1f} busy core-s |")
    a, b = tokens.values()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(t.abs().max()) for t in a.values())
    rows.append(f"| invert | largest token difference between the two | {diff:.2e} (token values up to {scale:.2f}) |")
    return rows


def bench_transform() -> list[str]:
    import numpy as np
    import torch

    from ray_dafusion.classifier import make_transform

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)) for _ in range(32)]
    tf = make_transform(32, True, rotation=10, hflip=False, fill=255)

    def per_image() -> None:
        torch.stack([tf(im, torch.Generator().manual_seed(i)) for i, im in enumerate(images)])

    def per_batch() -> None:
        tf.many(images, [torch.Generator().manual_seed(i) for i in range(len(images))])

    rows = []
    for name, fn in (("per image (`__call__`)", per_image), ("per batch of 32 (`many`)", per_batch)):
        fn()
        start, reps = time.perf_counter(), 50
        for _ in range(reps):
            fn()
        ms = (time.perf_counter() - start) / (reps * len(images)) * 1e3
        rows.append(f"| train transform, 32 px, rotation 10 | {name} | {ms:.3f} ms per image |")
    return rows


def bench_step() -> list[str]:
    import torch
    import torch.nn.functional as F

    from ray_dafusion.classifier import small_cnn

    torch.set_num_threads(1)
    rows = []
    for layout in (torch.contiguous_format, torch.channels_last):
        times = []
        for _ in range(3):
            torch.manual_seed(0)
            model = small_cnn(10).to(memory_format=layout)
            optimizer = torch.optim.Adam(model.parameters(), 1e-3)
            x = torch.randn(32, 3, 32, 32).contiguous(memory_format=layout)
            y = torch.randint(0, 10, (32,))
            for i in range(70):
                if i == 10:
                    start = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            times.append((time.perf_counter() - start) / 60 * 1e3)
        name = "channels_last" if layout == torch.channels_last else "contiguous"
        rows.append(f"| small_cnn Adam step, batch 32, 32 px | {name} | "
                    f"{min(times):.1f} ms (3 repeats: {', '.join(f'{t:.1f}' for t in times)}) |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help="invert, transform, step (default: all three)")
    args = parser.parse_args(argv)
    args.parts = args.parts or ["invert", "transform", "step"]
    unknown = sorted(set(args.parts) - {"invert", "transform", "step"})
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from invert, transform, step")
    rows = ["| part | how | measured |", "|---|---|---|"]
    if "step" in args.parts:
        rows += bench_step()
    if "transform" in args.parts:
        rows += bench_transform()
    if "invert" in args.parts:
        import ray

        workdir = tempfile.mkdtemp(prefix="sweep-parts-")
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            rows += bench_invert(workdir)
        finally:
            ray.shutdown()
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
