"""What each augment mode and each training method means, in one table each.

Adding a mode (say a LoRA-conditioned one) is one entry in :data:`AUGMENT_MODES`; adding a
method that trains on it is one entry in :data:`TRAIN_METHODS`. Every place that used to ask
``if mode == "da_fusion"`` reads these tables instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["AugmentMode", "TrainMethod", "SweepVariant", "AUGMENT_MODES", "TRAIN_METHODS", "SWEEP_VARIANTS", "SCORERS",
           "augment_mode", "train_method"]


@dataclass(frozen=True)
class AugmentMode:
    """How one augment mode conditions the diffusion model."""

    name: str
    prompt_word: str
    """What fills the template's {}: "token" (the learned pseudo-word) or "class_word" (the class name)."""
    needs_tokens: bool
    """Whether the mode needs the invert stage's tokens.safetensors."""
    leakage_guard: bool
    """Whether prompts are checked to name classes only through learned tokens."""
    default_strengths: tuple[float, ...]
    """t0 levels used when the config leaves `strengths` unset."""
    summary: str

    def word(self, token: str, class_name: str) -> str:
        """The word a prompt of this mode puts in its template for a class."""
        return token if self.prompt_word == "token" else class_word(class_name)


@dataclass(frozen=True)
class TrainMethod:
    """How one training method uses (or does not use) synthetic images."""

    name: str
    synthetic_mode: Optional[str]
    """The augment mode whose output this method trains on (None: real images only)."""
    randaugment: bool
    """Standard augmentation (RandAugment) on top of flips and rotation."""
    summary: str


def class_word(class_name: str) -> str:
    """The plain-language class word: `leafy_spurge` -> `leafy spurge`."""
    return " ".join(class_name.replace("_", " ").split())


AUGMENT_MODES: dict[str, AugmentMode] = {
    "da_fusion": AugmentMode(
        name="da_fusion", prompt_word="token", needs_tokens=True, leakage_guard=True,
        default_strengths=(0.25, 0.5, 0.75, 1.0),
        summary="DA-Fusion: learned class tokens, t0 drawn from k=4 levels (the paper)",
    ),
    "real_guidance": AugmentMode(
        name="real_guidance", prompt_word="class_word", needs_tokens=False, leakage_guard=False,
        default_strengths=(0.5,),
        summary="Real Guidance (He et al. 2023): the class name in the prompt, t0 0.5",
    ),
}

TRAIN_METHODS: dict[str, TrainMethod] = {
    "baseline": TrainMethod("baseline", None, False, "real images only (alpha 0)"),
    "standard": TrainMethod("standard", None, True, "real images with RandAugment (alpha 0)"),
    "real_guidance": TrainMethod("real_guidance", "real_guidance", False, "alpha-mixed Real Guidance images"),
    "da_fusion": TrainMethod("da_fusion", "da_fusion", False, "alpha-mixed DA-Fusion images"),
}


@dataclass(frozen=True)
class SweepVariant:
    """One compared method of a sweep: a train method, and the t0 levels of its synthetic set."""

    name: str
    method: str
    """A key of TRAIN_METHODS."""
    strengths: Optional[tuple[float, ...]] = None
    """t0 levels of the synthetic set (None: the augment mode's default)."""
    summary: str = ""
    augmented: bool = True
    """Whether it trains with the standard augmentation (the train section's rotation, flips and
    RandAugment); every compared method does, as in the paper, except the baseline."""
    synthetic_filter: Optional[str] = None
    """A train-time filter over the synthetic set's `classifier` scores, which come from the same
    (shots, seed)'s baseline run (ALIA's filter); None: every synthetic image is used."""


SWEEP_VARIANTS: dict[str, SweepVariant] = {
    "baseline": SweepVariant("baseline", "baseline", summary="real images only, no augmentation", augmented=False),
    "standard": SweepVariant("standard", "standard", summary="real images, standard augmentation"),
    "real_guidance": SweepVariant("real_guidance", "real_guidance", summary="Real Guidance images, t0 0.5"),
    "da_fusion": SweepVariant("da_fusion", "da_fusion", summary="DA-Fusion, t0 from k=4 levels"),
    "da_fusion_k1": SweepVariant("da_fusion_k1", "da_fusion", (0.5,), "DA-Fusion, one t0 level (0.5): the paper's k=1 ablation"),
    "da_fusion_filtered": SweepVariant(
        "da_fusion_filtered", "da_fusion", summary="DA-Fusion's images (k=4, shared with da_fusion), only those the "
        "same seed's baseline classifier calls their own class (ALIA's filter)",
        synthetic_filter="classifier.top1_is_label == 1"),
}


SCORERS = ("classifier", "source_distance", "text")
"""Quality scorers of the score stage (see score.py for their columns)."""


def augment_mode(name: str) -> AugmentMode:
    return AUGMENT_MODES[name]


def train_method(name: str) -> TrainMethod:
    return TRAIN_METHODS[name]
