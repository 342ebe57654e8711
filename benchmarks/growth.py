"""How cost grows with the data: augment, ingest and train at growing sizes, and 2 actors vs 1.

Each measurement runs in a fresh process with its own local Ray (so peak memory is its own), and
prints one JSON line; the parent collects them into a markdown table (docs/benchmarks.md).

- ``augment``: the tiny model at 32 px makes N synthetic images (N / M real images, M = 10) in one
  ``augment(cfg)`` job. Reported: seconds per image, the driver's peak RSS (VmHWM), the largest
  peak RSS of any Ray worker process, bytes spilled from the object store (Ray's memory summary),
  and, read back from the output, rows, unique ids (duplicates) and ids missing against N x M.
- ``ingest``: a generated folder of N small PNGs (16 px, 10 classes) ingested with every image in
  train: seconds, driver and worker peak RSS, the object store's peak use sampled every 0.2 s
  against the decoded size of the images (held once: peak <= ~1x; twice: ~2x).
- ``train``: small_cnn at 32 px streaming alpha-mixed batches (alpha 0.5, 300 steps) whose synthetic
  set is the augment output of a given size: samples/s, to compare 20,000 synthetic rows with 1,000.
- ``actors``: the same augment job (tiny at 64 px, 20 steps) with 1 actor and with 2 actors of
  0.5 CPU each (one torch thread each): images/s and the ratio.

    .venv/bin/python benchmarks/growth.py augment --sizes 100,1000,5000,20000
    .venv/bin/python benchmarks/growth.py ingest --sizes 100000
    .venv/bin/python benchmarks/growth.py train --sizes 1000,20000
    .venv/bin/python benchmarks/growth.py actors --sizes 960
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
M = 10


class PeakSampler:
    """Samples, every `period` s, the peak RSS (VmHWM) of every Ray worker process on this machine
    and optionally the object store's use, until stopped."""

    def __init__(self, period: float = 0.2, object_store: bool = False) -> None:
        self.period, self.object_store = period, object_store
        self.worker_peak: dict[int, int] = {}
        self.store_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                    if not (cmd.startswith(b"ray::") or b"default_worker.py" in cmd):
                        continue
                    peak = _vm_hwm(int(pid))
                except OSError:
                    continue
                self.worker_peak[int(pid)] = max(self.worker_peak.get(int(pid), 0), peak)
            if self.object_store:
                total = ray.cluster_resources().get("object_store_memory", 0)
                free = ray.available_resources().get("object_store_memory", total)
                self.store_peak = max(self.store_peak, int(total - free))
            self._stop.wait(self.period)


