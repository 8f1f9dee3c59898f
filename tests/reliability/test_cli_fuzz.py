"""CLI fuzz suite: every subcommand and flag with hypothesis-drawn paths, URLs, numbers at and past
their limits, and text with markup and TeX.  Never a traceback, never exit 1 (0 or the one-line
exit 2 only), never a file written outside the folder the command was pointed at.  The count is
printed: `CLI_FUZZ cases=<n> exit0=<n> exit2=<n>`."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compsae import cli

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {
    "demo",
    "tiny",
    "pythia70m",
    "synthetic",
    "synthetic_additive",
    "ablations",
    "gt",
    "probe",
}
COUNTS = {"cases": 0, 0: 0, 2: 0}

TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "-",
            "--",
            "$^$",
            "$\\frac{",
            "<script>x</script>",
            "&amp;",
            "..",
            "../..",
            "/",
            "a=b",
            "=",
            "%s%n",
            "\x00",
            "ünïcödé",
            "x" * 300,
            "{a: [1, {b: 2}]}",
            "[[[[[[[[[[",
            "~",
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24),
)
NUMBER = st.sampled_from(
    [
        "-1",
        "0",
        "1",
        "2",
        "2147483648",
        "9223372036854775808",
        "1000000000000",
        "1e999",
        "nan",
        "-0",
        "0x10",
        "1.5",
        "",
        "inf",
    ]
)
# no URL of a real remote protocol (s3, gs, http): tests never touch the network
URL = st.sampled_from(
    [
        "s4://bucket/x",
        "nope://x",
        "memory://fuzz/x.zarr",
        "file:///nonexistent/x",
        "zip://",
        "::",
        "a::b://c",
        "memory://",
        "file://",
    ]
)


def _paths(tmp: Path) -> st.SearchStrategy[str]:
    """Existing, missing and odd paths, all inside `tmp` (or not existing at all)."""
    binary = tmp / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    folder = tmp / "folder"
    folder.mkdir(exist_ok=True)
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    yaml_bad = tmp / "bad.yaml"
    yaml_bad.write_text("pipelines: {a: 1, a: 2}\n")
    return st.one_of(
        st.sampled_from(
            [
                str(binary),
                str(folder),
                str(yaml_bad),
                str(tmp / "missing"),
                str(tmp / "missing" / "deeper"),
                str(binary / "under_a_file"),
            ]
        ),
        URL,
        TEXT.map(lambda t: str(tmp / t.replace("/", "_").replace("\x00", "")[:40])),
    )


def _argv(tmp: Path) -> st.SearchStrategy[list[str]]:
    paths = _paths(tmp)
    config = st.one_of(paths, st.just(str(ROOT / "pipelines.yaml")))
    pipeline = TEXT.filter(lambda t: t not in SHIPPED)
    setting = st.one_of(
        TEXT,
        st.tuples(
            st.sampled_from(
                [
                    "runs_root",
                    "train.lr",
                    "train.seed",
                    "harvest.n_tokens",
                    "train.adam_betas",
                    "harvest.store",
                    "x.y.z",
                ]
            ),
            st.one_of(TEXT, NUMBER, URL),
        ).map(lambda kv: f"{kv[0]}={kv[1]}"),
    )
    stage = st.tuples(
        st.sampled_from(["harvest", "train", "analyze", "evaluate", "probe", "run", "status"]),
        pipeline,
        config,
        st.lists(setting, max_size=3),
        st.booleans(),
        st.one_of(st.none(), NUMBER),
        st.one_of(st.none(), URL, TEXT),
    ).map(_stage_argv)
    verify = st.tuples(paths, st.booleans()).map(
        lambda a: ["verify", a[0], *(["--deep"] if a[1] else [])]
    )
    export = st.tuples(paths, paths, st.booleans(), st.one_of(st.none(), TEXT)).map(
        lambda a: [
            "export",
            a[0],
            "--out",
            a[1],
            *(["--as-topk"] if a[2] else []),
            *(["--model-name", a[3]] if a[3] is not None else []),
        ]
    )
    score = st.tuples(
        st.lists(paths, min_size=1, max_size=2), paths, st.one_of(st.none(), paths)
    ).map(
        lambda a: ["humaneval", "score", *a[0], "--key", a[1], *(["--out", a[2]] if a[2] else [])]
    )
    hexport = st.tuples(
        st.lists(st.tuples(TEXT, paths), max_size=2),
        st.one_of(st.none(), paths),
        paths,
        NUMBER,
        NUMBER,
        NUMBER,
        NUMBER,
    ).map(
        lambda a: [
            "humaneval",
            "export",
            *[x for m, p in a[0] for x in ("--method", f"{m}={p}")],
            *(["--store", a[1]] if a[1] else []),
            "--out",
            a[2],
            "--n",
            a[3],
            "--raters",
            a[4],
            "--rows",
            a[5],
            "--seed",
            a[6],
            "--pipeline",
            "no-such-pipeline",
        ]
    )
    compare = st.tuples(
        st.lists(pipeline, min_size=1, max_size=2), config, st.one_of(st.none(), paths)
    ).map(
        lambda a: [
            "compare",
            *[x for p in a[0] for x in ("--pipeline", p)],
            "--config",
            a[1],
            *(["--out", a[2]] if a[2] else []),
        ]
    )
    garbage = st.lists(TEXT, max_size=4)
    return st.one_of(stage, verify, export, score, hexport, compare, garbage)


def _stage_argv(a: tuple) -> list[str]:
    command, pipeline, config, sets, force, workers, scheduler = a
    argv = [command, "--pipeline", pipeline, "--config", config]
    for s in sets:
        argv += ["--set", s]
    if force and command != "status":
        argv.append("--force")
    if workers is not None and command != "status":
        argv += ["--workers", workers]
    if scheduler is not None and command != "status":
        argv += ["--scheduler", scheduler]
    return argv


def _snapshot(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_traceback_no_exit_1_no_stray_writes(
    sandbox: Path, data: st.DataObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = data.draw(_argv(sandbox), label="argv")
    monkeypatch.chdir(sandbox)
    before_repo, before_parent = _snapshot(ROOT / "runs"), set(os.listdir(sandbox.parent))
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
            rc = int(e.code or 0)
    text = err.getvalue()
    assert "Traceback" not in text, f"{argv}: {text[-2000:]}"
    assert rc in (0, 2), f"{argv} exited {rc}: {text[-500:]}"
    if rc == 2:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("usage:")]
        assert len(lines) <= 2, (
            f"{argv}: {text}"
        )  # the error, and for verify the per-problem summary
    assert _snapshot(ROOT / "runs") == before_repo, f"{argv} wrote into the repository's runs/"
    assert set(os.listdir(sandbox.parent)) == before_parent, f"{argv} wrote beside its folder"
    COUNTS["cases"] += 1
    COUNTS[rc] += 1


def test_cli_fuzz_counts(capsys: pytest.CaptureFixture[str]) -> None:
    if not COUNTS["cases"]:
        pytest.skip("counts come from the fuzz test of this module")
    with capsys.disabled():
        print(f"\nCLI_FUZZ cases={COUNTS['cases']} exit0={COUNTS[0]} exit2={COUNTS[2]}")
    assert COUNTS[2] > 0
