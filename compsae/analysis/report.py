"""The analysis report: PNG figures, `report.html` (offline: no scripts, styles or fonts from the
network; figures are relative PNGs next to it), `metrics.json` and `metrics.parquet`."""

from __future__ import annotations

import html
import json
import os
from typing import Any

import numpy as np

from compsae.analysis.metrics import flat_rows, json_safe
from compsae.analysis.views import ATTENTION_LABEL, view_of
from compsae.figures import log_axis, plain_text, pyplot
from compsae.files import ANALYSIS_METRICS, ANALYSIS_METRICS_TABLE, ANALYSIS_REPORT

FVU_DEFINITION = (
    "FVU = Σ‖x − x̂‖² / Σ‖x − μ‖² over the evaluated tokens and dimensions (the README's definition)"
)

# Column name -> header with its unit ("" = a ratio or count that needs none).
LABELS = {
    "l0": "L0 (latents / token)",
    "fvu": "FVU",
    "fve": "FVE",
    "cosine": "cos(x, x̂)",
    "l2_ratio": "‖x̂‖/‖x‖",
    "fvu_nocomp": "FVU, composition off",
    "comp_share": "composition share of expl. var.",
    "n_tokens": "tokens",
    "dead_fraction": "dead (fraction of latents)",
    "dead_count": "dead (latents)",
    "n_latents": "latents",
    "dead_tokens_evaluated": "tokens evaluated",
    "ce_clean": "CE clean (nats)",
    "ce_zero": "CE zero-ablated (nats)",
    "ce_recon": "CE with x̂ (nats)",
    "delta_ce": "ΔCE (nats)",
    "kl_zero": "KL zero-ablated (nats)",
    "kl_recon": "KL with x̂ (nats)",
    "ce_recovered": "CE recovered",
    "kl_score": "KL score",
    "tokens_seen": "tokens trained",
    "gate_mean": "gate mean",
    "gate_std": "gate sd",
    "partners_mean": "partners / latent (mean)",
    "partners_median": "partners / latent (median)",
    "partner_entropy_mean": "partner entropy (nats)",
    "mean_npmi": "mean NPMI",
    "mean_jaccard": "mean Jaccard",
    "n_tracked": "latents tracked",
    "pairs_cooccurring": "pairs co-firing",
    "spearman_comp_vs_cooccurrence": "Spearman(composition, co-firing)",
    "spearman_comp_vs_npmi": "Spearman(composition, NPMI)",
    "attn_gini_mean": "attention Gini (mean)",
    "head_agreement": "head agreement (cos)",
    "fvu_nocomp_mean": "FVU, composition off (mean)",
    "spearman_comp_vs_pmi": "Spearman(composition, PMI)",
    "partner_gini_mean": "partner Gini (mean)",
    "pair_gain_total": "pair terms' share of variance",
    "spearman_attention_vs_effect": "Spearman(attention, pair effect)",
    "spearman_attention_vs_pmi": "Spearman(attention, PMI)",
    "calls_fdr": "calls: FDR",
    "calls_candidates": "calls: candidate pairs",
    "calls_called": "pairs called",
    "calls_calls_per_1000": "calls per 1,000 candidates",
    "composer": "composer",
    "matrix": "composition matrix (what its numbers are)",
}

# composition-table fields that only some composers have, and the view that explains a blank
ATTENTION_FIELDS = ("head_agreement", "spearman_attention_vs_effect", "spearman_attention_vs_pmi")
GATE_FIELDS = ("gate_mean", "gate_std")


class NotApplicable:
    """A table cell for a field the row's model kind does not have: empty, or the short phrase
    `why` (e.g. "no attention in pair composer")."""

    def __init__(self, why: str = "") -> None:
        self.why = why


NA = NotApplicable()


def fmt(v: Any) -> str:
    """How every number appears in the reports (3 significant digits; whole numbers in full;
    '–' for missing, '' for a field that does not apply)."""
    if isinstance(v, NotApplicable):
        return f"<span class='why'>{html.escape(v.why)}</span>" if v.why else ""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return str(int(f)) if f.is_integer() and abs(f) >= 100 else f"{f:.3g}"
    return html.escape(str(v))


def label(column: str) -> str:
    """The header of a column: its unit spelled out where it has one."""
    if column.startswith("dense_fraction_"):
        return f"dense > {column.rsplit('_', 1)[1]} (fraction of latents)"
    return LABELS.get(column, column)


