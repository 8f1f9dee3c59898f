"""What the composition report and the feature browser show per kind of model: labels by composer,
no attention views for models without attention, partner lists as counted, sequence-start rows
left out unless asked for, top contexts with the tokens after them and repeats merged."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pair_fixtures import D, N, composer

from compsae.analysis.block_stats import BlockSpec, model_partial
from compsae.analysis.browser_data import pair_pages
from compsae.analysis.browser_page import render_browser
from compsae.analysis.config import AnalyzeConfig
from compsae.analysis.reconstruction import TopContexts
from compsae.analysis.reconstructors import SAEReconstructor
from compsae.analysis.report import NotApplicable, composition_rows, composition_section
from compsae.analysis.run import TOP_CONTEXT_COLUMNS, run_analyze, top_context_table
from compsae.analysis.views import CompositionView, view_of
from compsae.store import ActivationStore, StoreLayout
from compsae.store.split import HeldOutSplit
from compsae.train.checkpoint import save_checkpoint
from compsae.train.config import make_model_config
from compsae.train.models import build_model
from compsae.train.records import CheckpointMeta, Normalization

HOOK = "blocks.0.hook_resid_post"
SEQ, ROWS = 16, 1024
BOS_LATENT = 0  # fires far above everything else on every sequence's first row


def token_at(pos: np.ndarray) -> np.ndarray:
    """Every sequence has the same tokens (pos + 1): windows at one position repeat."""
    return pos + 1


def make_store(url: str) -> ActivationStore:
    rng = np.random.default_rng(0)
    st = ActivationStore.create(
        url,
        {HOOK: D},
        ROWS,
        StoreLayout(chunk_rows=64, shard_rows=256, dtype="float32"),
        {"config_hash": "views"},
        overwrite=True,
    )
    x = np.abs(rng.normal(size=(ROWS, D))).astype(np.float32)
    rows = np.arange(ROWS)
    pos = rows % SEQ
    x[pos == 0, BOS_LATENT] = 10.0  # the pair fixture's encoder reads coordinate i as latent i
    for s in range(st.n_shards):
        lo, hi = st.shard_range(s)
        st.write_shard(s, {HOOK: x[lo:hi]}, token_at(pos[lo:hi]), rows[lo:hi] // SEQ, pos[lo:hi])
    st.finalize()
    return ActivationStore.open(url)


def save(model: torch.nn.Module, cfg, path) -> None:
    meta = CheckpointMeta(
        type=cfg.type,
        model=cfg,
        d_in=D,
        hook=HOOK,
        normalization=Normalization(scale=1.0),
        split=HeldOutSplit(fraction=0.5),
        step=1,
        tokens_seen=10,
        finished=True,
    )
    save_checkpoint(str(path), model, meta.model_dump(mode="json"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views")
    store = make_store(str(tmp / "s.zarr"))
    pair = composer()
    save(pair, pair.cfg, tmp / "train" / "pair")
    torch.manual_seed(0)
    cfg = make_model_config(type="topk", n_latents=N, k=2)
    save(build_model(cfg, D), cfg, tmp / "train" / "topk")
    return tmp, store


def analyse(tmp, store, out: str, **over) -> dict:
    cfg = AnalyzeConfig(
        **{
            "baselines": [],
            "ce": False,
            "progress": False,
            "pair_fdr": None,
            "top_k_contexts": 8,
            "context_window": 3,
            "context_after": 2,
            "browser_contexts": 8,
            "browser_partners": 3,
            "browser_hist_rows": 64,
            "n_attention_examples": 2,
            **over,
        }
    )
    run_analyze(cfg, store.url, str(tmp / "train"), str(tmp / out), decode=lambda i: f"t{i}")
    return json.loads((tmp / out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def default_run(trained):
    tmp, store = trained
    return tmp / "out", analyse(tmp, store, "out")


def page_data(path) -> dict:
    text = path.read_text()
    blob = re.search(r"<script type='application/json' id='data'>(.*?)</script>", text, re.S)
    return json.loads(blob.group(1).replace("<\\/", "</"))


# -- labels per kind ------------------------------------------------------------------------------


def test_pairwise_and_topk_models_get_their_own_labels_and_no_attention_views(default_run):
    out, metrics = default_run
    assert metrics["models"]["pair"]["composer"] == "pair"
    assert "composer" not in metrics["models"]["topk"]
    html = (out / "report.html").read_text()
    row = re.search(r"<tr><td>pair</td><td>pair composer</td>(.*?)</tr>", html).group(1)
    assert "<td>pair effect ‖Δ_ij‖</td>" in row
    topk = re.search(r"<tr><td>topk</td><td>topk</td><td colspan='\d+'>(.*?)</td></tr>", html)
    assert topk is not None and "no pair path in topk" in topk.group(1)
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert "composition_pair.png" in figures and "partners_pair.png" in figures
    # attention views only for attention models: none here, and no empty panel in their place
    assert not [f for f in figures if f.startswith(("attention", "head_entropy"))], figures
    assert not [f for f in figures if f.endswith("_topk.png") and "composition" in f]
    srcs = re.findall(r"<img src='figures/([^']+)'", html)
    assert sorted(srcs) == figures
    assert "attention weight" not in html and "mean attention" not in html
    assert "no attention in pair composer" not in html  # no attention model: no such column


def test_cells_a_composer_lacks_say_why():
    pair_stats = {"matrix": "pair effects (mixed differences)", "n_tracked": 4, "n_tokens": 10}
    metrics = {
        "models": {
            "att": {
                "kind": "compsae",
                "composer": "attention",
                "gate_on": True,
                "pairs": {**pair_stats, "spearman_attention_vs_effect": 0.5},
                "gate": {"gate_mean": 0.4, "gate_std": 0.1},
                "heads": {"head_agreement": 0.9},
            },
            "pair": {"kind": "compsae", "composer": "pair", "pairs": dict(pair_stats)},
            "mlp": {
                "kind": "compsae",
                "composer": "mlp",
                "gate_on": False,
                "pairs": dict(pair_stats),
                "gate": {"gate_mean": 1.0, "gate_std": 0.0},
            },
            "none": {"kind": "compsae", "composer": "none"},
            "tk": {"kind": "topk"},
            "pca": {"kind": "pca"},  # a baseline: no composition row at all
        },
        "ablations": [{"model": n} for n in ("att", "pair", "mlp", "none", "tk")],
    }
    rows, cols = composition_rows(metrics)
    by = {r["model"]: r for r in rows}
    assert set(by) == {"att", "pair", "mlp", "none", "tk"}
    assert {"head_agreement", "gate_mean", "spearman_attention_vs_effect"} <= set(cols)
    assert by["att"]["matrix"] == "pair effect ‖Δ_ij‖ (by intervention)"
    assert by["pair"]["matrix"] == "pair effect ‖Δ_ij‖"

    def why(model: str, col: str) -> str:
        cell = by[model][col]
        assert isinstance(cell, NotApplicable), (model, col, cell)
        return cell.why

    assert why("pair", "head_agreement") == "no attention in pair composer"
    assert why("pair", "spearman_attention_vs_effect") == "no attention in pair composer"
    assert why("pair", "gate_mean") == "no residual gate in pair composer"
    assert why("mlp", "head_agreement") == "no attention in mlp composer"
    assert why("mlp", "gate_mean") == "gate off (g = 1)"  # its gate values are all 1
    assert by["att"]["gate_mean"] == 0.4 and by["att"]["head_agreement"] == 0.9
    assert by["tk"]["_why"] == "no pair path in topk"
    assert by["none"]["_why"] == "no pair path in composer none"
    # no model with pair statistics: one line, not a table of blanks
    only = {"models": {"tk": {"kind": "topk"}}, "ablations": [{"model": "tk"}]}
    assert composition_section(only) == [
        "<p class='note'>No composition statistics (tk: no pair path in topk).</p>"
    ]


def test_views_per_kind():
    gated = view_of(
        {"kind": "compsae", "composer": "pair", "pair_selection": "gated", "pair_fit": "residual"}
    )
    assert gated.label == "pair composer, gated pairs, residual fit"
    assert gated.why("gate") == "no residual gate in pair composer"  # the short name in phrases
    assert view_of({"kind": "compsae", "composer": "pair", "pair_selection": "all"}).label == (
        "pair composer"
    )
    assert view_of({"kind": "compsae", "composer": "mlp", "gate_on": False}).label == (
        "mlp composer, gate off"
    )
    att = view_of({"kind": "compsae", "composer": "attention", "pairs": {"matrix": "x"}})
    assert (
        att.attends
        and att.why("heads") == ""
        and att.why("pairs") == "pair statistics not computed"
    )
    assert CompositionView("relu").why("gate") == "no composition path in relu"
    assert not CompositionView("compsae", "none").composes
    with pytest.raises(ValueError, match="unknown view"):
        CompositionView("topk").why("colour")


# -- partners -------------------------------------------------------------------------------------


def test_partner_panel_lists_the_partners_counted(default_run):
    out, _ = default_run
    data = page_data(out / "browser" / "pair.html")
    lat = pd.read_parquet(out / "latents.parquet").query("model == 'pair'").set_index("latent")
    counts = {int(k): v for k, v in data["partner_counts"].items()}
    panels = {int(k): v for k, v in data["partners"].items()}
    assert counts and set(counts) == set(panels)
    capped = 0
    for latent, n in counts.items():
        assert n == lat.loc[latent, "n_partners"]  # the table's count is the panel's list
        assert len(panels[latent]) == min(n, 3)  # analyze.browser_partners
        capped += n > 3
        effects = [s for _, s, _ in panels[latent]]
        assert effects == sorted(effects, reverse=True)  # strongest pair effect first
        assert all(0 <= j < N and j != latent for j, _, _ in panels[latent])
    assert capped  # the cap was exercised
    # latents without partners have none listed, and their count column says 0
    for latent in set(range(N)) - set(counts):
        assert lat.loc[latent, "n_partners"] in (0, None) or np.isnan(lat.loc[latent, "n_partners"])
    assert data["matrix_label"].startswith("pair effect") and data["composer"] == "pair composer"
    page = (out / "browser" / "pair.html").read_text()
    assert "href:'#latent='+l" in page  # each partner links to its own latent view
    topk = page_data(out / "browser" / "topk.html")
    assert (
        topk["partners"] == {} and "no composition partners: no pair path in topk" in topk["notes"]
    )


def run_page(page, hash_: str) -> dict:
    """What the page's script draws for `hash_`, run by node on a minimal DOM stand-in."""
    script = Path(__file__).with_name("browser_dom.js")
    res = subprocess.run(
        ["node", str(script), str(page), hash_], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to run the page's script")
def test_page_script_draws_partner_links_and_centred_contexts(default_run):
    out, _ = default_run
    data = page_data(out / "browser" / "pair.html")
    latent = max(data["partners"], key=lambda k: (data["partner_counts"][k], -int(k)))
    drawn = run_page(out / "browser" / "pair.html", f"#latent={latent}")
    assert drawn["ready"] == "1" and drawn["errors"] == []
    lat_links = [h for h in drawn["links"] if h.startswith("#latent=")]
    assert lat_links == [f"#latent={j}" for j, _, _ in data["partners"][latent]]
    assert drawn["ctx"] == drawn["centres"] > 0  # every context outlines its activating token
    want = f"{len(data['partners'][latent])} of {data['partner_counts'][latent]} partners"
    assert want in drawn["text"]
    pills = [f"×{c['n']}" for c in data["contexts"][latent] if c["n"] > 1]
    assert drawn["pills"][: len(pills)] == pills
    topk = run_page(out / "browser" / "topk.html", "#latent=1")
    assert topk["errors"] == [] and "no pair path in topk" in topk["text"]
    # the check can fail: data the script cannot read is reported
    broken = out / "broken.html"
    broken.write_text(render_browser(data | {"partners": None}))
    assert run_page(broken, f"#latent={latent}")["errors"]


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to run the page's script")
def test_each_profiled_pair_has_a_page_linked_from_both_latents(default_run, tmp_path):
    out, _ = default_run
    data = page_data(out / "browser" / "pair.html")
    # (the pages analysis writes from its top pairs: tests/test_analysis_pipeline.py)
    lat = next(iter(data["partners"]))  # a latent and its strongest partner
    i, j = int(lat), int(data["partners"][lat][0][0])
    profiled = {
        "i": min(i, j),
        "j": max(i, j),
        "tokens": 7,
        "mean_effect": 0.25,
        "p_value": float("nan"),  # JSON has no NaN: the page gets null
        "called": True,
        "n_only_i": 3,
        "n_only_j": 4,
        "tokens_both": [["t5", 2]],
        "tokens_only_i": [["t1", 3]],
        "tokens_only_j": [],
        "promoted": [["t9", 0.5]],
        "demoted": [["t2", -0.5]],
        "examples": [{"token": "t5", "context": "t3t4", "after": "t6"}],
    }
    pages = pair_pages([profiled])
    assert pages[0]["p_value"] is None and pages[0]["tokens_both"] == [["t5", 2]]
    page = tmp_path / "pairs.html"
    page.write_text(render_browser(data | {"pairs": pages}))
    a, b = profiled["i"], profiled["j"]
    drawn = run_page(page, f"#pair={a}-{b}")
    assert drawn["ready"] == "1" and drawn["errors"] == []
    assert f"#latent={a}" in drawn["links"] and f"#latent={b}" in drawn["links"]
    assert f"only #{a} (3 tokens)" in drawn["text"] and "t9" in drawn["text"]
    assert drawn["centres"] == 1  # the example's token, outlined
    # both latents' views link to it
    for lat in (a, b):
        seen = run_page(page, f"#latent={lat}")
        assert seen["errors"] == [] and f"#pair={a}-{b}" in seen["links"]
    # a pair without a profile says so instead of drawing an empty page
    missing = run_page(page, "#pair=0-0")
    assert missing["errors"] == [] and "only the top pairs analysis profiled" in missing["text"]


# -- sequence start -------------------------------------------------------------------------------


def test_sequence_start_rows_are_out_by_default(default_run):
    out, metrics = default_run
    tops = pd.read_parquet(out / "top_contexts.parquet")
    assert len(tops) and (tops["pos"] > 0).all()
    assert metrics["include_sequence_start"] is False and metrics["sequence_start_rows"] > 0
    for pair in metrics["models"]["pair"]["pairs"]["top_pairs"]:
        for ex in pair.get("examples", []):
            assert ex["context"]  # a position-0 row has no tokens before it
    html = (out / "report.html").read_text()
    assert "are left out of the top contexts, pair examples and composition statistics" in html


def test_sequence_start_rows_are_in_with_the_flag(trained, default_run):
    tmp, store = trained
    metrics = analyse(tmp, store, "with_start", include_sequence_start=True)
    tops = pd.read_parquet(tmp / "with_start" / "top_contexts.parquet")
    bos = tops[(tops["model"] == "pair") & (tops["latent"] == BOS_LATENT)]
    assert (bos["pos"] == 0).all() and len(bos)  # its 10.0 rows are now its top contexts
    assert metrics["include_sequence_start"] is True
    html = (tmp / "with_start" / "report.html").read_text()
    assert "are included in the top contexts" in html
    # the composition statistics cover more tokens with the sequence starts in
    _, off = default_run
    n_on = metrics["models"]["pair"]["pairs"]["n_tokens"]
    n_off = off["models"]["pair"]["pairs"]["n_tokens"]
    assert n_on - n_off == metrics["sequence_start_rows"]


@pytest.mark.parametrize("include", [False, True])
def test_block_statistics_leave_sequence_starts_out_unless_asked(include):
    rec = SAEReconstructor("pair", "compsae", N, model=composer())
    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=(64, D))).astype(np.float32)
    pos = np.arange(64) % SEQ
    x[pos == 0, BOS_LATENT] = 10.0
    spec = BlockSpec(
        top_k_contexts=4,
        tracked={"pair": np.arange(N)},
        contexts_for=frozenset({"pair"}),
        pair_null=False,
        include_sequence_start=include,
    )
    part = model_partial(rec, x, pos, np.arange(64), spec)
    shown = 64 if include else int((pos > 0).sum())
    assert part["effects"].n_tokens == shown and part["pair_latents"].n_tokens == shown
    assert part["latents"].n_tokens == 64 and part["bos"].n == 4  # reconstruction: every row
    top_rows = part["top"].rows[BOS_LATENT]
    top_rows = top_rows[top_rows >= 0]
    assert (pos[top_rows] == 0).all() if include else (pos[top_rows] > 0).all()


