"""The comparison metrics on fake oracle models over a ground-truth store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compsae.evaluation.comparison.config import EvaluateConfig
from compsae.evaluation.comparison.table import (
    CompositionAccumulator,
    eval_rows,
    evaluate_model,
    markdown_table,
)
from compsae.evaluation.ground_truth.config import GroundTruthConfig
from compsae.evaluation.ground_truth.design import load_ground_truth, write_ground_truth_store
from compsae.evaluation.ground_truth.pair_recovery import true_pairs
from compsae.store import ActivationStore, StoreLayout
from compsae.store.split import HeldOutSplit
from compsae.train.models.base import SAEOutput


class OracleComp(torch.nn.Module):
    """Decoder = the true V; reconstructs perfectly with the composition path, 80 % without;
    attends between co-active latents exactly when they form a true pair."""

    has_composition = True

    def __init__(self, V: np.ndarray, C, k: int = 8) -> None:
        super().__init__()
        self.W_dec = torch.nn.Parameter(torch.from_numpy(V).float())
        self.k = k
        n = V.shape[0]
        self.pair = torch.zeros(n, n)
        for a, b in true_pairs(C):
            self.pair[a, b] = self.pair[b, a] = 1.0

    def forward(self, x: torch.Tensor, composition: bool = True) -> SAEOutput:
        score = x @ self.W_dec.T
        idx = score.topk(self.k, dim=-1).indices  # [b, k]
        z = torch.zeros_like(score).scatter(1, idx, score.gather(1, idx).clamp_min(0))
        attn = self.pair[idx[:, :, None], idx[:, None, :]][:, None]  # [b, 1, k, k]
        return SAEOutput(x if composition else 0.8 * x, z, attn, active_idx=idx, comp=0.2 * x)

    def decode_active(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """Linear part plus one unit term per true pair among the active latents (what the
        intervention-based pair scores measure)."""
        linear = (vals[..., None] * self.W_dec[idx]).sum(1)
        both = (
            vals[:, :, None] * vals[:, None, :] * self.pair[idx[:, :, None], idx[:, None, :]]
        )  # [b, k, k]
        return linear + both.triu(1).sum((1, 2))[:, None]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    base = GroundTruthConfig(
        d_model=32,
        n_features=48,
        n_rows=4096,
        n_interactions={2: 6, 3: 2},
        noise_std=0.0,
        group_prob=0.05,
        mean_active=2.0,
    )
    layout = StoreLayout(dtype="float32", chunk_rows=512, shard_rows=2048)
    urls = {}
    for name, cfg in {
        "inter": base,
        "additive": base.model_copy(update={"additive_only": True}),
    }.items():
        urls[name] = str(root / name)
        write_ground_truth_store(cfg, urls[name], layout=layout)
    return urls


def test_oracle_scores(stores):
    cfg, split = EvaluateConfig(max_rows=2048, batch_size=500), HeldOutSplit(fraction=0.5)
    gt = load_ground_truth(stores["inter"])
    model = OracleComp(gt.V, gt.C)
    res = evaluate_model(
        model, ActivationStore.open(stores["inter"]), "synthetic.hook_x", gt, cfg, split
    )
    assert res["mcc"] == pytest.approx(1.0) and res["mmcs"] == pytest.approx(1.0)
    assert res["fvu"] == pytest.approx(0.0, abs=1e-9)
    store = ActivationStore.open(stores["inter"])
    x = store.read_rows("synthetic.hook_x", 0, store.n_rows)[eval_rows(store, split, 2048)]
    expected = 0.04 * (x**2).sum() / ((x - x.mean(0)) ** 2).sum()  # ‖0.2 x‖² about the mean of x
    assert res["fvu_no_composition"] == pytest.approx(expected, rel=1e-5)
    assert res["composition_share"] == pytest.approx(
        expected, rel=1e-5
    )  # (FVE_on - FVE_off) / FVE_on
    assert 6.0 < res["l0"] <= 8.0  # rows where nothing fires are all-zero
    # pair effects measured by intervention: exactly the true pairs compose
    assert res["pair_precision"] == 1.0 and res["pair_f1"] > 0.8 and res["pair_n_found"] > 0
    text = markdown_table([{"label": "oracle", **res}])
    assert "| oracle | 1 | 0 |" in text  # 3 significant digits: MCC 1, FVU 0

    # on the additive control the groups are scored as spurious pairs, not as recovered ones
    gta = load_ground_truth(stores["additive"])
    res_a = evaluate_model(
        OracleComp(gta.V, []),
        ActivationStore.open(stores["additive"]),
        "synthetic.hook_x",
        gta,
        cfg,
        split,
    )
    assert (
        "pair_f1" not in res_a
        and res_a["spurious_pair_n_found"] == 0
        and res_a["spurious_pair_f1"] == 0.0
    )


class OracleBilinear(OracleComp):
    """The bilinear ground truth's own decoder: composing pairs add a_i a_j B(v_i, v_j)."""

    def __init__(self, gt, k: int = 8) -> None:
        super().__init__(gt.V, [], k)
        d = gt.dictionary
        self.B = torch.from_numpy(
            ((d.V @ d.A.T)[:, None, :] * (d.V @ d.A.T)[None]) @ d.W_B
        ).float()  # [n, n, d]
        self.comp = torch.from_numpy(d.composing)

    def decode_active(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        linear = (vals[..., None] * self.W_dec[idx]).sum(1)
        on = (vals * self.comp[idx]).float()
        w = (on[:, :, None] * on[:, None, :]).triu(1)  # [b, k, k]
        return linear + torch.einsum("bij,bijd->bd", w, self.B[idx[:, :, None], idx[:, None, :]])


def test_bilinear_labelled_pairs_scored_by_effects_not_cooccurrence(tmp_path):
    cfg = GroundTruthConfig(
        interaction="bilinear",
        d_model=32,
        n_features=64,
        n_rows=8192,
        n_pairs=6,
        noise_std=0.0,
        group_prob=0.1,
        mean_active=2.0,
    )
    write_ground_truth_store(
        cfg,
        str(tmp_path / "bl"),
        layout=StoreLayout(dtype="float32", chunk_rows=512, shard_rows=4096),
    )
    gt = load_ground_truth(str(tmp_path / "bl"))
    res = evaluate_model(
        OracleBilinear(gt),
        ActivationStore.open(str(tmp_path / "bl")),
        "synthetic.hook_x",
        gt,
        EvaluateConfig(max_rows=4096, batch_size=512, min_pair_effect=0.0),
        HeldOutSplit(fraction=0.5),
    )
    assert res["pair_auc"] == 1.0  # every interacting pair above every twin
    assert res["pmi_auc"] < 0.9  # co-firing alone cannot tell them apart
    assert res["pair_f1"] > 0.9 and 0 <= res["conjunction_latent_f1"] <= 1


def test_composition_accumulator_means_over_coactive_tokens():
    acc = CompositionAccumulator(4)
    idx = torch.tensor([[0, 1], [0, 2]])
    attn = torch.tensor(
        [[[[0.5, 0.5], [0.2, 0.8]]], [[[0.9, 0.1], [0.3, 0.7]]]]
    )  # [b=2, heads=1, 2, 2]
    acc.update(attn, idx)
    S = acc.matrix()
    assert S[0, 1] == pytest.approx(0.5) and S[1, 0] == pytest.approx(0.2)
    assert S[0, 2] == pytest.approx(0.1) and S[0, 0] == 0.0 and S[3, 3] == 0.0


def test_pair_score_figure_draws_labelled_scores_and_skips_rows_without(tmp_path):
    from compsae.evaluation.comparison.table import pair_score_figure

    rows = [
        {
            "label": "costs $5 or $^$",
            "pair_auc": 0.9,
            "pair_threshold": 0.003,
            "pair_scores": {"interacting": [0.02, 0.0, 0.01], "co_firing_only": [1e-4, 0.0, 2e-3]},
        },
        {"label": "topk", "mcc": 0.95},
    ]
    out = tmp_path / "pair_scores.png"
    assert pair_score_figure(rows, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not pair_score_figure([{"label": "topk", "mcc": 0.95}], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()
