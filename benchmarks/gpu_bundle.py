"""Carry Ray (and the few packages a bare GPU image lacks) to a machine without network.

The lent GPU machines have Python 3.12, torch, transformers, pyarrow and pandas but no Ray, no
diffusers and no package index, and take at most 64 MiB of files with the work tree. Ray's cp312
wheel is ~76 MiB; without ``ray/jars`` (the Java worker, which Ray skips when absent) and
compressed with xz it is ~26 MiB. Tar keeps the executable bits of raylet and gcs_server, which a
``pip install --target`` of the wheel would need anyway.

Here (with network to the package index), once::

    python benchmarks/gpu_bundle.py build          # writes .gpu/ (ignored by git)

There, before anything imports Ray (``run`` with ``carry: [".gpu"]``)::

    python3 benchmarks/gpu_bundle.py install --target /tmp/site && export PYTHONPATH=/tmp/site:$PWD

`install` unpacks the tarball with Python's own tarfile and installs the wheels with pip
(no index, no dependencies) into the same directory.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, ".gpu")
RAY = "ray==2.60.0"
PYTHON = "3.12"
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64"]
# What `import ray.data, ray.train.torch, diffusers, ray_dafusion...` loads that the GPU image lacks
# (its package list: /work/.library/device/KINDS.md), pinned to the versions this project tests with.
WHEELS = [
    "diffusers==0.42.1", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0",
    "rpds-py==2026.9.1", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "colorful==0.5.8", "dill==0.4.1", "jsonpointer==3.12", "rfc3339-validator==0.1.4",
]


def _download(spec: str, dest: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
           "--implementation", "cp", "-d", dest, spec]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def build() -> None:
    wheels = os.path.join(BUNDLE, "wheels")
    shutil.rmtree(BUNDLE, ignore_errors=True)
    os.makedirs(wheels)
    with tempfile.TemporaryDirectory() as tmp:
        _download(RAY, tmp)
        (wheel,) = glob.glob(os.path.join(tmp, "ray-*.whl"))
        name = os.path.basename(wheel).split("-py")[0].split("-cp")[0]  # ray-2.60.0
        target = os.path.join(BUNDLE, f"{name}-cp{PYTHON.replace('.', '')}.tar.xz")
        with zipfile.ZipFile(wheel) as z, tarfile.open(target, "w:xz", preset=6) as tar:
            for info in z.infolist():
                if info.filename.startswith("ray/jars/") or info.is_dir():
                    continue
                data = z.read(info)
                entry = tarfile.TarInfo(info.filename)
                entry.size = len(data)
                mode = (info.external_attr >> 16) & 0o777
                entry.mode = mode or 0o644
                tar.addfile(entry, _Bytes(data))
    for spec in WHEELS:
        _download(spec, wheels)
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(BUNDLE, "**", "*"), recursive=True) if os.path.isfile(p))
    print(f"{BUNDLE}: {os.path.basename(target)} {os.path.getsize(target) / 2**20:.1f} MiB, "
          f"{len(os.listdir(wheels))} wheels; {total / 2**20:.1f} MiB in all")


class _Bytes:
    """A file object over bytes for tarfile.addfile."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.pos + size
        chunk, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return chunk


def install(target: str) -> None:
    (bundle,) = glob.glob(os.path.join(BUNDLE, "ray-*.tar.xz")) or [None]
    if bundle is None:
        raise SystemExit(f"no Ray bundle under {BUNDLE}: run `python benchmarks/gpu_bundle.py build` where pip has "
                         "network, and carry .gpu")
    os.makedirs(target, exist_ok=True)
    with tarfile.open(bundle) as tar:
        tar.extractall(target, filter="fully_trusted")  # raylet and gcs_server keep their exec bits
    wheels = sorted(glob.glob(os.path.join(BUNDLE, "wheels", "*.whl")))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", target, *wheels], check=True)
    print(f"{target}: Ray from {os.path.basename(bundle)} and {len(wheels)} wheels", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="download and pack into .gpu/ (here, with network)")
    inst = sub.add_parser("install", help="unpack .gpu/ into --target (there)")
    inst.add_argument("--target", default="/tmp/site")
    args = parser.parse_args()
    build() if args.command == "build" else install(args.target)


if __name__ == "__main__":
    main()
