"""How well a learned composition matrix recovers the true interaction set C.

Mapping rule (one definition, used everywhere):

1. True pairs: every interaction of order r contributes its r(r-1)/2 constituent pairs
   (a triple {i, j, l} gives {i,j}, {i,l}, {j,l}); pairs are unordered.
2. Learned latents stand for true features through the Hungarian matching of decoder directions
   (:func:`compsae.evaluation.ground_truth.matching.hungarian_match`), keeping only matches with
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
from typing import Any

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
    group_recall: float  # fraction of interactions whose every constituent pair was selected
    average_precision: float  # ranking quality among pairs of matched latents (NaN if undefined)

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


def select_pairs(
    S: np.ndarray,
    n_select: int | None = None,
    threshold: float | None = None,
) -> list[tuple[int, int]]:
    """Latent pairs (i < j) picked from a composition matrix: the ``n_select`` largest, or all >
    threshold."""
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


def pair_recovery(
    S: np.ndarray,
    C: Iterable[Iterable[int]],
    latent_to_true: dict[int, int],
    selection: str = "top",
    threshold: float = 0.0,
) -> PairRecovery:
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
    # Nothing to recover on the additive-only control: F1 is undefined there (report the composition
    # share)
    f1 = (
        float("nan")
        if not truth
        else (2 * precision * recall / (precision + recall) if tp else 0.0)
    )
    groups_hit = [all(p in mapped for p in true_pairs([c])) for c in C]
    group_recall = float(np.mean(groups_hit)) if groups_hit else float("nan")
    return PairRecovery(
        precision=precision,
        recall=recall,
        f1=f1,
        n_true_pairs=len(truth),
        n_selected=len(selected),
        n_true_positive=tp,
        group_recall=group_recall,
        average_precision=_matched_average_precision(S, truth, latent_to_true),
    )


def _matched_average_precision(
    S: np.ndarray, truth: set[tuple[int, int]], latent_to_true: dict[int, int]
) -> float:
    """Average precision of ``S`` restricted to pairs of matched latents (threshold-free ranking
    score)."""
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


# -- scores of measured pair effects against labelled pairs (bilinear ground truth)
# -------------------


def _latent_pair_score(
    S: np.ndarray, true_to_latent: dict[int, int], pairs: Iterable[tuple[int, int]]
) -> np.ndarray:
    """`S[l_i, l_j]` of the latents matched to each true pair (i, j); 0 where either is
    unmatched."""
    out = []
    for i, j in pairs:
        li, lj = true_to_latent.get(i), true_to_latent.get(j)
        out.append(0.0 if li is None or lj is None else float(max(S[li, lj], S[lj, li])))
    return np.asarray(out, dtype=np.float64)


def labelled_scores(
    S: np.ndarray,
    latent_to_true: dict[int, int],
    positives: list[tuple[int, int]],
    negatives: list[tuple[int, int]],
) -> tuple[np.ndarray, np.ndarray]:
    """The pair score `S [n, n]` of each labelled true pair, through the matched latents (0 where
    either is unmatched): `([len(positives)], [len(negatives)])`."""
    inv = {t: lat for lat, t in latent_to_true.items()}
    return _latent_pair_score(S, inv, positives), _latent_pair_score(S, inv, negatives)


def labelled_auc(
    S: np.ndarray,
    latent_to_true: dict[int, int],
    positives: list[tuple[int, int]],
    negatives: list[tuple[int, int]],
) -> tuple[float, float]:
    """(ROC AUC, average precision) of the pair score `S [n, n]` separating the `positives` from the
    `negatives` (true feature pairs, scored through the matched latents; unmatched pairs score 0).
    Ties count half, so a score that is 0 everywhere gives AUC 0.5."""
    from sklearn.metrics import roc_auc_score

    pos, neg = labelled_scores(S, latent_to_true, positives, negatives)
    if not len(pos) or not len(neg):
        return float("nan"), float("nan")
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


@dataclass
class ThresholdedPairs:
    """Pairs called composing at a threshold chosen on a validation half of the candidate pairs,
    scored on the other half."""

    threshold: float
    precision: float
    recall: float
    f1: float
    n_candidates: int  # test-half candidate pairs (both latents matched, enough co-firing support)
    n_true: int  # of which truly interacting
    n_found: int  # of which called composing

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def _halves(pairs: list[tuple[int, int]], seed: int = 0) -> np.ndarray:
    """A fixed validation (True) / test (False) split of true feature pairs, by a hash of the
    pair."""
    h = np.array(
        [(i * 1_000_003 + j * 7_919 + seed) * 2_654_435_761 % 2**32 for i, j in pairs],
        dtype=np.uint64,
    )
    return (h >> np.uint64(16)) % np.uint64(2) == 0


def _prf(called: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    tp = int((called & labels).sum())
    precision = tp / int(called.sum()) if called.any() else float("nan")
    recall = tp / int(labels.sum()) if labels.any() else float("nan")
    f1 = (
        2 * tp / (int(called.sum()) + int(labels.sum()))
        if (called.any() or labels.any())
        else float("nan")
    )
    return precision, recall, f1


def thresholded_pairs(
    S: np.ndarray,
    support: np.ndarray,
    latent_to_true: dict[int, int],
    interacts: Any,
    min_support: int = 5,
    min_score: float = 0.0,
) -> ThresholdedPairs:
    """Call a latent pair composing when its score `S[i, j]` is at least a threshold chosen to
    maximise F1 on the validation half of the candidates (never below `min_score`, a floor in the
    units of `S`), and score the calls on the test half.

    Candidates: latent pairs whose latents both match true features and that co-fire on at least
    `min_support` tokens (`support [n, n]`); `interacts(ti, tj) -> bool` says whether the true
    features interact (on the additive control: whether they would)."""
    lat = sorted(latent_to_true)
    cand, scores, labels = [], [], []
    for a_pos, li in enumerate(lat):
        for lj in lat[a_pos + 1 :]:
            if max(support[li, lj], support[lj, li]) < min_support:
                continue
            ti, tj = latent_to_true[li], latent_to_true[lj]
            cand.append((min(ti, tj), max(ti, tj)))
            scores.append(max(S[li, lj], S[lj, li]))
            labels.append(bool(interacts(ti, tj)))
    if not cand:
        return ThresholdedPairs(float("nan"), float("nan"), float("nan"), float("nan"), 0, 0, 0)
    s, y = np.asarray(scores), np.asarray(labels)
    val = _halves(cand)
    options = np.unique(np.r_[s[val], min_score])
    options = options[options >= min_score]
    best, best_f1 = max(min_score, float(s.max()) + 1.0), -1.0  # default: call nothing
    for t in options:
        f1 = _prf(s[val] >= t, y[val])[2] if val.any() else float("nan")
        if np.isfinite(f1) and f1 > best_f1:
            best, best_f1 = float(t), f1
    test = ~val
    called = (s[test] >= best) & (s[test] > 0)
    p, r, f = _prf(called, y[test])
    return ThresholdedPairs(
        best,
        p,
        r,
        f if np.isfinite(f) else 0.0,
        int(test.sum()),
        int(y[test].sum()),
        int(called.sum()),
    )


def conjunction_latent_score(z_active: np.ndarray, conj: np.ndarray) -> np.ndarray:
    """Per labelled pair, the best F1 of any single latent's firing as a detector of "both
    constituents fire": `z_active [T, n]` bool, `conj [T, P]` bool -> `[P]`.  Near 1 means the
    dictionary spent a latent on the conjunction instead of composing two."""
    zf, cf = z_active.astype(np.float64), conj.astype(np.float64)
    both = zf.T @ cf  # [n, P]
    f1 = 2 * both / np.maximum(zf.sum(0)[:, None] + cf.sum(0)[None, :], 1)
    return f1.max(0) if f1.size else np.zeros(conj.shape[1])
