"""`compsae run --pipeline tiny` end to end through the console entry point, then reuse and
errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# a smaller `tiny`: fewer tokens, smaller models, no CE (the LM reload is tested elsewhere)
SMALL = [
    "harvest.n_tokens=2048",
    "train.tokens=4096",
    "train.models.compsae.n_latents=64",
    "train.models.topk.n_latents=64",
    "train.models.relu.n_latents=64",
    "analyze.baselines=[pca, pca_topk]",
    "analyze.max_heldout_tokens=1024",
    "analyze.baseline_fit_tokens=256",
    "analyze.pair_latents=32",
    "probe.n_items=40",
    "probe.families=[boolean, grammar]",
]


def compsae(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "compsae.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    work = tmp_path_factory.mktemp("e2e")
    base = [
        "--pipeline",
        "tiny",
        "--config",
        str(ROOT / "pipelines.yaml"),
        "--set",
        f"runs_root={work / 'runs'}",
    ]
    for s in SMALL:
        base += ["--set", s]
    res = compsae("run", *base, cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    return work, base


def test_run_writes_every_stage(finished_run):
    work, _ = finished_run
    runs = work / "runs" / "tiny"
    stages = sorted(p.name.split("-")[0] for p in runs.iterdir() if (p / "stage.json").exists())
    assert stages == ["analyze", "harvest", "probe", "train"]
    analyze = next(runs.glob("analyze-*"))
    metrics = json.loads((analyze / "metrics.json").read_text())
    assert set(metrics["models"]) >= {"compsae", "topk", "relu", "pca", "pca_topk"}
    assert (analyze / "report.html").read_text().count("<img") >= 3
    for model in ("compsae", "topk", "relu"):
        folder = next(runs.glob("train-*")) / model
        assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
        assert 0 < metrics["models"][model]["all"]["fvu"] < 1.5
    probe = next(runs.glob("probe-*"))
    report = json.loads((probe / "probes.json").read_text())
    assert set(report["behaviour"]) == {"boolean", "grammar"} and report["methods"][:3] == [
        "compsae",
        "relu",
        "topk",
    ]


def test_pipeline_report_gathers_the_stages(finished_run):
    work, _ = finished_run
    runs = work / "runs" / "tiny"
    page = (runs / "report.html").read_text()
    for stage in ("harvest", "train", "analyze", "probe"):
        assert f"<h2>{stage}: done</h2>" in page
    # the probe tables are rendered inline, the figures point into the stage folders
    assert "LM behaviour" in page and page.count("<table>") >= 4
    for src in [part.split("'")[0] for part in page.split("<img src='")[1:]]:
        assert (runs / src).is_file(), src
    # the training curves and one feature browser per trained model
    assert "training_curves.png" in page
    links = [
        part.split("'")[0]
        for part in page.split("<a href='")[1:]
        if "/browser/" in part.split("'")[0]
    ]
    assert sorted(p.rsplit("/", 1)[-1] for p in links) == ["compsae.html", "relu.html", "topk.html"]
    for link in links:
        assert (runs / link).is_file(), link
    browser = (runs / links[0]).read_text()
    assert '"logits":{"0":' in browser  # tiny-neox reloads offline: logit effects through its W_U


def test_rerun_does_nothing_and_status_is_done(finished_run):
    work, base = finished_run
    res = compsae("run", *base, cwd=work)
    assert res.returncode == 0
    assert res.stdout.count("up to date, nothing to do") == 4
    res = compsae("status", *base, cwd=work)
    assert [line.split()[1] for line in res.stdout.splitlines()] == ["done"] * 4


def test_verify_the_store_and_the_whole_run(finished_run):
    work, _ = finished_run
    store = next((work / "runs" / "tiny").glob("harvest-*")) / "store.zarr"
    res = compsae("verify", str(store), cwd=work)
    assert res.returncode == 0 and res.stdout.startswith("ok: ") and "1 stores" in res.stdout
    res = compsae("verify", str(work / "runs" / "tiny"), "--deep", cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    n_records = len(list((work / "runs" / "tiny").glob("*-*/stage.json")))
    assert n_records >= 3 and f"1 stores, 3 checkpoints, {n_records} records" in res.stdout


def test_a_moved_runs_root_is_reused_where_it_lies(finished_run):
    """Copy the runs root elsewhere and hide the original: every stage is still done, verify passes,
    and a redone analysis reads the store and checkpoints from the new place."""
    import shutil

    work, base = finished_run
    moved = work / "moved-runs"
    shutil.copytree(work / "runs", moved)
    at_moved = [*base, "--set", f"runs_root={moved}"]
    hidden = work / "runs-hidden"
    (work / "runs").rename(hidden)
    try:
        res = compsae("status", *at_moved, cwd=work)
        assert res.returncode == 0 and "missing" not in res.stdout and "stale" not in res.stdout, (
            res.stdout
        )
        res = compsae("verify", str(moved / "tiny"), cwd=work)
        assert res.returncode == 0, res.stdout + res.stderr
        res = compsae("analyze", *at_moved, "--force", cwd=work)
        assert res.returncode == 0, res.stderr[-3000:]
        record = json.loads(next((moved / "tiny").glob("analyze-*/stage.json")).read_text())
        assert str(work / "runs") + "/" not in json.dumps(record)
    finally:
        hidden.rename(work / "runs")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "harvest.model=no-such-model"], "no-such-model"),
        (["--set", "harvest.hooks=[blocks.0.hook_nonsense]"], "blocks.0.hook_nonsense"),
        (["--set", "harvest.hooks=[blocks.40.hook_resid_post]"], "layer 40"),
        (["--set", "harvest.context=100000"], "context 100000"),
        (["--set", "harvest.data.source=/no/such/file.txt"], "/no/such/file.txt"),
        (["--set", "train.models.topk.k=999"], "k (999) must not exceed n_latents"),
    ],
)
def test_bad_input_is_one_line_exit_2(finished_run, extra, message):
    work, base = finished_run
    before = sorted(str(p) for p in (work / "runs").rglob("*"))
    res = compsae("run", *base, *extra, "--set", f"runs_root={work / 'bad-runs'}", cwd=work)
    assert res.returncode == 2, res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], res.stderr[-2000:]
    assert sorted(str(p) for p in (work / "runs").rglob("*")) == before  # nothing written is lost


def test_train_needs_harvest_first(tmp_path):
    res = compsae(
        "train",
        "--pipeline",
        "tiny",
        "--config",
        str(ROOT / "pipelines.yaml"),
        "--set",
        f"runs_root={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert "needs harvest first" in res.stderr


def test_help_lists_the_commands():
    res = subprocess.run(
        [sys.executable, "-m", "compsae.cli", "--help"], capture_output=True, text=True
    )
    for cmd in (
        "harvest",
        "train",
        "analyze",
        "evaluate",
        "probe",
        "run",
        "status",
        "verify",
        "humaneval",
    ):
        assert cmd in res.stdout


def test_help_and_status_import_no_torch(tmp_path):
    # the commands that only read configs and records start in well under a second: no torch,
    # transformers or dask behind them (status of a pipeline with nothing run yet)
    code = (
        "import sys\nfrom compsae.cli import main\n"
        "args = ['--help'] if sys.argv[1] == 'help' else ['status', '--pipeline', 'tiny', "
        "'--config', sys.argv[2], "
        "'--set', 'runs_root=' + sys.argv[3]]\n"
        "try:\n    main(args)\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'dask', 'scipy') if m in sys.modules))"
    )
    for what in ("help", "status"):
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                what,
                str(ROOT / "pipelines.yaml"),
                str(tmp_path / "runs"),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr[-1000:]
        assert "harvest" in res.stdout
        assert res.stdout.strip().splitlines()[-1] == "[]", (what, res.stdout[-500:])
