"""Krippendorff's alpha against hand-computed and published values."""

from __future__ import annotations

import numpy as np
import pytest

from compsae.evaluation.human_study.agreement import coincidence_matrix, krippendorff_alpha

nan = np.nan


def test_nominal_two_raters_by_hand():
    # Units: (1,1) (1,0) (0,0) (0,0).  Coincidences: o00 = 4, o01 = o10 = 1, o11 = 2, so n0 = 5,
    # n1 = 3, n = 8.  alpha = 1 - (n-1) * (o01 + o10) / (2 * n0 * n1) = 1 - 7 * 2 / 30 = 8/15.
    data = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=float)
    values, o = coincidence_matrix(data)
    assert values.tolist() == [0, 1]
    assert o.tolist() == [[4, 1], [1, 2]]
    assert krippendorff_alpha(data, "nominal") == pytest.approx(8 / 15)


def test_ordinal_three_values_by_hand():
    # Units (1,2), (2,3), (3,3): o12=o21=1, o23=o32=1, o33=2, n1=1, n2=2, n3=3, n=6.
    # ordinal delta^2: d12 = (n1+n2 - (n1+n2)/2)^2 = 1.5^2 = 2.25; d23 = (2+3 - 2.5)^2 = 6.25;
    # d13 = (1+2+3 - 2)^2 = 16.  observed = 2*2.25 + 2*6.25 = 17;
    # expected = 2*(1*2*2.25 + 2*3*6.25 + 1*3*16) = 2*(4.5 + 37.5 + 48) = 180.
    # alpha = 1 - 5 * 17 / 180 = 95/180.
    data = np.array([[1, 2, 3], [2, 3, 3]], dtype=float)
    assert krippendorff_alpha(data, "ordinal") == pytest.approx(95 / 180)


def test_published_example_with_missing_values():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 coders, 12 units.
    data = np.array(
        [
            [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
            [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
            [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
            [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
        ]
    )
    assert krippendorff_alpha(data, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(data, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(data, "interval") == pytest.approx(0.849, abs=5e-4)


def test_perfect_agreement_and_degenerate_cases():
    assert krippendorff_alpha(np.array([[0, 1, 1], [0, 1, 1]], dtype=float)) == pytest.approx(1.0)
    assert np.isnan(krippendorff_alpha(np.array([[1, 1], [1, 1]], dtype=float)))  # no variation
    assert np.isnan(krippendorff_alpha(np.array([[1, nan], [nan, 0]])))  # nothing pairable
    with pytest.raises(ValueError):
        krippendorff_alpha(np.array([[0, 1], [1, 0]], dtype=float), "ratio")
