"""Text from data and config reaches figures and pages as text: no TeX parsing, no HTML passed
through."""

from __future__ import annotations

import pandas as pd

from compsae.analysis.report import plot_fvu_vs_l0
from compsae.train.curves import plot_training_curves

NASTY = "price $^$ and <b>x</b>"


def test_figures_draw_dollar_signs_and_tex_as_text(tmp_path):
    path = tmp_path / "fvu.png"
    plot_fvu_vs_l0({"models": {NASTY: {"all": {"l0": 4.0, "fvu": 0.2}}}}, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    log = pd.DataFrame(
        {"tokens": [1, 2, 3], "fvu": [0.5, 0.4, 0.3], "l0": [4, 4, 4], "loss": [1.0, 0.9, 0.8]}
    )
    assert plot_training_curves({NASTY: log}, str(tmp_path / "curves.png"))
    import matplotlib

    assert (
        matplotlib.rcParams["text.parse_math"] is True
    )  # scoped to the figure, not changed for the process


def test_the_pipeline_report_escapes_markdown_from_the_stages():
    from compsae.pipeline.report import _markdown_html

    body = _markdown_html(
        f"| label | mcc |\n|---|---|\n| <script>alert(1)</script>{NASTY} | 0.5 |\n"
    )
    assert "<script>" not in body and "&lt;script&gt;" in body and "<b>" not in body
    assert "<table>" in body  # still a table
