"""The README's Python quickstart runs as written against a tiny pipeline run."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml
from mini_pipeline import MINI

from compsae import cli

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_quickstart_runs(tmp_path, monkeypatch, capsys) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"## Python quickstart.*?```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no Python quickstart block"
    cfg = copy.deepcopy(MINI)
    cfg["runs_root"] = str(tmp_path / "runs")
    # small enough for the 256-token mini harvest
    cfg["pipelines"]["mini"]["train"].update(batch_size=64, tokens=64 * 4)
    # the README's model name, with the mini run's sizes
    cfg["pipelines"]["mini"]["train"]["models"]["compsae"] = {
        "type": "compsae",
        "composer": "pair",
        "n_latents": 64,
        "k": 4,
    }
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    for stage in ("harvest", "train"):
        assert cli.main([stage, "--pipeline", "mini", "--config", "pipelines.yaml"]) == 0
    trained = sorted((tmp_path / "runs" / "mini").glob("train-*"))
    capsys.readouterr()
    # the README is written for the demo pipeline; the same lines run on this one (16 held-out rows)
    code = blocks[0].replace('"demo"', '"mini"').replace("batch_size=512", "batch_size=16")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert sorted((tmp_path / "runs" / "mini").glob("train-*")) == trained  # reused, not retrained
    m = re.search(r"^compsae: FVU (\d+\.\d{3}), mean pair term (\S+)$", out, flags=re.M)
    assert m, out
    assert 0.0 < float(m.group(1)) < 2.0 and float(m.group(2)) > 0.0, out
    line = r"^latents (\d+) \+ (\d+): (\d+) tokens, variance share \S+$"
    rows = re.findall(line, out, flags=re.M)
    assert rows and all(int(i) < int(j) < 64 and int(n) > 0 for i, j, n in rows), out
