"""Human-eval kit: export -> fake ratings -> score round-trips through the answer key."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import scipy.sparse as sp

from compsae.errors import UserError
from compsae.evaluation.human_study.cards import (
    CardConfig,
    Corpus,
    FeatureSource,
    stratified_sample,
)
from compsae.evaluation.human_study.kit import (
    bootstrap_ci,
    detection_f1,
    export,
    load_key,
    score,
    score_table,
)


def _toy(n_rows: int = 4000, vocab_size: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, n_rows)
    corpus = Corpus(
        tokens=tokens,
        seq_id=np.arange(n_rows) // 40,
        pos=np.arange(n_rows) % 40,
        vocab=[f"w{i}" for i in range(vocab_size)],
    )
    # "clean": latent j fires exactly on token j (magnitude varies); "noisy": random firing
    clean = sp.csr_matrix(
        (rng.uniform(0.5, 2.0, n_rows), (np.arange(n_rows), tokens)), shape=(n_rows, vocab_size)
    )
    noisy = sp.random(n_rows, vocab_size, density=0.03, random_state=seed, format="csr")
    partners = {j: [((j + 1) % vocab_size, 0.9)] for j in range(vocab_size)}
    return corpus, {"clean": FeatureSource(clean, partners=partners), "noisy": FeatureSource(noisy)}


def _fake_ratings(key: dict, path, n_raters: int = 3) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rater", "card_id", "interpretable", "confidence", "detection", "description"])
        for r in range(n_raters):
            for cid, card in key["cards"].items():
                truth = card["detection_truth"]
                if card["method"] == "clean":
                    marks = [i + 1 for i, t in enumerate(truth) if t]
                    w.writerow([f"r{r}", cid, "yes", 5, ";".join(map(str, marks)), "token"])
                else:
                    marks = [i + 1 for i, t in enumerate(truth) if not t]  # exactly wrong
                    w.writerow([f"r{r}", cid, "no", 1, ";".join(map(str, marks)), ""])


def test_export_score_roundtrip(tmp_path):
    corpus, methods = _toy()
    out = tmp_path / "kit"
    summary = export(methods, corpus, str(out), n=10, n_raters=3, seed=3)
    assert summary["n_cards"] == 20
    key = load_key(str(out / "answer_key.json"))
    assert sorted(c["method"] for c in key["cards"].values()) == ["clean"] * 10 + ["noisy"] * 10
    # blinded outputs carry neither method names nor latent indices nor answers
    jsonl = (out / "cards.jsonl").read_text()
    pages = [(out / f"rater_{r}.html").read_text() for r in (1, 2, 3)]
    for text in [jsonl, *pages]:
        assert "clean" not in text and "noisy" not in text and "detection_truth" not in text
    cards = [json.loads(line) for line in jsonl.splitlines()]
    assert all(len(c["detection"]) == 10 and len(c["top"]) == 10 for c in cards)
    assert all(
        not any(a for ctx in c["detection"] for a in ctx["acts"]) for c in cards
    )  # unhighlighted
    # each rater has a different order of the same cards
    orders = [[p.split('data-card="')[i].split('"')[0] for i in range(1, 21)] for p in pages]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    # the "clean" latent's top contexts are centred on its own token
    for cid, info in key["cards"].items():
        if info["method"] == "clean":
            card = next(c for c in cards if c["card_id"] == cid)
            assert all(ctx["tokens"][ctx["centre"]] == f"w{info['latent']}" for ctx in card["top"])
            assert card["partners"]  # CompSAE-style partners survive, described by tokens only

    ratings = tmp_path / "ratings.csv"
    _fake_ratings(key, ratings)
    result = score(str(ratings), str(out / "answer_key.json"), n_boot=200)
    assert result["methods"]["clean"]["interpretable_rate"] == 1.0
    assert result["methods"]["noisy"]["interpretable_rate"] == 0.0
    assert result["methods"]["clean"]["detection_f1"] == 1.0
    assert result["methods"]["noisy"]["detection_f1"] == 0.0
    assert result["differences"]["clean - noisy"]["interpretable_rate"]["diff"] == 1.0
    assert result["alpha_interpretable"] == pytest.approx(1.0)
    assert result["alpha_confidence"] == pytest.approx(1.0)
    assert "clean" in score_table(result)


def test_export_is_deterministic(tmp_path):
    corpus, methods = _toy()
    export(methods, corpus, str(tmp_path / "a"), n=5, n_raters=1, seed=7)
    export(methods, corpus, str(tmp_path / "b"), n=5, n_raters=1, seed=7)
    assert (tmp_path / "a" / "answer_key.json").read_text() == (
        tmp_path / "b" / "answer_key.json"
    ).read_text()
    assert (tmp_path / "a" / "rater_1.html").read_text() == (
        tmp_path / "b" / "rater_1.html"
    ).read_text()


def test_score_rejects_unknown_card(tmp_path):
    corpus, methods = _toy()
    export(methods, corpus, str(tmp_path), n=5, n_raters=1)
    bad = tmp_path / "bad.csv"
    bad.write_text("rater,card_id,interpretable\nr0,C9999,1\n")
    with pytest.raises(UserError, match="not in the key"):
        score(str(bad), str(tmp_path / "answer_key.json"))


def test_stratified_sample_spreads_over_density():
    rng = np.random.default_rng(0)
    counts = np.concatenate([np.full(100, 30), np.full(100, 3000), np.zeros(50, int)])
    latents, strata = stratified_sample(counts, 10_000, n=10, n_strata=2, min_fires=20, rng=rng)
    assert len(set(latents.tolist())) == 10
    assert (latents < 100).sum() == 5 and ((latents >= 100) & (latents < 200)).sum() == 5
    with pytest.raises(UserError, match="only 200 latents"):
        stratified_sample(counts, 10_000, n=201, n_strata=2, min_fires=20, rng=rng)


def test_detection_f1_and_bootstrap():
    truth = [True, False, True, False]
    assert detection_f1({1, 3}, truth) == 1.0
    assert detection_f1({2, 4}, truth) == 0.0
    assert detection_f1({1}, truth) == pytest.approx(2 / 3)
    assert detection_f1(set(), [False] * 3) == 1.0
    lo, hi = bootstrap_ci(np.r_[np.ones(25), np.zeros(25)], n_boot=500)
    assert (
        lo < 0.5 < hi and hi - lo > 0.15
    )  # n = 50: the interval is wide, as docs/evaluation.md says


def test_card_config_min_fires():
    assert CardConfig().min_fires == 10 + 4 * 2 + 5


def test_a_second_export_never_replaces_the_answer_key(tmp_path):
    corpus, methods = _toy()
    export(methods, corpus, str(tmp_path / "kit"), n=5, n_raters=1, seed=1)
    key = (tmp_path / "kit" / "answer_key.json").read_bytes()
    with pytest.raises(UserError, match="already holds a kit .*unscorable"):
        export(methods, corpus, str(tmp_path / "kit"), n=5, n_raters=1, seed=2)
    assert (tmp_path / "kit" / "answer_key.json").read_bytes() == key


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not a ratings CSV"),
        (b"rater,card_id\nr0,C1\n", "missing column"),
        (b"rater,card_id,interpretable\nr0\n", "not in the key|interpretable"),
    ],
)
def test_bad_ratings_and_key_files_are_one_line_errors(tmp_path, content, message):
    corpus, methods = _toy()
    export(methods, corpus, str(tmp_path / "kit"), n=5, n_raters=1)
    ratings = tmp_path / "ratings.csv"
    if content is not None:
        ratings.write_bytes(content)
    with pytest.raises(UserError, match=message):
        score(str(ratings), str(tmp_path / "kit" / "answer_key.json"))
    (tmp_path / "key.json").write_bytes(b"\x00\x01binary")
    with pytest.raises(UserError, match="not a humaneval answer key"):
        score(str(ratings), str(tmp_path / "key.json"))
    with pytest.raises(UserError, match="answer key .* not found"):
        score(str(ratings), str(tmp_path / "nokey.json"))
