"""Pair profiles: where both latents fire against one alone, and the logits the pair's mean term
moves (checked against the pair term computed by hand)."""

from __future__ import annotations

import numpy as np
import torch
from pair_fixtures import D, composer

from compsae.analysis.pair_profile import frequent_tokens, logit_effect, pair_profiles


def test_profile_counts_tokens_and_reads_the_mean_term_through_the_unembedding() -> None:
    model = composer()
    rng = np.random.default_rng(0)
    rows, ids, ab = [], [], []
    # 30 rows where latents 2 and 5 fire together (token 7), 20 where 2 fires with 9 (token 8),
    # 10 where 5 fires with 11 (token 9)
    for partner_of_2, n, tok in ((5, 30, 7), (9, 20, 8), (None, 10, 9)):
        for _ in range(n):
            x = np.zeros(D, dtype=np.float32)
            i, j = (2, partner_of_2) if partner_of_2 is not None else (5, 11)
            a, b = rng.uniform(1, 2, 2)
            x[i], x[j] = a, b
            rows.append(x)
            ids.append(tok)
            ab.append(a * b if (i, j) == (2, 5) else np.nan)
    x = np.stack(rows)
    w_u = rng.normal(size=(D, 40)).astype(np.float32)
    pairs = [{"i": 2, "j": 5}]

    def decode(t: int) -> str:
        return f"t{t}"

    pair_profiles(model, 1.0, x, np.array(ids), pairs, decode, w_u)
    (p,) = pairs
    assert p["tokens_both"] == [["t7", 30]]
    assert (p["n_only_i"], p["n_only_j"]) == (20, 10)
    assert p["tokens_only_i"] == [["t8", 20]] and p["tokens_only_j"] == [["t9", 10]]
    with torch.no_grad():
        term = model.pair.pair_term(torch.tensor([2]), torch.tensor([5]))[0].double().numpy()
    mean_term = float(np.nanmean(ab)) * term
    logits = mean_term @ w_u.astype(np.float64)
    assert p["promoted"][0] == ["t" + str(int(np.argmax(logits))), p["promoted"][0][1]]
    assert abs(p["promoted"][0][1] - logits.max()) < 1e-4 * abs(logits).max()
    assert p["demoted"][0][0] == "t" + str(int(np.argmin(logits)))
    # no unembedding: counts only
    bare = [{"i": 2, "j": 5}]
    pair_profiles(model, 1.0, x, np.array(ids), bare, decode, None)
    assert "promoted" not in bare[0] and bare[0]["n_only_i"] == 20


def test_frequent_tokens_and_logit_effect_order() -> None:
    assert frequent_tokens(np.array([3, 1, 3, 2, 3, 1]), str, 2) == [["3", 3], ["1", 2]]
    up, down = logit_effect(np.array([1.0, 0.0]), np.array([[0.5, -2.0, 3.0], [9, 9, 9]]), str, 2)
    assert [t for t, _ in up] == ["2", "0"] and [t for t, _ in down] == ["1", "0"]
