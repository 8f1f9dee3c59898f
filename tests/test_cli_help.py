"""The --help text of the stage commands."""

from __future__ import annotations

import pytest

from compsae import cli


@pytest.mark.parametrize("command", ["train", "run"])
def test_help_shows_a_per_model_set_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help at any width
    assert "train.models.compsae.k=16" in text
    assert "train.k=16" not in text
