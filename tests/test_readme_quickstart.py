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
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    for stage in ("harvest", "train"):
        assert cli.main([stage, "--pipeline", "mini", "--config", "pipelines.yaml"]) == 0
    capsys.readouterr()
    # the README is written for the demo pipeline; the same lines run on this one's folders
    exec(compile(blocks[0].replace("runs/demo/", "runs/mini/"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"^topk: topk, 64 latents, FVU \d+\.\d{3} on chunk 0$", out, flags=re.M), out
