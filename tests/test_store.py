"""ActivationStore: round trips in every dtype and backend, statistics, checksums, resume,
locking."""

from __future__ import annotations

import numpy as np
import pytest

from compsae.errors import StoreCorruptError, UserError
from compsae.store import ActivationStore, StoreLayout
from compsae.store.activation_store import shard_moments, to_storage
from compsae.variance import merge_moment_list

TOL = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 0.0}


def _fill(
    url: str, dtype: str = "float16", n: int = 1000, seed: int = 0
) -> tuple[ActivationStore, np.ndarray, np.ndarray]:
    layout = StoreLayout(chunk_rows=64, shard_rows=256, dtype=dtype)
    st = ActivationStore.create(
        url, {"h.a": 16, "h.b": 8}, n, layout, {"config_hash": "abc"}, overwrite=True
    )
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 16)).astype(np.float32)
    b = rng.normal(size=(n, 8)).astype(np.float32) * 3
    for s in range(st.n_shards):
        lo, hi = st.shard_range(s)
        rows = np.arange(lo, hi)
        st.write_shard(s, {"h.a": a[lo:hi], "h.b": b[lo:hi]}, rows % 50, rows // 10, rows % 10)
    st.finalize()
    return ActivationStore.open(url), a, b


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_local(tmp_path, dtype):
    st, a, b = _fill(str(tmp_path / "s.zarr"), dtype)
    fast = np.concatenate([st.read_chunk("h.a", c) for c in range(st.n_chunks)])
    assert fast.shape == a.shape
    np.testing.assert_allclose(fast, a, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_array_equal(st.read_rows("h.a", 0, st.n_rows), fast)  # zarr path == raw path
    np.testing.assert_allclose(
        st.read_rows("h.b", 100, 300), b[100:300], rtol=TOL[dtype], atol=3 * TOL[dtype]
    )
    np.testing.assert_array_equal(st.seq_id, np.arange(1000) // 10)
    np.testing.assert_array_equal(st.pos, np.arange(1000) % 10)
    assert st.complete and st.verify() == []


def test_round_trip_memory_url():
    st, a, _ = _fill("memory://compsae-test/s.zarr", "float16")
    np.testing.assert_allclose(st.read_chunk("h.a", 3), a[192:256], rtol=2e-3, atol=2e-3)
    assert st.verify() == []


def test_stats_match_numpy(tmp_path):
    st, _, _ = _fill(str(tmp_path / "s.zarr"), "float32")
    s = st.stats("h.b")
    x = st.read_rows("h.b", 0, st.n_rows).astype(np.float64)
    np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-10)
    assert s["count"] == 1000
    assert s["mean_norm"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-10)


def test_merge_moments_equals_one_pass():
    rng = np.random.default_rng(1)
    parts = [rng.normal(loc=i, size=(n, 3)) for i, n in enumerate((5, 17, 1, 40))]
    counts = np.array([len(p) for p in parts])
    n, mean, m2 = merge_moment_list(
        counts,
        np.stack([p.mean(0) for p in parts]),
        np.stack([((p - p.mean(0)) ** 2).sum(0) for p in parts]),
    )
    allx = np.concatenate(parts)
    assert n == len(allx)
    np.testing.assert_allclose(mean, allx.mean(0))
    np.testing.assert_allclose(m2 / n, allx.var(0))


def test_float16_overflow_is_refused():
    with pytest.raises(UserError, match="float16's range.*bfloat16 or float32"):
        to_storage(np.array([[1e6]], dtype=np.float32), "float16", "blocks.0.hook_x")


def test_corrupt_byte_names_shard_and_hook(tmp_path):
    url = str(tmp_path / "s.zarr")
    st, _, _ = _fill(url)
    path = tmp_path / "s.zarr" / "acts" / "h.a" / "c" / "1" / "0"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    st = ActivationStore.open(url)
    with pytest.raises(StoreCorruptError, match="hook h.a, shard 1: chunk 4 fails its checksum"):
        st.read_chunk("h.a", 4)
    st.read_chunk("h.a", 5)  # the other chunks of the shard are intact
    problems = st.verify()
    assert any("shard 1" in p for p in problems)


def test_missing_shard_file_is_an_error(tmp_path):
    url = str(tmp_path / "s.zarr")
    _fill(url)
    (tmp_path / "s.zarr" / "acts" / "h.b" / "c" / "2" / "0").unlink()
    st = ActivationStore.open(url)
    with pytest.raises(StoreCorruptError, match="hook h.b, shard 2"):
        st.read_chunk("h.b", 8)


def test_resume_keeps_done_shards_and_refuses_other_config(tmp_path):
    url = str(tmp_path / "s.zarr")
    layout = StoreLayout(chunk_rows=64, shard_rows=256)
    st = ActivationStore.create_or_resume(url, {"h": 4}, 600, layout, {"config_hash": "one"})
    st.write_shard(0, {"h": np.ones((256, 4))}, np.zeros(256), np.zeros(256), np.zeros(256))
    again = ActivationStore.create_or_resume(url, {"h": 4}, 600, layout, {"config_hash": "one"})
    assert again.done_shards() == {0}
    with pytest.raises(UserError, match="different config.*--force"):
        ActivationStore.create_or_resume(url, {"h": 4}, 600, layout, {"config_hash": "two"})
    assert ActivationStore.open(url).done_shards() == {0}  # nothing lost by the refusal
    fresh = ActivationStore.create_or_resume(
        url, {"h": 4}, 600, layout, {"config_hash": "two"}, force=True
    )
    assert fresh.done_shards() == set()


def test_finalize_shrinks_and_refuses_gaps(tmp_path):
    st = ActivationStore.create(
        str(tmp_path / "s.zarr"),
        {"h": 4},
        1000,
        StoreLayout(chunk_rows=64, shard_rows=256),
        {"config_hash": "a"},
    )
    with pytest.raises(StoreCorruptError, match="never written"):
        st.finalize()
    for s in range(2):
        lo, hi = st.shard_range(s)
        st.write_shard(
            s,
            {"h": np.full((hi - lo, 4), s + 1.0)},
            np.zeros(hi - lo),
            np.zeros(hi - lo),
            np.zeros(hi - lo),
        )
    st.finalize(512)
    st = ActivationStore.open(str(tmp_path / "s.zarr"))
    assert (st.n_rows, st.n_chunks, st.n_shards) == (512, 8, 2)
    assert st.read_chunk("h", 7)[0, 0] == 2.0


def test_second_writer_is_refused(tmp_path):
    st, _, _ = _fill(str(tmp_path / "s.zarr"))
    other = ActivationStore.open(str(tmp_path / "s.zarr"), mode="r+")
    with st.lock(), pytest.raises(UserError, match="another harvest is writing"), other.lock():
        pass
    with other.lock():  # released after the first writer is done
        pass


def test_unknown_hook_lists_the_stored_ones(tmp_path):
    st, _, _ = _fill(str(tmp_path / "s.zarr"))
    with pytest.raises(UserError, match="no hook 'h.c'; it holds h.a, h.b"):
        st.read_chunk("h.c", 0)


def test_open_missing_store(tmp_path):
    with pytest.raises(UserError, match="no store at"):
        ActivationStore.open(str(tmp_path / "nothing.zarr"))


def test_round_trip_s3(s3_bucket):
    url = f"{s3_bucket}/s.zarr"
    st, a, _ = _fill(url, "float16", n=600)
    np.testing.assert_allclose(st.read_chunk("h.a", 9), a[576:600], rtol=2e-3, atol=2e-3)
    assert st.verify() == []
    # side columns read in parts from the object store: the same values as the whole column
    fresh = ActivationStore.open(url)
    parts = list(fresh.column_parts("seq_id"))
    assert [lo for lo, _ in parts] == [0, 256, 512]
    np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), np.arange(600) // 10)
    np.testing.assert_array_equal(fresh.column_view("pos")[np.array([599, 3, 300])], [9, 3, 0])
    other = ActivationStore.open(url, mode="r+")
    with (
        st.lock(),
        pytest.raises(UserError, match="another harvest is writing to .* delete .*lock"),
        other.lock(),
    ):
        pass


def test_store_killed_while_being_laid_out_is_laid_out_again(tmp_path, monkeypatch):
    url = str(tmp_path / "s.zarr")
    layout = StoreLayout(chunk_rows=64, shard_rows=256)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for kill -9 between the group and its arrays

    import zarr

    monkeypatch.setattr(zarr.Group, "create_array", killed)
    with pytest.raises(KeyboardInterrupt):
        ActivationStore.create_or_resume(url, {"h": 4}, 600, layout, {"config_hash": "one"})
    monkeypatch.undo()
    st = ActivationStore.create_or_resume(url, {"h": 4}, 600, layout, {"config_hash": "one"})
    assert st.done_shards() == set() and st.manifest["laid_out"] is True


@pytest.mark.parametrize(
    ("dtype", "checksum"),
    [("float16", True), ("bfloat16", True), ("float32", True), ("float16", False)],
)
def test_written_files_are_the_bytes_zarr_writes(tmp_path, monkeypatch, dtype, checksum):
    """write_shard encodes shard files and the small per-shard chunks itself; every file must equal
    what Zarr writes for the same values, the last shard too (a partial chunk, and chunks wholly
    past the end of the array left empty)."""
    from compsae.store import writer

    layout = StoreLayout(chunk_rows=64, shard_rows=256, dtype=dtype, checksum=checksum)
    n = 800  # shard 3 holds rows 768..799: chunk 12 partial, chunks 13-15 past the end
    ours = ActivationStore.create(
        str(tmp_path / "ours.zarr"), {"h": 8}, n, layout, {"config_hash": "a"}
    )
    ref = ActivationStore.create(
        str(tmp_path / "ref.zarr"), {"h": 8}, n, layout, {"config_hash": "a"}
    )
    ref.manifest["store_id"] = ours.store_id  # the bound checksums then agree too
    x = np.random.default_rng(2).normal(size=(n, 8)).astype(np.float32)
    rows = np.arange(n) + 1  # no all-zero column chunk: Zarr would skip writing it

    def through_zarr(self, hook, shard, stored, crcs):
        lo, hi = self.store.shard_range(shard)
        self.store.zarr_array(hook)[lo:hi] = stored

    for s in range(ours.n_shards):
        lo, hi = ours.shard_range(s)
        ours.write_shard(s, {"h": x[lo:hi]}, rows[lo:hi] % 50, rows[lo:hi], rows[lo:hi] % 32)
        with monkeypatch.context() as m:
            m.setattr(writer, "plain_encoder", lambda arr: None)
            m.setattr(writer.ShardWriter, "_write_shard_file", through_zarr)
            ref.write_shard(s, {"h": x[lo:hi]}, rows[lo:hi] % 50, rows[lo:hi], rows[lo:hi] % 32)
    files = sorted(
        str(f.relative_to(tmp_path / "ref.zarr"))
        for f in (tmp_path / "ref.zarr").rglob("c/**/*")
        if f.is_file()
    )
    assert "acts/h/c/3/0" in files and "tokens/c/3" in files and "progress/stats/h/c/3/0" in files
    got = sorted(
        str(f.relative_to(tmp_path / "ours.zarr"))
        for f in (tmp_path / "ours.zarr").rglob("c/**/*")
        if f.is_file()
    )
    assert got == files  # temporary files renamed, nothing extra
    for name in files:
        assert (tmp_path / "ours.zarr" / name).read_bytes() == (
            tmp_path / "ref.zarr" / name
        ).read_bytes(), name
    np.testing.assert_array_equal(ours.zarr_array("h")[:], to_storage(x, dtype, "h"))
    assert ours.done_shards() == set(range(4)) and ours.verify() == []


@pytest.mark.parametrize("len_a", [0, 1, 7, 4096])
@pytest.mark.parametrize("len_b", [0, 1, 13, 1 << 20])
def test_crc_of_joined_bytes_from_the_parts(len_a, len_b):
    import crc32c

    from compsae.store.crc import crc32c_concat

    rng = np.random.default_rng(len_a * 31 + len_b)
    a, b = rng.bytes(len_a), rng.bytes(len_b)
    assert crc32c_concat(crc32c.crc32c(a), crc32c.crc32c(b), len_b) == crc32c.crc32c(a + b)


def test_bound_checksum_from_the_chunks_own_crc():
    import crc32c

    from compsae.store.format import bind_crc, bound_crc

    chunk = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float16)
    assert bind_crc(crc32c.crc32c(chunk), chunk.nbytes, "id", "h", 5) == bound_crc(
        chunk, "id", "h", 5
    )
    assert bind_crc(crc32c.crc32c(chunk), chunk.nbytes, "id", "h", 6) != bound_crc(
        chunk, "id", "h", 5
    )


