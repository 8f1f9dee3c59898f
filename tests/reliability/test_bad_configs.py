"""Property-based: malformed pipelines.yaml documents and --set overrides always end in one line,
exit 2."""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from compsae import cli

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "pipelines.yaml").read_text())

# For each key of the `tiny` pipeline: values that are never valid there.
_INT = [-1, -(10**9), 0, 0.5, "", "not-a-number", [], {}, None]
WRONG_BY_KEY: dict[str, list[Any]] = {
    **{
        k: _INT
        for k in (
            "n_tokens",
            "context",
            "batch_size",
            "chunk_rows",
            "shard_rows",
            "tokens",
            "n_latents",
            "k",
            "d_f",
            "d_c",
            "n_heads",
            "log_every",
            "checkpoint_every",
            "max_heldout_tokens",
            "baseline_fit_tokens",
            "nmf_components",
            "pair_latents",
            "ce_sequences",
        )
    },
    "lr": [-1, 0, "", "fast", [], {}, None],
    "dtype": ["float8", 1, [], None, "fp16"],
    "type": ["nope", 1, None, []],
    "hooks": [[], "", None, 5, {}],
    "models": [[], 5, "x"],
    "data": [[], 5, "x"],
    "source": ["", [], 5, None],
    "prepend_bos": ["maybe", [], {}, None],
}
SCALARS = st.one_of(
    st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(), st.none()
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    return out


LEAVES = [p for p in _paths(BASE["pipelines"]["tiny"]) if len(p) >= 2]
TYPED = [p for p in LEAVES if p[-1] in WRONG_BY_KEY]


def _run(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse
            rc = int(e.code or 0)
    return rc, err.getvalue()


def _assert_one_line_error(rc: int, err: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ")


@st.composite
def broken_documents(draw: st.DrawFn) -> str:
    doc = copy.deepcopy(BASE)
    pipe = doc["pipelines"]["tiny"]
    kind = draw(
        st.sampled_from(
            ["wrong_value", "unknown_key", "drop_required", "not_mapping", "bad_yaml", "bad_root"]
        )
    )
    if kind == "wrong_value":
        path = draw(st.sampled_from(TYPED))
        _get(pipe, path[:-1])[path[-1]] = draw(st.sampled_from(WRONG_BY_KEY[path[-1]]))
    elif kind == "unknown_key":
        path = draw(st.sampled_from([p for p in LEAVES if isinstance(_get(pipe, p), dict)] + [()]))
        node = _get(pipe, path) if path else pipe
        node[draw(st.sampled_from(["colour", "lr_typo", "hokks", "n_token"]))] = draw(SCALARS)
    elif kind == "drop_required":
        pipe.pop("harvest")
    elif kind == "not_mapping":
        doc["pipelines"]["tiny"] = draw(
            st.one_of(st.lists(SCALARS, max_size=3), st.text(max_size=5), st.integers())
        )
    elif kind == "bad_yaml":
        text = yaml.safe_dump(doc)
        cut = draw(st.integers(min_value=10, max_value=len(text) - 1))
        broken = text[:cut] + draw(
            st.sampled_from(["\n  - [unclosed", "\n\t: bad", "\n{{", "\nkey: 'open"])
        )
        try:
            yaml.safe_load(broken)
        except yaml.YAMLError:
            return broken
        assume(False)  # the cut happened to leave valid YAML
    else:
        value = st.one_of(
            st.lists(SCALARS, max_size=3), st.integers(), st.text(max_size=5).map(lambda s: s + "x")
        )
        return yaml.safe_dump(draw(value))
    return yaml.safe_dump(doc)


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=broken_documents())
def test_malformed_documents_give_one_line(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("cfg") / "pipelines.yaml"
    p.write_text(text)
    rc, err = _run(["status", "--pipeline", "tiny", "--config", str(p)])
    _assert_one_line_error(rc, err)


OVERRIDES = [(".".join(p), v) for p in TYPED for v in WRONG_BY_KEY[p[-1]]]


def _as_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(OVERRIDES),
    shape=st.sampled_from(
        ["{k}={v}", "{k}={v}", "{k}", "={v}", "{k}..x={v}", "{k}.=v", "nope.{k}={v}"]
    ),
)
def test_bad_overrides_give_one_line(case, shape):
    key, value = case
    arg = shape.format(k=key, v=_as_yaml(value))
    rc, err = _run(
        ["status", "--pipeline", "tiny", "--config", str(ROOT / "pipelines.yaml"), "--set", arg]
    )
    _assert_one_line_error(rc, err)