@pytest.mark.parametrize("include", [False, True])
def test_attention_statistics_leave_sequence_starts_out_unless_asked(include):
    torch.manual_seed(0)
    cfg = make_model_config(
        type="compsae", n_latents=N, k=2, d_f=8, d_c=4, n_heads=2, composer="attention"
    )
    rec = SAEReconstructor("att", "compsae", N, model=build_model(cfg, D).eval())
    x = np.abs(np.random.default_rng(2).normal(size=(48, D))).astype(np.float32)
    pos = np.arange(48) % SEQ
    spec = BlockSpec(tracked={"att": np.arange(N)}, pair_null=False, include_sequence_start=include)
    part = model_partial(rec, x, pos, np.arange(48), spec)
    shown = 48 if include else int((pos > 0).sum())
    assert part["gate"].count == shown * D and part["pairs"].n_tokens == shown
    out = rec(x)
    firing = np.take_along_axis(out.z, out.active_idx, 1) > 0  # [48, k] active queries
    mask = np.ones(48, bool) if include else pos > 0
    assert part["heads"].n_queries == int(firing[mask].sum()) and part["effects"].n_tokens == shown


# -- contexts: tokens after, repeats --------------------------------------------------------------


def test_contexts_carry_the_tokens_after_within_the_sequence(default_run, trained):
    out, _ = default_run
    tops = pd.read_parquet(out / "top_contexts.parquet")
    for _, r in tops.iterrows():
        want = token_at(np.arange(r["pos"] + 1, min(r["pos"] + 3, SEQ))).tolist()
        assert list(r["after_ids"]) == want
        assert r["after_text"] == "".join(f"t{t}" for t in want)
        assert (
            list(r["context_ids"])
            == token_at(np.arange(max(r["pos"] - 3, 0), r["pos"] + 1)).tolist()
        )
    assert (tops["after_ids"].apply(len) == 2).any()
    data = page_data(out / "browser" / "topk.html")
    for ctxs in data["contexts"].values():
        for c in ctxs:
            assert len(c["t"]) == len(c["a"]) and 0 <= c["c"] < len(c["t"])
            assert len(c["t"]) - c["c"] - 1 <= 2  # at most analyze.context_after after it


