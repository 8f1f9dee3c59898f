"""Training curves: every model of a train stage on one figure, read from the `metrics.jsonl` each
trainer writes (one line per `log_every` steps), against tokens seen.

Panels: FVU (the README's definition, per logged training batch: Σ‖x − x̂‖² / Σ‖x − μ‖² with μ the
batch mean), L0, dead fraction (latents not fired in the last `dead_window_tokens` tokens), the
total loss, its other terms (recon, auxk, l1, ...), and the composition path's share of the
explained variance, `(FVU_off − FVU) / (1 − FVU)` with FVU_off the FVU with the path switched off
(CompSAE only).
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pandas as pd

from compsae.figures import log_axis, plain_text, pyplot
from compsae.files import TRAINING_CURVES
from compsae.train.trainer import METRICS_FILE

CURVES_FILE = TRAINING_CURVES
# logged keys that are not loss terms
_NOT_LOSS = {
    "step",
    "tokens",
    "mse",
    "fvu",
    "l0",
    "fvu_no_comp",
    "gate_mean",
    "k",
    "m",
    "dead_fraction",
    "lr",
    "tokens_per_s",
    "loss",
}


def read_metrics_log(model_dir: str) -> pd.DataFrame:
    """The metrics log of one model folder as a table (one row per logged step, sorted by step);
    empty when there is none.  A line cut short by a kill is skipped."""
    fs, path = fsspec.core.url_to_fs(model_dir.rstrip("/"))
    target = f"{path}/{METRICS_FILE}"
    if not fs.exists(target):
        return pd.DataFrame()
    rows = []
    for line in fs.cat_file(target).decode(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            rows.append(rec)
    if not rows:
        return pd.DataFrame()
    df = (
        pd.DataFrame(rows)
        .drop_duplicates("step", keep="last")
        .sort_values("step", ignore_index=True)
    )
    if "fvu_no_comp" in df and "fvu" in df:
        df["comp_share"] = (df["fvu_no_comp"] - df["fvu"]) / (1.0 - df["fvu"]).where(
            df["fvu"] < 1.0
        )
    return df


def loss_terms(logs: dict[str, pd.DataFrame]) -> list[str]:
    """The loss terms (other than the total) logged by any model, sorted."""
    return sorted(
        {c for df in logs.values() for c in df.columns if c not in _NOT_LOSS and c != "comp_share"}
    )


@plain_text
def plot_training_curves(logs: dict[str, pd.DataFrame], path: str) -> list[str]:
    """One PNG at local `path` with a panel per quantity and a line per model (name -> its log);
    returns the panels drawn.  Models without a log are left out."""
    plt = pyplot()

    logs = {n: df for n, df in logs.items() if not df.empty and "tokens" in df}
    panels: list[tuple[str, str, bool]] = [
        ("fvu", "FVU (README definition; μ = training-batch mean)", True),
        ("l0", "L0 (active latents / token)", True),
        ("dead_fraction", "dead fraction", False),
        ("loss", "total loss", True),
    ]
    panels += [(t, f"loss term: {t}", True) for t in loss_terms(logs)]
    if any("comp_share" in df for df in logs.values()):
        panels.append(("comp_share", "composition share of explained variance", False))
    panels = [
        p for p in panels if any(p[0] in df and df[p[0]].notna().any() for df in logs.values())
    ]
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, log_y) in zip(axes.flat, panels, strict=False):
        for i, (name, df) in enumerate(sorted(logs.items())):
            if key in df and df[key].notna().any():
                ok = df[key].notna()
                ax.plot(
                    df["tokens"][ok],
                    df[key][ok],
                    label=name,
                    color=colours[i % len(colours)],
                    lw=1.2,
                )
        if log_y and all((df[key].dropna() > 0).all() for df in logs.values() if key in df):
            log_axis(ax, "y")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("tokens seen", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if panels:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(
            handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8
        )
    fig.tight_layout(rect=(0, 0.06 if panels else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [p[0] for p in panels]


def final_values(logs: dict[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """Per model the last logged step: tokens, FVU, L0, dead fraction, loss, composition share."""
    out = []
    for name, df in sorted(logs.items()):
        if df.empty:
            continue
        last = df.iloc[-1]
        out.append(
            {
                "model": name,
                **{
                    c: (None if pd.isna(last.get(c)) else last.get(c))
                    for c in ("step", "tokens", "fvu", "l0", "dead_fraction", "loss", "comp_share")
                    if c in df
                },
            }
        )
    return out


def write_training_curves(train_dir: str, model_dirs: dict[str, str]) -> str | None:
    """Draw the curves of `model_dirs` (name -> model folder) into `<train_dir>/training_curves.png`
    (any fsspec URL); returns the file name, or None when no model has a log."""
    import os
    import tempfile

    logs = {name: read_metrics_log(folder) for name, folder in model_dirs.items()}
    if all(df.empty for df in logs.values()):
        return None
    fs, path = fsspec.core.url_to_fs(train_dir.rstrip("/"))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, CURVES_FILE)
        plot_training_curves(logs, local)
        fs.makedirs(path, exist_ok=True)
        fs.put_file(local, f"{path}/{CURVES_FILE}")
    return CURVES_FILE
