"""Progress bars as plain lines when the output is not a terminal."""

from __future__ import annotations

import io

from tqdm import tqdm

from compsae.cli import PlainLines


def test_progress_bar_into_a_non_terminal_is_plain_lines():
    sink = io.StringIO()
    for _ in tqdm(range(5), desc="harvest", file=PlainLines(sink), mininterval=0, miniters=1):
        pass
    text = sink.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("harvest:") for line in lines)
    assert "5/5" in lines[-1] and len(set(lines)) == len(lines)  # the closing redraw not twice
