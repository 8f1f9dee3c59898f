"""Log axes in compsae figures: plain-text tick labels (no raw mathtext) and few of them.

Read from the SVG text of the figure, so the check is on what a reader sees, not on pixels."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import matplotlib
import numpy as np
import pandas as pd
import pytest

from compsae.analysis.report import plot_fvu_vs_l0
from compsae.figures import MAX_LOG_TICKS
from compsae.train.curves import plot_training_curves

SVG = "{http://www.w3.org/2000/svg}"


def axis_labels(path: str) -> list[tuple[str, list[str]]]:
    """(axis kind 'x'/'y', its non-empty tick label texts) for every axis of every panel."""
    root = ET.parse(path).getroot()
    out = []
    for group in root.iter(f"{SVG}g"):
        gid = group.get("id", "")
        if not gid.startswith("matplotlib.axis_"):
            continue
        # the SVG numbers axes across the figure: x, y of the first panel, then of the next
        kind = "x" if int(gid.rsplit("_", 1)[1]) % 2 else "y"
        texts = []
        for tick in group.iter(f"{SVG}g"):
            if tick.get("id", "").startswith(("xtick_", "ytick_")):
                texts += ["".join(t.itertext()).strip() for t in tick.iter(f"{SVG}text")]
        out.append((kind, [t for t in texts if t]))
    return out


def draw_svg(fn, *args, path):
    # text kept as <text> elements (not glyph outlines) so the labels can be read back
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fn(*args, str(path))
    return axis_labels(str(path))


def assert_readable(labels: list[str]) -> None:
    assert 2 <= len(labels) <= MAX_LOG_TICKS, labels
    for text in labels:
        assert "$" not in text and "\\" not in text and "mathdefault" not in text, text
        float(text)  # a plain number a reader can read


@pytest.mark.parametrize(
    "l0s", [(20.0, 24.0, 31.0), (8.0, 64.0), (1.0, 40.0, 2000.0), (3.0, 3000.0, 9e5)]
)
def test_fvu_vs_l0_log_axis_has_few_plain_labels(tmp_path, l0s):
    metrics = {
        "models": {
            f"m{i}": {"all": {"l0": l0, "fvu": 0.1 + 0.05 * i, "fvu_nocomp": 0.3}}
            for i, l0 in enumerate(l0s)
        }
    }
    axes = draw_svg(plot_fvu_vs_l0, metrics, path=tmp_path / "fvu.svg")
    (x_labels,) = [labels for kind, labels in axes if kind == "x"]
    assert_readable(x_labels)


def test_training_curve_log_panels_have_few_plain_labels(tmp_path):
    tokens = np.arange(1, 41) * 1000
    fade = np.linspace(0, 1, len(tokens))
    logs = {
        "narrow": pd.DataFrame(
            {
                "tokens": tokens,
                "fvu": 0.8 - 0.5 * fade,
                "l0": 30 + 5 * fade,
                "dead_fraction": 0.1 * fade,
                "loss": 10 ** (1 - 5 * fade),
                "recon": 10 ** (-1 - 1.5 * fade),
            }
        ),
        "wide": pd.DataFrame(
            {
                "tokens": tokens,
                "fvu": 0.7 - 0.4 * fade,
                "l0": 2 + 300 * fade,
                "dead_fraction": 0.2 * fade,
                "loss": 10 ** (0.5 - 4 * fade),
                "recon": 10 ** (-1 - 1.2 * fade),
            }
        ),
    }
    panels = plot_training_curves(logs, str(tmp_path / "c.png"))
    axes = draw_svg(plot_training_curves, logs, path=tmp_path / "c.svg")
    log_panels = [i for i, key in enumerate(panels) if key in ("fvu", "l0", "loss", "recon")]
    y_axes = [labels for kind, labels in axes if kind == "y"]
    assert len(y_axes) >= len(panels)
    for i in log_panels:
        assert_readable(y_axes[i])
