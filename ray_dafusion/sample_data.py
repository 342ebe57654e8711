"""The demo's sample data: scikit-learn's handwritten digits as an image folder.

1,797 real 8x8 scans of digits written by 43 people (the UCI optical recognition set, shipped
inside scikit-learn, so no network is needed), upscaled to `size` pixels and written as
`root/<digit name>/<index>.png`.

The set is split once into two fixed halves (:func:`digit_halves`): the **pretraining** half
(unlabelled: the `digits` diffusion model is trained on it without labels) and the
**experiment** half (every few-shot train, val and test image comes from it). Per class, in class
order, one ``numpy.random.default_rng(0)`` permutes the class's indices and its first half (rounded
down) goes to pretraining.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

__all__ = ["DIGIT_NAMES", "HALVES", "digit_halves", "write_digits"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HALVES = ("pretrain", "experiment")


def digit_halves() -> dict[str, np.ndarray]:
    """{"pretrain": indices, "experiment": indices} into sklearn's 1,797 digits (sorted, disjoint)."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    rng = np.random.default_rng(0)
    pretrain: list[int] = []
    for c in range(10):
        idx = np.flatnonzero(target == c)
        pretrain += idx[rng.permutation(len(idx))[: len(idx) // 2]].tolist()
    pretrain_set = set(pretrain)
    return {"pretrain": np.array(sorted(pretrain)),
            "experiment": np.array([i for i in range(len(target)) if i not in pretrain_set])}


def write_digits(root: str, size: int = 32, per_class: Optional[int] = None, half: Optional[str] = None,
                 labelled: bool = True, endpoint_url: Optional[str] = None) -> dict[str, int]:
    """Write the digits as an image folder under `root` (a local path, file:// or s3:// URI;
    idempotent: images already there are kept); returns images written per class.

    `half` keeps only one of the fixed halves (see digit_halves); `labelled=False` writes
    `root/<index>.png` with no class folders (the pretraining half is used without labels).
    """
    from sklearn.datasets import load_digits

    from . import storage

    if half is not None and half not in HALVES:
        raise ValueError(f"half must be one of {HALVES} or None, got {half!r}")
    digits = load_digits()
    keep = set(digit_halves()[half].tolist()) if half else None
    there = set(storage.list_files(root, ".png", endpoint_url, recursive=True))
    counts: dict[str, int] = {}
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        if keep is not None and index not in keep:
            continue
        name = DIGIT_NAMES[int(target)]
        if per_class is not None and counts.get(name, 0) >= per_class:
            continue
        uri = storage.join(root, name, f"{index:04d}.png") if labelled else storage.join(root, f"{index:04d}.png")
        if uri not in there:
            # scans hold 0..16 ink levels; invert to dark ink on white paper like a real scan
            gray = (255 - pixels / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
            png = io.BytesIO()
            Image.fromarray(gray).resize((size, size), Image.BICUBIC).save(png, format="PNG")
            storage.write_bytes(uri, png.getvalue(), endpoint_url)
        counts[name] = counts.get(name, 0) + 1
    return counts
