"""Causal pair test: splice x̂ into the LM with and without chosen pairs' mixed differences.

For a set S of latent pairs, the ablated reconstruction of a token is
`x̂_S = x̂ − Σ_{(i,j) ∈ S, both active} Δ_ij` (Δ: `pair_effects.mixed_differences`).  Splicing
x̂ and x̂_S into the LM gives per-token ΔCE = CE(x̂_S) − CE(x̂) and ΔKL = KL(p_x̂ ‖ p_x̂_S).
Controls of matched size: (a) co-firing pairs whose effect norms are drawn to match the tested
pairs' (nearest-norm sampling without replacement), (b) random directions with the same norm as
each removed Δ.  Intervals are percentile bootstraps (95 %): over tokens for the joint ablation
of a set, and over pairs for each pair's own ablation (`own_ablations`: one pair's term removed at a
time, on the sequences where it fires), which says whether a set's effect rests on a few pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compsae.analysis.pair_effects import mixed_differences, pair_positions


def pair_mask(idx: torch.Tensor, vals: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """`[b, P]` bool: pair of positions (a, b) is in `selected` (`[n, n]` bool, symmetric) and
    both its latents fire."""
    pa, pb = pair_positions(idx.shape[1], idx.device)
    sel = selected.to(idx.device)
    both = (vals[:, pa] > 0) & (vals[:, pb] > 0)
    return sel[idx[:, pa], idx[:, pb]] & both


@torch.no_grad()
def removed_terms(
    model: Any, idx: torch.Tensor, vals: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """`[b, d]`: Σ over the selected, co-active pairs of each token of Δ_ij."""
    mask = pair_mask(idx, vals, selected)
    delta = mixed_differences(model, idx, vals)  # [b, P, d]
    return (delta * mask[..., None].to(delta.dtype)).sum(1)


@torch.no_grad()
def ablated_x_hat(
    model: Any, idx: torch.Tensor, vals: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """x̂ without the selected pairs' terms.  An empty selection returns `decode_active`
    untouched (no subtraction), so the clean splice is reproduced bit for bit."""
    x_hat = model.decode_active(idx, vals)
    if not bool(selected.any()):
        return x_hat
    return x_hat - removed_terms(model, idx, vals, selected)


def random_directions_like(terms: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random directions with the row norms of `terms: [b, d]` (control b)."""
    r = torch.randn(terms.shape, generator=gen, dtype=torch.float64).to(terms)
    return r / r.norm(dim=-1, keepdim=True).clamp_min(1e-30) * terms.norm(dim=-1, keepdim=True)


def top_pairs(effect: np.ndarray, count: np.ndarray, n: int) -> np.ndarray:
    """`[m, 2]` the (i < j) pairs with the largest `effect` among those with `count > 0`, m ≤ n."""
    i, j = np.triu_indices(effect.shape[0], 1)
    ok = count[i, j] > 0
    i, j = i[ok], j[ok]
    order = np.argsort(-effect[i, j], kind="stable")[:n]
    return np.stack([i[order], j[order]], 1)


