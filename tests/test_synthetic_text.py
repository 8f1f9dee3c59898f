"""The synthetic text generator: deterministic, correct facts, spans that point at the right
text."""

from __future__ import annotations

import pytest

from compsae.harvest.synthetic_text import generate, iter_examples
from compsae.lm.byte_tokenizer import byte_tokenizer


@pytest.mark.parametrize("task", ["arithmetic", "boolean", "grammar", "mixed"])
def test_same_seed_same_examples_other_seed_differs(task: str) -> None:
    a, b, c = generate(task, 50, seed=1), generate(task, 50, seed=1), generate(task, 50, seed=2)
    assert [e.text for e in a] == [e.text for e in b]
    assert [e.text for e in a] != [e.text for e in c]


def test_arithmetic_results_are_correct() -> None:
    for ex in generate("arithmetic", 200, seed=0):
        f = ex.fields
        a, op, b, eq, result = ex.text.split(" ")
        assert (int(a), op, int(b), eq) == (f["a"], f["op"], f["b"], "=")
        assert (
            int(result)
            == f["result"]
            == {"+": f["a"] + f["b"], "-": f["a"] - f["b"], "*": f["a"] * f["b"]}[op]
        )


def test_boolean_values_are_correct() -> None:
    seen_negated = set()
    for ex in generate("boolean", 200, seed=0):
        f = ex.fields
        expr = ex.text.rsplit(" is ", 1)[0].replace("true", "True").replace("false", "False")
        assert eval(expr) == f["value"]  # noqa: S307 - our own generated text
        assert ex.text.endswith(str(f["value"]).lower())
        seen_negated.add(f["negated"])
    assert seen_negated == {True, False}


def test_grammar_agreement_and_distractors() -> None:
    exs = generate("grammar", 300, seed=0)
    kinds = {(e.fields["subject_number"], e.fields["distractor_number"]) for e in exs}
    assert kinds == {(s, d) for s in ("singular", "plural") for d in ("singular", "plural", None)}
    for e in exs:
        verb = e.text[slice(*e.spans["verb"])]
        assert verb == e.fields["verb"]
        assert (verb in {"are", "were", "have", "look", "seem"}) == (
            e.fields["subject_number"] == "plural"
        )
        assert ("distractor" in e.spans) == e.fields["has_distractor"]


def test_spans_map_to_token_positions() -> None:
    tok = byte_tokenizer()
    ex = next(iter_examples("arithmetic", seed=3))
    enc = tok(ex.text, add_special_tokens=False, return_offsets_mapping=True)
    positions = ex.token_positions(enc["offset_mapping"])
    result_ids = [enc["input_ids"][i] for i in positions["result"]]
    assert tok.decode(result_ids) == str(ex.fields["result"])
    assert (
        positions["op"]
        and tok.decode([enc["input_ids"][i] for i in positions["op"]]) == ex.fields["op"]
    )


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown synthetic task"):
        next(iter_examples("poetry", seed=0))
