"""Smoke test of Ray on a GPU machine: local Ray without the dashboard, one Ray Data actor with
``num_gpus=1`` that reports what it sees. Run after `gpu_bundle.py install`::

    python3 benchmarks/gpu_smoke.py
"""

from __future__ import annotations

import platform
import sys
import time


class _Probe:
    """Reports the process it runs in: Python, torch, CUDA device, Ray, diffusers, CUDA_VISIBLE_DEVICES."""

    def __call__(self, batch: dict) -> dict:
        import os

        import diffusers
        import ray
        import torch

        x = torch.ones(1024, 1024, device="cuda")
        ok = float((x @ x).sum()) == 1024.0**3
        return {"line": [f"actor: python {platform.python_version()}, torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0)}, "
                         f"ray {ray.__version__}, diffusers {diffusers.__version__}, "
                         f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}, matmul ok {ok}"]
                * len(batch["id"])}


def main() -> int:
    import ray
    import ray.data

    start = time.perf_counter()
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    resources = ray.cluster_resources()
    print(f"driver: python {platform.python_version()}, ray {ray.__version__}; cluster {resources} "
          f"(started in {time.perf_counter() - start:.1f}s)", flush=True)
    if resources.get("GPU", 0) < 1:
        print("no GPU in the Ray cluster", file=sys.stderr)
        return 1
    rows = ray.data.range(1).map_batches(_Probe, compute=ray.data.ActorPoolStrategy(size=1), num_gpus=1,
                                         batch_size=1).take_all()
    print(rows[0]["line"], flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
