"""The stages in order under one workdir: ingest -> invert -> (erase) -> augment -> train -> evaluate.

Each stage's inputs and outputs default to fixed places under ``workdir``; each stage skips an
output that is already complete with the same config, so re-running a pipeline resumes it.
``demo`` is the pipeline on the embedded default: local files, the `digits` model and the digits.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import storage
from .config import GalleryConfig, PipelineConfig, StageConfig, callable_stage_module
from .configlib import shared_settings
from .modes import AUGMENT_MODES, TRAIN_METHODS

__all__ = ["pipeline", "demo", "PipelineResult", "stage_configs", "DEMO_CONFIG"]

log = logging.getLogger(__name__)

# The embedded default of `ray-dafusion demo` / `make demo`: small enough to finish in minutes
# on two CPU cores, and the same code path as a real run.
DEMO_CONFIG: dict[str, Any] = {
    "workdir": "./runs/demo",
    "methods": ["baseline", "da_fusion"],
    "ingest": {"examples_per_class": 2, "val_per_class": 10, "test_per_class": 30, "seed": 0},
    "invert": {"model": "digits", "steps": 100, "resolution": 32, "batch_size": 4, "hflip": False, "num_cpus": 0.5},
    # one t0 level (0.5), the paper's k=1 ablation: on this small model it is the DA-Fusion setting that
    # beats standard augmentation (docs/results.md); the paper's four levels lose a tenth of the labels
    "augment": {"model": "digits", "num_augmentations": 10, "num_inference_steps": 50, "resolution": 32,
                "strengths": [0.5], "batch_size": 5, "num_cpus": 0.5, "max_actors": 2},
    "train": {"arch": "small_cnn", "backbone": "finetune", "image_size": 32, "hflip": False, "rotation": 10.0,
              "fill": 255, "epochs": 3, "iterations_per_epoch": 100, "batch_size": 32, "learning_rate": 1e-3,
              "num_workers": 1, "cpus_per_worker": 0.5},
}


@dataclass
class PipelineResult:
    """Where each stage's output went, and the headline results."""

    workdir: str
    outputs: dict[str, str] = field(default_factory=dict)
    results: Optional[dict[str, Any]] = None
    seconds: dict[str, float] = field(default_factory=dict)


def _fill(section: StageConfig, parent: PipelineConfig, **defaults: Any) -> Any:
    """A stage config with unset URIs filled from the workdir, and the pipeline's endpoint,
    overwrite, stall times and prices where the section leaves them at their defaults."""
    changes = {k: v for k, v in defaults.items() if getattr(section, k) in (None, "", [])}
    return dataclasses.replace(section, **changes, **shared_settings(parent, section))


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Every stage's config as the pipeline will run it (URIs resolved under workdir)."""
    w = cfg.workdir
    real = cfg.ingest.output or storage.join(w, "real")
    tokens = cfg.invert.output or storage.join(w, "tokens")
    erasure = cfg.erase.output or storage.join(w, "erasure")
    out: dict[str, Any] = {
        "ingest": _fill(cfg.ingest, cfg, output=real),
        "invert": _fill(cfg.invert, cfg, real=real, output=tokens),
        "erase": _fill(cfg.erase, cfg, real=real, output=erasure),
        "augment": {},
        "train": {},
    }
    for method in cfg.methods:
        mode = TRAIN_METHODS[method].synthetic_mode
        if mode and mode not in out["augment"]:
            extra: dict[str, Any] = {}
            if AUGMENT_MODES[mode].needs_tokens:
                extra["embeddings"] = tokens
                if cfg.run_erase:
                    extra["erasure"] = erasure
            # the augment section's t0 levels are DA-Fusion's; Real Guidance keeps its own (t0 0.5)
            strengths = cfg.augment.strengths if mode == "da_fusion" else cfg.real_guidance_strengths
            section = dataclasses.replace(cfg.augment, mode=mode, strengths=strengths)
            out["augment"][mode] = _fill(section, cfg, real=real, output=storage.join(w, "synthetic", mode), **extra)
        synthetic = out["augment"][mode].output if mode else None
        name = f"{cfg.train.name}-{method}" if cfg.train.name else method
        section = dataclasses.replace(cfg.train, method=method, name=name)
        out["train"][method] = _fill(section, cfg, real=real, output=storage.join(w, "train"),
                                     **({"synthetic": synthetic} if synthetic else {}))
    return out


def _timed(seconds: dict[str, float], name: str, fn, *args):
    start = time.time()
    log.info("=== %s ===", name)
    result = fn(*args)
    seconds[name] = round(time.time() - start, 1)
    return result


def pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Run every stage in order; complete outputs are skipped, so a re-run resumes."""
    from .augment import augment
    from .evaluate import evaluate
    from .gallery import gallery
    from .ingest import ingest
    from .inversion import invert
    from .train import train

    configs = stage_configs(cfg)
    if configs["ingest"].source == "":
        configs["ingest"].require("source")
    result = PipelineResult(workdir=cfg.workdir)
    secs = result.seconds

    # 1. real images -> real/{train,val,test}
    result.outputs["real"] = _timed(secs, "ingest", ingest, configs["ingest"]).output
    # 2. one learned token per class (only modes that need tokens use them)
    if any(AUGMENT_MODES[mode].needs_tokens for mode in configs["augment"]):
        result.outputs["tokens"] = _timed(secs, "invert", invert, configs["invert"]).output
        # 3. optional concept erasure
        if cfg.run_erase:
            from .erasure import erase

            result.outputs["erasure"] = _timed(secs, "erase", erase, configs["erase"]).output
    # 4. synthetic sets, one per augment mode the methods need
    for mode, aug_cfg in configs["augment"].items():
        augmented = _timed(secs, f"augment ({mode})", augment, aug_cfg)
        result.outputs[f"synthetic/{mode}"] = augmented.output
        sheet = storage.join(augmented.output, "gallery.png")
        if not (augmented.already_complete and storage.exists(sheet, aug_cfg.endpoint_url)):
            sheet = gallery(GalleryConfig(synthetic=aug_cfg.output, real=aug_cfg.real, output=sheet,
                                          endpoint_url=aug_cfg.endpoint_url)).output
        result.outputs[f"gallery/{mode}"] = sheet
    # 5. one classifier per method
    runs = []
    for method, train_cfg in configs["train"].items():
        trained = _timed(secs, f"train ({method})", train, train_cfg)
        runs.append(trained.output)
        result.outputs[f"train/{method}"] = trained.output
    # 6. evaluate on test with the checkpoints chosen on val
    eval_cfg = _fill(cfg.evaluate, cfg, real=result.outputs["real"], output=storage.join(cfg.workdir, "results"))
    eval_cfg = dataclasses.replace(eval_cfg, runs=eval_cfg.runs or runs)
    evaluated = _timed(secs, "evaluate", evaluate, eval_cfg)
    result.outputs["results"] = eval_cfg.output
    result.results = dataclasses.asdict(evaluated) if dataclasses.is_dataclass(evaluated) else evaluated

    log.info("=== done ===")
    log.info("results table : %s", storage.join(eval_cfg.output, "results.md"))
    log.info("results (json): %s", storage.join(eval_cfg.output, "results.json"))
    log.info("plots         : %s/*.png", eval_cfg.output)
    for key, uri in result.outputs.items():
        if key.startswith("gallery/"):
            log.info("gallery       : %s", uri)
    log.info("stage seconds : %s", secs)
    return result


def demo(cfg: Optional[PipelineConfig] = None) -> PipelineResult:
    """The pipeline on the embedded default: local Ray and files, the `digits` model, the digits.

    `cfg` defaults to DEMO_CONFIG; `ray-dafusion demo --train.epochs 2` builds it from DEMO_CONFIG
    with that field changed. Without an ingest source, the experiment half of the digits (the half
    the `digits` model never saw) is written first. Ends with one line: the two accuracies and the gain.
    """
    from .sample_data import write_digits

    cfg = cfg if cfg is not None else PipelineConfig.from_dict(DEMO_CONFIG)
    if not cfg.ingest.source:
        source = storage.join(cfg.workdir, "sample", "digits")
        counts = write_digits(source, half="experiment", endpoint_url=cfg.endpoint_url)
        log.info("%d scanned handwritten digits (scikit-learn, the half the digits model never saw) written to %s",
                 sum(counts.values()), source)
        cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, source=source))
    result = pipeline(cfg)
    accuracy = {r["method"]: r["mean_class_acc"] for r in (result.results or {}).get("runs", [])}
    if "baseline" in accuracy and "da_fusion" in accuracy:
        gain = 100 * (accuracy["da_fusion"] - accuracy["baseline"])
        log.info("demo: test mean per-class accuracy, %d shots per class: baseline %.3f, da_fusion %.3f (%+.1f "
                 "points); what DA-Fusion made: %s", cfg.ingest.examples_per_class, accuracy["baseline"],
                 accuracy["da_fusion"], gain, result.outputs.get("gallery/da_fusion"))
    return result


callable_stage_module(__name__)  # `from ray_dafusion import pipeline` may give this module: call it as the stage
