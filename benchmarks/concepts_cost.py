"""Time per class of textual inversion and ESD erasure, run exactly as the command line runs them.

    python benchmarks/concepts_cost.py --workdir /tmp/concepts-bench --classes 2 --steps 100 \
        --iterations 100 --resolution 64 --num-cpus 1

1. writes scikit-learn's handwritten digits as an image folder and ingests `--classes` classes
   (`--shots` train images each);
2. runs `ray-dafusion invert`, `ray-dafusion erase --method xattn` and `--method full` through
   `ray_dafusion.cli.main` with the printed argv (one Ray task per class, `--num-cpus` each);
3. reads each class's training seconds from the stage manifest (inside the task, model load
   excluded) and times the whole stage (Ray start, model load, writing included). Prints a
   markdown table and writes `<workdir>/concepts_cost.json`.
"""

from __future__ import annotations

import argparse
import os
import time

from ray_dafusion import storage
from ray_dafusion.cli import main as cli
from ray_dafusion.sample_data import DIGIT_NAMES, write_digits


def run(stage: str, argv: list[str]) -> float:
    print(f"$ ray-dafusion {stage} {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    if cli([stage, *argv]) != 0:
        raise SystemExit(f"ray-dafusion {stage} failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/concepts-bench")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100, help="textual inversion steps per class")
    parser.add_argument("--iterations", type=int, default=100, help="ESD iterations per class")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-cpus", type=float, default=1.0)
    parser.add_argument("--num-gpus", type=float, default=0.0)
    args = parser.parse_args()

    w = args.workdir
    write_digits(os.path.join(w, "digits"), per_class=args.shots + 2)
    names = ",".join(DIGIT_NAMES[: args.classes])
    common = ["--model", args.model, "--resolution", str(args.resolution), "--num_cpus", str(args.num_cpus),
              "--num_gpus", str(args.num_gpus), "--overwrite", "true"]
    run("ingest", ["--source", os.path.join(w, "digits"), "--output", os.path.join(w, "real"),
                   "--examples_per_class", str(args.shots), "--val_per_class", "1", "--test_per_class", "1",
                   "--classes", names, "--overwrite", "true"])
    real = os.path.join(w, "real")
    runs = {
        "invert": ("invert", ["--real", real, "--output", os.path.join(w, "tokens"), "--steps", str(args.steps), *common],
                   args.steps),
        "erase xattn": ("erase", ["--real", real, "--output", os.path.join(w, "erase-xattn"), "--method", "xattn",
                                  "--iterations", str(args.iterations), *common], args.iterations),
        "erase full": ("erase", ["--real", real, "--output", os.path.join(w, "erase-full"), "--method", "full",
                                 "--iterations", str(args.iterations), *common], args.iterations),
    }
    results = {}
    for label, (stage, argv, steps) in runs.items():
        output = argv[argv.index("--output") + 1]
        storage.delete(output)  # time a fresh run, not a skip
        wall = run(stage, argv)
        manifest = storage.read_manifest(output)
        per_class = manifest["timings"]["seconds_per_class"]
        results[label] = {"argv": ["ray-dafusion", stage, *argv], "wall_seconds": round(wall, 2),
                          "seconds_per_class": per_class, "steps": steps,
                          "seconds_per_step": round(sum(per_class.values()) / len(per_class) / steps, 4)}

    load = os.getloadavg()
    info = {"cpus": os.cpu_count(), "load_average": [round(v, 1) for v in load], "resolution": args.resolution,
            "model": args.model, "classes": args.classes, "shots": args.shots, "results": results}
    storage.write_json(os.path.join(w, "concepts_cost.json"), info)
    print(f"\n{os.cpu_count()} CPUs, load average {load[0]:.1f}; model {args.model}, {args.resolution} px, "
          f"{args.classes} classes x {args.shots} shots, {args.num_cpus} CPU per task\n")
    print("| stage | steps per class | seconds per class (in task) | seconds per step | stage wall time |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        per = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds_per_class"].items())
        print(f"| {label} | {r['steps']} | {per} | {r['seconds_per_step']:.3f} | {r['wall_seconds']:.1f} |")


if __name__ == "__main__":
    main()
