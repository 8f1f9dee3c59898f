"""Bad input the config schema alone cannot catch: each is one line on stderr, exit 2, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_checks import one_line_error
from mini_pipeline import MINI

from compsae import cli
from compsae.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, text: str | None = None) -> Path:
    p = tmp_path / "pipelines.yaml"
    p.write_text(
        text if text is not None else yaml.safe_dump(MINI).replace("RUNS", str(tmp_path / "runs"))
    )
    return p


def test_duplicate_keys_are_refused(tmp_path, capsys):
    text = (
        _config(tmp_path)
        .read_text()
        .replace("  mini:\n", "  mini:\n    description: a\n    description: b\n", 1)
    )
    p = _config(tmp_path, text)
    one_line_error(
        capsys, ["status", "-p", "mini", "-c", str(p)], "key 'description' is given twice"
    )


def test_deeply_nested_yaml_and_override(tmp_path, capsys):
    p = _config(tmp_path, "pipelines: " + "[" * 50_000 + "]" * 50_000 + "\n")
    one_line_error(capsys, ["status", "-p", "mini", "-c", str(p)], "nested too deeply")
    p = _config(tmp_path)
    one_line_error(
        capsys,
        ["status", "-p", "mini", "-c", str(p), "--set", "train.lr=" + "[" * 50_000],
        "nested too deeply",
    )


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("train.seed=-1", "train.seed"),
        ("train.adam_betas=[0.9, 1.0]", "betas must each be in [0, 1)"),
        ("train.adam_betas=[-0.1, 0.9]", "betas"),
        ("runs_root=", "runs_root is empty"),
        ("runs_root=/", "file-system root"),
        ("runs_root=s4://bucket/runs", "unknown URL protocol 's4'"),
        ("harvest.store=nope://x/store.zarr", "unknown URL protocol 'nope'"),
        ("harvest.writer_threads=0", "harvest.writer_threads"),
        ("train=null", "'analyze' works on trained models: it needs a 'train' section"),
    ],
)
def test_values_that_validate_in_isolation(tmp_path, capsys, override, expect):
    p = _config(tmp_path)
    one_line_error(capsys, ["status", "-p", "mini", "-c", str(p), "--set", override], expect)
    assert not (tmp_path / "runs").exists()


def test_a_harvest_too_large_for_the_disk_is_refused_up_front(tmp_path, capsys):
    p = _config(tmp_path)
    big = ["harvest", "-p", "mini", "-c", str(p), "--set", "harvest.n_tokens=1000000000000"]
    # one process and a parallel harvest both hold a window of token ids, not all of them: what
    # refuses a trillion tokens is the disk
    for extra in ([], ["--workers", "2"]):
        line = one_line_error(capsys, [*big, *extra], "needs", "of disk", "harvest.n_tokens")
        assert "TiB" in line and not list((tmp_path / "runs").rglob("zarr.json"))


def test_a_dictionary_too_large_for_memory_is_refused_up_front():
    from compsae.train.config import TrainConfig, make_model_config
    from compsae.train.run import check_training_memory

    with pytest.raises(
        UserError, match=r"n_latents 100,000,000\) needs .* of memory.*lower n_latents"
    ):
        check_training_memory(
            "big", make_model_config(type="topk", n_latents=10**8, k=4), TrainConfig(), 512, "cpu"
        )
    check_training_memory(
        "small", make_model_config(type="topk", n_latents=64, k=4), TrainConfig(), 512, "cpu"
    )


def test_unknown_protocol_and_missing_paths_on_the_command_line(tmp_path, capsys):
    one_line_error(capsys, ["verify", "s4://bucket/store.zarr"], "s4")
    one_line_error(capsys, ["verify", str(tmp_path / "nothing")], "nothing at")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["verify", str(tmp_path / "empty")], "holds no compsae store")


def test_invalid_json_in_a_store_isone_line_error(tmp_path, capsys):
    from compsae.store import ActivationStore, StoreLayout

    url = str(tmp_path / "s.zarr")
    st = ActivationStore.create(
        url, {"h": 4}, 256, StoreLayout(chunk_rows=64, shard_rows=256), {"config_hash": "a"}
    )
    st.write_shard(0, {"h": [[1.0] * 4] * 256}, [0] * 256, [0] * 256, list(range(256)))
    st.finalize()
    for broken, expect in (
        ("{not json", "zarr.json cannot be read"),
        (
            json.dumps(
                {
                    "zarr_format": 3,
                    "node_type": "group",
                    "attributes": {"manifest": {"format": "compsae-store/2"}},
                }
            ),
            "manifest (zarr.json) is incomplete or invalid",
        ),
    ):
        (tmp_path / "s.zarr" / "zarr.json").write_text(broken)
        assert cli.main(["verify", url]) == 2
        res = capsys.readouterr()
        assert "Traceback" not in res.err and len(res.err.splitlines()) == 1
        assert len(res.out.splitlines()) == 1 and expect in res.out, res.out
