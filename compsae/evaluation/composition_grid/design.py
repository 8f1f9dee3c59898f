"""Pair-graph ground truth: interactions that no per-feature score can read.

``x = Σ_i a_i v_i + Σ_{(i,j) ∈ P} m(a_i, a_j)·[i, j fire]·B(v_i, v_j) + noise``

The candidate pairs are the edges of a random graph in which every feature that takes part has
exactly ``degree`` interacting edges (P) and ``degree`` co-firing-only edges (the twins, T): both
edge sets come from the same kind of random perfect matchings, and every edge of P ∪ T has its own
co-firing event of probability ``cofire_prob``.  So a feature's own statistics (firing rate, norm,
anything of one latent) are distributed the same whether a given partner interacts or not, and
only a statistic of the pair can tell P from T.  ``B(v, w) = ((A v) ⊙ (A w)) W_B`` is a shared
rank-``rank`` bilinear map; ``m`` is ``a_i a_j`` ("product") or 1 ("constant").  ``W_B`` is scaled
so the interaction terms carry ``strength`` of the data's variance (measured on the first block).
The additive twin (``additive=True``) is the same draw with the interaction term left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

BLOCK_ROWS = 4096


class PairGraphDesign(BaseModel):
    """One cell's data: sizes, the pair graph, interaction strength, firing and magnitude laws."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_model: int = Field(64, ge=4)
    n_features: int = Field(256, ge=8)
    pair_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of features in any pair")
    degree: int = Field(
        2, ge=1, description="interacting edges (and as many twin edges) per paired feature"
    )
    strength: float = Field(
        0.03, ge=0.0, lt=1.0, description="share of variance in interaction terms"
    )
    rank: int = Field(8, ge=1, description="rank of the shared bilinear map B")
    cofire_prob: float = Field(
        0.002, gt=0.0, le=1.0, description="per-edge co-firing event probability"
    )
    mean_active: float = Field(3.0, gt=0.0, description="expected independent firings per row")
    max_prob: float = Field(0.1, gt=0.0, le=1.0)
    zipf_exponent: float = Field(0.5, ge=0.0)
    magnitude_law: Literal["product", "constant"] = "product"
    magnitude: tuple[float, float] = (0.5, 1.5)
    noise_std: float = Field(0.05, ge=0.0)
    additive: bool = False
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _graph_fits(self) -> PairGraphDesign:
        paired = self.n_paired
        if paired < 4 or 2 * self.degree >= paired:
            raise ValueError(
                f"{paired} paired features cannot carry {2 * self.degree} edges each: "
                "raise pair_fraction or lower degree"
            )
        return self

    @property
    def n_paired(self) -> int:
        """Features that sit in pairs (an even number, so perfect matchings exist)."""
        return int(round(self.pair_fraction * self.n_features)) // 2 * 2


@dataclass
class PairGraph:
    """The fixed parts of one design: directions, firing probabilities, the pair graph, B."""

    V: np.ndarray  # [n_features, d] unit feature directions
    probs: np.ndarray  # [n_features] independent firing probabilities
    pairs: np.ndarray  # [n_pairs, 2] interacting edges (i < j)
    twins: np.ndarray  # [n_twins, 2] co-firing-only edges (i < j)
    A: np.ndarray  # [rank, d]
    W_B: np.ndarray  # [rank, d], scaled to the design's strength
    interacting: bool

    @property
    def edges(self) -> np.ndarray:
        """[n_pairs + n_twins, 2]: interacting edges first, then twins."""
        return np.concatenate([self.pairs, self.twins])

    @property
    def labels(self) -> np.ndarray:
        """[n_edges] bool, True for interacting edges (whether or not the twin is additive)."""
        return np.r_[np.ones(len(self.pairs), bool), np.zeros(len(self.twins), bool)]

    def pair_terms(self, edges: np.ndarray) -> np.ndarray:
        """B(v_i, v_j) for `edges: [p, 2]` -> `[p, d]` (unit magnitudes)."""
        proj = self.V @ self.A.T  # [n_features, r]
        return (proj[edges[:, 0]] * proj[edges[:, 1]]) @ self.W_B


def _matchings(
    ids: np.ndarray, count: int, rng: np.random.Generator, taken: set[tuple[int, int]]
) -> list[np.ndarray]:
    """`count` random perfect matchings of `ids` sharing no edge with each other or with `taken`."""
    out: list[np.ndarray] = []
    for _ in range(count):
        for _attempt in range(200):
            perm = rng.permutation(ids).reshape(-1, 2)
            perm.sort(axis=1)
            edges = {(int(a), int(b)) for a, b in perm}
            if not edges & taken:
                break
        else:
            raise ValueError(
                "could not draw disjoint matchings: lower degree or raise pair_fraction"
            )
        taken |= edges
        out.append(perm)
    return out


