"""Task probes on arithmetic, boolean logic and subject-verb agreement.

The examples come from the harvest's generator (:mod:`compsae.harvest.synthetic_text`), which keeps
the character span of every named part; here each example is cut at its *decision point* (the
token after which the model must produce the answer: after "=", after "is", before the verb) and
turned into

* a forced choice for the LM's own behaviour (correct vs wrong continuation, scored by the summed
  log-probability of the continuation tokens, so multi-token answers and any tokenizer work), and
* binary labels at that position for the probes (input variables such as "op is +", "literal 0 is
  true", "subject is plural", and the answer itself), plus A/B pairs for the conjunction test.

The LM is anything shaped like :class:`compsae.lm.models.LoadedModel`: ``tokenizer`` (a
Hugging Face fast tokenizer), ``bos_token_id``, ``model(tokens) -> logits`` and
``run_hooks(tokens, [hook], stop_at_layer) -> {hook: [b, s, d]}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from compsae.errors import UserError
from compsae.evaluation.probes.sparse import conjunction_test, probe_sweep
from compsae.harvest.synthetic_text import SyntheticExample, generate

FAMILIES = ("arithmetic", "boolean", "grammar")
Label = Callable[
    [SyntheticExample], "int | None"
]  # None: the example does not take part in the task


# singular -> plural verb forms used by the grammar family (both directions looked up)
_AGREEMENT = {"is": "are", "was": "were", "has": "have", "looks": "look", "seems": "seem"}
_OTHER_NUMBER = {**_AGREEMENT, **{p: s for s, p in _AGREEMENT.items()}}


@dataclass
class ProbeItem:
    example: SyntheticExample
    prompt: str  # text up to the decision point
    correct: str  # continuation the model should prefer
    wrong: str  # the contrasting continuation


def make_item(ex: SyntheticExample) -> ProbeItem:
    """Cut an example at its decision point and build its forced choice."""
    f, text = ex.fields, ex.text
    if ex.task == "arithmetic":
        cut = ex.spans["equals"][1]
        wrong = f["result"] + 1 if f["result"] % 10 != 9 else f["result"] - 1
        return ProbeItem(ex, text[:cut], f" {f['result']}", f" {wrong}")
    if ex.task == "boolean":
        cut = ex.spans["is"][1]
        value = str(f["value"]).lower()
        return ProbeItem(ex, text[:cut], f" {value}", f" {'false' if f['value'] else 'true'}")
    if ex.task == "grammar":
        s, e = ex.spans["verb"]
        cut = s - 1  # the space before the verb belongs to the continuation
        verb = text[s:e]
        if verb not in _OTHER_NUMBER:
            raise ValueError(
                f"no singular/plural partner known for verb {verb!r}: add it to _AGREEMENT"
            )
        return ProbeItem(ex, text[:cut], f" {verb}", f" {_OTHER_NUMBER[verb]}")
    raise ValueError(f"unknown task {ex.task!r}")


# Probe tasks per family: name -> label function (evaluated at the decision point)
TASKS: dict[str, dict[str, Label]] = {
    "arithmetic": {
        "op_is_plus": lambda e: int(e.fields["op"] == "+"),
        "op_is_times": lambda e: int(e.fields["op"] == "*"),
        "a_gt_b": lambda e: int(e.fields["a"] > e.fields["b"]),
        "result_negative": lambda e: int(e.fields["result"] < 0),
        "result_even": lambda e: int(e.fields["result"] % 2 == 0),
    },
    "boolean": {
        "value": lambda e: int(e.fields["value"]),
        "negated": lambda e: int(e.fields["negated"]),
        "connective_and": lambda e: int(e.fields["connective"] == "and"),
        "literal_0": lambda e: int(e.fields["literals"][0]),
        "literal_1": lambda e: int(e.fields["literals"][1]),
    },
    "grammar": {
        "subject_plural": lambda e: int(e.fields["subject_number"] == "plural"),
        "has_distractor": lambda e: int(e.fields["has_distractor"]),
        "distractor_plural": lambda e: (
            None
            if not e.fields["has_distractor"]
            else int(e.fields["distractor_number"] == "plural")
        ),
    },
}

# Tasks that are (properties of) the answer rather than input variables: probed only when the LM
# computes the answer, else a probe would read what is decodable, not what the model uses.
ANSWER_TASKS: dict[str, frozenset[str]] = {
    "arithmetic": frozenset({"result_negative", "result_even"}),
    "boolean": frozenset({"value"}),
    "grammar": frozenset(),
}

# Conjunctions A ∧ B for the conjunction test: name -> (label A, label B)
CONJUNCTIONS: dict[str, dict[str, tuple[Label, Label]]] = {
    "arithmetic": {
        "a_big_and_b_big": (lambda e: int(e.fields["a"] >= 50), lambda e: int(e.fields["b"] >= 50))
    },
    "boolean": {
        "literal_0_and_literal_1": (TASKS["boolean"]["literal_0"], TASKS["boolean"]["literal_1"])
    },
    "grammar": {
        "subject_and_distractor_plural": (
            TASKS["grammar"]["subject_plural"],
            lambda e: int(e.fields["has_distractor"] and e.fields["distractor_number"] == "plural"),
        )
    },
}


def make_items(family: str, n: int, seed: int = 0) -> list[ProbeItem]:
    """``n`` deterministic items of one family."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return [make_item(e) for e in generate(family, n, seed)]


