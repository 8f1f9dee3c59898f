"""Probe templates, LM behaviour and the probe runner on a fake byte-level LM."""

from __future__ import annotations

import numpy as np
import torch

from compsae.evaluation.probes.tasks import (
    TASKS,
    continuation_logprob,
    decision_activations,
    labels,
    lm_behaviour,
    make_items,
    pca_features,
    run_conjunctions,
    run_probes,
)
from compsae.lm.byte_tokenizer import VOCAB_SIZE, byte_tokenizer


class FakeLM:
    """Byte-level 'LM' that always predicts the byte b" t" ... : logits favour one fixed byte;
    its hook activation is a one-hot of the current token plus a running count of 'true' tokens."""

    def __init__(self, favour: int) -> None:
        self.tokenizer = byte_tokenizer()
        self.bos_token_id = 0
        self.device = "cpu"
        self.favour = favour

    def model(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, VOCAB_SIZE)
        logits[..., self.favour] = 5.0
        return logits

    def run_hooks(self, tokens, hooks, stop_at_layer):
        onehot = torch.nn.functional.one_hot(tokens, VOCAB_SIZE).float()
        return {hooks[0]: onehot.cumsum(dim=1)}  # bag of tokens so far: [b, s, vocab]


def test_items_cut_at_decision_point():
    arith = make_items("arithmetic", 20)
    assert all(
        it.prompt.endswith("=") and it.correct == f" {it.example.fields['result']}" for it in arith
    )
    assert all(it.correct != it.wrong for it in arith)
    boolean = make_items("boolean", 20)
    assert all(
        it.prompt.endswith("is") and {it.correct, it.wrong} == {" true", " false"} for it in boolean
    )
    gram = make_items("grammar", 20)
    for it in gram:
        assert it.example.text.startswith(it.prompt + it.correct)
        assert it.wrong.strip() != it.correct.strip()


def test_labels_and_masks():
    gram = make_items("grammar", 200)
    y, keep = labels(gram, TASKS["grammar"]["distractor_plural"])
    assert keep.sum() == sum(it.example.fields["has_distractor"] for it in gram)
    y, keep = labels(gram, TASKS["grammar"]["subject_plural"])
    assert keep.all() and 0.3 < y.mean() < 0.7


def test_continuation_logprob_and_behaviour():
    lm = FakeLM(favour=ord("t") + 1)  # byte ids are offset by one for BOS
    lp = continuation_logprob(lm, ["x is", "x is"], [" true", " false"])
    assert lp[0] > lp[1]
    items = make_items("boolean", 40)
    res = lm_behaviour(lm, items)
    # the fake LM always prefers "t": it is right exactly when the answer is "true"
    truth = np.mean([it.example.fields["value"] for it in items])
    assert res["accuracy"] == np.float64(truth)


def test_probe_runner_finds_literal_tokens():
    lm = FakeLM(favour=1)
    items = {"boolean": make_items("boolean", 300)}
    acts = {"boolean": decision_activations(lm, "hook", items["boolean"])}
    assert acts["boolean"].shape == (300, VOCAB_SIZE)
    rows = run_probes(
        acts, items, {"raw": lambda x: x, "pca": pca_features(acts["boolean"], 10)}, ks=(1, 5)
    )
    negated = [r for r in rows if r["task"] == "negated" and r["method"] == "raw" and r["k"] == 1][
        0
    ]
    assert negated["accuracy"] == 1.0  # the count of "(" tokens gives negation away
    conj = run_conjunctions(
        acts, items, latents=lambda x: x, composition=lambda x: x, control=lambda x: x
    )
    assert conj[0]["conjunction"] == "literal_0_and_literal_1"
