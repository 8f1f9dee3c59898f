"""k-sparse linear probes over any feature matrix (SAE latents, PCA/NMF components, raw channels).

Procedure (Gurnee et al. 2023 style): on the training split pick the k
features with the largest |mean(class 1) − mean(class 0)|, fit a logistic regression on just those,
report held-out accuracy and F1.  Feature selection only ever sees training rows, so a shuffled
label gives chance accuracy.  The conjunction test asks whether the composition output carries
A ∧ B information beyond the constituents, against a control with the same number of extra columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from compsae.errors import UserError


@dataclass
class ProbeResult:
    k: int
    features: list[int]  # selected column indices
    accuracy: float  # held-out
    f1: float  # held-out, positive class = 1
    majority: float  # held-out accuracy of always guessing the training majority class
    n_train: int
    n_test: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def split_indices(
    n: int, test_fraction: float = 0.3, seed: int = 0, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Train / test row indices.  With ``groups`` (e.g. sequence ids) a group is never split, so
    tokens of one prompt cannot leak from train to test."""
    rng = np.random.default_rng(seed)
    if groups is None:
        test = rng.random(n) < test_fraction
    else:
        uniq, inv = np.unique(groups, return_inverse=True)
        test = (rng.random(len(uniq)) < test_fraction)[inv]
    return np.flatnonzero(~test), np.flatnonzero(test)


def _dense(features) -> np.ndarray:
    if hasattr(features, "toarray"):
        features = features.toarray()
    return np.asarray(features, dtype=np.float64)