def matched_pairs(
    effect: np.ndarray, count: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Control (a): for each target pair, the unused co-firing pair (not a target) whose effect is
    nearest to it, visiting the targets in random order; `[m, 2]`."""
    i, j = np.triu_indices(effect.shape[0], 1)
    ok = count[i, j] > 0
    taken = {(int(a), int(b)) for a, b in target}
    cand = [
        (int(a), int(b)) for a, b in zip(i[ok], j[ok], strict=True) if (int(a), int(b)) not in taken
    ]
    cand_eff = np.array([effect[a, b] for a, b in cand])
    used = np.zeros(len(cand), dtype=bool)
    out = []
    for t in rng.permutation(len(target)):
        if used.all():
            break
        d = np.abs(cand_eff - effect[target[t, 0], target[t, 1]])
        d[used] = np.inf
        best = int(np.argmin(d))
        used[best] = True
        out.append(cand[best])
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def selection_matrix(pairs: np.ndarray, n: int) -> torch.Tensor:
    """`[n, n]` symmetric bool with the listed pairs on."""
    s = torch.zeros(n, n, dtype=torch.bool)
    if len(pairs):
        p = torch.as_tensor(pairs)
        s[p[:, 0], p[:, 1]] = True
        s[p[:, 1], p[:, 0]] = True
    return s


def bootstrap_ci(
    values: np.ndarray, rng: np.random.Generator, n_boot: int = 1000, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean of `values`."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def per_token_delta(
    ce_fn: Callable,
    tokens: torch.Tensor,
    base: Callable | tuple[torch.Tensor, torch.Tensor],
    ablated: Callable,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted token: ΔCE = CE(ablated) − CE(base) and KL(p_base ‖ p_ablated), both `[b,
    ctx−1]`.  `base` is a splice, or its `(ce, logits)` already computed on these `tokens` (one
    LM forward per ablation instead of two)."""
    with torch.no_grad():
        ce_b, lg_b = ce_fn(tokens, base) if callable(base) else base
        ce_a, lg_a = ce_fn(tokens, ablated)
    lp_b = F.log_softmax(lg_b[:, :-1].double(), -1)
    lp_a = F.log_softmax(lg_a[:, :-1].double(), -1)
    return (ce_a - ce_b).double(), (lp_b.exp() * (lp_b - lp_a)).sum(-1)


@dataclass
class PairCausalRecord:
    """One row of the causal test: `kind` in {top, matched, random_dir}, `n_pairs` tested, mean
    ΔCE / ΔKL per affected token of the joint ablation with 95 % bootstrap intervals over tokens,
    the tokens affected and, where the set was small enough for one ablation per pair
    (`pairs_own` > 0), the mean over pairs of each pair's own ΔCE per affected token with a 95 %
    bootstrap interval over pairs."""

    kind: str
    n_pairs: int
    n_tokens: int
    delta_ce: float
    delta_ce_lo: float
    delta_ce_hi: float
    delta_kl: float
    delta_kl_lo: float
    delta_kl_hi: float
    pairs_own: int = 0
    pair_delta_ce: float = math.nan
    pair_delta_ce_lo: float = math.nan
    pair_delta_ce_hi: float = math.nan


@torch.no_grad()
def own_ablation(
    model: Any,
    ce_fn: Callable,
    tokens: torch.Tensor,
    idx: torch.Tensor,
    vals: torch.Tensor,
    base_x: torch.Tensor,
    pair: np.ndarray,
    n_latents: int,
    scale: float,
    gen: torch.Generator | None = None,
    base_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """Mean ΔCE per affected predicted token of removing one `pair`'s term alone (`gen`: a random
    direction of the same norm instead), spliced only into the sequences where the pair fires.
    `idx`, `vals`: `[b·ctx, k]` active latents of `tokens: [b, ctx]`; `base_x`: their x̂ in model
    units; `base_out`: the `(ce, logits)` of splicing `base_x` into all of `tokens`, when already
    computed.  NaN where the pair never fires before the last position."""
    b, ctx = tokens.shape
    sel = selection_matrix(np.asarray(pair).reshape(1, 2), n_latents)
    fires = pair_mask(idx, vals, sel).any(1)  # [b·ctx]
    hit = fires.view(b, ctx)[:, :-1]
    seqs = hit.any(1).nonzero().flatten()
    if len(seqs) == 0:
        return math.nan
    rows = fires.nonzero().flatten()
    terms = removed_terms(model, idx[rows], vals[rows], sel)  # [r, d]
    if gen is not None:
        terms = random_directions_like(terms, gen)
    ablated = base_x.clone()
    ablated[rows] -= terms
    d = base_x.shape[-1]
    sub = seqs.tolist()

    def splice(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        part = (x / scale).view(b, ctx, d)[sub]
        return lambda act: part.view(act.shape).to(act)

    base: Callable | tuple[torch.Tensor, torch.Tensor] = splice(base_x)
    if base_out is not None:
        base = (base_out[0][sub], base_out[1][sub])
    dce, _ = per_token_delta(ce_fn, tokens[sub], base, splice(ablated))
    return float(dce[hit[sub]].mean())


def _own_summary(rec: PairCausalRecord, own: list[float], rng: np.random.Generator) -> None:
    """Fill the over-pairs fields of `rec` from the pairs' own ΔCE (NaN: never fired)."""
    v = np.asarray([o for o in own if math.isfinite(o)], dtype=np.float64)
    if v.size:
        rec.pairs_own = int(v.size)
        rec.pair_delta_ce, rec.pair_delta_ce_lo, rec.pair_delta_ce_hi = bootstrap_ci(v, rng)


def _summary(
    kind: str,
    n: int,
    dce: torch.Tensor,
    dkl: torch.Tensor,
    hit: torch.Tensor,
    rng: np.random.Generator,
) -> PairCausalRecord:
    ce_v, kl_v = dce[hit].numpy(), dkl[hit].numpy()
    ce, ce_lo, ce_hi = bootstrap_ci(ce_v, rng)
    kl, kl_lo, kl_hi = bootstrap_ci(kl_v, rng)
    return PairCausalRecord(kind, n, int(hit.sum()), ce, ce_lo, ce_hi, kl, kl_lo, kl_hi)


@torch.no_grad()
def run_pair_causal(
    model: Any,
    ce_fn: Callable,
    tokens: torch.Tensor,
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    effect: np.ndarray,
    count: np.ndarray,
    ns: tuple[int, ...] = (10, 100, 1000),
    seed: int = 0,
    scale: float = 1.0,
    own_max: int = 100,
    progress: bool = False,
) -> list[PairCausalRecord]:
    """The causal test on held-out `tokens: [b, ctx]`: for each N in `ns` (clipped to the co-firing
    pairs that exist), the top-N pairs by `effect` (in-context mean ‖Δ‖), the matched-norm control
    and the random-direction control.  `encode` maps hook activations `[m, d]` to the model's
    active `(idx, vals)` of `act · scale` (the model's input units); x̂ and the removed terms are
    divided by `scale` again before the splice.  Averages are over the
    predicted tokens whose activation had at least one removed term.  Sets of at most `own_max`
    pairs also get one ablation per pair (`own_ablation`) and the bootstrap over pairs; `progress`
    shows a bar over the LM forwards."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n_lat = effect.shape[0]
    store: dict[str, Any] = {}

    def capture(act: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        idx, vals = encode(act.flatten(0, 1).cpu().to(dtype) * scale)
        store.update(idx=idx, vals=vals, shape=act.shape)
        return (model.decode_active(idx, vals) / scale).view(act.shape)

    ce_fn(tokens, capture)
    idx, vals, shape = store["idx"], store["vals"], store["shape"]
    base_x = model.decode_active(idx, vals)

    def splice(x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda act: (x / scale).view(shape).to(act)

    base_out = ce_fn(tokens, splice(base_x))  # x̂ spliced in: every ablation's reference
    n_avail = int((np.triu(count, 1) > 0).sum())
    sets = sorted({min(n, n_avail) for n in ns if n > 0})
    n_own = sum(3 * n for n in sets if n <= own_max)  # an upper bound: the top-10 are cached
    bar = tqdm(
        total=3 * len(sets) + n_own, desc="causal pair test", unit="forward", disable=not progress
    )
    out: list[PairCausalRecord] = []
    own_cache: dict[tuple[str, int, int], float] = {}

    def own(kind: str, pairs: np.ndarray) -> list[float]:
        vals_out = []
        for a, b in pairs:
            key = (kind, int(a), int(b))
            if key not in own_cache:
                pair_gen = None
                if kind == "random_dir":  # one seeded direction per pair, whatever the order
                    pair_seed = seed * 1_000_003 + int(a) * n_lat + int(b)
                    pair_gen = torch.Generator().manual_seed(pair_seed)
                own_cache[key] = own_ablation(
                    model,
                    ce_fn,
                    tokens,
                    idx,
                    vals,
                    base_x,
                    np.array([a, b]),
                    n_lat,
                    scale,
                    pair_gen,
                    base_out,
                )
                bar.update()
            vals_out.append(own_cache[key])
        return vals_out

    for n in sets:
        top = top_pairs(effect, count, n)
        ctl = matched_pairs(effect, count, top, rng)
        for kind, pairs in (("top", top), ("matched", ctl)):
            sel = selection_matrix(pairs, n_lat)
            terms = removed_terms(model, idx, vals, sel)
            hit = pair_mask(idx, vals, sel).any(1).view(shape[:2])[:, :-1]
            dce, dkl = per_token_delta(ce_fn, tokens, base_out, splice(base_x - terms))
            bar.update()
            out.append(_summary(kind, len(pairs), dce, dkl, hit, rng))
            if 0 < len(pairs) <= own_max:
                _own_summary(out[-1], own(kind, pairs), rng)
            if kind == "top":
                rand = random_directions_like(terms, gen)
                dce, dkl = per_token_delta(ce_fn, tokens, base_out, splice(base_x - rand))
                bar.update()
                out.append(_summary("random_dir", len(pairs), dce, dkl, hit, rng))
                if 0 < len(pairs) <= own_max:
                    _own_summary(out[-1], own("random_dir", pairs), rng)
    bar.close()
    return out


def plot_pair_causal(records: list[PairCausalRecord], path: str, metric: str = "delta_ce") -> None:
    """ΔCE (or `delta_kl`) vs N for the top pairs and both controls, 95 % intervals as error
    bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in ("top", "matched", "random_dir"):
        rows = [r for r in records if r.kind == kind and r.n_pairs > 0 and r.n_tokens > 0]
        if not rows:
            continue
        n = np.array([r.n_pairs for r in rows])
        y = np.array([getattr(r, metric) for r in rows])
        lo = np.array([getattr(r, metric + "_lo") for r in rows])
        hi = np.array([getattr(r, metric + "_hi") for r in rows])
        ax.errorbar(n, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("pairs removed (N)")
    ax.set_ylabel(metric.replace("_", " ") + " per affected token (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
