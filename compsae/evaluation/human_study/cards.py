"""Feature cards: the evidence a rater sees about one latent, built from activations over a corpus.

Input format (the clean boundary between "compute activations" and "show them to people"):

* :class:`Corpus` — the store's token rows: ``tokens``, ``seq_id``, ``pos`` columns (rows of one
  sequence contiguous and in position order, as the harvest writes them) and ``vocab`` (token text
  per id).
* :class:`FeatureSource` — one method's latent activations over those rows as a sparse matrix
  ``acts [n_rows, n_latents]`` (zeros = inactive), plus, for CompSAE, composition partners per
  latent.

:func:`compsae.evaluation.human_study.kit.feature_source_from_checkpoint` fills a FeatureSource from
a store and a checkpoint; tests build both by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from compsae.errors import UserError


@dataclass
class Corpus:
    tokens: np.ndarray  # [n_rows] int token id
    seq_id: np.ndarray  # [n_rows] sequence index
    pos: np.ndarray  # [n_rows] position in the sequence
    vocab: list[str]  # token text by id (ids outside it render as "<id>")

    @property
    def n_rows(self) -> int:
        return len(self.tokens)

    def text(self, token_id: int) -> str:
        return self.vocab[token_id] if 0 <= token_id < len(self.vocab) else f"<{token_id}>"

    def window(self, row: int, left: int, right: int) -> np.ndarray:
        """Row indices of the context around ``row`` within its own sequence: [≤ left + 1 +
        right]."""
        lo, hi = max(0, row - left), min(self.n_rows, row + right + 1)
        rows = np.arange(lo, hi)
        return rows[self.seq_id[rows] == self.seq_id[row]]


@dataclass
class FeatureSource:
    acts: sp.spmatrix  # [n_rows, n_latents] activations, zeros = inactive
    partners: dict[int, list[tuple[int, float]]] | None = (
        None  # latent -> [(partner latent, score)], CompSAE
    )

    def __post_init__(self) -> None:
        self.acts = sp.csc_matrix(self.acts)  # column access: one latent at a time

    @property
    def n_latents(self) -> int:
        return self.acts.shape[1]

    def fire_counts(self) -> np.ndarray:
        """[n_latents] number of rows where each latent is non-zero."""
        return np.diff(self.acts.indptr)

    def column(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, values)`` of the non-zero activations of one latent."""
        s, e = self.acts.indptr[latent], self.acts.indptr[latent + 1]
        return self.acts.indices[s:e], self.acts.data[s:e]


@dataclass
class CardConfig:
    n_top: int = 10  # top-activating contexts
    n_quantile_bins: int = 4  # activation quantile bins below the top
    per_quantile: int = 2  # contexts per bin
    n_negative: int = 3  # non-activating contexts shown
    n_detect_pos: int = 5  # detection task: activating held-out contexts ...
    n_detect_neg: int = 5  # ... and non-activating ones (10 in all by default)
    left: int = 12  # context tokens before the centre token
    right: int = 4  # ... and after it
    n_partners: int = 5
    partner_tokens: int = (
        5  # each partner is described by its top tokens, never its index (blinding)
    )

    @property
    def min_fires(self) -> int:
        """A latent needs this many firing rows to fill a card without reusing a context."""
        return self.n_top + self.n_quantile_bins * self.per_quantile + self.n_detect_pos


@dataclass
class Context:
    tokens: list[str]
    acts: list[float]  # per-token activation (all zeros for detection contexts: unhighlighted)
    centre: int  # index of the centre token inside ``tokens``
    max_act: float

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "acts": [round(a, 4) for a in self.acts],
            "centre": self.centre,
            "max_act": round(self.max_act, 4),
        }


@dataclass
class Card:
    method: str
    latent: int
    density: float
    top: list[Context]
    quantiles: list[tuple[str, list[Context]]]  # (bin label, contexts)
    negatives: list[Context]
    detection: list[Context]  # unhighlighted
    detection_truth: list[bool]  # True where the context activates the latent
    partners: list[dict] = field(default_factory=list)  # [{"score", "top_tokens"}]


def _context(
    corpus: Corpus, col: sp.csc_matrix, row: int, cfg: CardConfig, highlight: bool
) -> Context:
    rows = corpus.window(row, cfg.left, cfg.right)
    acts = col[rows].toarray().ravel() if highlight else np.zeros(len(rows))
    return Context(
        tokens=[corpus.text(int(t)) for t in corpus.tokens[rows]],
        acts=[float(a) for a in acts],
        centre=int(np.flatnonzero(rows == row)[0]),
        max_act=float(acts.max()) if len(acts) else 0.0,
    )


