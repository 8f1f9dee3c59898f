"""Analysis on a small store and checkpoints made here: Dask equals the plain loop with any
scheduler, and the report's numbers are the ones in metrics.json."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from compsae.analysis.block_stats import BlockSpec
from compsae.analysis.ce import ce_metrics
from compsae.analysis.config import AnalyzeConfig
from compsae.analysis.dask_path import (
    acts_array,
    build_graph,
    compute,
    dask_client,
    open_store,
    plan_blocks,
    reference_partials,
)
from compsae.analysis.metrics import model_metrics
from compsae.analysis.reconstructors import SAEReconstructor
from compsae.analysis.report import fmt
from compsae.analysis.run import run_analyze
from compsae.store import ActivationStore, StoreLayout
from compsae.store.split import HeldOutSplit, heldout_mask
from compsae.train.checkpoint import save_checkpoint
from compsae.train.config import make_model_config
from compsae.train.models import build_model
from compsae.train.records import CheckpointMeta, Normalization

HOOK = "blocks.0.hook_resid_post"
D, CTX, N_ROWS, FRACTION = 16, 32, 4096, 0.25


def make_store(url: str) -> ActivationStore:
    rng = np.random.default_rng(0)
    layout = StoreLayout(chunk_rows=256, shard_rows=1024, dtype="float16")
    st = ActivationStore.create(
        url,
        {HOOK: D},
        N_ROWS,
        layout,
        {"config_hash": "t", "context": CTX, "model": {"name": "tiny-neox"}},
        overwrite=True,
    )
    atoms = rng.normal(size=(40, D))
    for shard in range(N_ROWS // 1024):
        rows = np.arange(shard * 1024, (shard + 1) * 1024)
        codes = rng.exponential(1.0, (1024, 40)) * (rng.random((1024, 40)) < 0.1)
        x = codes @ atoms + 0.5 + rng.normal(0, 0.1, (1024, D))
        pos = rows % CTX
        x[pos == 0] *= 4.0  # BOS rows stand out, as in real models
        st.write_shard(
            shard, {HOOK: x}, tokens=rng.integers(32, 127, 1024), seq_id=rows // CTX, pos=pos
        )
    st.finalize()
    return st


def make_models(train_dir) -> None:
    torch.manual_seed(0)
    configs = {
        "compsae": make_model_config(
            type="compsae", n_latents=48, k=4, d_f=16, d_c=8, n_heads=2, composer="attention"
        ),
        "compsae_mlp": make_model_config(
            type="compsae", n_latents=48, k=4, d_f=16, d_c=8, n_heads=2, composer="mlp"
        ),
        "topk": make_model_config(type="topk", n_latents=48, k=4),
        "relu": make_model_config(type="relu", n_latents=48),
    }
    for name, cfg in configs.items():
        model = build_model(cfg, D)
        meta = CheckpointMeta(
            type=cfg.type,
            model=cfg,
            d_in=D,
            hook=HOOK,
            normalization=Normalization(scale=0.7),
            split=HeldOutSplit(fraction=FRACTION),
            step=1,
            tokens_seen=100,
            finished=True,
        )
        save_checkpoint(str(train_dir / name), model, meta.model_dump(mode="json"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    url = str(root / "store.zarr")
    make_store(url)
    make_models(root / "train")
    return url, root


def _recons(root):
    from compsae.analysis.baselines import fit_baselines

    recons = [
        SAEReconstructor.from_checkpoint(n, str(root / "train" / n), batch_rows=100)
        for n in ("compsae", "topk")
    ]
    rng = np.random.default_rng(1)
    return recons + fit_baselines(["pca_topk"], rng.normal(size=(200, D)), 4, 8)


def _summaries(parts, tracked):
    return {n: model_metrics(p, [0.01, 0.1], 0.05, tracked.get(n))[0] for n, p in parts.items()}


@pytest.mark.parametrize("seed", range(6))
def test_the_cap_keeps_the_first_held_out_rows_in_store_order(seed: int) -> None:
    """plan_blocks counts per chunk, then inside the chunk where the cap falls: the rows kept are
    the first `max_tokens` held-out rows, and the blocks are the chunks holding them."""
    rng = np.random.default_rng(seed)
    n, chunk_rows = int(rng.integers(50, 400)), int(rng.integers(1, 40))
    held = rng.random(n) < rng.uniform(0.1, 0.9)
    for cap in (1, int(held.sum()) // 2 + 1, int(held.sum()), n):
        plan = plan_blocks(held, chunk_rows, max_tokens=cap)
        first = np.flatnonzero(held)[:cap]
        np.testing.assert_array_equal(np.flatnonzero(plan.keep), first)
        assert plan.chunks == sorted({int(r) // chunk_rows for r in first})


def test_dask_equals_numpy_loop_with_any_scheduler(setup):
    url, root = setup
    store = open_store(url)
    held = heldout_mask(store.seq_id, FRACTION, 0)
    plan = plan_blocks(held, store.chunk_rows, max_tokens=700)
    assert plan.n_tokens == 700 and plan.keep.sum() == 700 and not (plan.keep & ~held).any()
    recons = _recons(root)
    tracked = {"compsae": np.array([0, 3, 5, 7, 11, 20])}
    spec = BlockSpec(top_k_contexts=3, tracked=tracked, contexts_for=frozenset({"compsae"}))
    ref = reference_partials(store, HOOK, store.pos, plan, recons, spec)
    results = []
    for workers in (0, 1, 2):
        graph = build_graph(acts_array(store, HOOK), store.pos, plan, recons, spec)
        with dask_client(workers, processes=False) as client:
            results.append(compute(graph, client, progress=False))
    want = _summaries(ref, tracked)
    for got in results:
        got_s = _summaries(got, tracked)
        for name in want:
            for group in ("all", "bos", "rest"):
                for key, v in want[name][group].items():
                    assert got_s[name][group][key] == pytest.approx(v, rel=1e-9, nan_ok=True), (
                        name,
                        group,
                        key,
                    )
        assert np.array_equal(got["compsae"]["pairs"].co, ref["compsae"]["pairs"].co)
        assert np.allclose(got["compsae"]["pairs"].attn_to, ref["compsae"]["pairs"].attn_to)
        assert np.array_equal(got["compsae"]["top"].rows, ref["compsae"]["top"].rows)
        assert np.array_equal(got["compsae"]["latents"].fire, ref["compsae"]["latents"].fire)
    # the merge tree is fixed, so every scheduler gives bit-identical floats
    for got in results[1:]:
        assert got["compsae"]["rest"].sq_err == results[0]["compsae"]["rest"].sq_err
        assert np.array_equal(
            got["compsae"]["pairs"].attn_to, results[0]["compsae"]["pairs"].attn_to
        )
    # and the loop itself agrees with one numpy pass over all evaluated rows
    rows = np.flatnonzero(plan.keep)
    x = store.read_rows(HOOK, 0, store.n_rows)[rows]
    out = recons[0](x)
    mu = x.astype(np.float64).mean(0)
    fvu = ((x - out.x_hat.astype(np.float64)) ** 2).sum() / ((x - mu) ** 2).sum()
    assert want["compsae"]["all"]["fvu"] == pytest.approx(fvu, rel=1e-6)
    assert want["compsae"]["all"]["n_tokens"] == 700
    assert want["compsae"]["bos"]["n_tokens"] == (store.pos[rows] == 0).sum()


def test_zarr_reader_equals_chunk_reader(setup):
    url, _ = setup
    store = open_store(url)
    a = acts_array(store, HOOK, reader="chunk")[300:900].compute()
    b = acts_array(store, HOOK, reader="zarr")[300:900].compute()
    assert np.array_equal(a, b) and np.array_equal(a, store.read_rows(HOOK, 300, 900))


def toy_ce_fn(tokens: torch.Tensor, replace):
    """A stand-in LM: fixed embedding -> (hook) -> unembedding."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(128, D, generator=g)
    unemb = torch.randn(D, 128, generator=g)
    acts = emb[tokens]
    if replace is not None:
        acts = replace(acts)
    logits = acts @ unemb
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, 128), tokens[:, 1:].reshape(-1), reduction="none"
    )
    return ce.reshape(tokens.shape[0], -1), logits


