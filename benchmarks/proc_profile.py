"""Where a command's core-seconds go, by process, and how many Ray worker processes it started.

Runs the command, samples every process under /proc once a second, and prints: wall seconds, the
machine's busy core-seconds (/proc/stat) and idle share, the number of Ray worker processes that
appeared (titles `ray::...` or Ray's default_worker), and the busiest process titles with their
core-seconds. A worker's title changes with what it runs (`ray::IDLE` between tasks); its CPU is
counted under the title it had when sampled, and a process that lives less than the 1 s between
samples is missed. Linux only; the machine should be otherwise quiet.

    .venv/bin/python benchmarks/proc_profile.py --out profile.json -- \\
        .venv/bin/ray-dafusion sweep --config jobs/configs/sweep_digits.yaml --workdir /tmp/w --seeds "[0,1]"

docs/benchmarks.md ("The sweep's parts") used it for the worker processes of the digits sweep.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> tuple[float, float]:
    """(busy, total) core-seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / TICK, sum(fields) / TICK


def processes() -> dict[int, tuple[str, float]]:
    """pid -> (title, user + system CPU seconds) for every live process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline") as f:
                title = f.read().replace("\0", " ").strip() or stat[stat.find("(") + 1:stat.rfind(")")]
        except OSError:  # ended while being read
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        out[int(entry)] = (title, (int(rest[11]) + int(rest[12])) / TICK)
    return out


def is_ray_worker(title: str) -> bool:
    return title.startswith("ray::") or "default_worker.py" in title


def profile(command: list[str], interval: float = 1.0) -> dict:
    before = processes()
    busy0, total0 = busy_seconds()
    started = time.time()
    child = subprocess.Popen(command)
    last = dict(before)
    by_title: collections.Counter = collections.Counter()
    workers: set[int] = set()
    while child.poll() is None:
        time.sleep(interval)
        now = processes()
        for pid, (title, cpu) in now.items():
            spent = cpu - last.get(pid, (title, 0.0))[1]  # a process born during the run: all its CPU
            if spent > 0:
                by_title[title] += spent
            if is_ray_worker(title) and pid not in before:
                workers.add(pid)
        last.update(now)
    busy1, total1 = busy_seconds()
    return {
        "command": command,
        "returncode": child.returncode,
        "wall_s": round(time.time() - started, 1),
        "busy_core_s": round(busy1 - busy0, 1),
        "idle_share": round(1 - (busy1 - busy0) / max(total1 - total0, 1e-9), 3),
        "ray_worker_processes_started": len(workers),
        "core_s_by_title": [[t, round(s, 1)] for t, s in by_title.most_common(15) if s >= 0.05],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the result here as JSON")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to profile after --")
    result = profile(command)
    print(json.dumps({k: v for k, v in result.items() if k != "core_s_by_title"}))
    for title, seconds in result["core_s_by_title"]:
        print(f"{seconds:8.1f}  {' '.join(title.split())[:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
