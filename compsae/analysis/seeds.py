"""Aggregate repeated-seed runs of the ablation study (models named `<variant>__s<seed>`) into one
mean ± sd table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from compsae.train.config import split_seed_name


def aggregate_seeds(
    rows: Sequence[dict],
    group_by: Sequence[str] = ("variant",),
    metrics: Sequence[str] | None = None,
    seed_key: str = "seed",
) -> pd.DataFrame:
    """Mean, sample sd (ddof=1) and number of seeds of every metric per group.

    ``rows``: one dict per (variant, seed) run, e.g. ``{"variant": "gate_off", "seed": 1, "fvu":
    ...}``. ``metrics``: numeric columns to aggregate (default: every numeric column except the
    keys). Returns a DataFrame indexed by ``group_by`` with columns ``<metric>_mean``,
    ``<metric>_sd``, ``n_seeds``.
    """
    df = pd.DataFrame(list(rows))
    if df.empty:
        return df
    keys = list(group_by)
    if metrics is None:
        metrics = [
            c
            for c in df.columns
            if c not in (*keys, seed_key) and pd.api.types.is_numeric_dtype(df[c])
        ]
    g = df.groupby(keys, sort=False)
    out = pd.DataFrame({"n_seeds": g[seed_key].nunique() if seed_key in df else g.size()})
    for m in metrics:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_sd"] = g[m].std(ddof=1)
    return out


def mean_sd_table(agg: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> str:
    """Markdown table with one "mean ± sd" cell per metric (sd "–" for a single seed)."""
    header = [*agg.index.names, "seeds", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in agg.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        cells = []
        for m in metrics:
            mean, sd = row[f"{m}_mean"], row[f"{m}_sd"]
            cells.append(
                f"{mean:.{digits}f} ± {sd:.{digits}f}"
                if np.isfinite(sd)
                else f"{mean:.{digits}f} ± –"
            )
        lines.append("| " + " | ".join([*map(str, idx), str(int(row["n_seeds"])), *cells]) + " |")
    return "\n".join(lines)


ABLATION_METRICS = ("fvu", "fvu_nocomp", "comp_share", "l0", "dead_fraction", "ce_recovered")


def ablations_by_variant(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds of every variant trained as `<variant>__s<seed>`; [] without repeats."""
    tagged = []
    for row in rows:
        variant, seed = split_seed_name(row["model"])
        if seed is not None:
            tagged.append(
                {
                    "variant": variant,
                    "seed": seed,
                    **{m: row.get(m) for m in ABLATION_METRICS if row.get(m) is not None},
                }
            )
    if not tagged:
        return []
    agg = aggregate_seeds(
        tagged, metrics=[m for m in ABLATION_METRICS if any(m in t for t in tagged)]
    )
    out = []
    for variant, rec in agg.iterrows():
        out.append(
            {"variant": variant, **{c: (None if pd.isna(v) else float(v)) for c, v in rec.items()}}
        )
    return out