def _vm_hwm(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _spilled_bytes() -> int:
    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Spilled (\d+) MiB", text)
    return int(match.group(1)) * 2**20 if match else 0


def _start_ray() -> None:
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _tokens(work: str) -> str:
    import torch
    from safetensors.torch import save_file

    emb = os.path.join(work, "tokens.safetensors")
    save_file({"<cat>": torch.randn(32) * 0.01, "<dog>": torch.randn(32) * 0.01}, emb)
    return emb


def one_augment(n: int, work: str, resolution: int = 32, steps: int = 4, actors: int = 1,
                real: str | None = None) -> dict:
    """N synthetic images from N / M real rows (written here unless `real` is an ingest output)."""
    sys.path.insert(0, HERE)
    from augment_overhead import write_real

    from ray_dafusion import storage
    from ray_dafusion.augment import augment
    from ray_dafusion.config import AugmentConfig
    from ray_dafusion.models import resolve_model

    if real is None:
        real = os.path.join(work, "real")
        write_real(real, n // M, resolution)
    resolve_model("tiny")  # built once, outside the clock
    cfg = AugmentConfig(real=real, output=os.path.join(work, "synthetic"), embeddings=_tokens(work), model="tiny",
                        num_augmentations=M, num_inference_steps=steps, resolution=resolution, batch_size=8,
                        min_actors=actors, max_actors=actors, num_cpus=0.5, stall_warning=600.0)
    _start_ray()
    with PeakSampler() as sampler:
        start = time.perf_counter()
        result = augment(cfg)
        seconds = time.perf_counter() - start
    spilled = _spilled_bytes()
    table = storage.read_parquet(storage.join(cfg.output, "data"), columns=["id", "source_id"])
    ids = table.column("id").to_pylist()
    manifest = storage.read_manifest(cfg.output)
    return {"what": "augment", "n": n, "actors": actors, "resolution": resolution, "steps": steps,
            "seconds": round(seconds, 1), "s_per_image": round(seconds / n, 5),
            "images_per_s": round(n / seconds, 2), "actor_seconds": manifest["timings"].get("actor_seconds"),
            "driver_peak_rss_mib": round(_vm_hwm() / 2**20), "worker_peak_rss_mib": round(max(sampler.worker_peak.values(), default=0) / 2**20),
            "spilled_mib": round(spilled / 2**20), "rows": len(ids), "duplicates": len(ids) - len(set(ids)),
            "missing": n - len(set(ids)), "sources": len(set(table.column("source_id").to_pylist())),
            "errors": result.errors}


def one_ingest(n: int, work: str, size: int = 16) -> dict:
    import numpy as np
    from PIL import Image

    from ray_dafusion.config import IngestConfig
    from ray_dafusion.ingest import ingest

    folder = os.path.join(work, "folder")
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for c in range(10):
        os.makedirs(os.path.join(folder, f"class{c}"), exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"class{i % 10}", f"{i:06d}.png"))
    made = time.perf_counter() - start
    per_class = n // 10
    cfg = IngestConfig(source=folder, output=os.path.join(work, "real"), examples_per_class=per_class - 2,
                       val_per_class=1, test_per_class=1, stall_warning=600.0)
    _start_ray()
    with PeakSampler(object_store=True) as sampler:
        start = time.perf_counter()
        result = ingest(cfg)
        seconds = time.perf_counter() - start
    decoded = n * size * size * 3
    return {"what": "ingest", "n": n, "image_side": size, "folder_seconds": round(made, 1), "seconds": round(seconds, 1),
            "images_per_s": round(n / seconds, 1), "driver_peak_rss_mib": round(_vm_hwm() / 2**20),
            "worker_peak_rss_mib": round(max(sampler.worker_peak.values(), default=0) / 2**20),
            "object_store_peak_mib": round(sampler.store_peak / 2**20, 1), "decoded_mib": round(decoded / 2**20, 1),
            "spilled_mib": round(_spilled_bytes() / 2**20), "rows": sum(result.counts.values()),
            "errors": result.errors}


def one_train(n: int, work: str) -> dict:
    """Augment n synthetic images with the tiny model (4 steps: only their count matters here), then train."""
    from ray_dafusion.config import TrainConfig
    from ray_dafusion.train import train

    sys.path.insert(0, HERE)
    from gpu_ray_job import make_real

    _start_ray()
    real = make_real(work, n // M, 32)  # through the ingest stage: train, val and test splits, as train needs
    aug = one_augment(n, work, resolution=32, steps=4, real=real)
    import ray

    cfg = TrainConfig(real=real, synthetic=os.path.join(work, "synthetic"),
                      output=os.path.join(work, "train"), method="da_fusion", arch="small_cnn", image_size=32,
                      epochs=3, iterations_per_epoch=100, batch_size=32, num_workers=1, cpus_per_worker=0.5,
                      cache_mb=0, stall_warning=600.0)  # cache_mb 0: every pass streams from parquet
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    ray.shutdown()
    rates = [m["samples_per_s"] for m in result.metrics]
    return {"what": "train", "synthetic_rows": aug["rows"], "real_rows": aug["sources"], "seconds": round(seconds, 1),
            "samples_per_s_by_epoch": [round(r, 1) for r in rates],
            "steps": sum(m["steps"] for m in result.metrics)}


def _child(args: argparse.Namespace) -> None:
    work = tempfile.mkdtemp(prefix=f"growth-{args.what}-")
    n = args.sizes[0]
    if args.what == "augment":
        out = one_augment(n, work)
    elif args.what == "ingest":
        out = one_ingest(n, work)
    elif args.what == "train":
        out = one_train(n, work)
    else:  # actors
        out = one_augment(n, work, resolution=64, steps=20, actors=args.actors)
    out["load_average"] = round(os.getloadavg()[0], 1)
    print("RESULT " + json.dumps(out), flush=True)
    if not args.keep:
        subprocess.run(["rm", "-rf", work], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("augment", "ingest", "train", "actors"))
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], required=True)
    parser.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep each run's work directory")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    runs = [(n, a) for n in args.sizes for a in ((1, 2) if args.what == "actors" else (1,))]
    results = []
    for n, actors in runs:
        cmd = [sys.executable, os.path.abspath(__file__), args.what, "--sizes", str(n), "--actors", str(actors), "--child"]
        cmd += ["--keep"] if args.keep else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{args.what} at {n} failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    keys = list(results[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(str(r.get(k)) for k in keys) + " |")
    if args.what == "actors":
        print(f"\n2 actors / 1 actor images/s: {results[1]['images_per_s'] / results[0]['images_per_s']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
