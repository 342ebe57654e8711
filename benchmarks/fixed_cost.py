"""Fixed cost per job: what a stage costs beyond its work, broken down, in one Ray session.

A small augment job (tiny model, 32 px, 4 steps: the work is a fraction of a second) is run
several times in one local Ray session, with `compute: actors` (a fresh actor pool per job, each
actor loading the model) and `compute: tasks` (Ray tasks whose worker processes keep the model
loaded for the next job). Each job's wall time is split by timing the driver's phases:

- checks: `_check_inputs` (required fields, t0 levels) and `_prepare_conditioning` (model, token
  and erasure fingerprints, checked against the model);
- generate: the Ray Data job (planning, actor or task start, model load, the work itself);
  `work` is the time spent inside the generation calls (the batches' own seconds);
- verify: reading back every (source_id, aug_index); manifest: writing it;
- other: the wall time no phase above holds: the class table, the prompt check, the output check,
  listing the real ids and what is already committed, the stage's lease.

Then a training run (small_cnn, 16 px, 8 real rows, batch 4, `iterations_per_epoch` 3: two whole
passes over the 8 rows, so 4 optimiser steps; the script prints the count) with `num_workers: 1`
(a Ray Train worker group) and `num_workers: 0` (in the calling process).

    .venv/bin/python benchmarks/fixed_cost.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(module, names: list[str], into: dict[str, float]) -> None:
    """Wrap module functions so that their seconds add up in `into` under their name."""
    for name in names:
        fn = getattr(module, name)

        def wrapper(*args, __fn=fn, __name=name, **kwargs):
            start = time.perf_counter()
            try:
                return __fn(*args, **kwargs)
            finally:
                into[__name] += time.perf_counter() - start

        setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="jobs per compute kind")
    args = parser.parse_args()

    sys.path.insert(0, HERE)
    import ray
    from augment_overhead import write_real
    from growth import _tokens

    from ray_dafusion import augment as augment_module
    from ray_dafusion import storage
    from ray_dafusion.config import AugmentConfig, TrainConfig
    from ray_dafusion.models import resolve_model
    from ray_dafusion.train import train

    work = tempfile.mkdtemp(prefix="fixed-cost-")
    real = os.path.join(work, "real")
    write_real(real, 8, 32)
    shutil.copytree(os.path.join(real, "train"), os.path.join(real, "val"))  # training validates on it
    resolve_model("tiny")
    emb = _tokens(work)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init: {time.perf_counter() - start:.1f}s")
    ray.data.DataContext.get_current().enable_progress_bars = False

    phases: dict[str, float] = defaultdict(float)
    timed(augment_module, ["_check_inputs", "_prepare_conditioning", "_generate", "_verify", "_write_manifest"], phases)
    rows = []
    for compute in ("actors", "tasks"):
        for i in range(args.repeats):
            phases.clear()
            cfg = AugmentConfig(real=real, output=os.path.join(work, f"syn-{compute}-{i}"), embeddings=emb, model="tiny",
                                num_augmentations=2, num_inference_steps=4, resolution=32, batch_size=4,
                                min_actors=1, max_actors=1, num_cpus=0.5, compute=compute)
            start = time.perf_counter()
            augment_module.augment(cfg)
            wall = time.perf_counter() - start
            work_s = storage.read_manifest(cfg.output)["timings"]["actor_seconds"]
            checks = phases["_check_inputs"] + phases["_prepare_conditioning"]
            timed_s = checks + phases["_generate"] + phases["_verify"] + phases["_write_manifest"]
            rows.append((f"augment, compute {compute}, job {i + 1}", wall, work_s, checks, phases["_generate"] - work_s,
                         phases["_verify"], phases["_write_manifest"], wall - timed_s))
            print(rows[-1], flush=True)
    print("\n| job | wall s | work s | beyond work s | checks s | Ray Data + start + model load s | verify s | manifest s "
          "| other s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, wall, work_s, checks, gen, verify, manifest, other in rows:
        print(f"| {name} | {wall:.1f} | {work_s:.1f} | {wall - work_s:.1f} | {checks:.2f} | {gen:.1f} | {verify:.2f} | "
              f"{manifest:.2f} | {other:.2f} |")

    print("\n| training run (small_cnn 16 px) | optimiser steps | wall s |\n|---|---|---|")
    for workers in (1, 0, 1, 0):
        cfg = TrainConfig(real=real, output=os.path.join(work, f"train-{workers}-{time.time_ns()}"), method="baseline",
                          arch="small_cnn", image_size=16, epochs=1, iterations_per_epoch=3, batch_size=4,
                          num_workers=workers)
        start = time.perf_counter()
        result = train(cfg)
        print(f"| num_workers {workers} | {result.optimizer_steps} | {time.perf_counter() - start:.1f} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