def labels(items: list[ProbeItem], label: Label) -> tuple[np.ndarray, np.ndarray]:
    """``(y, keep)``: binary labels [n] and the mask of items the task applies to."""
    raw = [label(it.example) for it in items]
    keep = np.array([r is not None for r in raw])
    return np.array([r if r is not None else 0 for r in raw], dtype=np.int64), keep


def _encode(lm: Any, text: str) -> list[int]:
    return [int(lm.bos_token_id), *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [b, s] tokens and their lengths (causal attention: padding never affects earlier
    tokens)."""
    length = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return tokens, torch.tensor([len(s) for s in seqs])


@torch.no_grad()
def continuation_logprob(
    lm: Any,
    prompts: list[str],
    continuations: list[str],
    batch_size: int = 32,
) -> np.ndarray:
    """Σ log p(continuation tokens | prompt) for each pair: [n]."""
    out = []
    device = getattr(lm, "device", "cpu")
    for i in tqdm(
        range(0, len(prompts), batch_size), desc="LM log-probs", unit="batch", leave=False
    ):
        p_ids = [_encode(lm, p) for p in prompts[i : i + batch_size]]
        full = [
            _encode(lm, p + c)
            for p, c in zip(
                prompts[i : i + batch_size], continuations[i : i + batch_size], strict=True
            )
        ]
        tokens, lengths = _pad(full, int(lm.bos_token_id))
        logp = torch.log_softmax(lm.model(tokens.to(device)).float(), dim=-1).cpu()  # [b, s, vocab]
        for j, (p, f) in enumerate(zip(p_ids, full, strict=True)):
            # continuation tokens: everything after the longest common prefix with the prompt's
            # tokens
            start = next(
                (k for k, (u, v) in enumerate(zip(p, f, strict=False)) if u != v),
                min(len(p), len(f)),
            )
            start = max(start, 1)  # BOS is never scored
            idx = torch.arange(start, int(lengths[j]))
            out.append(float(logp[j, idx - 1, torch.tensor(f)[idx]].sum()))
    return np.array(out)


def lm_behaviour(lm: Any, items: list[ProbeItem], batch_size: int = 32) -> dict[str, float]:
    """Forced-choice accuracy and mean log-prob difference (correct − wrong) of the LM on
    ``items``."""
    prompts = [it.prompt for it in items]
    good = continuation_logprob(lm, prompts, [it.correct for it in items], batch_size)
    bad = continuation_logprob(lm, prompts, [it.wrong for it in items], batch_size)
    diff = good - bad
    return {
        "accuracy": float((diff > 0).mean()),
        "logprob_diff": float(diff.mean()),
        "logprob_diff_sd": float(diff.std()),
        "n": len(items),
    }


@torch.no_grad()
def decision_activations(
    lm: Any,
    hook: str,
    items: list[ProbeItem],
    batch_size: int = 32,
    stop_at_layer: int | None = None,
) -> np.ndarray:
    """The ``hook`` activation at the decision point (last prompt token) of every item: [n, d]."""
    out = []
    device = getattr(lm, "device", "cpu")
    for i in tqdm(
        range(0, len(items), batch_size), desc=f"activations {hook}", unit="batch", leave=False
    ):
        seqs = [_encode(lm, it.prompt) for it in items[i : i + batch_size]]
        tokens, lengths = _pad(seqs, int(lm.bos_token_id))
        acts = lm.run_hooks(tokens.to(device), [hook], stop_at_layer)[hook]  # [b, s, d]
        out.append(acts[torch.arange(len(seqs)), lengths.to(acts.device) - 1].float().cpu().numpy())
    return np.concatenate(out)


FeatureFn = Callable[[np.ndarray], np.ndarray]  # residual activations [n, d] -> features [n, m]


def run_probes(
    acts: dict[str, np.ndarray],
    items: dict[str, list[ProbeItem]],
    features: dict[str, FeatureFn],
    ks: tuple[int, ...] = (1, 2, 5),
    seed: int = 0,
    test_fraction: float = 0.3,
    tasks: dict[str, list[str]] | None = None,
) -> list[dict]:
    """Sparse probes for every family × task × feature method × k.

    ``acts``: family -> residual activations at the decision points [n, d]; ``items`` the matching
    items; ``features``: method name -> map from activations to its features (SAE encode, PCA, NMF,
    identity for raw channels); ``tasks``: family -> task names to run (default: all of ``TASKS``).
    Returns one row per (family, task, method, k); a task whose labels (or training split) hold a
    single class is left out.
    """
    rows = []
    for family, X in acts.items():
        feats = {m: fn(X) for m, fn in features.items()}
        chosen = {
            t: f for t, f in TASKS[family].items() if tasks is None or t in tasks.get(family, ())
        }
        for task, label in tqdm(chosen.items(), desc=f"probes {family}", unit="task"):
            y, keep = labels(items[family], label)
            if len(np.unique(y[keep])) < 2:
                continue
            for method, Z in feats.items():
                try:
                    results = probe_sweep(
                        Z[keep], y[keep], ks=ks, test_fraction=test_fraction, seed=seed
                    )
                except UserError:  # the random split left one class out of training: too few items
                    break
                for r in results:
                    rows.append(
                        {
                            "family": family,
                            "task": task,
                            "method": method,
                            "k": r.k,
                            "accuracy": r.accuracy,
                            "f1": r.f1,
                            "majority": r.majority,
                            "features": r.features,
                        }
                    )
    return rows


def run_conjunctions(
    acts: dict[str, np.ndarray],
    items: dict[str, list[ProbeItem]],
    latents: FeatureFn,
    composition: FeatureFn,
    control: FeatureFn,
    seed: int = 0,
    test_fraction: float = 0.3,
) -> list[dict]:
    """The conjunction test for every family: does the composition output help an A∧B probe?

    ``latents``: CompSAE codes; ``composition``: its composition-path output; ``control``: an
    equally wide matrix without composition (e.g. the reconstruction with the path switched off).
    A conjunction that never (or always) holds in the training split gets a row with ``skipped``.
    """
    rows = []
    for family, X in acts.items():
        Z, C, K = latents(X), composition(X), control(X)
        for name, (la, lb) in CONJUNCTIONS[family].items():
            a, _ = labels(items[family], la)
            b, _ = labels(items[family], lb)
            try:
                res = conjunction_test(Z, C, K, a, b, test_fraction=test_fraction, seed=seed)
            except UserError as e:
                rows.append({"family": family, "conjunction": name, "skipped": str(e)})
                continue
            rows.append(
                {
                    "family": family,
                    "conjunction": name,
                    "positive_rate": float((a & b).mean()),
                    "majority": res.constituents.majority,
                    **res.as_dict(),
                }
            )
    return rows


def pca_features(fit_rows: np.ndarray, n_components: int, seed: int = 0) -> FeatureFn:
    """PCA fitted on ``fit_rows`` [n, d] (e.g. a store sample), as a feature map."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=n_components, random_state=seed).fit(fit_rows)
    return pca.transform


def nmf_features(
    fit_rows: np.ndarray,
    n_components: int,
    seed: int = 0,
    fit: dict[str, Any] | None = None,
    max_iter: int = 300,
) -> FeatureFn:
    """NMF on ``[relu(x), relu(-x)]`` (residual activations are signed; NMF needs non-negative
    input).  scikit-learn's ConvergenceWarning is kept in, for the fit and every transform (each
    runs its own iterations); ``fit`` receives whether the fit converged (see `quiet_fit`)."""
    import warnings

    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    from compsae.analysis.baselines import quiet_fit, sign_split

    nmf = NMF(n_components=n_components, init="nndsvda", max_iter=max_iter, random_state=seed)
    info = quiet_fit(nmf, sign_split(fit_rows))
    if fit is not None:
        fit.update(info)

    def features(x: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return nmf.transform(sign_split(x))

    return features