def _cells(row: dict[str, Any], columns: list[str]) -> str:
    """One row's cells; a row with "_why" has its leading columns, then one cell over the rest
    that says why they are blank."""
    if "_why" not in row:
        return "".join(f"<td>{fmt(row.get(c))}</td>" for c in columns)
    lead = 0
    while lead < len(columns) and columns[lead] in row:
        lead += 1
    cells = "".join(f"<td>{fmt(row[c])}</td>" for c in columns[:lead])
    rest = len(columns) - lead
    return cells + (f"<td colspan='{rest}'>{fmt(NotApplicable(row['_why']))}</td>" if rest else "")


def table(rows: list[dict[str, Any]], columns: list[str], caption: str) -> str:
    """An HTML table (scrolls sideways when wider than the page); each row's first column names
    it."""
    head = "".join(f"<th>{html.escape(label(c))}</th>" for c in columns)
    body = "".join(f"<tr>{_cells(r, columns)}</tr>" for r in rows)
    return (
        "<div "
        f"class='scroll'><table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table></div>"
    )


# -- figures ---------------------------------------------------------------------------------------


def _plt() -> Any:
    return pyplot()


@plain_text
def plot_density(metrics: dict[str, Any], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, m in metrics["models"].items():
        hist = m.get("latents", {}).get("density_hist")
        if not hist or m.get("kind") in ("pca", "pca_topk"):
            continue
        ax.stairs(hist["counts"], hist["bin_edges"], label=f"{name} ({hist['dead']} dead)")
    ax.set_xlabel("log10 firing fraction")
    ax.set_ylabel("latents")
    ax.set_title(f"latent density ({metrics['n_tokens']} held-out tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@plain_text
def plot_fvu_vs_l0(metrics: dict[str, Any], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, m in metrics["models"].items():
        a = m["all"]
        if a.get("l0") is None or a.get("fvu") is None:
            continue
        ax.scatter([a["l0"]], [a["fvu"]], label=name)
        if a.get("fvu_nocomp") is not None:
            ax.scatter([a["l0"]], [a["fvu_nocomp"]], marker="x", label=f"{name} (composition off)")
    log_axis(ax, "x")
    ax.set_xlabel("L0")
    ax.set_ylabel("FVU (held-out)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cluster_order(mat: np.ndarray) -> np.ndarray:
    """Leaf order of an average-linkage clustering of the rows of a symmetrised `mat` (NaN = 0)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import pdist

    m = np.nan_to_num(mat)
    m = (m + m.T) / 2
    if len(m) < 3:
        return np.arange(len(m))
    return leaves_list(linkage(pdist(m), method="average"))


@plain_text
def plot_heatmap(
    comp: np.ndarray,
    tracked: np.ndarray,
    name: str,
    what: str,
    path: str,
    limit: int = 128,
) -> None:
    """The composition matrix `comp` of the first `limit` tracked latents, clustered; `what`: what
    its numbers are (`CompositionView.matrix_label`)."""
    plt = _plt()
    sub = comp[:limit, :limit]
    order = cluster_order(sub)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    im = ax.imshow(
        np.nan_to_num(sub[np.ix_(order, order)]), cmap="viridis", interpolation="nearest"
    )
    ax.set_title(f"{name}: {what} (top {len(sub)} latents, clustered)", fontsize=8)
    ax.set_xlabel("latent j")
    ax.set_ylabel("latent i")
    fig.colorbar(im, ax=ax, shrink=0.8, label=what)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@plain_text
def plot_partners(partners: dict[str, np.ndarray], name: str, share: str, path: str) -> None:
    """Histogram of the distinct partners per latent; `share`: the mass a partner's share is
    counted in (`CompositionView.partner_label`)."""
    plt = _plt()
    counts = partners["n_partners"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(counts, bins=np.arange(counts.max(initial=0) + 2) - 0.5)
    ax.set_xlabel(f"distinct partners ({share} ≥ threshold)")
    ax.set_ylabel("latents")
    ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@plain_text
def plot_head_entropy(heads: dict[str, Any], name: str, path: str) -> None:
    plt = _plt()
    ent = heads["entropy_per_head"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(np.arange(len(ent)), ent)
    ax.set_xlabel("head")
    ax.set_ylabel("mean attention entropy (nats)")
    ax.set_title(f"{name}: head agreement {fmt(heads['head_agreement'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@plain_text
def plot_attention_example(ex: dict[str, Any], path: str) -> None:
    plt = _plt()
    attn = np.asarray(ex["attn"])
    labels = [str(i) for i in ex["latents"]]
    fig, ax = plt.subplots(figsize=(5, 4.6))
    im = ax.imshow(attn, cmap="magma", vmin=0, vmax=max(float(attn.max(initial=0)), 1e-6))
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
    ax.set_yticks(range(len(labels)), labels, fontsize=5)
    ax.set_xlabel("attends to (active latent j)", fontsize=7)
    ax.set_ylabel("active latent i", fontsize=7)
    ax.set_title(f"…{ex['context'][-60:]} [{ex['token']}]", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight (heads averaged)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_figures(
    metrics: dict[str, Any],
    arrays: dict[str, dict[str, Any]],
    examples: list[dict[str, Any]],
    fig_dir: str,
) -> list[tuple[str, str]]:
    """Write every figure into `fig_dir`; returns (file name, caption) pairs in report order."""
    os.makedirs(fig_dir, exist_ok=True)
    figs: list[tuple[str, str]] = []

    def add(fname: str, caption: str, fn: Any, *args: Any) -> None:
        fn(*args, os.path.join(fig_dir, fname))
        figs.append((fname, caption))

    add("density_hist.png", "Latent firing density (held-out tokens)", plot_density, metrics)
    add("fvu_vs_l0.png", "FVU against L0, every method", plot_fvu_vs_l0, metrics)
    for name, arr in arrays.items():
        view = view_of(metrics["models"][name])
        if "comp" in arr:
            add(
                f"composition_{name}.png",
                f"{name} ({view.label}): composition matrix, {view.matrix_label}, clustered",
                plot_heatmap,
                arr["comp"],
                arr["tracked"],
                name,
                view.matrix_label,
            )
            if view.attends and "comp_attention" in arr:  # attention weights exist only here
                add(
                    f"attention_{name}.png",
                    f"{name} ({view.label}): {ATTENTION_LABEL}, clustered",
                    plot_heatmap,
                    arr["comp_attention"],
                    arr["tracked"],
                    name,
                    ATTENTION_LABEL,
                )
            add(
                f"partners_{name}.png",
                f"{name} ({view.label}): distinct partners per latent ({view.partner_label})",
                plot_partners,
                arr["partners"],
                name,
                view.partner_label,
            )
        heads = metrics["models"][name].get("heads")
        if heads:
            add(
                f"head_entropy_{name}.png",
                f"{name}: attention entropy per head",
                plot_head_entropy,
                heads,
                name,
            )
    for i, ex in enumerate(examples):
        add(
            f"attention_example_{i}.png",
            f"{ex['model']}: attention among the active latents of one token",
            plot_attention_example,
            ex,
        )
    return figs


# -- the page --------------------------------------------------------------------------------------

RECON_COLS = [
    "model",
    "kind",
    "l0",
    "fvu",
    "fve",
    "cosine",
    "l2_ratio",
    "fvu_nocomp",
    "comp_share",
    "n_tokens",
]
CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em "
    "auto;color:#222}table{border-collapse:collapse;"
    "margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}"
    "caption{font-weight:bold;text-align:left}figure{display:inline-block;margin:.5em}img{max-width:100%}"
    ".scroll{overflow-x:auto;max-width:100%}.why{color:#777;font-style:italic}"
    # tables rendered from the stages' markdown have no wrapper: they scroll themselves
    "body>table{display:block;overflow-x:auto;max-width:100%}"
)


def recon_rows(metrics: dict[str, Any], group: str) -> list[dict[str, Any]]:
    rows = []
    for name, m in metrics["models"].items():
        rows.append({"model": name, "kind": m.get("kind"), **m[group]})
    return sorted(rows, key=lambda r: (r.get("l0") is None, r.get("l0") or 0, r["model"]))


def applicable(kind: Any, settings: Any) -> set[str]:
    """The settings (of `settings`) a model of `kind` has: the fields of its config class in the
    ModelConfig union; a CompSAE with composer "none" has no gate or curriculum either.  An unknown
    kind keeps every setting."""
    from compsae.train.config import MODEL_CONFIGS, TopKConfig

    cls = MODEL_CONFIGS.get(str(kind))
    if cls is None:
        return set(settings)
    have = {f for f in settings if f in cls.model_fields or f == "type"}
    # every config carries k (it bounds the dictionary), but only top-k models select k latents
    return have if issubclass(cls, TopKConfig) else have - {"k"}


def ablation_table(
    rows: list[dict[str, Any]],
    settings: tuple[str, ...] = (
        "type",
        "n_latents",
        "k",
        "composer",
        "gate",
        "curriculum",
        "graduated_sparsity",
    ),
) -> tuple[list[dict[str, Any]], list[str]]:
    """The ablation rows with the `settings` a row's model kind does not have blanked, and the
    columns that apply to some row."""
    out = []
    for row in rows:
        keep = applicable(row.get("type"), settings)
        if row.get("type") == "compsae" and row.get("composer") == "none":
            keep -= {"gate", "curriculum"}
        out.append({k: (NA if k in settings and k not in keep else v) for k, v in row.items()})
    cols = [
        c
        for c in rows[0]
        if any(not isinstance(r.get(c), NotApplicable) and r.get(c) is not None for r in out)
    ]
    return out, cols


def render_html(metrics: dict[str, Any], figures: list[tuple[str, str]]) -> str:
    """report.html as a string (figures referenced by relative path)."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>compsae analysis</title>"
        f"<style>{CSS}</style></head><body><h1>compsae analysis</h1>"
    ]
    parts.append(
        f"<p>hook <code>{html.escape(str(metrics['hook']))}</code>, {metrics['n_tokens']} held-out "
        "tokens "
        f"(held-out fraction {fmt(metrics['heldout_fraction'])}, seed {metrics['heldout_seed']}); "
        f"baselines at L0 = {metrics['baseline_k']}.</p>"
    )
    if sequence_start_note(metrics):
        parts.append(f"<p class='note'>{html.escape(sequence_start_note(metrics))}</p>")
    if metrics.get("browsers"):
        links = ", ".join(
            f"<a href='{html.escape(rel)}'>{html.escape(name)}</a>"
            for name, rel in metrics["browsers"].items()
        )
        parts.append(
            "<p>Feature browser (every latent: top contexts, histogram, logit effect, partners): "
            f"{links}</p>"
        )
    parts.append(
        f"<p class='note'>{html.escape(FVU_DEFINITION)}; composition share = (FVU with the path "
        "off − FVU) / "
        "(1 − FVU); numbers rounded to 3 significant digits.</p>"
    )
    parts.append(
        table(
            recon_rows(metrics, "all"),
            RECON_COLS,
            f"Comparison at matched L0 (all {metrics['n_tokens']} held-out tokens)",
        )
    )
    parts.append(
        table(recon_rows(metrics, "rest"), RECON_COLS, "Position > 0 only (tokens per row)")
    )
    parts.append(
        table(recon_rows(metrics, "bos"), RECON_COLS, "Position 0 (BOS) only (tokens per row)")
    )
    lat_rows = [
        {"model": n, **{k: v for k, v in m["latents"].items() if not isinstance(v, dict)}}
        for n, m in metrics["models"].items()
        if "latents" in m
    ]
    if lat_rows:
        cols = (
            ["model", "n_latents", "dead_count", "dead_fraction"]
            + [c for c in lat_rows[0] if c.startswith("dense_fraction")]
            + ["dead_tokens_evaluated"]
        )
        parts.append(
            table(
                lat_rows,
                cols,
                f"Latent health on {metrics['n_tokens']} held-out tokens "
                "(dead = never fired on them)",
            )
        )
    if metrics.get("ablations"):
        rows, cols = ablation_table(metrics["ablations"])
        parts.append(
            table(
                rows,
                cols,
                f"Ablations: every trained model, on {metrics['n_tokens']} held-out tokens "
                "(empty cells: the setting does not apply to that kind of model)",
            )
        )
    if metrics.get("ablations_by_variant"):
        rows = metrics["ablations_by_variant"]
        parts.append(
            table(
                rows,
                list(rows[0]),
                f"Ablations: mean and sd over seeds (sd with ddof=1), on "
                f"{metrics['n_tokens']} held-out tokens",
            )
        )
    parts.extend(composition_section(metrics))
    for n, m in metrics["models"].items():
        calls = m.get("pairs", {}).get("calls")
        if calls:
            parts.append(
                f"<p>{html.escape(n)}: label-free calls: {calls['called']} of "
                f"{calls['candidates']} candidate pairs at FDR {calls['fdr']:g} "
                f"({calls['calls_per_1000']:.1f} per 1,000; null from "
                f"{calls['null_pairs']} pairs on rows made additive in the same dictionary)</p>"
            )
        top = m.get("pairs", {}).get("top_pairs")
        if top:
            rows = [
                {
                    "latents": f"{p['i']} + {p['j']}",
                    "tokens": p["tokens"],
                    "mean_effect": p["mean_effect"],
                    "gain_share": p["gain_share"],
                    **({"p_value": p["p_value"], "called": p["called"]} if "p_value" in p else {}),
                    "where both fire": " | ".join(
                        f"{e['context']}[{e['token']}]{e.get('after', '')}"
                        for e in p.get("examples", [])
                    ),
                    **_profile_columns(p),
                }
                for p in top
            ]
            parts.append(
                table(
                    rows,
                    list(rows[0]),
                    (
                        f"{n} ({view_of(m).label}): the composing pairs that explain most "
                        "variance, measured by intervention (mean_effect: mean "
                        "‖x̂(z) − x̂(z∖i) − x̂(z∖j) + x̂(z∖ij)‖ over the tokens where both fire, "
                        "relative to the RMS "
                        "activation deviation; gain_share: reconstruction gain of keeping the "
                        "pair's term, share of the "
                        "total variance; tokens: held-out tokens where both fire)"
                    ),
                )
            )
    for n, m in metrics["models"].items():
        if m.get("pair_causal"):
            parts.append(
                table(
                    m["pair_causal"],
                    list(m["pair_causal"][0]),
                    f"{n}: causal pair test (ΔCE / ΔKL per affected token when the pairs' terms "
                    "are removed from the splice; matched: co-firing pairs of matched effect "
                    "norm; random_dir: random directions of the same norm; _lo / _hi: 95 % "
                    "bootstrap over tokens; pair_delta_ce: mean of each pair's own ablation, "
                    "bootstrap over pairs)",
                )
            )
    if metrics.get("pair_stability"):
        rows = [{**r, "models": " vs ".join(r["models"])} for r in metrics["pair_stability"]]
        parts.append(
            table(
                rows,
                list(rows[0]),
                "Seed stability of the pairs (latents matched by decoder cosine; effect_overlap: "
                "share of the top-n pairs by effect shared by the two seeds; pmi_overlap: the same "
                "for the top-n pairs by co-occurrence)",
            )
        )
    ce_rows = [{"model": n, **m["ce"]} for n, m in metrics["models"].items() if m.get("ce")]
    if ce_rows:
        parts.append(
            table(
                ce_rows,
                list(ce_rows[0]),
                f"Next-token loss with x̂ spliced in ({metrics.get('ce_note', '')})",
            )
        )
    else:
        parts.append(f"<p>CE evaluation: {html.escape(str(metrics.get('ce_note', 'not run')))}</p>")
    for note in metrics.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for fname, caption in figures:
        parts.append(
            f"<figure><img src='figures/{html.escape(fname)}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def sequence_start_note(metrics: dict[str, Any]) -> str:
    """What the report says about sequence-start rows (position 0, BOS) ("" for an older
    metrics.json that does not record it)."""
    if "include_sequence_start" not in metrics:
        return ""
    n = metrics.get("sequence_start_rows", 0)
    if metrics["include_sequence_start"]:
        return (
            f"Sequence-start rows (position 0, BOS; {n} of the evaluated tokens) are included in "
            "the top contexts, pair examples and composition statistics "
            "(analyze.include_sequence_start: true)."
        )
    return (
        f"Sequence-start rows (position 0, BOS; {n} of the evaluated tokens) are left out of the "
        "top contexts, pair examples and composition statistics (analyze.include_sequence_start: "
        "false); the reconstruction tables cover them."
    )


def composition_rows(metrics: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The composition table: one row per model with pair statistics, labelled by what its numbers
    are for its composer, fields its composer lacks saying why; then one row per trained model
    without them, saying why in one phrase.  Returns (rows, columns)."""
    trained = {a["model"] for a in metrics.get("ablations", [])}
    rows, blank = [], []
    for n, m in metrics["models"].items():
        view = view_of(m)
        if "pairs" not in m:
            if n in trained:
                blank.append({"model": n, "composer": view.label, "_why": view.why("pairs")})
            continue
        pairs = m["pairs"]
        row: dict[str, Any] = {"model": n, "composer": view.label, "matrix": view.matrix_label}
        skip = ("matrix", "top_pairs", "called_pairs", "calls")  # matrix: labelled above
        row.update((k, v) for k, v in pairs.items() if k not in skip)
        row.update(
            (f"calls_{k}", v)
            for k, v in pairs.get("calls", {}).items()
            if k in ("fdr", "candidates", "called", "calls_per_1000")
        )
        # a gate switched off is fixed to 1: its "statistics" would only look like a finding
        gate = m.get("gate", {}) if view.has_gate else {}
        row.update((k, v) for k, v in gate.items() if not isinstance(v, dict))
        if m.get("heads"):
            row["head_agreement"] = m["heads"].get("head_agreement")
        rows.append((view, row))
    columns: list[str] = []
    for _, row in rows:
        columns += [c for c in row if c not in columns]
    out = []
    for view, row in rows:
        for c in columns:
            if c not in row and c in ATTENTION_FIELDS and view.why("attention"):
                row[c] = NotApplicable(view.why("attention"))
            elif c not in row and c in GATE_FIELDS and view.why("gate"):
                row[c] = NotApplicable(view.why("gate"))
        out.append(row)
    if not columns and blank:
        columns = ["model", "composer", "matrix"]
    return out + blank, columns


def composition_section(metrics: dict[str, Any]) -> list[str]:
    """The composition table, as HTML parts: none when no model has a row, one line when no model
    has pair statistics (no table of blanks)."""
    rows, columns = composition_rows(metrics)
    if not rows:
        return []
    if all("_why" in r for r in rows):
        why = "; ".join(f"{r['model']}: {r['_why']}" for r in rows)
        return [f"<p class='note'>No composition statistics ({html.escape(why)}).</p>"]
    caption = (
        "Composition and co-occurrence, per composer (matrix: what the row's numbers are; "
        "n_tokens: tokens behind each row)"
    )
    return [table(rows, columns, caption)]


def _profile_columns(pair: dict[str, Any]) -> dict[str, str]:
    """The top-pairs table's profile columns (`pair_profile`): the tokens where both latents fire
    against one alone, and the tokens the pair's mean term promotes and demotes."""
    if "tokens_both" not in pair:
        return {}

    def tokens(rows: list) -> str:
        return ", ".join(f"{t} ({c})" for t, c in rows)

    cols = {
        "tokens (both)": tokens(pair["tokens_both"]),
        "only i (rows: tokens)": f"{pair['n_only_i']}: {tokens(pair['tokens_only_i'])}",
        "only j (rows: tokens)": f"{pair['n_only_j']}: {tokens(pair['tokens_only_j'])}",
    }
    if "promoted" in pair:
        cols["promotes"] = ", ".join(t for t, _ in pair["promoted"])
        cols["demotes"] = ", ".join(t for t, _ in pair["demoted"])
    return cols


def write_report(
    out_dir: str,
    metrics: dict[str, Any],
    arrays: dict[str, dict[str, Any]],
    examples: list[dict[str, Any]],
    plots: bool = True,
) -> dict[str, str]:
    """Write metrics.json, metrics.parquet, figures/*.png and report.html into local `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    safe = json_safe(metrics)
    with open(os.path.join(out_dir, ANALYSIS_METRICS), "w") as f:
        json.dump(safe, f, indent=1, allow_nan=False)
    flat_rows(safe).to_parquet(os.path.join(out_dir, ANALYSIS_METRICS_TABLE), index=False)
    figures = (
        make_figures(safe, arrays, examples, os.path.join(out_dir, "figures")) if plots else []
    )
    with open(os.path.join(out_dir, ANALYSIS_REPORT), "w") as f:
        f.write(render_html(safe, figures))
    return {
        "report": ANALYSIS_REPORT,
        "metrics_json": ANALYSIS_METRICS,
        "metrics_parquet": ANALYSIS_METRICS_TABLE,
    }


__all__ = [
    "FVU_DEFINITION",
    "ablation_table",
    "applicable",
    "fmt",
    "label",
    "make_figures",
    "render_html",
    "table",
    "write_report",
]
