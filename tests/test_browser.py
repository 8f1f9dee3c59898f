"""The feature browser: its data from a real analysis run, the logit effects, and the page itself
in headless Chromium (skipped where no Chromium is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from train_fixtures import HOOK, make_store

from compsae.analysis.browser_data import logit_effects, partner_table
from compsae.analysis.browser_page import render_browser
from compsae.analysis.config import AnalyzeConfig
from compsae.analysis.run import run_analyze
from compsae.store.split import HeldOutSplit
from compsae.train.checkpoint import save_checkpoint
from compsae.train.config import make_model_config
from compsae.train.models import build_model
from compsae.train.records import CheckpointMeta, Normalization

CHROMIUM = next(
    (
        shutil.which(n)
        for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
        if shutil.which(n)
    ),
    None,
)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    store, _ = make_store(str(tmp / "s.zarr"), n=2048)
    torch.manual_seed(0)
    for name, cfg in {
        "comp": make_model_config(
            type="compsae", n_latents=32, k=4, d_f=8, d_c=4, n_heads=2, composer="attention"
        ),
        "topk": make_model_config(type="topk", n_latents=32, k=4),
    }.items():
        model = build_model(cfg, 16)
        meta = CheckpointMeta(
            type=cfg.type,
            model=cfg,
            d_in=16,
            hook=HOOK,
            normalization=Normalization(scale=0.8),
            split=HeldOutSplit(fraction=0.25),
            step=1,
            tokens_seen=10,
            finished=True,
        )
        save_checkpoint(str(tmp / "train" / name), model, meta.model_dump(mode="json"))
    cfg = AnalyzeConfig(
        baselines=["pca"],
        ce=False,
        plots=False,
        progress=False,
        max_heldout_tokens=512,
        baseline_fit_tokens=256,
        browser_contexts=3,
        browser_hist_rows=300,
        context_window=4,
    )
    out = run_analyze(
        cfg, store.url, str(tmp / "train"), str(tmp / "analyze"), decode=lambda i: f"t{i}"
    )
    return tmp, out


def page_data(path) -> dict:
    text = path.read_text()
    blob = re.search(r"<script type='application/json' id='data'>(.*?)</script>", text, re.S).group(
        1
    )
    return json.loads(blob.replace("<\\/", "</"))


def test_one_page_per_trained_model_linked_from_the_report(analysed):
    tmp, out = analysed
    assert out["files"]["browsers"] == {
        "comp": "browser/comp.html",
        "topk": "browser/topk.html",
    }  # no baselines
    report = (tmp / "analyze" / "report.html").read_text()
    assert "href='browser/comp.html'" in report and "href='browser/topk.html'" in report
    page = (tmp / "analyze" / "browser" / "comp.html").read_text()
    assert (
        "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    )


def test_browser_data_matches_the_analysis_tables(analysed):
    import pandas as pd

    tmp, _ = analysed
    lat = pd.read_parquet(tmp / "analyze" / "latents.parquet")
    tops = pd.read_parquet(tmp / "analyze" / "top_contexts.parquet")
    data = page_data(tmp / "analyze" / "browser" / "comp.html")
    mine = lat[lat["model"] == "comp"].sort_values("latent")
    assert data["n_latents"] == 32 and len(data["table"]) == 32 and data["n_tokens"] == 512
    col = {c: i for i, c in enumerate(data["columns"])}
    freq = np.array([r[col["frequency"]] for r in data["table"]])
    np.testing.assert_allclose(freq, mine["frequency"], rtol=5e-3)  # 3 significant digits
    alive = mine.loc[mine["fire_count"] > 0, "latent"].tolist()
    assert alive and sorted(int(k) for k in data["contexts"]) == sorted(alive)
    for latent in alive[:5]:
        ctxs = data["contexts"][str(latent)]
        assert 1 <= len(ctxs) <= 3
        best = tops[(tops["model"] == "comp") & (tops["latent"] == latent) & (tops["rank"] == 0)]
        # the centre token of the first context carries the latent's top activation
        c = ctxs[0]["c"]
        assert ctxs[0]["a"][c] == pytest.approx(float(best["activation"].iloc[0]), rel=2e-2)
        assert ctxs[0]["t"][c] == int(best["token_id"].iloc[0])
        assert ctxs[0]["n"] == int(best["repeats"].iloc[0]) >= 1
        assert (
            sum(data["hist"].get(str(latent), [])) > 0
            or mine.set_index("latent").loc[latent, "fire_count"] < 5
        )
    # the CompSAE has composition partners, the TopK SAE none (and says so)
    assert data["partner_matrix"] is not None and data["partners"]
    topk = page_data(tmp / "analyze" / "browser" / "topk.html")
    assert topk["partners"] == {} and any("no composition partners" in n for n in topk["notes"])
    assert any(
        "logit effects left out" in n for n in data["notes"]
    )  # the store has no LM to reload


def test_logit_effects_are_the_decoder_through_the_unembedding():
    rng = np.random.default_rng(0)
    w_dec, w_u = rng.normal(size=(70, 6)), rng.normal(size=(6, 40))
    up, upv, down, downv = logit_effects(w_dec, w_u, k=3, block=16)
    full = w_dec @ w_u
    np.testing.assert_array_equal(up, np.argsort(-full, axis=1)[:, :3])
    np.testing.assert_allclose(upv, np.sort(full, axis=1)[:, ::-1][:, :3], rtol=1e-5)
    np.testing.assert_array_equal(down, np.argsort(full, axis=1)[:, :3])
    np.testing.assert_allclose(downv, np.sort(full, axis=1)[:, :3], rtol=1e-5)


def test_partners_come_from_whatever_pair_matrix_analysis_wrote():
    tracked = np.array([3, 7, 9])
    comp = np.array([[np.nan, 0.5, 0.0], [0.1, np.nan, 0.2], [np.nan, 0.0, np.nan]])
    key, partners = partner_table({"comp": comp, "tracked": tracked})
    assert key == "comp" and partners[3] == [(7, 0.5)] and partners[7] == [(3, 0.5), (9, 0.2)]
    effect = np.zeros((3, 3))
    effect[0, 2] = 1.0
    assert partner_table({"comp": comp, "pair_effect": effect, "tracked": tracked})[1] == {
        3: [(9, 1.0)],
        9: [(3, 1.0)],
    }
    assert partner_table({}) == (None, {})


def _chromium(args: list[str], timeout: int = 90) -> subprocess.CompletedProcess[str]:
    base = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        "--virtual-time-budget=3000",
    ]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_page_runs_in_headless_chromium(analysed, tmp_path):
    tmp, _ = analysed
    page = tmp / "analyze" / "browser" / "comp.html"
    dom = _chromium(["--dump-dom", page.as_uri()]).stdout
    assert 'data-ready="1"' in dom and "data-errors" not in dom
    assert dom.count('<tr class="row') == 32 and "top-activating contexts" in dom
    shot = tmp_path / "browser.png"
    _chromium([f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri()])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    # the check can fail: a page whose data breaks the script reports the error
    broken = page_data(page) | {"columns": None}
    (tmp_path / "broken.html").write_text(render_browser(broken))
    dom = _chromium(["--dump-dom", (tmp_path / "broken.html").as_uri()]).stdout
    assert (
        "data-errors=" in dom
        and "null" in dom.split("data-errors=")[1][:200]
        and 'data-ready="1"' not in dom
    )


def test_fast_codes_equal_the_full_forward(analysed):
    from compsae.analysis.browser import codes_fn
    from compsae.analysis.reconstructors import SAEReconstructor

    tmp, _ = analysed
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    for name in ("comp", "topk"):
        rec = SAEReconstructor.from_checkpoint(name, str(tmp / "train" / name))
        np.testing.assert_allclose(codes_fn(rec)(x), rec(x).z, rtol=1e-5, atol=1e-6)


def test_contexts_do_not_depend_on_the_group_size(analysed, monkeypatch):
    import pandas as pd

    from compsae.analysis import browser_data as bd
    from compsae.analysis.browser import codes_fn
    from compsae.analysis.reconstructors import SAEReconstructor
    from compsae.store import ActivationStore

    tmp, _ = analysed
    store = ActivationStore.open(str(tmp / "s.zarr"))
    lat = pd.read_parquet(tmp / "analyze" / "latents.parquet").query("model == 'topk'")
    tops = pd.read_parquet(tmp / "analyze" / "top_contexts.parquet").query("model == 'topk'")
    encode = codes_fn(SAEReconstructor.from_checkpoint("topk", str(tmp / "train" / "topk")))

    def build():
        return bd.browser_data(
            "topk",
            "topk",
            encode,
            store,
            HOOK,
            lat,
            tops,
            {},
            str,
            np.arange(0, 2048, 7),
            per_latent=3,
            window=4,
        )["contexts"]

    whole = build()
    monkeypatch.setattr(bd, "CONTEXT_GROUP", 5)
    assert build() == whole and len(whole) > 5
