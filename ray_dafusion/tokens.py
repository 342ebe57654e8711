"""Class tokens, prompt templates and the leakage guard.

A class named ``leafy spurge`` is represented in prompts by the pseudo-word ``<leafy_spurge>``,
whose embedding textual inversion learns. The guard makes sure no prompt of a da_fusion run
carries a class name as plain words.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

__all__ = [
    "class_token",
    "case_collision",
    "taken_ignoring_case",
    "INVERSION_TEMPLATES",
    "make_prompt",
    "LeakageError",
    "find_leak",
    "templates_for",
    "check_prompts",
]

# Phrasings in the spirit of textual inversion's small template set: the object is the
# subject, the surroundings vary, so the token learns the object rather than one framing.
INVERSION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a close-up photo of a {}",
    "a cropped photo of a {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a blurry photo of a {}",
    "a clean photo of the {}",
    "a rendition of a {}",
)


def templates_for(class_names: Sequence[str], templates: Sequence[str] = INVERSION_TEMPLATES) -> tuple[str, ...]:
    """The templates that name none of these classes (the digits have a class `one`, so "a photo of
    one {}" would teach <eight> beside the word one); a ValueError when none is left."""
    kept = tuple(t for t in templates if find_leak(make_prompt(t, " "), class_names) is None)
    if not kept:
        raise ValueError(f"every inversion template names a class of this data set ({', '.join(class_names[:5])}...)")
    return kept


def class_token(class_name: str) -> str:
    """`<` + class name with whitespace as `_` + `>` (docs/method.md)."""
    name = "_".join(class_name.split())
    if not name:
        raise ValueError("class name is empty")
    return f"<{name}>"


def case_collision(words: Iterable[str]) -> Optional[tuple[str, str]]:
    """The first two of `words` that are equal ignoring case, or None. CLIP's tokenizer lowercases a
    prompt before it looks for added tokens, so `<Cat>` and `<cat>` would read as one token."""
    seen: dict[str, str] = {}
    for word in words:
        if word.lower() in seen:
            return seen[word.lower()], word
        seen[word.lower()] = word
    return None


def taken_ignoring_case(names: Iterable[str], vocab: Iterable[str]) -> dict[str, str]:
    """{name: the vocabulary entry it equals ignoring case} for each of `names` a tokenizer with
    `vocab` would not tell from a token it already has. (With both `<cat>` and `<Cat>` added, which
    id a prompt's `<cat>` gets varies from process to process.)"""
    lowered: dict[str, str] = {}
    for entry in vocab:
        lowered.setdefault(entry.lower(), entry)
    return {name: lowered[name.lower()] for name in names if name.lower() in lowered}


def make_prompt(template: str, word: str) -> str:
    return template.replace("{}", word, 1)


class LeakageError(ValueError):
    """A prompt names a class in plain words where only learned tokens are allowed."""


def _variants(class_name: str) -> set[str]:
    base = " ".join(class_name.replace("_", " ").replace("-", " ").split())
    return {v for v in (class_name, base, base.replace(" ", "_"), base.replace(" ", "-")) if v}


def find_leak(prompt: str, class_names: Iterable[str], tokens: Iterable[str] = ()) -> str | None:
    """The first class name that appears as whole words in `prompt` (learned tokens removed), its
    words joined by spaces, underscores or hyphens, singular or (names of 3 letters or more, so
    that a class `it` does not refuse "its") with a plural -s/-es."""
    text = prompt
    for tok in sorted(tokens, key=len, reverse=True):
        if tok:
            text = text.replace(tok, " ")
    for name in class_names:
        for variant in _variants(name):
            plural = r"(?:e?s)?" if len(variant) >= 3 else ""
            pattern = r"(?<![\w])" + re.escape(variant).replace(r"\ ", r"[\s_\-]+") + plural + r"(?![\w])"
            if re.search(pattern, text, flags=re.IGNORECASE):
                return name
    return None


def check_prompts(prompts: Mapping[str, Sequence[str]], class_names: Sequence[str], tokens: Sequence[str]) -> None:
    """Raise LeakageError naming the class and prompt if any prompt carries a class name.

    `prompts` maps each class to the prompts its rows will use.
    """
    for cls, plist in prompts.items():
        for prompt in plist:
            leaked = find_leak(prompt, class_names, tokens)
            if leaked is not None:
                raise LeakageError(
                    f"prompt {prompt!r} (for class {cls!r}) contains the class name {leaked!r}; "
                    "da_fusion prompts may name classes only through learned tokens. "
                    "Fix prompt_templates, or use mode: real_guidance for the class-word baseline."
                )
