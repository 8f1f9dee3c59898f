"""What every bad-input CLI test checks: exit 2 and one line on stderr, no traceback."""

from __future__ import annotations

import pytest

from compsae import cli


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *expect: str) -> str:
    """Run `compsae argv`; assert exit 2 and a single stderr line containing each of `expect`."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]