def _spread_rows(
    rows: np.ndarray,
    values: np.ndarray,
    n: int,
    seq_id: np.ndarray,
    used: set[int],
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Up to ``n`` rows (largest value first, or random with ``rng``), one per sequence, not in
    ``used``."""
    order = rng.permutation(len(rows)) if rng is not None else np.argsort(-values, kind="stable")
    out, seqs = [], {int(seq_id[r]) for r in used}
    for i in order:
        r = int(rows[i])
        if r in used or int(seq_id[r]) in seqs:
            continue
        out.append(r)
        seqs.add(int(seq_id[r]))
        if len(out) == n:
            break
    return out


def _silent_rows(
    corpus: Corpus,
    col: sp.csc_matrix,
    n: int,
    cfg: CardConfig,
    rng: np.random.Generator,
    used: set[int],
) -> list[int]:
    """Rows whose whole context window has the latent at zero (so "does not activate" is true)."""
    dense = col.toarray().ravel()
    out: list[int] = []
    for r in rng.permutation(corpus.n_rows)[: 50 * max(n, 1)]:
        r = int(r)
        if r in used:
            continue
        if not dense[corpus.window(r, cfg.left, cfg.right)].any():
            out.append(r)
            used.add(r)
            if len(out) == n:
                break
    return out


def top_tokens(corpus: Corpus, source: FeatureSource, latent: int, n: int) -> list[str]:
    """The distinct token texts at the latent's strongest activations."""
    rows, vals = source.column(latent)
    out: list[str] = []
    for i in np.argsort(-vals, kind="stable"):
        t = corpus.text(int(corpus.tokens[rows[i]]))
        if t not in out:
            out.append(t)
        if len(out) == n:
            break
    return out


def build_card(
    method: str,
    latent: int,
    corpus: Corpus,
    source: FeatureSource,
    cfg: CardConfig,
    rng: np.random.Generator,
) -> Card:
    """Collect the evidence for one latent.  Detection contexts never repeat a shown context."""
    rows, vals = source.column(latent)
    if len(rows) == 0:
        raise UserError(
            f"{method} latent {latent} never fires on this corpus: sample alive latents only"
        )
    col = source.acts[:, latent]
    used: set[int] = set()
    top_rows = _spread_rows(rows, vals, cfg.n_top, corpus.seq_id, used)
    used.update(top_rows)
    # Quantile bins over the remaining activating rows (strongest bin first)
    rest = np.flatnonzero(~np.isin(rows, np.fromiter(used, dtype=np.int64, count=len(used))))
    quantiles: list[tuple[str, list[Context]]] = []
    if len(rest):
        edges = np.quantile(vals[rest], np.linspace(0, 1, cfg.n_quantile_bins + 1))
        for b in range(cfg.n_quantile_bins - 1, -1, -1):
            lo, hi = edges[b], edges[b + 1]
            inside = rest[(vals[rest] >= lo) & (vals[rest] <= hi)]
            pick = _spread_rows(
                rows[inside], vals[inside], cfg.per_quantile, corpus.seq_id, used, rng
            )
            used.update(pick)
            label = f"bin {cfg.n_quantile_bins - b}/{cfg.n_quantile_bins} ({lo:.3g}–{hi:.3g})"
            quantiles.append((label, [_context(corpus, col, r, cfg, True) for r in pick]))
    neg_rows = _silent_rows(corpus, col, cfg.n_negative, cfg, rng, used)
    det_pos = _spread_rows(rows, vals, cfg.n_detect_pos, corpus.seq_id, used, rng)
    used.update(det_pos)
    det_neg = _silent_rows(corpus, col, cfg.n_detect_neg, cfg, rng, used)
    det = [(r, True) for r in det_pos] + [(r, False) for r in det_neg]
    det = [det[i] for i in rng.permutation(len(det))]
    partners = []
    if source.partners is not None:
        for p, score in source.partners.get(latent, [])[: cfg.n_partners]:
            partners.append(
                {
                    "score": round(float(score), 4),
                    "top_tokens": top_tokens(corpus, source, int(p), cfg.partner_tokens),
                }
            )
    return Card(
        method=method,
        latent=latent,
        density=len(rows) / corpus.n_rows,
        top=[_context(corpus, col, r, cfg, True) for r in top_rows],
        quantiles=quantiles,
        negatives=[_context(corpus, col, r, cfg, True) for r in neg_rows],
        detection=[_context(corpus, col, r, cfg, False) for r in (r for r, _ in det)],
        detection_truth=[t for _, t in det],
        partners=partners,
    )


def stratified_sample(
    fire_counts: np.ndarray,
    n_rows: int,
    n: int,
    n_strata: int,
    min_fires: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` latents drawn at random from alive ones (≥ ``min_fires`` fires), stratified by density.

    Alive latents are cut into ``n_strata`` equal-count bins of log density and ``n`` is spread as
    evenly as possible over the bins.  Returns ``(latents, stratum)``.
    """
    alive = np.flatnonzero(fire_counts >= min_fires)
    if len(alive) < n:
        raise UserError(
            f"only {len(alive)} latents fire at least {min_fires} times on this corpus "
            f"(need {n}): use more rows or a smaller --n"
        )
    log_density = np.log10(fire_counts[alive] / n_rows)
    order = alive[np.argsort(log_density, kind="stable")]
    bins = np.array_split(order, n_strata)
    per = [n // n_strata + (1 if i < n % n_strata else 0) for i in range(n_strata)]
    latents, strata = [], []
    for s, (members, k) in enumerate(zip(bins, per, strict=True)):
        k = min(k, len(members))
        latents.extend(rng.choice(members, k, replace=False).tolist())
        strata.extend([s] * k)
    # Top up from the remaining alive latents if a bin was too small
    if len(latents) < n:
        remaining = np.setdiff1d(alive, latents)
        extra = rng.choice(remaining, n - len(latents), replace=False)
        latents.extend(extra.tolist())
        strata.extend([-1] * len(extra))
    return np.array(latents, dtype=np.int64), np.array(strata, dtype=np.int64)
