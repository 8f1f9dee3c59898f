"""What the feature browser shows of one trained model, as one JSON-able dict (see `browser_page`).

Per latent: its row of `latents.parquet` (frequency, mean / max activation, partner statistics),
the tokens it fires on most among its top contexts, its top contexts with every token's activation
(for shading), a histogram of its non-zero activations on a sample of held-out tokens, its logit
effect (decoder direction times the LM's unembedding: the tokens it promotes and suppresses) where
the hook is in the residual stream and the LM loads, and its strongest composition partners with
the contexts where the pair fires together.

Everything here reads what analysis already computed, plus two small passes of the model: over the
context windows (to shade them) and over a sample of held-out rows (the histograms).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from compsae.analysis.views import CompositionView
from compsae.store import ActivationStore

HIST_BINS = 20
TOP_TOKENS = 8
LOGIT_TOKENS = 8
PARTNERS = 6
CONTEXT_GROUP = 1024  # contexts encoded together (≈ 13k rows with a 12-token window)
# per-pair matrices over the tracked latents that rank partners, in order of preference (the first
# present is used): an intervention-based pair effect where analysis computes one, else attention
PARTNER_MATRICES = ("pair_effect", "pair_score", "comp")


def _sig(v: float, digits: int = 3) -> float:
    """`v` rounded to `digits` significant digits (keeps the JSON small)."""
    return float(f"{float(v):.{digits}g}") if np.isfinite(v) else 0.0


def read_rows(store: ActivationStore, hook: str, rows: np.ndarray) -> np.ndarray:
    """`[len(rows), d]` activations of sorted unique store `rows`, each chunk read once."""
    out = np.empty((len(rows), store.d_model(hook)), dtype=np.float32)
    chunk = rows // store.chunk_rows
    for c in np.unique(chunk):
        sel = np.flatnonzero(chunk == c)
        block = store.read_chunk(hook, int(c))
        out[sel] = block[rows[sel] - int(c) * store.chunk_rows]
    return out


def context_windows(
    tops: pd.DataFrame, store: ActivationStore, per_latent: int, window: int, after: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """The first `per_latent` top contexts of each latent, each as its store rows (`rows`: up to
    `window` rows before the centre row, the centre row and up to `after` rows after it, all in
    the same sequence; `centre`: the centre's index in `rows`); and all rows needed, sorted."""
    sel = tops[tops["rank"] < per_latent].sort_values(["latent", "rank"]).reset_index(drop=True)
    seq = store.column_view("seq_id")
    ctx_rows, centres = [], []
    for r in sel["row"].to_numpy():
        lo, hi = max(int(r) - window, 0), min(int(r) + after, len(seq) - 1)
        cand = np.arange(lo, hi + 1)
        cand = cand[seq[cand] == seq[r]]
        ctx_rows.append(cand)
        centres.append(int(np.searchsorted(cand, int(r))))
    sel = sel.assign(rows=ctx_rows, centre=centres)
    needed = np.unique(np.concatenate(ctx_rows)) if ctx_rows else np.zeros(0, dtype=np.int64)
    return sel, needed


def encode_pairs(
    encode: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    row_idx: np.ndarray,
    latent: np.ndarray,
    centre: np.ndarray,
    batch: int = 2048,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Codes of `x: [m, d]` at the (row_idx, latent) pairs `[p]`, and the active latent ids of each
    row in `centre` (indices into x), encoding `batch` rows at a time (the dense codes are never
    all in memory)."""
    vals = np.zeros(len(row_idx), dtype=np.float32)
    active: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(centre)
    for lo in range(0, len(x), batch):
        z = encode(x[lo : lo + batch])  # [b, n]
        hi = lo + len(z)
        hit = (row_idx >= lo) & (row_idx < hi)
        vals[hit] = z[row_idx[hit] - lo, latent[hit]]
        for k in np.flatnonzero((centre >= lo) & (centre < hi)):
            active[k] = np.flatnonzero(z[centre[k] - lo] > 0)
    return vals, active


def activation_histograms(
    encode: Callable[[np.ndarray], np.ndarray], x: np.ndarray, top: np.ndarray, batch: int = 2048
) -> np.ndarray:
    """`[n, HIST_BINS]` counts of each latent's non-zero codes on `x: [m, d]`, in equal bins from 0
    to its max activation `top: [n]` (values above it go to the last bin)."""
    n = len(top)
    counts = np.zeros((n, HIST_BINS), dtype=np.int64)
    scale = np.where(top > 0, top, 1.0)
    for lo in range(0, len(x), batch):
        z = encode(x[lo : lo + batch])
        r, c = np.nonzero(z > 0)
        b = np.minimum((z[r, c] / scale[c] * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        np.add.at(counts, (c, b), 1)
    return counts


def partner_table(
    arrays: dict[str, Any], limit: int = PARTNERS
) -> tuple[str | None, dict[int, list[tuple[int, float]]]]:
    """(the matrix used, latent -> its strongest partners `(partner, score)`): analysis' partner
    lists (`metrics.partner_lists`: the partners counted in `n_partners`, by pair effect) where it
    wrote them, else the first per-pair matrix in `PARTNER_MATRICES`; ({} when it has none: a
    model without composition)."""
    lists = arrays.get("partner_lists")
    if lists is not None:
        key = next((k for k in PARTNER_MATRICES if k in arrays), "comp")
        return key, {int(lat): [(j, s) for j, s, _ in ps[:limit]] for lat, ps in lists.items()}
    tracked = arrays.get("tracked")
    for key in PARTNER_MATRICES:
        mat = arrays.get(key)
        if mat is None or tracked is None:
            continue
        mat = np.asarray(mat, dtype=np.float64)
        if mat.ndim != 2 or mat.shape[0] != len(tracked) or mat.shape[1] != len(tracked):
            continue
        sym = np.nan_to_num(np.fmax(mat, mat.T), nan=0.0)  # either direction counts
        np.fill_diagonal(sym, 0.0)
        out: dict[int, list[tuple[int, float]]] = {}
        for i, lat in enumerate(tracked):
            order = np.argsort(-sym[i], kind="stable")[:limit]
            kept = [(int(tracked[j]), float(sym[i, j])) for j in order if sym[i, j] > 0]
            if kept:
                out[int(lat)] = kept
        return key, out
    return None, {}


def logit_effects(
    w_dec: np.ndarray, w_u: np.ndarray, k: int = LOGIT_TOKENS, block: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each decoder row `w_dec: [n, d]` through the unembedding `w_u: [d, vocab]` ->
    (top-k promoted token ids `[n, k]`, their logit changes, bottom-k ids, their changes), per unit
    of activation, in blocks of latents (the full `[n, vocab]` product is never held)."""
    import torch

    wu = torch.as_tensor(w_u, dtype=torch.float32)
    ups, upv, downs, downv = [], [], [], []
    for lo in range(0, len(w_dec), block):
        eff = torch.as_tensor(w_dec[lo : lo + block], dtype=torch.float32) @ wu  # [b, vocab]
        top = torch.topk(eff, k, dim=-1)
        bot = torch.topk(-eff, k, dim=-1)
        ups.append(top.indices.numpy())
        upv.append(top.values.numpy())
        downs.append(bot.indices.numpy())
        downv.append(-bot.values.numpy())
    return np.concatenate(ups), np.concatenate(upv), np.concatenate(downs), np.concatenate(downv)


def browser_data(
    name: str,
    kind: str,
    encode: Callable[[np.ndarray], np.ndarray],
    store: ActivationStore,
    hook: str,
    latents: pd.DataFrame,
    tops: pd.DataFrame,
    arrays: dict[str, Any],
    decode: Callable[[int], str],
    sample_rows: np.ndarray,
    w_dec: np.ndarray | None = None,
    w_u: np.ndarray | None = None,
    per_latent: int = 5,
    window: int = 12,
    n_tokens: int = 0,
    notes: list[str] | None = None,
    after: int = 0,
    partners_shown: int = PARTNERS,
    view: CompositionView | None = None,
    pairs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything one model's browser page shows (the module docstring), JSON-able.

    `encode(x [m, d]) -> z [m, n]` in the store's units; `latents`, `tops`: this model's rows of
    latents.parquet / top_contexts.parquet; `arrays`: its analysis arrays (partners); `sample_rows`:
    held-out rows for the histograms; `w_dec` / `w_u`: decoder rows and the LM's unembedding for the
    logit effects (skipped when either is None); `n_tokens`: held-out tokens behind the table;
    `after`: tokens shown after each context's centre; `partners_shown`: partners listed per
    latent; `view`: what the model's composition numbers are (labels, why there are none); `pairs`:
    its profiled top pairs (analysis' `top_pairs` rows), one pair page each (`pair_pages`)."""
    notes = list(notes or [])
    view = view or CompositionView(kind)
    lat = latents.sort_values("latent").reset_index(drop=True)
    n = int(lat["latent"].max()) + 1 if len(lat) else 0
    columns = [
        c
        for c in (
            "latent",
            "frequency",
            "fire_count",
            "mean_activation",
            "max_activation",
            "n_partners",
            "partner_entropy",
            "attn_gini",
        )
        if c in lat
    ]
    table = [
        [
            None
            if (isinstance(v, float) and not np.isfinite(v))
            else (int(v) if c in ("latent", "fire_count") else _sig(v))
            for c, v in zip(columns, row, strict=True)
        ]
        for row in lat[columns].itertuples(index=False)
    ]

    matrix, partners = partner_table(arrays, partners_shown)
    lists = arrays.get("partner_lists")
    partner_counts = (
        {int(lat): len(ps) for lat, ps in lists.items()}
        if lists is not None
        else {lat: len(ps) for lat, ps in partners.items()}
    )
    shares = {
        int(lat): {int(j): float(sh) for j, _, sh in ps[:partners_shown]}
        for lat, ps in (lists or {}).items()
    }
    if matrix is None:
        why = view.why("pairs") or "its pair statistics were skipped"
        notes.append(f"no composition partners: {why}")

    vocab: dict[int, str] = {}

    def tok(i: int) -> int:
        if i not in vocab:
            vocab[i] = decode(int(i))
        return int(i)

    top_tokens: dict[int, list[list[Any]]] = {}
    for latent, group in tops.groupby("latent"):
        counts: Counter[int] = Counter()
        reps = group["repeats"] if "repeats" in group else pd.Series(1, index=group.index)
        for t, n_rep in zip(group["token_id"], reps, strict=True):
            counts[int(t)] += int(n_rep)
        top_tokens[int(latent)] = [[tok(t), c] for t, c in counts.most_common(TOP_TOKENS)]

    contexts: dict[int, list[dict[str, Any]]] = {}
    sel, _ = context_windows(tops, store, per_latent, window, after)
    repeats = sel["repeats"] if "repeats" in sel else pd.Series(1, index=sel.index)
    tokens = store.column_view("tokens")
    # a group of contexts at a time: the rows read stay small whatever the dictionary size
    for lo in range(0, len(sel), CONTEXT_GROUP):
        part = sel.iloc[lo : lo + CONTEXT_GROUP]
        needed = np.unique(np.concatenate(list(part["rows"])))
        x = read_rows(store, hook, needed)  # [m, d]
        pair_rows = np.searchsorted(needed, np.concatenate(list(part["rows"]))).astype(np.int64)
        pair_lat = np.repeat(part["latent"].to_numpy(), [len(r) for r in part["rows"]])
        centre = np.searchsorted(needed, part["row"].to_numpy()).astype(np.int64)
        vals, active = encode_pairs(encode, x, pair_rows, pair_lat, centre)
        at = 0
        for i, (latent, rows, c, n_rep) in enumerate(
            zip(
                part["latent"],
                part["rows"],
                part["centre"],
                repeats.iloc[lo : lo + CONTEXT_GROUP],
                strict=True,
            )
        ):
            acts = vals[at : at + len(rows)]
            at += len(rows)
            mine = {p for p, _ in partners.get(int(latent), [])}
            contexts.setdefault(int(latent), []).append(
                {
                    "t": [tok(int(tokens[r])) for r in rows],
                    "a": [_sig(a) for a in acts],
                    "c": int(c),  # the activating token: window before it, `after` after it
                    "n": int(n_rep),  # top contexts with this same token window
                    "p": sorted(int(j) for j in active[i] if int(j) in mine),
                }
            )

    hist: dict[int, list[int]] = {}
    if len(sample_rows) and n:
        top_act = np.nan_to_num(
            lat.set_index("latent")["max_activation"].reindex(range(n)).to_numpy(), nan=0.0
        )
        counts = activation_histograms(
            encode, read_rows(store, hook, np.sort(sample_rows)), top_act
        )
        hist = {int(i): counts[i].tolist() for i in np.flatnonzero(counts.sum(1))}

    logits: dict[int, dict[str, list[list[Any]]]] = {}
    if w_dec is not None and w_u is not None:
        up, upv, down, downv = logit_effects(w_dec, w_u)
        for i in range(len(w_dec)):
            logits[i] = {
                "up": [[tok(int(t)), _sig(v)] for t, v in zip(up[i], upv[i], strict=True)],
                "down": [[tok(int(t)), _sig(v)] for t, v in zip(down[i], downv[i], strict=True)],
            }

    return {
        "model": name,
        "kind": kind,
        "hook": hook,
        "n_latents": n,
        "n_tokens": int(n_tokens),
        "hist_rows": int(len(sample_rows)),
        "hist_bins": HIST_BINS,
        "columns": columns,
        "table": table,
        "top_tokens": top_tokens,
        "contexts": contexts,
        "hist": hist,
        "logits": logits,
        "partners": {
            k: [[j, _sig(s), _sig(shares.get(k, {}).get(j, float("nan")))] for j, s in v]
            for k, v in partners.items()
        },
        "partner_counts": partner_counts,
        "partner_matrix": matrix,
        "composer": view.label,
        "matrix_label": view.matrix_label if matrix is not None else "",
        "partner_label": view.partner_label,
        "no_partners_why": view.why("pairs") or "its pair statistics were skipped",
        "vocab": vocab,
        "pairs": pair_pages(pairs or []),
        "notes": notes,
    }


PAIR_PAGE_FIELDS = (
    "i",
    "j",
    "tokens",
    "mean_effect",
    "p_value",
    "called",
    "n_only_i",
    "n_only_j",
    "tokens_both",
    "tokens_only_i",
    "tokens_only_j",
    "promoted",
    "demoted",
    "examples",
)


def _json_safe(v: Any) -> Any:
    """`v` with NaN / inf as None, numpy scalars as Python numbers (the page's JSON is strict)."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return _sig(v) if np.isfinite(v) else None
    return v


def pair_pages(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per profiled pair (`#pair=i-j` in the page): what both latents' pages link to."""
    return [
        _json_safe({k: p[k] for k in PAIR_PAGE_FIELDS if k in p})
        for p in pairs
        if "i" in p and "j" in p
    ]
