"""Harvest stage on tiny-neox: stored values, resume, refusals and their messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fake_clock import FakeClock

from compsae.errors import UserError
from compsae.harvest import shards as harvest_shards
from compsae.harvest.config import HarvestConfig
from compsae.harvest.run import run_harvest
from compsae.harvest.verdicts import tokenizer_verdict, writers_busy_share, writers_verdict
from compsae.lm.byte_tokenizer import byte_tokenizer
from compsae.lm.models import load_model
from compsae.store import ActivationStore

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]


def small_cfg(**over: Any) -> HarvestConfig:
    """~2.3k rows in 5 shards of 512 rows (the last one partial), 4 sequences per forward."""
    base: dict[str, Any] = dict(
        model="tiny-neox",
        hooks=HOOKS,
        context=32,
        n_tokens=2300,
        batch_size=4,
        chunk_rows=128,
        shard_rows=512,
        data={"source": "synthetic:mixed", "seed": 3},
    )
    base.update(over)
    return HarvestConfig(**base)


def read_all(url: str) -> dict[str, np.ndarray]:
    st = ActivationStore.open(url)
    out = {f"acts/{h}": st.zarr_array(h)[:] for h in st.hooks}
    out.update(tokens=st.tokens, seq_id=st.seq_id, pos=st.pos)
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted harvest, shared by the tests that compare against it."""
    out_dir = tmp_path_factory.mktemp("full")
    return run_harvest(small_cfg(), str(out_dir))


def test_store_equals_run_with_cache_for_two_hooks(full_run: dict[str, Any]) -> None:
    st = ActivationStore.open(full_run["store"])
    assert st.complete and st.hooks == HOOKS and st.n_rows == 72 * 32  # ceil(2300 / 32) sequences
    loaded = load_model(small_cfg())
    tokens = torch.from_numpy(st.tokens.reshape(-1, 32)[:6].astype(np.int64))
    _, cache = loaded.model.run_with_cache(tokens)  # full forward, no truncation
    for hook in HOOKS:
        ref = cache[hook].reshape(-1, cache[hook].shape[-1]).numpy()
        got = st.read_rows(hook, 0, ref.shape[0])
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
        assert not np.array_equal(got, 0 * got)
    assert np.all(st.pos.reshape(-1, 32) == np.arange(32))
    assert np.all(st.tokens.reshape(-1, 32)[:, 0] == 0)  # BOS id 0 prepended (Pythia's: falsy!)
    m = st.manifest
    assert (
        m["model"]["name"] == "tiny-neox"
        and m["prepend_bos"] is True
        and "BOS id 0" in m["bos_rule"]
    )
    assert m["harvest"]["stop_at_layer"] == 3
    assert set(m["rounding_error"]) == set(HOOKS) and all(
        0 < e < 1e-3 for e in m["rounding_error"].values()
    )


def test_no_bos_when_prepend_bos_false(tmp_path: Path) -> None:
    out = run_harvest(small_cfg(prepend_bos=False, n_tokens=512, hooks=HOOKS[:1]), str(tmp_path))
    st = ActivationStore.open(out["store"])
    assert not np.all(st.tokens.reshape(-1, 32)[:, 0] == 0)
    assert "no BOS" in st.manifest["bos_rule"]


