"""Synthetic text with known structure: arithmetic, boolean logic and subject-verb agreement.

Each example carries its text, the structured facts behind it (`fields`) and the character spans
of its named parts (`spans`), so the harvest can use the texts as a data source and the
evaluation stage can turn the same examples into per-token probe labels with `token_positions`.
Everything is deterministic given the seed (one `random.Random` per call, no global state).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Task = Literal["arithmetic", "boolean", "grammar"]
TASKS: tuple[str, ...] = ("arithmetic", "boolean", "grammar", "mixed")

_SINGULAR_NOUNS = (
    "key",
    "dog",
    "author",
    "teacher",
    "car",
    "bottle",
    "painting",
    "farmer",
    "road",
    "letter",
)
_PLURAL_NOUNS = (
    "keys",
    "dogs",
    "authors",
    "teachers",
    "cars",
    "bottles",
    "paintings",
    "farmers",
    "roads",
    "letters",
)
_DISTRACTOR_SINGULAR = ("cabinet", "house", "window", "garden", "city", "box")
_DISTRACTOR_PLURAL = ("cabinets", "houses", "windows", "gardens", "cities", "boxes")
_PREPOSITIONS = ("to", "near", "behind", "beside", "of")
# (singular form, plural form, continuation)
_VERBS = (
    ("is", "are", "on the table"),
    ("was", "were", "old"),
    ("has", "have", "a new owner"),
    ("looks", "look", "clean"),
    ("seems", "seem", "lost"),
)


@dataclass(frozen=True)
class SyntheticExample:
    """One synthetic sentence and what is known about it.

    `fields` by task:
      arithmetic: a, b, op ("+", "-", "*"), result
      boolean:    literals (list[bool]), connective ("and" | "or"), negated (bool), value (bool)
      grammar:    subject, subject_number ("singular" | "plural"), has_distractor,
                  distractor_number ("singular" | "plural" | None), verb, verb_number
    `spans` maps part names to character ranges [start, end) in `text`.
    """

    task: str
    text: str
    fields: dict[str, Any]
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def token_positions(self, offsets: Sequence[tuple[int, int]]) -> dict[str, list[int]]:
        """Token indices overlapping each named span, given the tokenizer's character `offsets`
        of this example's tokens (e.g. `tokenizer(text, return_offsets_mapping=True)`)."""
        found: dict[str, list[int]] = {}
        for name, (s, e) in self.spans.items():
            found[name] = [i for i, (ts, te) in enumerate(offsets) if ts < e and te > s and te > ts]
        return found


class _Builder:
    """Appends text pieces and records the character span of the named ones."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.spans: dict[str, tuple[int, int]] = {}
        self.length = 0

    def add(self, piece: str, name: str | None = None, sep: str = " ") -> None:
        if self.parts and sep:
            self.parts.append(sep)
            self.length += len(sep)
        if name is not None:
            self.spans[name] = (self.length, self.length + len(piece))
        self.parts.append(piece)
        self.length += len(piece)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def arithmetic_example(rng: random.Random) -> SyntheticExample:
    """`"12 + 7 = 19"`: two operands, an operator and the correct result."""
    op = rng.choice(("+", "-", "*"))
    hi = 12 if op == "*" else 99
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    t = _Builder()
    t.add(str(a), "a")
    t.add(op, "op")
    t.add(str(b), "b")
    t.add("=", "equals")
    t.add(str(result), "result")
    return SyntheticExample(
        "arithmetic", t.text, {"a": a, "b": b, "op": op, "result": result}, t.spans
    )


def boolean_example(rng: random.Random) -> SyntheticExample:
    """`"not ( true and false ) is true"`: two literals, a connective, optional negation, value."""
    literals = [rng.random() < 0.5, rng.random() < 0.5]
    connective = rng.choice(("and", "or"))
    negated = rng.random() < 0.5
    inner = (literals[0] and literals[1]) if connective == "and" else (literals[0] or literals[1])
    value = (not inner) if negated else inner
    t = _Builder()
    if negated:
        t.add("not", "not")
        t.add("(", "open")
    t.add(str(literals[0]).lower(), "literal_0")
    t.add(connective, "connective")
    t.add(str(literals[1]).lower(), "literal_1")
    if negated:
        t.add(")", "close")
    t.add("is", "is")
    t.add(str(value).lower(), "value")
    fields = {"literals": literals, "connective": connective, "negated": negated, "value": value}
    return SyntheticExample("boolean", t.text, fields, t.spans)


def grammar_example(rng: random.Random, distractor_rate: float = 0.5) -> SyntheticExample:
    """`"The keys to the cabinet are on the table."`: subject-verb agreement, with a prepositional
    distractor noun of either number in half of the examples."""
    plural = rng.random() < 0.5
    idx = rng.randrange(len(_SINGULAR_NOUNS))
    subject = (_PLURAL_NOUNS if plural else _SINGULAR_NOUNS)[idx]
    has_distractor = rng.random() < distractor_rate
    distractor_number = None
    t = _Builder()
    t.add("The")
    t.add(subject, "subject")
    if has_distractor:
        d_plural = rng.random() < 0.5
        distractor_number = "plural" if d_plural else "singular"
        noun = rng.choice(_DISTRACTOR_PLURAL if d_plural else _DISTRACTOR_SINGULAR)
        t.add(rng.choice(_PREPOSITIONS), "preposition")
        t.add("the")
        t.add(noun, "distractor")
    sing, plur, rest = rng.choice(_VERBS)
    verb = plur if plural else sing
    t.add(verb, "verb")
    t.add(rest + ".", "continuation")
    number = "plural" if plural else "singular"
    fields = {
        "subject": subject,
        "subject_number": number,
        "has_distractor": has_distractor,
        "distractor_number": distractor_number,
        "verb": verb,
        "verb_number": number,
    }
    return SyntheticExample("grammar", t.text, fields, t.spans)


_MAKERS = {"arithmetic": arithmetic_example, "boolean": boolean_example, "grammar": grammar_example}


def iter_examples(task: str, seed: int) -> Iterator[SyntheticExample]:
    """An endless, seed-deterministic stream of examples of `task` ("mixed" cycles the three)."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}")
    rng = random.Random(f"compsae-synthetic-{task}-{seed}")
    if task == "mixed":
        for kind in itertools.cycle(("arithmetic", "boolean", "grammar")):
            yield _MAKERS[kind](rng)
    maker = _MAKERS[task]
    while True:
        yield maker(rng)


def generate(task: str, n: int, seed: int = 0) -> list[SyntheticExample]:
    """The first `n` examples of `iter_examples(task, seed)`."""
    return list(itertools.islice(iter_examples(task, seed), n))
