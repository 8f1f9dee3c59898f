"""What a composing pair is: the tokens where both latents fire against those where only one does,
and the next-token logits its term moves.

The logit effect of pair (i, j) is its mean term over the held-out tokens where both fire,
`Δ̄_ij = mean_t Δ_ij(t)` in store units, read through the unembedding: `Δ̄_ij W_U`.  That is the
direct effect on the logits, with the final layer norm left out (as for a latent's promoted
tokens in the browser); the splice test (`pair_causal`) measures the full effect on the loss.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from compsae.analysis.pair_causal import removed_terms, selection_matrix

TOKENS_SHOWN = 5  # most frequent tokens per group, promoted / demoted tokens per pair


def frequent_tokens(ids: np.ndarray, decode: Callable[[int], str], n: int = TOKENS_SHOWN) -> list:
    """The `n` most frequent token ids of `ids` as `[token, count]`, most frequent first."""
    return [[decode(int(t)), int(c)] for t, c in Counter(ids.tolist()).most_common(n)]


def logit_effect(
    mean_term: np.ndarray, w_u: np.ndarray, decode: Callable[[int], str], n: int = TOKENS_SHOWN
) -> tuple[list, list]:
    """(promoted, demoted): the `n` tokens whose logits `mean_term: [d] @ w_u: [d, vocab]` raises
    most and lowers most, as `[token, logit change]`."""
    logits = mean_term.astype(np.float64) @ w_u.astype(np.float64)  # [vocab]
    order = np.argsort(logits)
    up = [[decode(int(t)), float(logits[t])] for t in order[::-1][:n]]
    down = [[decode(int(t)), float(logits[t])] for t in order[:n]]
    return up, down


@torch.no_grad()
def pair_profiles(
    model: Any,
    scale: float,
    x: np.ndarray,
    token_ids: np.ndarray,
    pairs: list[dict[str, Any]],
    decode: Callable[[int], str],
    w_u: np.ndarray | None,
) -> None:
    """Add to each of `pairs` (dicts with latents "i", "j") its profile on held-out rows `x: [b, d]`
    (store units) with token ids `token_ids: [b]`: `n_only_i` / `n_only_j` (rows where one fires
    without the other), `tokens_both` / `tokens_only_i` / `tokens_only_j` (most frequent tokens of
    each group) and, with the unembedding `w_u: [d, vocab]`, `promoted` / `demoted` (tokens whose
    logits the pair's mean term moves most)."""
    dtype = next(model.parameters()).dtype
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(dtype) * scale
    # encoded in chunks: the pre-activations of every row at once would be [b, n_latents]
    coded = [model.active(xt[lo : lo + 2048])[1:] for lo in range(0, len(xt), 2048)]
    idx = torch.cat([c[0] for c in coded])
    vals = torch.cat([c[1] for c in coded])
    n_lat = int(model.cfg.n_latents)
    for pair in pairs:
        i, j = int(pair["i"]), int(pair["j"])
        fire_i = ((idx == i) & (vals > 0)).any(1).numpy()
        fire_j = ((idx == j) & (vals > 0)).any(1).numpy()
        both, only_i, only_j = fire_i & fire_j, fire_i & ~fire_j, fire_j & ~fire_i
        pair.update(
            n_only_i=int(only_i.sum()),
            n_only_j=int(only_j.sum()),
            tokens_both=frequent_tokens(token_ids[both], decode),
            tokens_only_i=frequent_tokens(token_ids[only_i], decode),
            tokens_only_j=frequent_tokens(token_ids[only_j], decode),
        )
        if w_u is None or not both.any():
            continue
        rows = torch.as_tensor(np.flatnonzero(both))
        sel = selection_matrix(np.array([[min(i, j), max(i, j)]]), n_lat)
        terms = removed_terms(model, idx[rows], vals[rows], sel)  # [r, d] model units
        mean_term = (terms.double().mean(0) / scale).numpy()
        pair["promoted"], pair["demoted"] = logit_effect(mean_term, w_u, decode)
