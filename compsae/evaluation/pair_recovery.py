"""How well a learned composition matrix recovers the true interaction set C.

Mapping rule (one definition, used everywhere):

1. True pairs: every interaction of order r contributes its r(r-1)/2 constituent pairs
   (a triple {i, j, l} gives {i,j}, {i,l}, {j,l}); pairs are unordered.
2. Learned latents stand for true features through the Hungarian matching of decoder directions
   (:func:`compsae.evaluation.matching.hungarian_match`), keeping only matches with
   ``|cos| >= min_cos`` — a latent that matches nothing well stands for nothing.
3. The composition matrix ``S [n_latents, n_latents]`` is symmetrised as ``max(|S_ij|, |S_ji|)``
   and its off-diagonal upper triangle is ranked.  Selection is either the top ``|true pairs|``
   entries ("top", threshold-free, the default) or every entry ``> threshold``.
4. A selected latent pair is a true positive when both latents map to true features and that
   feature pair is a true pair; otherwise (including unmapped latents) it is a false positive.
   Because the matching is one-to-one, two learned pairs never map to the same true pair.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from sklearn.metrics import average_precision_score


@dataclass
class PairRecovery:
    precision: float
    recall: float
    f1: float
    n_true_pairs: int
    n_selected: int
    n_true_positive: int
    group_recall: float        # fraction of interactions whose every constituent pair was selected
    average_precision: float   # ranking quality among pairs of matched latents (NaN if undefined)

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def true_pairs(C: Iterable[Iterable[int]]) -> set[tuple[int, int]]:
    """All unordered constituent pairs of the interactions in ``C``."""
    out: set[tuple[int, int]] = set()
    for group in C:
        out.update((min(a, b), max(a, b)) for a, b in combinations(sorted(set(group)), 2))
    return out


def symmetrize(S: np.ndarray) -> np.ndarray:
    """``max(|S|, |S|ᵀ)`` with a zero diagonal: [n, n]."""
    S = np.abs(np.asarray(S, dtype=np.float64))
    S = np.maximum(S, S.T)
    np.fill_diagonal(S, 0.0)
    return S


def select_pairs(S: np.ndarray, n_select: int | None = None, threshold: float | None = None,
                 ) -> list[tuple[int, int]]:
    """Latent pairs (i < j) picked from a composition matrix: the ``n_select`` largest, or all > threshold."""
    if (n_select is None) == (threshold is None):
        raise ValueError("give exactly one of n_select and threshold")
    S = symmetrize(S)
    iu, ju = np.triu_indices(S.shape[0], k=1)
    scores = S[iu, ju]
    if threshold is not None:
        keep = np.flatnonzero(scores > threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
    else:
        keep = np.argsort(-scores, kind="stable")[:n_select]
    return [(int(iu[k]), int(ju[k])) for k in keep]


def pair_recovery(S: np.ndarray, C: Iterable[Iterable[int]], latent_to_true: dict[int, int],
                  selection: str = "top", threshold: float = 0.0) -> PairRecovery:
    """Precision / recall / F1 of recovering the true pairs of ``C`` from composition matrix ``S``.

    ``S``: [n_latents, n_latents] interaction scores between learned latents.
    ``latent_to_true``: the matching, ``Matching.latent_to_true(min_cos)``.
    ``selection``: "top" (top-|true pairs|) or "threshold" (entries > ``threshold``).
    """
    C = [tuple(c) for c in C]
    truth = true_pairs(C)
    if selection == "top":
        selected = select_pairs(S, n_select=len(truth))
    elif selection == "threshold":
        selected = select_pairs(S, threshold=threshold)
    else:
        raise ValueError(f"selection must be 'top' or 'threshold', got {selection!r}")

    mapped = set()
    tp = 0
    for i, j in selected:
        ti, tj = latent_to_true.get(i), latent_to_true.get(j)
        if ti is None or tj is None or ti == tj:
            continue
        pair = (min(ti, tj), max(ti, tj))
        if pair in truth:
            tp += 1
            mapped.add(pair)
    precision = tp / len(selected) if selected else float("nan")
    recall = tp / len(truth) if truth else float("nan")
    # Nothing to recover on the additive-only control: F1 is undefined there (report the composition share)
    f1 = float("nan") if not truth else (2 * precision * recall / (precision + recall) if tp else 0.0)
    groups_hit = [all(p in mapped for p in true_pairs([c])) for c in C]
    group_recall = float(np.mean(groups_hit)) if groups_hit else float("nan")
    return PairRecovery(precision=precision, recall=recall, f1=f1, n_true_pairs=len(truth),
                        n_selected=len(selected), n_true_positive=tp, group_recall=group_recall,
                        average_precision=_matched_average_precision(S, truth, latent_to_true))


def _matched_average_precision(S: np.ndarray, truth: set[tuple[int, int]],
                               latent_to_true: dict[int, int]) -> float:
    """Average precision of ``S`` restricted to pairs of matched latents (threshold-free ranking score)."""
    if not truth or len(latent_to_true) < 2:
        return float("nan")
    lat = np.array(sorted(latent_to_true))
    sub = symmetrize(S)[np.ix_(lat, lat)]
    iu, ju = np.triu_indices(len(lat), k=1)
    t_of = np.array([latent_to_true[int(i)] for i in lat])
    a, b = t_of[iu], t_of[ju]
    labels = np.array([(min(x, y), max(x, y)) in truth for x, y in zip(a, b, strict=True)])
    if not labels.any():
        return 0.0
    return float(average_precision_score(labels, sub[iu, ju]))
