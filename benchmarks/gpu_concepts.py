"""GPU cost of the per-class concept stages: textual inversion and ESD erasure, without Ray.

Calls the functions each Ray task runs for one class (`inversion._invert_classes` with a one-class
list, `erasure._erase_class`) in this process on one CUDA GPU with the `sd15-shape` model (SD 1.5's
shapes, random weights: the same work per step as the real model) at 512 px, and reports seconds
per step / iteration. A short warm-up run of each (2 steps / iterations) goes first and is not
reported; each run writes its class file under its own output folder in the workdir.

What a figure covers: each record's `seconds` (divided by the steps / iterations for the per-step
figure), which the training functions time themselves. Reading the class's images, model build
and load, the model fingerprint and writing the class file are outside it. Inside it, besides the
loop, are a few one-off set-up and wrap-up costs: for inversion (`learn_tokens`) adding the token,
freezing and copying the embedding matrix, and the fp32 VAE encoding of the class's 4 images and
their mirrors; for erasure (`erase_concept`) the frozen copy of the UNet, the two prompt
encodings, and copying the trained tensors to the CPU at the end (`full`: the whole UNet). These
are small next to 40 steps / 10 iterations at 512 px but not subtracted, so the per-step figure
is a slight overestimate, smaller the more steps are run. Per-class cost at the paper's settings
is steps x seconds per step.

    python benchmarks/gpu_concepts.py --invert-steps 40 --erase-iterations 10 --out result.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from augment_overhead import write_real  # noqa: E402
from gpu_augment import gpu_finish, gpu_setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-shape")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--invert-steps", type=int, default=40)
    parser.add_argument("--erase-iterations", type=int, default=10)
    parser.add_argument("--methods", default="xattn,full", help="erasure methods to time")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from ray_dafusion import models, schema
    from ray_dafusion.config import EraseConfig, InvertConfig
    from ray_dafusion.erasure import _erase_class
    from ray_dafusion.inversion import _invert_classes

    def invert_one(cfg, info) -> dict:  # one class in its own task, as invert runs it with classes_per_task 1
        (record,) = _invert_classes(cfg, [info])
        return record

    cuda, _, result = gpu_setup(args, "gpu_concepts.py")
    work = args.workdir or tempfile.mkdtemp(prefix="gpu-concepts-")
    models.resolve_model(args.model)
    real = os.path.join(work, "real")
    write_real(real, 8, 256)  # 2 classes x 4 shots
    info = schema.read_class_table(real)[0]
    gpus = 1 if cuda else 0

    def timed(label: str, fn, cfg, n: int, unit: str) -> None:
        fn(cfg.replace(**{unit: 2}, output=os.path.join(work, f"warm-{label}")), info)  # warm-up
        record = fn(cfg.replace(**{unit: n}, output=os.path.join(work, label)), info)
        per = record["seconds"] / n
        result[label] = {unit: n, "seconds": record["seconds"], "seconds_per_" + unit.rstrip("s"): round(per, 4),
                         "seconds_for_1000": round(per * 1000, 1), "device": record["device"]}
        print(f"{label}: {n} {unit} in {record['seconds']:.1f}s = {per:.3f}s each; 1000 would take "
              f"{per * 1000 / 60:.1f} min", flush=True)

    invert_cfg = InvertConfig(real=real, output=work, model=args.model, resolution=args.resolution, num_gpus=gpus)
    timed("invert", invert_one, invert_cfg, args.invert_steps, "steps")
    for method in args.methods.split(","):
        erase_cfg = EraseConfig(real=real, output=work, model=args.model, method=method,
                                resolution=args.resolution, num_gpus=gpus)
        timed(f"erase_{method}", _erase_class, erase_cfg, args.erase_iterations, "iterations")
    gpu_finish(result, cuda, args.out)


if __name__ == "__main__":
    main()