def test_interrupted_then_resumed_equals_uninterrupted(
    tmp_path: Path, full_run: dict[str, Any]
) -> None:
    cfg = small_cfg()

    def die_after_two(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt  # what a Ctrl-C in the middle of a write looks like

    with pytest.raises(KeyboardInterrupt):
        run_harvest(cfg, str(tmp_path), on_shard_written=die_after_two)
    url = str(tmp_path / "store.zarr")
    partial = ActivationStore.open(url)
    assert not partial.complete and partial.done_shards() == {0, 1}

    written: list[int] = []
    out = run_harvest(cfg, str(tmp_path), on_shard_written=written.append)
    assert written == [2, 3, 4]  # done shards are not redone
    a, b = read_all(out["store"]), read_all(full_run["store"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert out["digest"] == full_run["digest"]


def test_several_writer_threads_write_the_same_store(
    tmp_path: Path, full_run: dict[str, Any]
) -> None:
    """Shards written side by side (as on a GPU) finish in any order; the store is the same bytes,
    its config hash too (the thread count cannot change what is stored)."""
    written: list[int] = []
    out = run_harvest(
        small_cfg(writer_threads=3), str(tmp_path / "a"), on_shard_written=written.append
    )
    assert sorted(written) == [0, 1, 2, 3, 4]
    a, b = read_all(out["store"]), read_all(full_run["store"])
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert out["digest"] == full_run["digest"]

    def die_at_two(shard: int) -> None:
        if shard == 2:
            raise RuntimeError("writer died")

    with pytest.raises(
        RuntimeError, match="writer died"
    ):  # a writer thread's error reaches the caller
        run_harvest(small_cfg(writer_threads=3), str(tmp_path / "b"), on_shard_written=die_at_two)
    assert 2 in ActivationStore.open(str(tmp_path / "b" / "store.zarr")).done_shards()
    resumed = run_harvest(small_cfg(writer_threads=2), str(tmp_path / "b"))
    assert resumed["digest"] == full_run["digest"]


def test_complete_store_is_not_redone(full_run: dict[str, Any], tmp_path: Path) -> None:
    out = run_harvest(small_cfg(store=full_run["store"]), str(tmp_path))
    assert out == full_run


def test_existing_store_of_other_config_is_refused_unless_force(tmp_path: Path) -> None:
    run_harvest(small_cfg(n_tokens=512), str(tmp_path))
    other = small_cfg(n_tokens=512, data={"source": "synthetic:arithmetic"})
    with pytest.raises(UserError, match="different config.*--force"):
        run_harvest(other, str(tmp_path))
    out = run_harvest(other, str(tmp_path), force=True)
    assert ActivationStore.open(out["store"]).manifest["data"]["source"] == "synthetic:arithmetic"


def test_force_never_deletes_a_file_compsae_did_not_write(tmp_path: Path) -> None:
    first = run_harvest(small_cfg(n_tokens=512), str(tmp_path))
    mine = Path(first["store"]) / "acts" / "notes.txt"  # a user's file put in the store afterwards
    mine.write_text("my notes")
    with pytest.raises(UserError, match=r"did not write \(acts/notes.txt\).*move it out"):
        run_harvest(small_cfg(n_tokens=512), str(tmp_path), force=True)
    assert mine.read_text() == "my notes"
    assert ActivationStore.open(first["store"]).complete  # nothing of the store deleted either
    mine.unlink()
    out = run_harvest(
        small_cfg(n_tokens=512), str(tmp_path), force=True
    )  # only compsae's files: redone
    assert out["digest"] == first["digest"]


def test_second_concurrent_harvest_is_refused(tmp_path: Path) -> None:
    cfg = small_cfg(n_tokens=512)

    def stop(shard: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_harvest(cfg, str(tmp_path), on_shard_written=stop)
    store = ActivationStore.open(str(tmp_path / "store.zarr"), mode="r+")
    with store.lock("harvest"), pytest.raises(UserError, match="another harvest"):
        run_harvest(cfg, str(tmp_path))


def test_memory_url_store() -> None:
    out = run_harvest(small_cfg(n_tokens=600, store="memory://compsae-test/harvest.zarr"), "unused")
    st = ActivationStore.open(out["store"])
    assert st.complete and st.n_rows == 19 * 32


def test_float16_overflow_stops_with_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = harvest_shards._forward

    def huge(*args: Any) -> dict[str, np.ndarray]:
        return {h: a * 1e6 for h, a in real(*args).items()}

    monkeypatch.setattr(harvest_shards, "_forward", huge)
    with pytest.raises(UserError, match="float16.*bfloat16 or float32"):
        run_harvest(small_cfg(n_tokens=512), str(tmp_path))
    out = run_harvest(
        small_cfg(n_tokens=512, dtype="float32", store=str(tmp_path / "f32.zarr")), str(tmp_path)
    )
    assert ActivationStore.open(out["store"]).complete


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"model": "no-such-model-xyz"}, "unknown model 'no-such-model-xyz'.*tiny-neox"),
        (
            {"hooks": ["blocks.1.hook_resid_pots"]},
            "unknown hook 'blocks.1.hook_resid_pots'.*hook_resid_post",
        ),
        ({"hooks": ["blocks.7.hook_resid_post"]}, "layer 7 .* 4 layers"),
        ({"context": 4096}, "context 4096 is beyond.*512"),
        ({"data": {"source": "/no/such/file.jsonl"}}, "not found"),
        ({"data": {"source": "synthetic:poetry"}}, "unknown synthetic task"),
        ({"hooks": ["blocks.1.attn.hook_pattern"]}, "not one vector per token"),
    ],
)
def test_bad_input_messages(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        run_harvest(small_cfg(**over), str(tmp_path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "store.zarr").exists()  # refused before anything was written


def test_empty_data_set_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(UserError, match="empty or shorter than one sequence"):
        run_harvest(small_cfg(data={"source": str(empty)}), str(tmp_path))
    assert not (tmp_path / "store.zarr").exists()


def test_local_jsonl_source_and_missing_field(tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "\n".join(json.dumps({"body": f"document number {i} says hello."}) for i in range(40))
    )
    with pytest.raises(UserError, match="no field 'text'.*body"):
        run_harvest(small_cfg(data={"source": str(docs)}, n_tokens=256), str(tmp_path))
    out = run_harvest(
        small_cfg(data={"source": str(docs), "text_field": "body"}, n_tokens=256, hooks=HOOKS[:1]),
        str(tmp_path),
    )
    st = ActivationStore.open(out["store"])
    assert st.n_rows == 256
    assert byte_tokenizer().decode(st.tokens[1:16].tolist()) == "document number"


def test_data_running_out_stores_what_there_is(tmp_path: Path) -> None:
    docs = tmp_path / "few.txt"
    docs.write_text("a short line of text\n" * 10)  # 10 * 21 bytes = 210 tokens → 6 windows of 31
    out = run_harvest(small_cfg(data={"source": str(docs)}, hooks=HOOKS[:1]), str(tmp_path))
    assert out["n_rows"] == 6 * 32
    assert ActivationStore.open(out["store"]).manifest["data"]["n_seqs"] == 6


def test_writer_threads_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from compsae.harvest.shards import writer_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert writer_threads(small_cfg(), torch.device("cpu")) == 1  # the forward needs the cores
    assert writer_threads(small_cfg(), torch.device("cuda")) == 4
    assert writer_threads(small_cfg(writer_threads=2), torch.device("cuda")) == 2
    monkeypatch.setattr(
        "os.sched_getaffinity", lambda _pid: set(range(7)), raising=False
    )  # a pinned job
    assert writer_threads(small_cfg(), torch.device("cuda")) == 1


def test_a_harvest_held_up_by_its_shard_writers_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the harvest's clock, storing a shard takes 0.3 s and nothing else takes any time: the one
    writer is busy all of the 1.5 s the 5 shards take.  When the forward passes take the time
    instead, the writers are not blamed.  (The clock is the test's, so the machine's load cannot
    change the verdicts.)"""
    real_write, real_forward = ActivationStore.write_shard, harvest_shards._forward
    clock = FakeClock()

    def costs(write_s: float, forward_s: float) -> None:
        def write(self: ActivationStore, *args: Any, **kwargs: Any) -> None:
            clock.advance(write_s)
            real_write(self, *args, **kwargs)

        def forward(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            clock.advance(forward_s)
            return real_forward(*args, **kwargs)

        monkeypatch.setattr(ActivationStore, "write_shard", write)
        monkeypatch.setattr(harvest_shards, "_forward", forward)

    costs(write_s=0.3, forward_s=0.0)
    run_harvest(small_cfg(), str(tmp_path / "slow_disk"), clock=clock)
    out = capsys.readouterr().out
    assert (
        "the shard writers were busy 100% of the time: the disk or harvest.writer_threads (1) "
        "limits this harvest"
    ) in out
    costs(write_s=0.01, forward_s=0.3)  # 18 forward passes: 5.4 s, the writers 0.05 s of it
    run_harvest(small_cfg(), str(tmp_path / "slow_model"), clock=clock)
    assert "the shard writers were busy" not in capsys.readouterr().out


def test_what_limits_a_harvest_is_said_only_for_a_large_share_of_a_long_enough_run() -> None:
    assert writers_busy_share(busy_s=3.0, threads=2, total_s=2.0) == 0.75
    assert writers_busy_share(busy_s=0.0, threads=1, total_s=0.0) == 0.0  # an empty loop
    assert writers_verdict(0.8, total_s=10.0, threads=1) is None  # busy, but not nearly always
    assert writers_verdict(0.81, total_s=1.0, threads=1) is None  # too short to tell
    said = writers_verdict(0.81, total_s=1.01, threads=3)
    assert said is not None and "busy 81%" in said and "writer_threads (3)" in said
    assert tokenizer_verdict(waited_s=1.0, total_s=10.0) is None  # a tenth: not the limit
    assert tokenizer_verdict(waited_s=0.9, total_s=1.0) is None  # too short to tell
    said = tokenizer_verdict(waited_s=1.04, total_s=10.0)
    assert said is not None and "1.0 s of it waiting for the tokenizer" in said
