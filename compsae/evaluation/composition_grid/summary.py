"""The grid's table and figure: per cell the oracle, the post-hoc TopK fit and the composers."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = {
    "oracle": "oracle (true codes)",
    "topk": "TopK + post-hoc pair fit",
    "topk_params": "TopK at CompSAE params",
    "compsae": "CompSAE (pair composer)",
    "polysae": "PolySAE form",
}


def _ci(s: dict[str, Any]) -> str:
    lo, hi = s["auc_ci"]
    return f"{s['auc']:.3f} [{lo:.2f}, {hi:.2f}]"


def _row(r: dict[str, Any]) -> list[str]:
    res, s = r["result"], r["result"]["scores"]
    fits, add = res["fits"], res["additive"]["calls_per_1000"]
    both = ("topk", "compsae")
    return [
        r["split"],
        r["name"],
        str(res["n_pairs"]),
        "yes" if res["identifiable"] else "no",
        *(_ci(s[m]) for m in ("oracle", "topk", "compsae", "polysae")),
        " / ".join(f"{s[m]['auc_statistic']:.3f}" for m in both),
        " / ".join(f"{s[m]['f1']:.2f}" for m in both),
        " / ".join(f"{s[m]['f1_label_tuned']:.2f}" for m in both),
        " / ".join(f"{add[m]:.1f}" for m in both),
        f"{s['pmi']['auc']:.2f}",
        f"{res['best_per_latent_auc']:.2f}",
        " / ".join(
            f"{v:.4f}"
            for v in (fits["topk"]["fvu"], fits["compsae"]["fvu"], fits["compsae"]["fvu_path_off"])
        ),
        " / ".join(f"{fits[m]['mcc']:.3f}" for m in both),
    ]


COLUMNS = [
    "split",
    "cell",
    "pairs",
    "identifiable",
    "oracle AUC",
    "TopK post-hoc AUC",
    "CompSAE AUC",
    "PolySAE-form AUC",
    "evidence AUC (TopK / CompSAE)",
    "F1 label-free (TopK / CompSAE)",
    "F1 label-tuned (TopK / CompSAE)",
    "additive calls/1000 (TopK / CompSAE)",
    "PMI AUC",
    "best per-latent AUC",
    "FVU TopK / CompSAE / path off",
    "MCC TopK / CompSAE",
]


def grid_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per cell with AUC (95 % bootstrap interval over pairs), label-free F1 and
    calls per 1,000 candidates on the additive twin, and the fit figures."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in records]
    return "\n".join(lines) + "\n"


def worst_identifiable(records: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """Per method, the worst AUC and label-free F1 over the split's identifiable cells, and the
    number of identifiable cells where the composer beats the post-hoc TopK statistic."""
    cells = [r for r in records if r["split"] == split and r["result"]["identifiable"]]
    out: dict[str, Any] = {
        "identifiable_cells": len(cells),
        "cells": sum(r["split"] == split for r in records),
    }
    for m in ("oracle", "topk", "compsae"):
        if cells:
            worst = min(cells, key=lambda r: r["result"]["scores"][m]["auc"])
            out[m] = {
                "worst_auc": worst["result"]["scores"][m]["auc"],
                "worst_cell": worst["name"],
                "worst_f1": min(r["result"]["scores"][m]["f1"] for r in cells),
            }
    out["compsae_beats_topk"] = sum(
        r["result"]["scores"]["compsae"]["auc"] > r["result"]["scores"]["topk"]["auc"]
        for r in cells
    )
    return out


def grid_figure(records: list[dict[str, Any]], path: str, split: str = "test") -> None:
    """AUC per cell (one axis value each): the oracle, the post-hoc TopK fit and the composers."""
    cells = [r for r in records if r["split"] == split]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(cells)), 4.0))
    xs = range(len(cells))
    for m, marker in (
        ("oracle", "s"),
        ("topk", "o"),
        ("topk_params", "v"),
        ("compsae", "D"),
        ("polysae", "^"),
    ):
        ys = [r["result"]["scores"][m]["auc"] for r in cells]
        lo = [y - r["result"]["scores"][m]["auc_ci"][0] for y, r in zip(ys, cells, strict=True)]
        hi = [r["result"]["scores"][m]["auc_ci"][1] - y for y, r in zip(ys, cells, strict=True)]
        ax.errorbar(
            list(xs), ys, yerr=[lo, hi], fmt=marker, label=METHODS[m], capsize=2, alpha=0.85
        )
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [r["name"] for r in cells], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("pair AUC (interacting vs co-firing twins)")
    ax.set_ylim(0.3, 1.02)
    ax.set_title(f"composition grid, {split} split (95 % bootstrap intervals over pairs)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
