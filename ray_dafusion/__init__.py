"""ray-dafusion: DA-Fusion diffusion data augmentation as a Ray-distributed system.

Each stage is one function taking its config and returning a small result object::

    from ray_dafusion import augment, AugmentConfig
    result = augment(AugmentConfig(real="runs/x/real", embeddings="runs/x/tokens",
                                   output="runs/x/synthetic/da_fusion"))

Stages that use Ray join the Ray this process is connected to; call ``ray.init(...)`` first to
choose one, or a stage calls ``ray.init()`` with Ray's defaults, as Ray Data would.

Stage functions are imported on first use so `import ray_dafusion` stays light (the registry is
``config.STAGES``). A stage module named like its function (``ray_dafusion.augment``) is itself
callable as the stage, so ``from ray_dafusion import augment`` works whichever Python hands back.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import (
    STAGES,
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
from .errors import StageError

__version__ = "0.1.0"

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "EraseConfig",
    "EvaluateConfig",
    "GalleryConfig",
    "IngestConfig",
    "InvertConfig",
    "PipelineConfig",
    "StageError",
    "TrainConfig",
    "load_config",
    *STAGES,
]


def __getattr__(name: str) -> Any:
    if name in STAGES:
        return getattr(importlib.import_module(STAGES[name].module), STAGES[name].function)
    raise AttributeError(f"module 'ray_dafusion' has no attribute {name!r}")
