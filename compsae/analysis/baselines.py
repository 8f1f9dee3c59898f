"""Linear baselines fitted on training rows and evaluated like the trained dictionaries.

- `pca`: rank-k PCA (every token uses all k components, L0 = k).
- `pca_topk`: the full PCA basis, keeping each token's k largest |coefficients| (sparse, L0 ≤ k).
- `nmf`: scikit-learn `MiniBatchNMF` on the sign-split activations `[relu(x), relu(−x)]` (NMF needs
  non-negative data), keeping each token's k largest codes; x̂ = x̂₊ − x̂₋.
Each is a `Reconstructor` (see `reconstructors.py`): small, picklable numpy/scikit-learn state.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.decomposition import PCA, MiniBatchNMF
from sklearn.exceptions import ConvergenceWarning

from compsae.analysis.reconstructors import Reconstruction


def quiet_fit(estimator: Any, x: np.ndarray) -> dict[str, Any]:
    """`estimator.fit(x)` with scikit-learn's ConvergenceWarning kept in (a rerun would print it
    again every time); returns what it would have said, for the record: `{"converged", "n_iter",
    "max_iter"}`.  Any other warning of the fit is passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        estimator.fit(x)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return {
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "n_iter": int(getattr(estimator, "n_iter_", 0)),
        "max_iter": int(estimator.max_iter),
    }


def not_converged_line(name: str, fit: dict[str, Any] | None) -> str | None:
    """The one line a baseline whose fit stopped before converging gets, or None."""
    if fit is None or fit["converged"]:
        return None
    return (
        f"{name}: the fit stopped at max_iter {fit['max_iter']} before converging "
        f"(n_iter {fit['n_iter']}; recorded as converged: false); it is scored as it stands"
    )


def keep_top_k(codes: np.ndarray, k: int) -> np.ndarray:
    """`codes: [b, n]` with all but each row's k largest |values| set to zero."""
    if k >= codes.shape[1]:
        return codes
    keep = np.argpartition(-np.abs(codes), k - 1, axis=1)[:, :k]
    out = np.zeros_like(codes)
    np.put_along_axis(out, keep, np.take_along_axis(codes, keep, 1), 1)
    return out


class PCABaseline:
    """`x̂ = μ + c V` with `c = (x − μ) Vᵀ`, `V: [r, d]` the top principal directions; with `top_k`
    the full basis and only the top_k largest |c| per token."""

    def __init__(
        self, name: str, mean: np.ndarray, components: np.ndarray, top_k: int | None = None
    ) -> None:
        self.name = name
        self.kind = "pca_topk" if top_k is not None else "pca"
        self.mean = mean.astype(np.float32)  # [d]
        self.components = components.astype(np.float32)  # [r, d]
        self.top_k = top_k
        self.n_latents = components.shape[0]

    @classmethod
    def fit(cls, x: np.ndarray, k: int, sparse: bool, seed: int = 0) -> PCABaseline:
        """Fit on training rows `x: [m, d]`: rank k, or (sparse) the full basis with top-k
        coefficients."""
        rank = min(x.shape) if sparse else min(k, *x.shape)
        pca = PCA(n_components=rank, svd_solver="full", random_state=seed).fit(
            np.asarray(x, np.float64)
        )
        return cls(
            "pca_topk" if sparse else "pca", pca.mean_, pca.components_, top_k=k if sparse else None
        )

    def __call__(self, x: np.ndarray) -> Reconstruction:
        codes = (np.asarray(x, np.float32) - self.mean) @ self.components.T  # [b, r]
        if self.top_k is not None:
            codes = keep_top_k(codes, self.top_k)
        return Reconstruction(x_hat=codes @ self.components + self.mean, z=codes)


def sign_split(x: np.ndarray) -> np.ndarray:
    """`x: [b, d]` -> `[relu(x), relu(−x)]: [b, 2d]`, non-negative and invertible (x = left −
    right)."""
    return np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=1)


class NMFBaseline:
    """Top-k NMF codes of the sign-split input; x̂ = (W_k H)[:, :d] − (W_k H)[:, d:]."""

    def __init__(
        self, name: str, nmf: MiniBatchNMF, top_k: int, fit: dict[str, Any] | None = None
    ) -> None:
        self.name, self.kind = name, "nmf"
        self.nmf = nmf
        self.top_k = top_k
        self.n_latents = int(nmf.components_.shape[0])
        self.fit_info = fit  # {"converged", "n_iter", "max_iter"} of the fit, see `quiet_fit`

    @classmethod
    def fit(
        cls, x: np.ndarray, k: int, n_components: int, seed: int = 0, max_iter: int = 50
    ) -> NMFBaseline:
        """Fit `n_components` non-negative atoms on training rows `x: [m, d]` (at most `max_iter`
        passes over them; whether it converged is in `fit_info`)."""
        nmf = MiniBatchNMF(
            # nndsvda needs at most min(rows, 2d) atoms: a small store or hook gets fewer
            n_components=min(n_components, x.shape[0], 2 * x.shape[1]),
            init="nndsvda",
            batch_size=1024,
            max_iter=max_iter,
            random_state=seed,
        )
        fit = quiet_fit(nmf, sign_split(np.asarray(x, np.float32)))
        return cls("nmf", nmf, k, fit)

    def __call__(self, x: np.ndarray) -> Reconstruction:
        x = np.asarray(x, np.float32)
        d = x.shape[1]
        codes = keep_top_k(
            self.nmf.transform(sign_split(x)).astype(np.float32), self.top_k
        )  # [b, c] >= 0
        both = codes @ self.nmf.components_.astype(np.float32)  # [b, 2d]
        return Reconstruction(x_hat=both[:, :d] - both[:, d:], z=codes)


def fit_baselines(
    names: list[str], x_train: np.ndarray, k: int, nmf_components: int, seed: int = 0
) -> list[PCABaseline | NMFBaseline]:
    """The requested baselines (`pca`, `pca_topk`, `nmf`) fitted on `x_train: [m, d]` at L0 = k."""
    out: list[PCABaseline | NMFBaseline] = []
    for name in names:
        if name == "pca":
            out.append(PCABaseline.fit(x_train, k, sparse=False, seed=seed))
        elif name == "pca_topk":
            out.append(PCABaseline.fit(x_train, k, sparse=True, seed=seed))
        elif name == "nmf":
            out.append(NMFBaseline.fit(x_train, k, nmf_components, seed=seed))
        else:
            raise ValueError(f"unknown baseline {name!r}")
    return out