def test_ce_metrics_hand_values():
    tok = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    perfect = ce_metrics(toy_ce_fn, tok, lambda a: a)
    assert perfect["ce_recovered"] == pytest.approx(1.0) and perfect["delta_ce"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert perfect["kl_score"] == pytest.approx(1.0)
    half = ce_metrics(toy_ce_fn, tok, lambda a: a * 0.5)
    want = (half["ce_zero"] - half["ce_recon"]) / (half["ce_zero"] - half["ce_clean"])
    assert half["ce_recovered"] == pytest.approx(want) and half["ce_recovered"] < 1.0
    assert half["kl_zero"] > half["kl_recon"] > 0


def test_report_end_to_end_numbers_match_metrics_json(setup, tmp_path):
    url, root = setup
    cfg = AnalyzeConfig(
        max_heldout_tokens=800,
        baseline_fit_tokens=600,
        nmf_components=8,
        top_k_contexts=3,
        pair_latents=16,
        ce_sequences=4,
        progress=False,
        n_attention_examples=2,
    )
    out = tmp_path / "analyze"
    res = run_analyze(cfg, url, str(root / "train"), str(out), ce_fn=toy_ce_fn)
    metrics = json.loads((out / "metrics.json").read_text())
    html = (out / "report.html").read_text()
    assert set(metrics["models"]) == {
        "compsae",
        "compsae_mlp",
        "topk",
        "relu",
        "pca",
        "pca_topk",
        "nmf",
    }
    assert metrics["n_tokens"] == 800 == res["n_tokens"]
    assert metrics["baseline_k"] == 4
    for name, m in metrics["models"].items():
        row = re.search(rf"<tr><td>{name}</td>(.*?)</tr>", html).group(1)
        assert (
            f"<td>{fmt(m['all']['fvu'])}</td>" in row and f"<td>{fmt(m['all']['l0'])}</td>" in row
        )
        assert m["ce"]["ce_clean"] is not None
    assert metrics["models"]["pca"]["all"]["l0"] == pytest.approx(4.0)
    fit = metrics["models"]["nmf"]["fit"]  # the NMF fit's convergence, recorded
    assert isinstance(fit["converged"], bool) and 1 <= fit["n_iter"] <= fit["max_iter"] == 50
    assert "fit" not in metrics["models"]["pca"]
    assert metrics["models"]["pca_topk"]["all"]["l0"] <= 4.0
    assert (
        "fvu_nocomp" in metrics["models"]["compsae"]["all"]
        and "fvu_nocomp" not in metrics["models"]["topk"]["all"]
    )
    assert metrics["models"]["compsae"]["pairs"]["n_tracked"] == 16
    assert (
        "heads" in metrics["models"]["compsae"] and "heads" not in metrics["models"]["compsae_mlp"]
    )
    assert len(metrics["ablations"]) == 4 and {a["composer"] for a in metrics["ablations"]} >= {
        "attention",
        "mlp",
    }
    flat = pd.read_parquet(out / "metrics.parquet")
    got = flat.query("model == 'topk' and group == 'all' and metric == 'fvu'")["value"].item()
    assert got == pytest.approx(metrics["models"]["topk"]["all"]["fvu"])
    # offline: no network assets, every image a relative file that exists
    assert "http" not in html and "<script" not in html
    for src in re.findall(r"<img src='([^']+)'", html):
        assert (out / src).is_file()
    assert (out / "figures" / "composition_compsae.png").is_file()
    assert (out / "figures" / "attention_example_0.png").is_file()
    # the attention heatmap only for the attention composer; the MLP composer's row says why
    assert (out / "figures" / "attention_compsae.png").is_file()
    assert not (out / "figures" / "attention_compsae_mlp.png").exists()
    assert "no attention in mlp composer" in html and "no pair path in topk" in html
    tops = pd.read_parquet(out / "top_contexts.parquet")
    assert set(tops["model"]) == {"compsae", "compsae_mlp", "topk", "relu"}
    first = (
        tops[(tops.model == "topk")]
        .groupby("latent")["activation"]
        .apply(lambda s: s.is_monotonic_decreasing)
    )
    assert first.all()
    assert (
        tops["context_text"].str.len().gt(0).all()
        and (tops["context_ids"].apply(len) <= cfg.context_window + 1).all()
    )
    lat = pd.read_parquet(out / "latents.parquet")
    assert lat.query("model == 'compsae'")["n_partners"].notna().sum() == 16
    # the browser has one pair page per profiled top pair, the same rows metrics.json holds
    from compsae.analysis.browser_data import pair_pages
    from compsae.analysis.run import TOP_PAIR_EXAMPLES

    page = (out / "browser" / "compsae.html").read_text()
    blob = re.search(r"<script type='application/json' id='data'>(.*?)</script>", page, re.S)
    top = metrics["models"]["compsae"]["pairs"].get("top_pairs", [])[:TOP_PAIR_EXAMPLES]
    assert top and json.loads(blob.group(1).replace("<\\/", "</"))["pairs"] == pair_pages(top)
    assert lat.query("model == 'topk'")["fire_count"].sum() == pytest.approx(
        metrics["models"]["topk"]["all"]["l0"] * 800
    )
    _every_key_is_documented(metrics)


def _every_key_is_documented(metrics: dict) -> None:
    """Every field analyze writes is named in docs/metrics.md's metrics.json section."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    doc = doc[doc.index("## metrics.json") :]
    keys = set(metrics)
    for m in metrics["models"].values():
        keys |= set(m) | set(m["all"]) | set(m["latents"]) | set(m.get("ce", {}))
        pairs = m.get("pairs", {})
        keys |= set(pairs) | {k for row in pairs.get("top_pairs", []) for k in row}
        keys |= {k for row in m.get("pair_causal", []) for k in row}
    for row in metrics["ablations"]:
        keys |= set(row) - {"model", "k", "n_latents", "type"}
    missing = sorted(k for k in keys if f"`{k}`" not in doc and f"`{k}_lo`" not in doc)
    assert not missing, f"metrics.json fields missing from docs/metrics.md: {missing}"


@pytest.mark.slow
def test_existing_cluster_with_worker_processes_gives_the_same_numbers(setup):
    """`scheduler=tcp://...`: reconstructors and the store travel by path into worker processes."""
    from distributed import LocalCluster

    url, root = setup
    store = open_store(url)
    plan = plan_blocks(heldout_mask(store.seq_id, FRACTION, 0), store.chunk_rows, max_tokens=300)
    recons = _recons(root)
    spec = BlockSpec(
        top_k_contexts=2, tracked={"compsae": np.arange(6)}, contexts_for=frozenset({"topk"})
    )
    ref = reference_partials(store, HOOK, store.pos, plan, recons, spec)
    graph = build_graph(acts_array(store, HOOK), store.pos, plan, recons, spec)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        dask_client(scheduler=cluster.scheduler_address) as client,
    ):
        got = compute(graph, client, progress=False)
    for name in ("compsae", "topk", "pca_topk"):
        for group in ("bos", "rest"):
            assert got[name][group].sq_err == pytest.approx(ref[name][group].sq_err, rel=1e-9)
    assert np.allclose(got["compsae"]["pairs"].attn_to, ref["compsae"]["pairs"].attn_to)


def test_user_errors(setup, tmp_path):
    url, _ = setup
    from compsae.errors import UserError

    with pytest.raises(UserError, match="no train stage folder"):
        run_analyze(AnalyzeConfig(), url, str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no trained models"):
        run_analyze(AnalyzeConfig(), url, str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(UserError, match="no held-out rows"):
        plan_blocks(np.zeros(100, bool), 10, 5)
    with pytest.raises(ValueError):
        AnalyzeConfig(scheduler="localhost:8786")
    with pytest.raises(ValueError):
        AnalyzeConfig(unknown_key=1)
