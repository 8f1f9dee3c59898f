"""One page per pipeline, `<runs_root>/<pipeline>/report.html`: every finished stage's tables and
figures in one place (analysis, ground-truth comparison, task probes), linked to the stage folders.

Rewritten after every stage, so it always shows what is done; it only reads what the stages
wrote, never recomputes anything.
"""

from __future__ import annotations

import html
from typing import Any

import fsspec

from compsae.analysis.report import CSS
from compsae.config import PipelineConfig, PipelinesFile
from compsae.stages import StageStatus, join

REPORT = "report.html"

# Per stage: (markdown file rendered inline, figures shown, a page linked), relative to the stage folder.
STAGE_FILES: dict[str, tuple[str | None, tuple[str, ...], str | None]] = {
    "harvest": (None, (), None),
    "train": (None, (), None),
    "analyze": (None, ("figures/fvu_vs_l0.png", "figures/density_hist.png"), "report.html"),
    "evaluate": ("comparison.md", (), None),
    "probe": ("probes.md", ("probes.png",), None),
}


def _markdown_html(text: str) -> str:
    import markdown

    # the stages' own headings start at h1; inside this page they sit under a stage's h2
    body = markdown.markdown(text, extensions=["tables"])
    for level in (3, 2, 1):
        body = body.replace(f"<h{level}>", f"<h{level + 2}>").replace(f"</h{level}>", f"</h{level + 2}>")
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
    if md_file and fs.exists(f"{root}/{rel}/{md_file}"):
        parts.append(_markdown_html(fs.cat_file(f"{root}/{rel}/{md_file}").decode()))
    for fig in figures:
        if fs.exists(f"{root}/{rel}/{fig}"):
            src = html.escape(f"{rel}/{fig}")
            parts.append(f"<figure><img src='{src}' alt='{src}'><figcaption>{src}</figcaption></figure>")
    return "\n".join(parts)


def render_pipeline_report(name: str, pipe: PipelineConfig, statuses: list[StageStatus], fs: Any, root: str) -> str:
    """The page as a string; `root` is the pipeline folder on `fs`, which holds the stage folders."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>compsae: {html.escape(name)}</title>"
             f"<style>{CSS}</style></head><body><h1>compsae pipeline <code>{html.escape(name)}</code></h1>"]
    if pipe.description:
        parts.append(f"<p>{html.escape(pipe.description)}</p>")
    parts += [_stage_section(fs, root, st) for st in statuses]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_pipeline_report(whole: PipelinesFile, pipe: PipelineConfig, name: str) -> str:
    """Write `<runs_root>/<name>/report.html` from the stages done so far; return its path."""
    from compsae.pipeline import plan

    url = join(whole.runs_root, name)
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    page = render_pipeline_report(name, pipe, plan(whole, pipe, name), fs, root)
    fs.pipe_file(f"{root}/{REPORT}", page.encode())
    return join(url, REPORT)
