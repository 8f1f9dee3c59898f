"""One page per pipeline, `<runs_root>/<pipeline>/report.html`: every finished stage's tables and
figures in one place (analysis, ground-truth comparison, task probes), linked to the stage folders.

Rewritten after every stage, so it always shows what is done; it only reads what the stages
wrote, never recomputes anything.
"""

from __future__ import annotations

import contextlib
import html
from typing import Any

import fsspec

from compsae import durable
from compsae.analysis.records import AnalyzeOutputs
from compsae.analysis.report import CSS
from compsae.files import (
    ANALYSIS_REPORT,
    COMPARISON_MD,
    FIGURES_DIR,
    PAIR_SCORES_PNG,
    PIPELINE_REPORT,
    PROBES_MD,
    PROBES_PNG,
    TRAINING_CURVES,
)
from compsae.pipeline.config import PipelineConfig, PipelinesFile
from compsae.stages import StageStatus, join

REPORT = PIPELINE_REPORT

# Per stage: (markdown file rendered inline, figures shown, a page linked), relative to the stage
# folder.
STAGE_FILES: dict[str, tuple[str | None, tuple[str, ...], str | None]] = {
    "harvest": (None, (), None),
    "train": (None, (TRAINING_CURVES,), None),
    "analyze": (
        None,
        (f"{FIGURES_DIR}/fvu_vs_l0.png", f"{FIGURES_DIR}/density_hist.png"),
        ANALYSIS_REPORT,
    ),
    "evaluate": (COMPARISON_MD, (PAIR_SCORES_PNG,), None),
    "probe": (PROBES_MD, (PROBES_PNG,), None),
}


def _markdown_html(text: str) -> str:
    import markdown

    # Markdown passes raw HTML through, and these tables hold labels and names from data and config:
    # escaped first, a `<script>` in a label is shown, not run.  The stages write no HTML of their
    # own. The stages' own headings start at h1; inside this page they sit under a stage's h2.
    body = markdown.markdown(html.escape(text, quote=False), extensions=["tables"])
    for level in (3, 2, 1):
        body = body.replace(f"<h{level}>", f"<h{level + 2}>").replace(
            f"</h{level}>", f"</h{level + 2}>"
        )
    return body


def _stage_section(fs: Any, root: str, st: StageStatus) -> str:
    rel = st.path.rstrip("/").rsplit("/", 1)[-1] if st.path else None
    head = f"<h2>{html.escape(st.stage)}: {html.escape(st.state)}</h2>"
    if st.state != "done" or rel is None:
        note = f" ({html.escape(st.note)})" if st.note else ""
        return f"{head}<p class='note'>not done yet{note}: run <code>compsae {st.stage}</code>.</p>"
    md_file, figures, page = STAGE_FILES.get(st.stage, (None, (), None))
    parts = [head, f"<p>folder <a href='{html.escape(rel)}/'><code>{html.escape(rel)}</code></a>"]
    if page and fs.exists(f"{root}/{rel}/{page}"):
        parts.append(f"; full report: <a href='{html.escape(rel)}/{page}'>{html.escape(page)}</a>")
    parts.append("</p>")
    browsers = {}
    if st.stage == "analyze" and st.record is not None:
        browsers = AnalyzeOutputs.model_validate(st.record["outputs"]).browsers
    if browsers:
        links = ", ".join(
            f"<a href='{html.escape(rel)}/{html.escape(page)}'>{html.escape(name)}</a>"
            for name, page in browsers.items()
            if fs.exists(f"{root}/{rel}/{page}")
        )
        parts.append(f"<p>Feature browser, one page per model: {links}</p>")
    if st.stage == "train" and st.record is not None:
        parts.append(_train_summary(fs, root, rel, st.record))
    if md_file and fs.exists(f"{root}/{rel}/{md_file}"):
        parts.append(_markdown_html(fs.cat_file(f"{root}/{rel}/{md_file}").decode()))
    for fig in figures:
        if fs.exists(f"{root}/{rel}/{fig}"):
            src = html.escape(f"{rel}/{fig}")
            parts.append(
                f"<figure><img src='{src}' alt='{src}'><figcaption>{src}</figcaption></figure>"
            )
    return "\n".join(parts)


def _train_summary(fs: Any, root: str, rel: str, record: dict[str, Any]) -> str:
    """Per model: where training ended and its held-out numbers; draws the training curves when
    the stage folder has none yet (stages finished before the train stage drew them)."""
    from compsae.analysis.report import table
    from compsae.train.curves import CURVES_FILE, write_training_curves

    models = (record.get("outputs") or {}).get("models") or {}
    if not fs.exists(f"{root}/{rel}/{CURVES_FILE}") and models:
        # a figure is a convenience: the table below still says where training ended
        with contextlib.suppress(OSError, ValueError, KeyError):
            write_training_curves(
                f"{fs.unstrip_protocol(root)}/{rel}", {n: m["path"] for n, m in models.items()}
            )
    rows = []
    for name, m in sorted(models.items()):
        final, held = m.get("final") or {}, m.get("heldout") or {}
        rows.append(
            {
                "model": name,
                "type": m.get("type") + (" (imported)" if m.get("imported") else ""),
                "tokens trained": m.get("tokens_seen"),
                "train FVU (last batch)": final.get("fvu"),
                "train L0": final.get("l0"),
                "dead fraction": final.get("dead_fraction"),
                "held-out FVU": held.get("fvu"),
                "held-out L0": held.get("l0"),
                "held-out tokens": held.get("tokens"),
            }
        )
    cols = [
        "model",
        "type",
        "tokens trained",
        "train FVU (last batch)",
        "train L0",
        "dead fraction",
        "held-out FVU",
        "held-out L0",
        "held-out tokens",
    ]
    return table(
        rows,
        cols,
        "Training: FVU = Σ‖x − x̂‖² / Σ‖x − μ‖² (README definition); L0 in active latents "
        "per token; dead = not fired in the last dead_window_tokens tokens",
    )


def render_pipeline_report(
    name: str, pipe: PipelineConfig, statuses: list[StageStatus], fs: Any, root: str
) -> str:
    """The page as a string; `root` is the pipeline folder on `fs`, which holds the stage
    folders."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>compsae: "
        f"{html.escape(name)}</title>"
        f"<style>{CSS}</style></head><body><h1>compsae pipeline "
        f"<code>{html.escape(name)}</code></h1>"
    ]
    if pipe.description:
        parts.append(f"<p>{html.escape(pipe.description)}</p>")
    parts += [_stage_section(fs, root, st) for st in statuses]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_pipeline_report(
    whole: PipelinesFile, pipe: PipelineConfig, name: str, statuses: list[StageStatus]
) -> str:
    """Write `<runs_root>/<name>/report.html` from `statuses` (where every stage stands: the
    pipeline's plan); return its path."""
    url = join(whole.runs_root, name)
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    page = render_pipeline_report(name, pipe, statuses, fs, root)
    durable.atomic_write(f"{root}/{REPORT}", page.encode(), fs=fs)
    return join(url, REPORT)
