"""Alpha-mixing of real and synthetic examples: exact per sample, stateless per epoch.

An epoch is made of whole passes over the real train set. In every pass each real train example
appears exactly once: with probability ``alpha`` it is replaced by one of its own synthetic
versions (chosen uniformly among the versions that exist), otherwise it stays real. The choice is
a pure function of ``(seed, epoch, pass, source_id)``, so

* any worker can decide for any row on its own, with no coordination and no shuffle barrier:
  training streams the union of real and synthetic rows and keeps a row exactly when it is the
  chosen one (:func:`keep_mask`);
* a run is reproducible and a resumed epoch makes the same choices as the interrupted one;
* the choice is drawn afresh in every pass of an epoch.

Real rows take part with ``aug_index == -1`` (:data:`REAL`), so one rule serves both kinds:
keep a row iff ``choose(...) == aug_index``.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["REAL", "choose", "keep_mask", "candidate_table", "epoch_plan"]

REAL = -1
"""aug_index of a real row (and the choice meaning 'keep the real image')."""

_TWO_64 = float(2**64)


def choose(seed: int, epoch: int, source_id: str, candidates: Sequence[int], alpha: float,
           pass_index: int = 0) -> int:
    """The stand-in for real example `source_id` in pass `pass_index` of `epoch`: REAL (-1) or one aug_index.

    `candidates` are the aug_index values of the source's synthetic images that exist (sorted);
    a source without any always stays real. Hash-based, so the same inputs give the same answer
    in any process.
    """
    if not candidates or alpha <= 0.0:
        return REAL
    digest = hashlib.blake2b(f"{seed}:{epoch}:{pass_index}:{source_id}".encode(), digest_size=16).digest()
    coin = int.from_bytes(digest[:8], "little") / _TWO_64  # uniform in [0, 1)
    if coin >= alpha:
        return REAL
    # 64-bit value mod a small M: the bias is below 2**-50, far under any test's resolution.
    return int(candidates[int.from_bytes(digest[8:], "little") % len(candidates)])


def keep_mask(
    source_ids: Iterable[str],
    aug_indices: Iterable[int],
    candidates: Mapping[str, Sequence[int]],
    seed: int,
    epoch: int,
    alpha: float,
    pass_index: int = 0,
) -> np.ndarray:
    """Boolean mask over rows of the real+synthetic union: True where the row is used in that pass.

    Real rows have source_id == their own id and aug_index == REAL.
    """
    memo: dict[str, int] = {}
    out = []
    for sid, aug in zip(source_ids, aug_indices):
        choice = memo.get(sid)
        if choice is None:
            choice = memo[sid] = choose(seed, epoch, sid, candidates.get(sid, ()), alpha, pass_index)
        out.append(choice == int(aug))
    return np.asarray(out, dtype=bool)


def candidate_table(source_ids: Iterable[str], aug_indices: Iterable[int]) -> dict[str, tuple[int, ...]]:
    """source_id -> sorted tuple of its synthetic aug_index values (duplicates refused)."""
    table: dict[str, set[int]] = {}
    for sid, aug in zip(source_ids, aug_indices):
        seen = table.setdefault(str(sid), set())
        if int(aug) in seen:
            raise ValueError(f"synthetic set holds two images for source {sid} aug_index {aug}")
        if int(aug) < 0:
            raise ValueError(f"synthetic image of source {sid} has a negative aug_index {aug}")
        seen.add(int(aug))
    return {sid: tuple(sorted(augs)) for sid, augs in table.items()}


def epoch_plan(
    real_ids: Iterable[str],
    candidates: Mapping[str, Sequence[int]],
    seed: int,
    epoch: int,
    alpha: float,
    pass_index: int = 0,
) -> dict[str, int]:
    """real id -> its choice in that pass (REAL or an aug_index); for reports and tests."""
    return {rid: choose(seed, epoch, rid, candidates.get(rid, ()), alpha, pass_index) for rid in real_ids}