def test_identical_windows_are_one_context_with_repeats(trained):
    _, store = trained
    top = TopContexts.empty(2, 5)
    # rows 5, 21, 37: position 5 of three sequences (same tokens); 9: another window; 15: last
    top.rows[0, :5] = [5, 21, 37, 9, 15]
    top.values[0, :5] = [5.0, 4.0, 3.0, 2.0, 1.0]
    top.rows[1, :2] = [9, 25]
    top.values[1, :2] = [1.0, 0.5]
    df = top_context_table("m", top, store, 3, str, after=2)
    assert list(df.columns) == TOP_CONTEXT_COLUMNS
    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    doc = doc[doc.index("## top_contexts.parquet") :]
    assert all(f"`{c}`" in doc for c in TOP_CONTEXT_COLUMNS)  # every column documented
    zero = df[df["latent"] == 0]
    assert zero["row"].tolist() == [5, 9, 15] and zero["rank"].tolist() == [0, 1, 2]
    assert zero["repeats"].tolist() == [3, 1, 1] and zero["activation"].iloc[0] == 5.0
    assert list(zero["after_ids"].iloc[2]) == []  # the sequence's last token: nothing after
    one = df[df["latent"] == 1]
    assert one["repeats"].tolist() == [2] and one["rank"].tolist() == [0]
