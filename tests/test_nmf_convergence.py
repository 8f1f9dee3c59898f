"""The NMF baselines: scikit-learn's ConvergenceWarning stays in; the record says whether the fit
converged, and a fit that did not gets one line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from compsae.analysis.baselines import NMFBaseline, not_converged_line, quiet_fit
from compsae.evaluation.probes.tasks import nmf_features


def _rows(n: int = 256, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _escaped(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return caught


def test_an_unconverged_nmf_baseline_is_recorded_not_warned() -> None:
    fitted: list[NMFBaseline] = []
    caught = _escaped(lambda: fitted.append(NMFBaseline.fit(_rows(), 4, 8, max_iter=1)))
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    (nmf,) = fitted
    assert nmf.fit_info == {"converged": False, "n_iter": 1, "max_iter": 1}
    line = not_converged_line("nmf", nmf.fit_info)
    assert line is not None and "max_iter 1 before converging" in line
    assert "converged: false" in line
    assert _escaped(lambda: nmf(_rows(16))) == []  # scoring it warns neither


def test_a_converged_fit_gets_no_line() -> None:
    from sklearn.decomposition import NMF

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 2)) @ rng.uniform(size=(2, 6))  # exactly rank 2, non-negative
    fit = quiet_fit(NMF(n_components=2, init="nndsvda", max_iter=2000, random_state=0), x)
    assert fit["converged"] and 1 <= fit["n_iter"] < 2000
    assert not_converged_line("nmf", fit) is None


def test_other_warnings_of_the_fit_are_passed_on() -> None:
    class Noisy:
        max_iter = 3
        n_iter_ = 3

        def fit(self, x: np.ndarray) -> None:
            warnings.warn("stopped early", ConvergenceWarning, stacklevel=2)
            warnings.warn("something else", UserWarning, stacklevel=2)

    with pytest.warns(UserWarning, match="something else") as caught:
        fit = quiet_fit(Noisy(), _rows())
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert fit == {"converged": False, "n_iter": 3, "max_iter": 3}


def test_the_probe_nmf_records_its_fit_and_never_warns() -> None:
    fit: dict = {}
    features = []
    caught = _escaped(lambda: features.append(nmf_features(_rows(), 8, fit=fit, max_iter=1)))
    caught += _escaped(lambda: features[0](_rows(32, seed=1)))  # each transform iterates too
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert fit == {"converged": False, "n_iter": 1, "max_iter": 1}
