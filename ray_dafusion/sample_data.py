"""The demo's sample data: scikit-learn's handwritten digits as an image folder.

1,797 real 8x8 scans of digits written by 43 people (the UCI optical recognition set, shipped
inside scikit-learn, so no network is needed), upscaled to `size` pixels and written as
`root/<digit name>/<index>.png`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["DIGIT_NAMES", "write_digits"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits(root: str, size: int = 32, per_class: int | None = None) -> dict[str, int]:
    """Write the digits as an image folder (idempotent); returns images written per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[str, int] = {}
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        name = DIGIT_NAMES[int(target)]
        if per_class is not None and counts.get(name, 0) >= per_class:
            continue
        path = os.path.join(root, name, f"{index:04d}.png")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # scans hold 0..16 ink levels; invert to dark ink on white paper like a real scan
            gray = (255 - pixels / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
            Image.fromarray(gray).resize((size, size), Image.BICUBIC).save(path)
        counts[name] = counts.get(name, 0) + 1
    return counts
