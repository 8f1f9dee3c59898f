"""A `--set` of a setting the model's composer does not read warns on one line; the run goes on."""

from __future__ import annotations

import copy

import pytest
import yaml
from mini_pipeline import MINI

from compsae import cli
from compsae.pipeline.config import load_pipeline
from compsae.train.config import (
    COMPOSER_SETTINGS,
    COMPOSITION_SETTINGS,
    CompSAEConfig,
    make_model_config,
)


def _config(tmp_path, **compsae: object) -> str:
    cfg = copy.deepcopy(MINI)
    cfg["runs_root"] = str(tmp_path / "runs")
    cfg["pipelines"]["mini"]["train"]["models"]["compsae"] = {"type": "compsae", **compsae}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _warnings(config: str, *sets: str) -> list[str]:
    lines: list[str] = []
    load_pipeline("mini", config, list(sets), warn=lines.append)
    return lines


def test_a_setting_of_another_composer_warns_once(tmp_path) -> None:
    config = _config(tmp_path, composer="pair")
    (line,) = _warnings(config, "train.models.compsae.n_heads=8")
    assert line == (
        "warning: --set train.models.compsae.n_heads=8 has no effect with the pair composer "
        "(n_heads is read by the attention composer only); the run goes on"
    )
    (line,) = _warnings(config, "train.models.compsae.d_f=64", "train.models.compsae.k=8")
    assert "d_f is read by the attention / mlp composers only" in line
    # the pair composer's own settings, and settings every model reads: no warning
    assert _warnings(config, "train.models.compsae.pair_rank=8", "train.models.topk.k=2") == []


def test_the_selection_decides_for_the_pair_settings_it_alone_reads(tmp_path) -> None:
    config = _config(tmp_path, composer="pair")
    (line,) = _warnings(config, "train.models.compsae.pair_gate_l1=0.1")
    assert "with pair_selection all (pair_gate_l1 is read by pair_selection gated only)" in line
    gated = _config(tmp_path, composer="pair", pair_selection="gated")
    assert _warnings(gated, "train.models.compsae.pair_gate_l1=0.1") == []


def test_the_attention_composer_and_seeded_models(tmp_path) -> None:
    config = _config(tmp_path, composer="attention")
    assert _warnings(config, "train.models.compsae.n_heads=4") == []
    (line,) = _warnings(config, "train.models.compsae.pair_rank=8")
    assert "with the attention composer (pair_rank is read by the pair composer only)" in line
    # with train.seeds the model trains as compsae__s<seed>: the --set still names compsae
    (line,) = _warnings(config, "train.seeds=[0, 1]", "train.models.compsae.pair_fit=residual")
    assert "pair_fit" in line


def test_the_cli_prints_the_warning_and_goes_on(tmp_path, capsys) -> None:
    config = _config(tmp_path, composer="pair")
    sets = ["--set", "train.models.compsae.n_heads=8"]
    assert cli.main(["status", "--pipeline", "mini", "--config", config, *sets]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "has no effect with the pair composer" in err


@pytest.mark.parametrize("composer", sorted(COMPOSER_SETTINGS))
def test_each_composer_reads_exactly_its_listed_settings(composer) -> None:
    assert COMPOSER_SETTINGS[composer] <= set(CompSAEConfig.model_fields)
    model = make_model_config(type="compsae", composer=composer)
    for field in COMPOSITION_SETTINGS:
        assert (model.ignored_because(field) is None) == (field in model.read_settings()), field
    assert model.read_settings() <= COMPOSER_SETTINGS[composer]
    assert make_model_config(type="topk").ignored_because("n_heads") is None
