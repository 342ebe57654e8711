"""What every manifest records about the software that made an output."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["versions"]

_PACKAGES = ("ray-dafusion", "ray", "torch", "torchvision", "diffusers", "transformers", "pyarrow")


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