def mean_difference(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """|mean over label 1 − mean over label 0| per column: [n_features]."""
    labels = labels.astype(bool)
    return np.abs(features[labels].mean(axis=0) - features[~labels].mean(axis=0))


def top_k_features(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` columns with the largest class mean difference (ties: lower index)."""
    score = mean_difference(features, labels)
    return np.argsort(-score, kind="stable")[:k]


def _check_binary(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    values = np.unique(labels)
    if not set(values.tolist()) <= {0, 1}:
        raise UserError(
            f"probe labels must be binary 0/1, got values {values[:5].tolist()}: "
            "turn a multi-class label into one-vs-rest tasks first"
        )
    return labels.astype(np.int64)


def _fit_score(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, seed: int
) -> tuple[float, float]:
    if len(np.unique(y_train)) < 2:
        pred = np.full(len(y_test), y_train[0] if len(y_train) else 0)
    else:
        # Standardise with training statistics: latents and raw channels live on very different
        # scales.
        mu, sd = X_train.mean(axis=0), X_train.std(axis=0) + 1e-8
        clf = LogisticRegression(max_iter=1000, random_state=seed)
        clf.fit((X_train - mu) / sd, y_train)
        pred = clf.predict((X_test - mu) / sd)
    return float(accuracy_score(y_test, pred)), float(f1_score(y_test, pred, zero_division=0.0))


def sparse_probe(
    features, labels: np.ndarray, k: int, train_idx: np.ndarray, test_idx: np.ndarray, seed: int = 0
) -> ProbeResult:
    """Fit a k-sparse logistic probe.

    ``features``: [n, m] array or scipy sparse; ``labels``: [n] binary.  Selection and fitting use
    ``train_idx`` only; accuracy and F1 are measured on ``test_idx``.
    """
    X = _dense(features)
    y = _check_binary(labels)
    Xtr, ytr, Xte, yte = X[train_idx], y[train_idx], X[test_idx], y[test_idx]
    if len(np.unique(ytr)) < 2:
        raise UserError(
            "probe training split has a single class: use more examples or another split seed"
        )
    idx = top_k_features(Xtr, ytr, k)
    acc, f1 = _fit_score(Xtr[:, idx], ytr, Xte[:, idx], yte, seed)
    majority = float(np.mean(yte == int(round(ytr.mean()))))
    return ProbeResult(
        k=k,
        features=[int(i) for i in idx],
        accuracy=acc,
        f1=f1,
        majority=majority,
        n_train=len(train_idx),
        n_test=len(test_idx),
    )


def probe_sweep(
    features,
    labels: np.ndarray,
    ks: tuple[int, ...] = (1, 2, 5),
    test_fraction: float = 0.3,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> list[ProbeResult]:
    """:func:`sparse_probe` at each k on one shared train/test split."""
    n = features.shape[0]
    train_idx, test_idx = split_indices(n, test_fraction, seed, groups)
    return [sparse_probe(features, labels, k, train_idx, test_idx, seed) for k in ks]


@dataclass
class ConjunctionResult:
    constituents: (
        ProbeResult  # probe for A∧B on the constituent latents (top-k for A + top-k for B)
    )
    with_composition: float  # held-out accuracy after adding k_extra composition-output columns
    with_control: float  # ... after adding k_extra columns of the control matrix instead
    f1_constituents: float
    f1_with_composition: float
    f1_with_control: float

    @property
    def gain(self) -> float:
        """Accuracy gain of the composition output over the equally-sized control."""
        return self.with_composition - self.with_control

    def as_dict(self) -> dict:
        return {
            "accuracy_constituents": self.constituents.accuracy,
            "accuracy_with_composition": self.with_composition,
            "accuracy_with_control": self.with_control,
            "f1_constituents": self.f1_constituents,
            "f1_with_composition": self.f1_with_composition,
            "f1_with_control": self.f1_with_control,
            "gain_over_control": self.gain,
        }


def conjunction_test(
    latents,
    composition,
    control,
    label_a: np.ndarray,
    label_b: np.ndarray,
    k_each: int = 1,
    k_extra: int = 1,
    test_fraction: float = 0.3,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> ConjunctionResult:
    """Does the composition output improve an A∧B probe over the constituents alone?

    ``latents``: [n, m] SAE codes; the constituents are the top ``k_each`` latents for A and for B
    (selected on the training split).  ``composition``: [n, d] the composition path's output;
    ``control``: [n, d'] a matrix of the same kind without composition (e.g. the reconstruction
    with the composition path off, or the raw residual) so that a gain is not just extra columns.
    ``k_extra`` columns of each are added, chosen by mean difference for A∧B.
    """
    Z, Cm, Ct = _dense(latents), _dense(composition), _dense(control)
    a, b = _check_binary(label_a), _check_binary(label_b)
    y = a & b
    train_idx, test_idx = split_indices(len(y), test_fraction, seed, groups)
    cons = np.unique(
        np.concatenate(
            [
                top_k_features(Z[train_idx], a[train_idx], k_each),
                top_k_features(Z[train_idx], b[train_idx], k_each),
            ]
        )
    )
    base = Z[:, cons]
    ytr, yte = y[train_idx], y[test_idx]
    if len(np.unique(ytr)) < 2:
        raise UserError(
            "A∧B never (or always) holds in the training split: the conjunction test needs both"
        )
    acc0, f10 = _fit_score(base[train_idx], ytr, base[test_idx], yte, seed)

    def with_extra(extra: np.ndarray) -> tuple[float, float]:
        cols = top_k_features(extra[train_idx], ytr, k_extra)
        X = np.concatenate([base, extra[:, cols]], axis=1)
        return _fit_score(X[train_idx], ytr, X[test_idx], yte, seed)

    acc_c, f1_c = with_extra(Cm)
    acc_t, f1_t = with_extra(Ct)
    majority = float(np.mean(yte == int(round(ytr.mean()))))
    base_res = ProbeResult(
        k=len(cons),
        features=[int(i) for i in cons],
        accuracy=acc0,
        f1=f10,
        majority=majority,
        n_train=len(train_idx),
        n_test=len(test_idx),
    )
    return ConjunctionResult(
        constituents=base_res,
        with_composition=acc_c,
        with_control=acc_t,
        f1_constituents=f10,
        f1_with_composition=f1_c,
        f1_with_control=f1_t,
    )