def _raw_graph(design: PairGraphDesign) -> PairGraph:
    rng = np.random.default_rng([design.seed, 0])
    V = rng.standard_normal((design.n_features, design.d_model))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    p = np.arange(1, design.n_features + 1, dtype=np.float64) ** (-design.zipf_exponent)
    probs = np.minimum(p * design.mean_active / p.sum(), design.max_prob)[
        rng.permutation(design.n_features)
    ]
    paired = rng.permutation(design.n_features)[: design.n_paired]
    # 2·degree matchings, dealt alternately to P and T: every paired feature gets `degree` of each
    taken: set[tuple[int, int]] = set()
    ms = _matchings(paired, 2 * design.degree, rng, taken)
    pairs = np.concatenate(ms[0::2]).astype(np.int64)
    twins = np.concatenate(ms[1::2]).astype(np.int64)
    A = rng.standard_normal((design.rank, design.d_model)) / np.sqrt(design.d_model)
    W_B = rng.standard_normal((design.rank, design.d_model))
    return PairGraph(
        V=V.astype(np.float32),
        probs=probs,
        pairs=pairs,
        twins=twins,
        A=A.astype(np.float32),
        W_B=W_B,
        interacting=not design.additive,
    )


def sample_graph(design: PairGraphDesign) -> PairGraph:
    """Draw the design's graph and scale B so interaction terms carry `design.strength` of the
    variance
    (the additive twin keeps the same graph and B, only switched off)."""
    g = _raw_graph(design)
    if design.strength > 0:
        a, fire_pair = _firing(design, g, 0)
        base = a @ g.V
        inter = _interactions(design, g, a, fire_pair)
        v_base = (
            float(((base - base.mean(0)) ** 2).sum(1).mean()) + design.noise_std**2 * design.d_model
        )
        v_int = float(((inter - inter.mean(0)) ** 2).sum(1).mean())
        # shares add up when the two parts are uncorrelated (checked in the tests)
        scale = np.sqrt(design.strength * v_base / ((1 - design.strength) * max(v_int, 1e-30)))
        g.W_B = g.W_B * scale
    else:
        g.W_B = np.zeros_like(g.W_B)
    g.W_B = g.W_B.astype(np.float32)
    return g


def _firing(design: PairGraphDesign, g: PairGraph, block: int) -> tuple[np.ndarray, np.ndarray]:
    """One block's magnitudes `a: [rows, n_features]` and which interacting pairs fired
    (`[rows, n_pairs]` bool)."""
    rng = np.random.default_rng([design.seed, 1, block])
    rows, edges = BLOCK_ROWS, g.edges
    fire = rng.random((rows, design.n_features)) < g.probs
    event = rng.random((rows, len(edges))) < design.cofire_prob  # [rows, n_edges]
    r, e = np.nonzero(event)
    fire[r, edges[e, 0]] = True
    fire[r, edges[e, 1]] = True
    a = np.where(fire, rng.uniform(*design.magnitude, size=fire.shape), 0.0).astype(np.float32)
    both = fire[:, g.pairs[:, 0]] & fire[:, g.pairs[:, 1]]  # [rows, n_pairs]
    return a, both


def _interactions(
    design: PairGraphDesign, g: PairGraph, a: np.ndarray, both: np.ndarray
) -> np.ndarray:
    """Σ over fired interacting pairs of m(a_i, a_j) B(v_i, v_j) -> `[rows, d]`."""
    mag = (
        a[:, g.pairs[:, 0]] * a[:, g.pairs[:, 1]]
        if design.magnitude_law == "product"
        else np.ones_like(both, dtype=np.float32)
    )
    return ((mag * both) @ g.pair_terms(g.pairs)).astype(np.float32)


def generate(
    design: PairGraphDesign, g: PairGraph, start_block: int, n_blocks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of blocks `[start_block, start_block + n_blocks)`: `x: [rows, d]`, the true magnitudes
    `a: [rows, n_features]` and the interaction part `inter: [rows, d]` (zeros on the additive
    twin)."""
    xs, As, inters = [], [], []
    for block in range(start_block, start_block + n_blocks):
        a, both = _firing(design, g, block)
        inter = (
            _interactions(design, g, a, both)
            if g.interacting
            else np.zeros((len(a), design.d_model), np.float32)
        )
        noise = np.random.default_rng([design.seed, 2, block]).standard_normal(
            (len(a), design.d_model)
        )
        xs.append((a @ g.V + inter + design.noise_std * noise).astype(np.float32))
        As.append(a)
        inters.append(inter)
    return np.concatenate(xs), np.concatenate(As), np.concatenate(inters)
