"""What every manifest records about the software that made an output."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any, Optional

__all__ = ["versions", "CostMeter", "max_rss_bytes"]

_PACKAGES = ("ray-dafusion", "ray", "torch", "torchvision", "diffusers", "transformers", "pyarrow", "numpy", "pillow",
             "safetensors", "scikit-learn")  # numpy draws, Pillow decodes and resizes, sklearn holds the digits


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages that shape an output (read from package
    metadata, so nothing heavy is imported)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ---- cost telemetry ---------------------------------------------------------------------------------


def max_rss_bytes() -> int:
    """This process's peak resident memory."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 where /proc is not there)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class CostMeter:
    """What a stage used: wall seconds, device-seconds by kind, peak memory, and an estimated cost.

    Device-seconds follow Ray's resource accounting: what a task, actor or worker reserved
    (num_cpus, num_gpus) times how long it worked, from its setup (reads, model load) through its
    last batch, plus the driver's own CPU time; an actor's idle time between batches is not
    counted. Stages add their workers' seconds (measured in each task or actor) and peak memory
    as they learn them. The driver's memory is its peak during this stage when the stage raised
    it, else its resident memory at the report (a process's peak covers its whole life: in a
    pipeline it would be an earlier stage's).
    """

    def __init__(self, cost: Optional[dict[str, Any]] = None) -> None:
        import resource
        import time

        self.prices = {"cpu_hour": 0.0, "gpu_hour": 0.0, **((cost or {}).get("prices") or {})}
        self.started = time.time()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._driver_cpu0 = usage.ru_utime + usage.ru_stime
        self.cpu_seconds = 0.0
        self.gpu_seconds = 0.0
        self.peak_memory = 0
        self._driver_peak0 = max_rss_bytes()

    def add_actor_seconds(self, seconds: float, cpus: float, gpus: float = 0.0, peak_memory: int = 0) -> None:
        """`seconds` of work by tasks or actors that each reserved `cpus` and `gpus`."""
        self.cpu_seconds += seconds * cpus
        self.gpu_seconds += seconds * gpus
        self.peak_memory = max(self.peak_memory, int(peak_memory))

    add_task_seconds = add_actor_seconds

    def _driver_memory(self) -> int:
        peak = max_rss_bytes()
        return peak if peak > self._driver_peak0 else (rss_bytes() or peak)

    def report(self, images: Optional[int] = None, samples: Optional[int] = None) -> dict[str, Any]:
        import resource
        import time

        wall = time.time() - self.started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = self.cpu_seconds + (usage.ru_utime + usage.ru_stime - self._driver_cpu0)
        out: dict[str, Any] = {
            "wall_seconds": round(wall, 3),
            "cpu_core_seconds": round(cpu, 3),
            "gpu_seconds": round(self.gpu_seconds, 3),
            "peak_memory_bytes": max(self.peak_memory, self._driver_memory()),
            "estimated_cost": round(cpu / 3600 * float(self.prices["cpu_hour"])
                                    + self.gpu_seconds / 3600 * float(self.prices["gpu_hour"]), 6),
            "prices": dict(self.prices),
        }
        if images is not None:
            out["images_per_second"] = round(images / wall, 4) if wall > 0 else 0.0
        if samples is not None:
            out["samples_per_second"] = round(samples / wall, 4) if wall > 0 else 0.0
        return out