def test_values_already_in_the_storage_dtype_are_checked_not_converted():
    h = np.array([[1.5, -2.0]], dtype=np.float16)
    assert to_storage(h, "float16", "x") is h
    with pytest.raises(UserError, match="inf or NaN in float16.*bfloat16 or float32"):
        to_storage(np.array([[np.inf]], dtype=np.float16), "float16", "x")
    nan_bits = np.array([[0x7FC0]], dtype=np.uint16)  # a bfloat16 NaN
    with pytest.raises(UserError, match="NaN or inf"):
        to_storage(nan_bits, "bfloat16", "x")
    with pytest.raises(UserError, match="NaN or inf"):
        to_storage(np.array([[1.0, np.nan]], dtype=np.float32), "float16", "x")


def test_shard_moments_match_one_float64_pass():
    x = np.random.default_rng(3).normal(loc=5.0, size=(2500, 7)).astype(np.float16)
    got = shard_moments(x, block_rows=1024)  # blocks of 1024, 1024 and 452 rows
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(got[1:8], x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(got[8:15], ((x64 - x64.mean(0)) ** 2).sum(0), rtol=1e-10)
    assert got[0] == 2500 and got[15] == pytest.approx(np.linalg.norm(x64, axis=1).sum(), rel=1e-12)


def test_force_never_replaces_a_folder_that_holds_no_store(tmp_path):
    """A store pointed at a user's folder is refused, --force or not, and nothing in it is touched;
    an empty folder, or one with only the remains of a store killed at creation, is fine."""
    from compsae.store import refuse_foreign_folder

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    layout = StoreLayout(chunk_rows=64, shard_rows=256)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not empty .*holiday.jpg.* holds no compsae store"):
            ActivationStore.create(
                str(mine), {"h": 4}, 100, layout, {"config_hash": "a"}, overwrite=overwrite
            )
        with pytest.raises(UserError, match="holds no compsae store"):
            ActivationStore.create_or_resume(
                str(mine), {"h": 4}, 100, layout, {"config_hash": "a"}, force=True
            )
    assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]
    assert (mine / "holiday.jpg").read_bytes() == b"\xff\xd8 precious"
    (tmp_path / "empty").mkdir()
    refuse_foreign_folder(str(tmp_path / "empty"))
    store = ActivationStore.create(
        str(tmp_path / "s.zarr"), {"h": 4}, 100, layout, {"config_hash": "a"}
    )
    refuse_foreign_folder(store.url)  # a compsae store may be replaced
    ActivationStore.create_or_resume(
        store.url, {"h": 4}, 100, layout, {"config_hash": "b"}, force=True
    )


