"""Checksums bound to position and identity, metadata digests, side-array checksums, legacy
stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compsae.errors import StoreCorruptError
from compsae.store import ActivationStore, StoreLayout

LAYOUT = StoreLayout(chunk_rows=64, shard_rows=256)
HOOKS = {"h.a": 16, "h.b": 8}


def _fill(url: str, n: int = 1000, seed: int = 0, layout: StoreLayout = LAYOUT) -> ActivationStore:
    st = ActivationStore.create(url, HOOKS, n, layout, {"config_hash": "abc"}, overwrite=True)
    rng = np.random.default_rng(seed)
    for s in range(st.n_shards):
        lo, hi = st.shard_range(s)
        rows = np.arange(lo, hi)
        st.write_shard(
            s,
            {h: rng.normal(size=(hi - lo, d)) for h, d in HOOKS.items()},
            rows % 50,
            rows // 10,
            rows % 10,
        )
    st.finalize()
    return ActivationStore.open(url)


def _all_chunks(st: ActivationStore, hook: str) -> None:
    for c in range(st.n_chunks):
        st.read_chunk(hook, c)


def _edit_json(path: Path, edit) -> None:  # noqa: ANN001 - a function of the parsed document
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_swapped_shard_files_are_caught_by_readers(tmp_path):
    st = _fill(str(tmp_path / "s.zarr"))
    a, b = (tmp_path / "s.zarr/acts/h.a/c" / str(i) / "0" for i in (0, 1))  # same size: full shards
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db), b.write_bytes(da)
    st = ActivationStore.open(st.url)
    with pytest.raises(
        StoreCorruptError, match=r"hook h\.a, shard 0: chunk 0 fails its checksum .*moved"
    ):
        st.read_chunk("h.a", 0)
    _all_chunks(st, "h.b")  # the other hook is untouched
    assert any("hook h.a, shard 1" in p for p in st.verify())


def test_swapped_chunks_inside_a_shard_are_caught(tmp_path):
    st = _fill(str(tmp_path / "s.zarr"))
    path = tmp_path / "s.zarr/acts/h.b/c/2/0"
    data = bytearray(path.read_bytes())
    size = (
        64 * 8 * 2 + 4
    )  # one chunk and its own crc32c: both move, so the crc32c alone still passes
    first, second = bytes(data[:size]), bytes(data[size : 2 * size])
    data[:size], data[size : 2 * size] = second, first
    path.write_bytes(bytes(data))
    st = ActivationStore.open(st.url)
    with pytest.raises(StoreCorruptError, match=r"hook h\.b, shard 2: chunk 8 fails its checksum"):
        st.read_chunk("h.b", 8)
    with pytest.raises(StoreCorruptError, match="chunk 9 fails"):
        st.read_rows("h.b", 600, 610)  # every read path checks


def test_a_shard_from_another_store_of_the_same_shape_is_caught(tmp_path):
    ours = _fill(str(tmp_path / "ours.zarr"), seed=0)
    _fill(str(tmp_path / "other.zarr"), seed=1)
    shutil.copy(tmp_path / "other.zarr/acts/h.a/c/1/0", tmp_path / "ours.zarr/acts/h.a/c/1/0")
    shutil.copy(
        tmp_path / "other.zarr/progress/chunk_crc/h.a/c/1/0",
        tmp_path / "ours.zarr/progress/chunk_crc/h.a/c/1/0",
    )
    st = ActivationStore.open(ours.url)
    with pytest.raises(StoreCorruptError, match=r"hook h\.a, shard 1: chunk 4 fails its checksum"):
        st.read_chunk("h.a", 4)


@pytest.mark.parametrize(
    ("file", "edit", "named"),
    [
        (
            "zarr.json",
            lambda d: d["attributes"]["manifest"].update(dtype="bfloat16"),
            "the manifest",
        ),
        ("zarr.json", lambda d: d["attributes"]["manifest"].update(n_rows=500), "the manifest"),
        (
            "zarr.json",
            lambda d: d["attributes"]["manifest"]["stats"]["h.a"].update(mean_norm=2.0),
            "the manifest",
        ),
        ("acts/h.a/zarr.json", lambda d: d.update(data_type="bfloat16"), "acts/h.a/zarr.json"),
        ("tokens/zarr.json", lambda d: d.update(shape=[500]), "tokens/zarr.json"),
    ],
)
def test_edited_metadata_is_refused_on_open(tmp_path, file, edit, named):
    st = _fill(str(tmp_path / "s.zarr"))
    _edit_json(tmp_path / "s.zarr" / file, edit)
    with pytest.raises(StoreCorruptError, match=f"{named}.* does not match the digest"):
        ActivationStore.open(st.url)


def test_deep_verify_recomputes_the_statistics(tmp_path):
    from compsae.store import integrity

    st = _fill(str(tmp_path / "s.zarr"))
    assert st.verify(deep=True) == []
    # a careful edit that also rewrites the digests: only recomputing the statistics sees it
    st = ActivationStore.open(st.url, mode="r+")
    st.manifest["stats"]["h.b"]["var"] = [v * 2 for v in st.manifest["stats"]["h.b"]["var"]]
    st.manifest[integrity.INTEGRITY] = integrity.metadata_digests(st)
    st.group.attrs["manifest"] = st.manifest
    st = ActivationStore.open(st.url)
    assert st.verify() == []
    assert [p for p in st.verify(deep=True) if "hook h.b" in p and "statistics" in p]


@pytest.mark.parametrize("name", ["tokens", "seq_id", "pos"])
def test_side_arrays_carry_bound_checksums(tmp_path, name):
    st = _fill(str(tmp_path / "s.zarr"))
    path = tmp_path / "s.zarr" / name / "c" / "1"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= (
        0x10  # one bit: decodes, or breaks the decompressor; either way one line
    )
    path.write_bytes(bytes(data))
    st = ActivationStore.open(st.url)
    with pytest.raises(StoreCorruptError, match=f"store .*{name}"):
        getattr(st, name)
    assert any(name in p for p in st.verify())
    # swapping two equal-size shards of a side array is as loud
    st = _fill(str(tmp_path / "t.zarr"))
    a, b = (tmp_path / "t.zarr" / name / "c" / str(i) for i in (0, 1))
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db), b.write_bytes(da)
    with pytest.raises(StoreCorruptError, match=f"{name}, shard 0: fails its checksum"):
        getattr(ActivationStore.open(st.url), name)


def test_compressed_stores_are_checked_the_same_way(tmp_path):
    layout = StoreLayout(chunk_rows=64, shard_rows=256, compressor="zstd")
    st = _fill(str(tmp_path / "z.zarr"), layout=layout)
    _all_chunks(st, "h.a")
    assert st.verify(deep=True) == []
    a, b = (tmp_path / "z.zarr/acts/h.a/c" / str(i) / "0" for i in (0, 1))
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db), b.write_bytes(da)
    with pytest.raises(StoreCorruptError, match=r"hook h\.a, shard 0"):
        ActivationStore.open(st.url).read_chunk("h.a", 1)


def test_stores_of_format_1_are_still_read(tmp_path):
    st = _fill(str(tmp_path / "s.zarr"))
    want = st.read_chunk("h.a", 3).copy()

    def as_format_1(d):  # noqa: ANN001, ANN202
        m = d["attributes"]["manifest"]
        m["format"] = "compsae-store/1"
        m.pop("store_id"), m.pop("integrity")

    _edit_json(tmp_path / "s.zarr/zarr.json", as_format_1)
    with pytest.raises(
        StoreCorruptError, match=r"says compsae-store/1 but .*progress/side_crc.*format was edited"
    ):
        ActivationStore.open(st.url)  # format 1 never had the bound-checksum tables
    for table in ("progress/side_crc", "progress/chunk_crc"):
        shutil.rmtree(tmp_path / "s.zarr" / table)
    old = ActivationStore.open(st.url)
    assert old.legacy
    np.testing.assert_array_equal(old.read_chunk("h.a", 3), want)
    assert old.verify() == []  # the shard digests from chunks Zarr's own crc checked
    seq_id = ActivationStore.open(st.url).seq_id
    np.testing.assert_array_equal(
        np.concatenate([p for _, p in old.column_parts("seq_id")]), seq_id
    )
    np.testing.assert_array_equal(
        old.column_view("seq_id")[np.array([5, 999, 300])], seq_id[[5, 999, 300]]
    )


@pytest.mark.parametrize("also_drop", [(), ("store_id", "integrity")])
def test_a_format_edited_back_to_1_is_refused(tmp_path, also_drop):
    """Format 1 has none of format 2's checks: a manifest edited to say format 1 must not switch
    them off."""
    st = _fill(str(tmp_path / "s.zarr"))

    def downgrade(d):  # noqa: ANN001, ANN202
        m = d["attributes"]["manifest"]
        m["format"] = "compsae-store/1"
        for key in also_drop:
            m.pop(key)

    _edit_json(tmp_path / "s.zarr/zarr.json", downgrade)
    for mode in ("r", "r+"):
        with pytest.raises(
            StoreCorruptError, match=f"store {st.url}: its manifest says compsae-store/1"
        ) as info:
            ActivationStore.open(st.url, mode=mode)
        assert "\n" not in str(info.value)
