"""How many rows per second a training worker decodes and transforms: what feeds the model.

Times `train._transform_rows`, the function every train path calls for a batch (the in-memory
cache, the streamed pass, validation): PNG decode, resize, random flip and rotation, RandAugment
when on, float conversion; and "in step", what the threads do when the training step finishes the
transform on a GPU (`augment_in_step`, the default there): decode, resize and the random draws only. Sources are smooth random PNGs of `--source-size` px made here, the
output `--image-size` px. Per setting: rows/s over `--repeats` batches of `--batch-size` rows after
one untimed batch, with `--threads` decoding threads (the train config's `decode_threads`), and
with `--processes`, in that many Ray tasks of one CPU each (`decode_processes`: separate
processes, so no interpreter lock shared between them).

On a GPU node this says whether the CPUs can feed the model: ResNet-50 at 224 px on one H200
took 1716 samples/s from preloaded tensors (docs/benchmarks.md), so the stream needs at least that
many rows/s from the threads a worker has.

    python benchmarks/decode_rate.py --threads 1,2 --processes 1,2 --image-size 224 --source-size 160
    PYTHONPATH=<another checkout> python benchmarks/decode_rate.py ...   # the same for other code
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time

import numpy as np


def sources(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n encoded PNGs (object array of bytes): 8x8 random colours resized up, like photos' PNG sizes."""
    from PIL import Image

    from ray_dafusion import schema

    rng = np.random.default_rng(seed)
    out = [schema.encode_image(Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype("uint8"))
                               .resize((size, size), Image.BILINEAR)) for _ in range(n)]
    return np.array(out, dtype=object)


def _workload(image_bytes: np.ndarray, image_size: int, randaugment: bool) -> tuple:
    """The train transform (rotation 15, flips) and the rows of one batch, as the train stage holds them."""
    from ray_dafusion.classifier import make_transform

    n = len(image_bytes)
    transform = make_transform(image_size, True, rotation=15.0, hflip=True, randaugment=randaugment, fill=0)
    rows = {"id": np.array([f"row-{i}" for i in range(n)], dtype=object), "image_bytes": image_bytes,
            "label": np.zeros(n, dtype=np.int64), "aug_index": np.full(n, -1)}
    return transform, rows


def rate(image_bytes: np.ndarray, image_size: int, threads: int, randaugment: bool, repeats: int,
         in_step: bool = False) -> float:
    """Rows/s of train-time decode + transform of one batch, `repeats` times after one warm-up."""
    from ray_dafusion.train import _transform_rows, item_seed

    transform, rows = _workload(image_bytes, image_size, randaugment)

    def batch(pass_index: int) -> None:
        seeds = [item_seed(0, 0, pass_index, str(i)) for i in rows["id"]]
        more = {"in_step": True} if in_step else {}
        _transform_rows(transform, image_size, image_bytes, rows["label"], rows["aug_index"], rows["id"], seeds,
                        pass_index, threads, **more)

    batch(0)
    start = time.perf_counter()
    for r in range(repeats):
        batch(r + 1)
    return repeats * len(image_bytes) / (time.perf_counter() - start)


def process_rate(image_bytes: np.ndarray, image_size: int, processes: int, randaugment: bool, repeats: int,
                 in_step: bool = False) -> float:
    """Rows/s of the same work in Ray tasks of one CPU each (`decode_processes`): the train stage's
    `_decoded_ahead`, `processes` batches at a time, over `repeats` x `processes` batches after two
    untimed rounds (which start the worker processes)."""
    from ray_dafusion.config import TrainConfig
    from ray_dafusion.train import _decoded_ahead

    transform, rows = _workload(image_bytes, image_size, randaugment)
    cfg = TrainConfig(image_size=image_size, decode_processes=processes, prefetch_batches=1)

    def run(batches: int) -> None:
        for _ in _decoded_ahead(((p, rows) for p in range(batches)), cfg, transform, 0, in_step):
            pass

    run(2 * processes)
    start = time.perf_counter()
    run(repeats * processes)
    return repeats * processes * len(image_bytes) / (time.perf_counter() - start)


def finish_on_gpu(image_bytes: np.ndarray, image_size: int, repeats: int = 20) -> dict:
    """What the training step spends on a GPU finishing one batch (`train.batch_images`: the uint8
    copy to the GPU, flip, rotation, float), in ms, and how many output values differ from the
    same batch finished on the CPU (the rotation's nearest-pixel choice may fall the other way on
    a rounding tie)."""
    import torch

    from ray_dafusion.classifier import decode_uint8, make_transform
    from ray_dafusion.train import batch_images

    transform = make_transform(image_size, True, rotation=15.0, hflip=True, fill=0)
    x, flips, angles = transform.draw([decode_uint8(b) for b in image_bytes],
                                      [torch.Generator().manual_seed(i) for i in range(len(image_bytes))])
    cuda = torch.device("cuda")
    on_gpu = batch_images(transform, x, [flips, angles], cuda)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        batch_images(transform, x, [flips, angles], cuda)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    on_cpu = batch_images(transform, x, [flips, angles], torch.device("cpu"))
    return {"ms_per_batch": round(seconds * 1e3, 3), "values_differing_from_cpu": int((on_gpu.cpu() != on_cpu).sum()),
            "values": on_cpu.numel()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated decode_threads values")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--source-size", type=int, default=160)
    p.add_argument("--processes", default="",
                   help="comma-separated decode_processes values: the same work in Ray tasks (starts a local Ray)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads per process (Ray workers run with 1 per CPU they reserve)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()

    import ray
    import torch

    import ray_dafusion

    torch.set_num_threads(args.torch_threads)
    print(f"code: {os.path.dirname(ray_dafusion.__file__)}; {os.cpu_count()} CPUs; torch threads {args.torch_threads}")
    image_bytes = sources(args.batch_size, args.source_size)
    if args.processes:  # started before any timing: its start-up work would slow the threads' rows too
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        time.sleep(5)
    from ray_dafusion.train import _transform_rows

    rows = []
    settings = [("flip+rotation", False, False), ("+RandAugment", True, False), ("in step", False, True)]
    if "in_step" not in inspect.signature(_transform_rows).parameters:  # older code (a "before" checkout)
        print("this code has no in_step (the GPU finishing the transform): that setting is left out")
        settings = settings[:2]
    for name, randaugment, in_step in settings:
        for threads in [int(t) for t in args.threads.split(",")]:
            r = rate(image_bytes, args.image_size, threads, randaugment, args.repeats, in_step)
            rows.append({"transform": name, "threads": threads, "rows_per_s": r})
            print(f"{name:<14} threads {threads:>2}: {r:8.1f} rows/s", flush=True)
        for processes in [int(n) for n in args.processes.split(",") if n]:
            r = process_rate(image_bytes, args.image_size, processes, randaugment, args.repeats, in_step)
            rows.append({"transform": name, "processes": processes, "rows_per_s": r})
            print(f"{name:<14} processes {processes:>2}: {r:8.1f} rows/s", flush=True)
    if torch.cuda.is_available():
        rows.append({"transform": "finish on GPU", **finish_on_gpu(image_bytes, args.image_size)})
        print(f"finish on GPU: {rows[-1]['ms_per_batch']:.2f} ms per batch of {args.batch_size} (copy included); "
              f"{rows[-1]['values_differing_from_cpu']} of {rows[-1]['values']} values differ from the CPU's")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
