"""An s3:// store without credentials, with refused credentials or out of reach: one line, exit 2,
for every command that opens a store or a run folder; never reported as corrupt data.

Offline: the credentials chain finds nothing before any connection is made (instance metadata
off, credential files pointed at nothing), and the stores exist on moto's loopback S3 server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_checks import one_line_error

from compsae import cli
from compsae.errors import StoreCorruptError, UserError
from compsae.object_store import object_store_error

pytest.importorskip("s3fs")
botocore_exceptions = pytest.importorskip("botocore.exceptions")
HOW = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")


def _forget_sessions() -> None:
    """s3fs keeps one file system (and its credentials) per set of arguments; a CLI process starts
    without any."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "FSSPEC_S3",
        "FSSPEC_S3_ANON",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    _forget_sessions()
    yield
    _forget_sessions()


def _pipelines(tmp_path: Path, runs_root: str, store: str | None = None) -> Path:
    harvest: dict[str, Any] = {
        "model": "tiny-neox",
        "hooks": ["blocks.1.hook_resid_post"],
        "n_tokens": 512,
        "context": 16,
        "chunk_rows": 128,
        "shard_rows": 256,
        "data": {"source": "synthetic:arithmetic"},
    }
    if store is not None:
        harvest["store"] = store
    doc = {
        "runs_root": runs_root,
        "pipelines": {
            "mini": {
                "harvest": harvest,
                "train": {
                    "hook": "blocks.1.hook_resid_post",
                    "tokens": 512,
                    "batch_size": 128,
                    "models": {"topk": {"type": "topk", "n_latents": 32, "k": 4}},
                },
                "analyze": {
                    "max_heldout_tokens": 128,
                    "baseline_fit_tokens": 128,
                    "nmf_components": 4,
                    "pair_latents": 8,
                    "ce_sequences": 2,
                },
            }
        },
    }
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("command", ["harvest", "train", "analyze", "run", "status"])
def test_a_run_root_on_s3_without_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_credentials: None, command: str
) -> None:
    cfg = _pipelines(tmp_path, "s3://compsae-no-credentials/runs")
    one_line_error(
        capsys,
        [command, "-p", "mini", "-c", str(cfg)],
        "no usable credentials",
        "NoCredentialsError",
        *HOW,
    )


def test_a_store_on_s3_without_credentials(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = _pipelines(
        tmp_path, str(tmp_path / "runs"), store="s3://compsae-no-credentials/mini/store.zarr"
    )
    one_line_error(capsys, ["harvest", "-p", "mini", "-c", str(cfg)], "no usable credentials", *HOW)
    one_line_error(
        capsys,
        ["verify", "s3://compsae-no-credentials/mini/store.zarr"],
        "no usable credentials",
        *HOW,
    )
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    _forget_sessions()
    one_line_error(
        capsys, ["verify", "s3://compsae-no-credentials/mini/store.zarr"], "ProfileNotFound", *HOW
    )


def test_stages_that_open_an_existing_s3_store_without_credentials(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Harvest and train with credentials, then every stage that opens the store without them."""
    store = f"{s3_bucket}/mini/store.zarr"
    cfg = _pipelines(tmp_path, str(tmp_path / "runs"), store=store)
    assert cli.main(["harvest", "-p", "mini", "-c", str(cfg)]) == 0
    assert cli.main(["train", "-p", "mini", "-c", str(cfg)]) == 0
    capsys.readouterr()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _forget_sessions()
    try:
        # (harvest itself is up to date by its record, which it checks without opening the store)
        for argv in (
            ["analyze", "-p", "mini", "-c", str(cfg)],
            ["verify", str(tmp_path / "runs" / "mini")],
            ["verify", store],
            ["train", "-p", "mini", "-c", str(cfg), "--force"],
        ):
            one_line_error(capsys, argv, "no usable credentials", *HOW)
    finally:
        _forget_sessions()
    assert not list(
        (tmp_path / "runs" / "mini").glob("analyze*/stage.json")
    )  # nothing recorded as done


def test_botocore_errors_inside_library_errors_are_recognised() -> None:
    from s3fs.errors import translate_boto_error

    refused = botocore_exceptions.ClientError(
        {
            "Error": {
                "Code": "InvalidAccessKeyId",
                "Message": "The AWS Access Key Id you provided does not exist",
            }
        },
        "HeadObject",
    )
    wrapped = translate_boto_error(
        refused
    )  # what s3fs raises: a PermissionError caused by the ClientError
    assert isinstance(wrapped, PermissionError)
    message = str(object_store_error(wrapped))
    assert "refused" in message and "InvalidAccessKeyId" in message and "AWS_PROFILE" in message
    unreachable = botocore_exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")
    try:
        try:
            raise unreachable
        except Exception as e:
            raise RuntimeError("zarr could not read the chunk") from e
    except RuntimeError as outer:
        assert "cannot reach" in str(object_store_error(outer)) and "127.0.0.1:9" in str(
            object_store_error(outer)
        )
    assert object_store_error(ValueError("bad")) is None
    assert object_store_error(PermissionError(13, "Permission denied", "/x")) is None
    not_found = botocore_exceptions.ClientError(
        {"Error": {"Code": "NoSuchKey", "Message": "no"}}, "GetObject"
    )
    assert object_store_error(not_found) is None  # a missing file is the store's to report


def test_a_read_that_fails_for_credentials_is_not_called_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-harvesting (what a corrupt store calls for) would not help: the read names the
    credentials."""
    from compsae.store import ActivationStore, StoreLayout

    url = str(tmp_path / "s.zarr")
    st = ActivationStore.create(
        url, {"h": 4}, 256, StoreLayout(chunk_rows=64, shard_rows=256), {"config_hash": "a"}
    )
    st.write_shard(0, {"h": [[1.0] * 4] * 256}, [0] * 256, [0] * 256, list(range(256)))
    st.finalize()
    st = ActivationStore.open(url)

    class NoCredentialsGroup:
        def __getitem__(self, name: str) -> Any:
            raise botocore_exceptions.NoCredentialsError()

    monkeypatch.setattr(st, "group", NoCredentialsGroup())
    with pytest.raises(UserError, match="no usable credentials") as info:
        _ = st.tokens
    assert not isinstance(info.value, StoreCorruptError)
