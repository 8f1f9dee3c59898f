"""Seed aggregation of the ablation study."""

from __future__ import annotations

import pytest

from compsae.analysis.seeds import aggregate_seeds, mean_sd_table


def test_aggregate_seeds_mean_sd():
    rows = [{"variant": "full", "seed": s, "fvu": v} for s, v in enumerate([0.1, 0.2, 0.3])]
    rows += [{"variant": "gate_off", "seed": 0, "fvu": 0.5}]
    agg = aggregate_seeds(rows)
    assert agg.loc["full", "fvu_mean"] == pytest.approx(0.2)
    assert agg.loc["full", "fvu_sd"] == pytest.approx(0.1)
    assert agg.loc["full", "n_seeds"] == 3 and agg.loc["gate_off", "n_seeds"] == 1
    text = mean_sd_table(agg, ["fvu"])
    assert "0.200 ± 0.100" in text and "0.500 ± –" in text
