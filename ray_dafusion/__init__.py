"""ray-dafusion: DA-Fusion diffusion data augmentation as a Ray-distributed system.

Each stage is one function taking its config and returning a small result object::

    from ray_dafusion import augment, AugmentConfig
    result = augment(AugmentConfig(real="runs/demo/real", output="runs/demo/synthetic", ...))

Stage functions are imported on first use so `import ray_dafusion` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import (
    AugmentConfig,
    ConfigError,
    EraseConfig,
    EvaluateConfig,
    GalleryConfig,
    IngestConfig,
    InvertConfig,
    PipelineConfig,
    TrainConfig,
    load_config,
)

__version__ = "0.1.0"

_STAGE_FUNCTIONS = {
    "ingest": "ray_dafusion.ingest",
    "invert": "ray_dafusion.inversion",
    "erase": "ray_dafusion.erasure",
    "augment": "ray_dafusion.augment",
    "train": "ray_dafusion.train",
    "evaluate": "ray_dafusion.evaluate",
    "gallery": "ray_dafusion.gallery",
    "pipeline": "ray_dafusion.pipeline",
}

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "EraseConfig",
    "EvaluateConfig",
    "GalleryConfig",
    "IngestConfig",
    "InvertConfig",
    "PipelineConfig",
    "TrainConfig",
    "load_config",
    *_STAGE_FUNCTIONS,
]


def __getattr__(name: str) -> Any:
    if name in _STAGE_FUNCTIONS:
        return getattr(importlib.import_module(_STAGE_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'ray_dafusion' has no attribute {name!r}")