@pytest.mark.parametrize("compressors", [None, "zstd", "crc32c"])
def test_chunk_files_read_directly_equal_zarrs_read(tmp_path, compressors):
    """The per-shard arrays are read from their chunk files, not through Zarr's event loop: the
    values must be Zarr's, missing chunks as the fill value, any stop; other codecs go through
    Zarr."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    from compsae.store.format import read_row_chunks

    codecs = {None: None, "zstd": [ZstdCodec(level=1)], "crc32c": [Crc32cCodec()]}[compressors]
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    arr = group.create_array(
        "t",
        shape=(10, 3),
        dtype="<f8",
        chunks=(4, 3),
        fill_value=-1.0,
        **({} if codecs is None else {"compressors": codecs}),
    )
    values = np.arange(30, dtype=np.float64).reshape(10, 3)
    arr[0:4] = values[0:4]
    arr[8:10] = values[8:10]  # chunk 1 (rows 4-7) never written
    for stop in (10, 9, 5, 1, 12):
        got = read_row_chunks(arr, str(tmp_path / "g.zarr" / "t"), stop)
        if compressors == "crc32c":
            assert got is None
            continue
        np.testing.assert_array_equal(got, arr[:stop])
        assert got.dtype == arr.dtype


def test_a_store_reads_its_progress_arrays_without_zarr(tmp_path, monkeypatch):
    store = ActivationStore.create(
        str(tmp_path / "s.zarr"),
        {"h": 4},
        96,
        StoreLayout(chunk_rows=16, shard_rows=32),
        {"config_hash": "a"},
    )
    x = np.random.default_rng(0).normal(size=(96, 4)).astype(np.float32)
    for s in (0, 2):
        lo, hi = store.shard_range(s)
        store.write_shard(
            s, {"h": x[lo:hi]}, np.arange(lo, hi), np.arange(lo, hi) // 8, np.arange(lo, hi) % 8
        )
    expect_done = {int(i) for i in np.flatnonzero(store.group["progress/shard_done"][:])}
    monkeypatch.setattr("zarr.Array.__getitem__", lambda *a: pytest.fail("read through Zarr"))
    assert store.done_shards() == expect_done == {0, 2}


def test_a_side_column_read_on_demand_gives_the_whole_columns_values(tmp_path, monkeypatch):
    layout = StoreLayout(chunk_rows=8, shard_rows=32, dtype="float32")
    n = 150  # 5 shards, the last partial
    st = ActivationStore.create(str(tmp_path / "s.zarr"), {"h": 2}, n, layout, {"config_hash": "a"})
    for s in range(st.n_shards):
        lo, hi = st.shard_range(s)
        rows = np.arange(lo, hi)
        st.write_shard(
            s, {"h": np.zeros((hi - lo, 2), np.float32)}, rows * 3 % 101, rows // 10, rows % 10
        )
    st.finalize()
    whole = ActivationStore.open(st.url).seq_id
    from compsae.store import activation_store

    monkeypatch.setattr(activation_store, "_SHARDS_PER_READ", 2)  # parts read two shards at a time
    parts = list(ActivationStore.open(st.url).column_parts("seq_id"))
    assert [lo for lo, _ in parts] == [0, 32, 64, 96, 128]
    np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), whole)
    view = ActivationStore.open(st.url).column_view("seq_id")
    view.keep_shards = 2  # shards dropped and read again
    assert (
        len(view) == n and view[0] == whole[0] and view[-1] == whole[-1] and view[149] == whole[149]
    )
    for key in (
        slice(None),
        slice(30, 70),
        slice(140, 500),
        slice(5, 5),
        np.array([149, 0, 33, 33, 64]),
        np.array([[1, 2], [140, 3]]),
        np.zeros(0, dtype=np.int64),
    ):
        np.testing.assert_array_equal(view[key], whole[key])
    with pytest.raises(IndexError):
        view[np.array([n])]
    with pytest.raises(TypeError, match="mask"):
        view[np.ones(n, dtype=bool)]
    tokens = ActivationStore.open(st.url).column_view("tokens")
    np.testing.assert_array_equal(tokens[np.arange(n)], np.arange(n) * 3 % 101)
    # a corrupt part is refused when read, naming the column and shard
    path = tmp_path / "s.zarr" / "pos" / "c" / "2"
    assert path.is_file()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    pos = ActivationStore.open(st.url).column_view("pos")
    assert pos[5] == 5  # shard 0 reads fine
    with pytest.raises(StoreCorruptError, match="pos"):
        pos[70]
