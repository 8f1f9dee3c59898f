"""Tokenizing beside the forward passes: a harvest whose tokens arrive while it runs stores the
same bytes as one that had them all first, also when the data runs out part-way (the store then
shrinks to the last whole sequence), and resumes after a stop there."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_clock import FakeClock

from compsae.errors import UserError
from compsae.harvest import token_feed
from compsae.harvest.config import HarvestConfig
from compsae.harvest.run import run_harvest, tokenize_all
from compsae.harvest.token_feed import TokenFeed
from compsae.lm.byte_tokenizer import byte_tokenizer
from compsae.store import ActivationStore
from compsae.store.activation_store import ActivationStore as StoreClass

HOOKS = ["blocks.1.hook_resid_post"]


def _cfg(**over: Any) -> HarvestConfig:
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
    return HarvestConfig(**{**base, **over})


def _arrays(url: str) -> dict[str, Any]:
    st = ActivationStore.open(url)
    out: dict[str, Any] = {f"acts/{h}": st.zarr_array(h)[:] for h in st.hooks}
    out.update(
        tokens=st.tokens,
        seq_id=st.seq_id,
        pos=st.pos,
        n_rows=st.n_rows,
        n_seqs=st.manifest["data"]["n_seqs"],
        stats=st.manifest["stats"],
        rounding=st.manifest["rounding_error"],
    )
    # the per-shard arrays of a shrunk store are sized for its shards, as if laid out for them
    out.update({name: st.group[name][:] for name in ("progress/shard_done", "progress/shard_crc")})
    return out


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def _tokens_after_store_creation(m: pytest.MonkeyPatch) -> dict[str, Any]:
    """Sequences after the first 5 arrive only once the store is opened: the harvest must lay the
    store out for the sequences asked and wait for the rest batch by batch.  Returns the rows each
    `shrink` was asked for."""
    created = threading.Event()
    seen: dict[str, Any] = {"shrinks": []}
    real_sequences, real_shrink = token_feed.token_sequences, StoreClass.shrink
    real_open = StoreClass.create_or_resume.__func__

    def gated(*args: Any, **kwargs: Any) -> Iterator[np.ndarray]:
        for i, seq in enumerate(real_sequences(*args, **kwargs)):
            if i == 5:
                assert created.wait(60), "the store was never opened"
            yield seq

    def create_or_resume(cls: type, *args: Any, **kwargs: Any) -> ActivationStore:
        store = real_open(cls, *args, **kwargs)
        created.set()
        return store

    def shrink(self: ActivationStore, n_rows: int, extra: dict[str, Any] | None = None) -> None:
        seen["shrinks"].append(n_rows)
        real_shrink(self, n_rows, extra)

    m.setattr(token_feed, "token_sequences", gated)
    m.setattr(StoreClass, "create_or_resume", classmethod(create_or_resume))
    m.setattr(StoreClass, "shrink", shrink)
    return seen


def _all_tokens_first(m: pytest.MonkeyPatch) -> None:
    """The harvest gets every sequence before it lays the store out (as before the feed)."""
    start = TokenFeed.start

    def whole(
        cls: type,
        cfg: HarvestConfig,
        tokenizer: Any,
        window: int | None = None,
        progress: bool = False,
        clock: Any = None,
    ) -> TokenFeed:
        return TokenFeed.of(start(cfg, tokenizer).result(cfg.data.source, cfg.n_tokens))

    m.setattr(TokenFeed, "start", classmethod(whole))


def _harvest(cfg: HarvestConfig, out: Path, how: Any) -> tuple[dict[str, Any], Any]:
    with pytest.MonkeyPatch.context() as m:
        seen = how(m)
        return run_harvest(cfg, str(out)), seen


def test_a_feed_gives_the_sequences_tokenize_all_gives() -> None:
    cfg = _cfg()
    tokens = tokenize_all(cfg, byte_tokenizer())
    feed = TokenFeed.start(cfg, byte_tokenizer())
    assert feed.wait_for(3) == 3
    np.testing.assert_array_equal(feed.result(cfg.data.source, cfg.n_tokens), tokens)
    assert feed.wait_for(10**6) == len(tokens) == cfg.n_seqs
    assert TokenFeed.of(tokens[:7]).wait_for(10) == 7


def test_the_harvest_runs_while_tokens_arrive_and_stores_the_same_bytes(tmp_path: Path) -> None:
    streamed, seen = _harvest(_cfg(), tmp_path / "streamed", _tokens_after_store_creation)
    assert seen["shrinks"] == []
    reference, _ = _harvest(_cfg(), tmp_path / "reference", _all_tokens_first)
    _assert_same(_arrays(streamed["store"]), _arrays(reference["store"]))
    assert ActivationStore.open(streamed["store"]).verify() == []


# 23 sequences: the data ends inside a batch of 4; 30: exactly where a batch of 5 would start
@pytest.mark.parametrize(("max_docs", "batch_size"), [(30, 4), (40, 5)])
def test_data_running_out_mid_harvest_shrinks_the_store_to_what_there_was(
    tmp_path: Path, max_docs: int, batch_size: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """The store ends with the last whole sequence (inside a shard: a partial last shard), and
    equals a harvest that knew the count before laying the store out."""
    cfg = _cfg(
        n_tokens=10_000,
        batch_size=batch_size,
        data={"source": "synthetic:mixed", "seed": 3, "max_docs": max_docs},
    )
    n_seqs = len(tokenize_all(cfg, byte_tokenizer()))
    assert (
        5 < n_seqs < cfg.n_seqs and (n_seqs * cfg.context) % cfg.shard_rows
    )  # runs out after the gate opens
    known, _ = _harvest(cfg, tmp_path / "known", _all_tokens_first)
    capsys.readouterr()
    streamed, seen = _harvest(cfg, tmp_path / "streamed", _tokens_after_store_creation)
    assert seen["shrinks"] == [n_seqs * cfg.context]
    assert (
        f"the data ran out after {n_seqs * cfg.context} of 10000 tokens" in capsys.readouterr().out
    )
    a, b = _arrays(streamed["store"]), _arrays(known["store"])
    assert a["n_rows"] == n_seqs * cfg.context and a["n_seqs"] == n_seqs
    _assert_same(a, b)
    assert ActivationStore.open(streamed["store"]).verify() == []


def test_a_stop_after_the_store_shrank_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    cfg = _cfg(n_tokens=10_000, data={"source": "synthetic:mixed", "seed": 3, "max_docs": 30})
    n_rows = len(tokenize_all(cfg, byte_tokenizer())) * cfg.context
    last = (n_rows - 1) // cfg.shard_rows
    real_write = StoreClass.write_shard

    def stop_at_the_last_shard(m: pytest.MonkeyPatch) -> dict[str, Any]:
        def write_shard(self: ActivationStore, shard: int, *args: Any, **kwargs: Any) -> None:
            if shard == last:
                raise KeyboardInterrupt  # stopped before the partial last shard is written
            real_write(self, shard, *args, **kwargs)

        m.setattr(StoreClass, "write_shard", write_shard)
        return _tokens_after_store_creation(m)

    with pytest.raises(KeyboardInterrupt):
        _harvest(cfg, tmp_path / "run", stop_at_the_last_shard)
    st = ActivationStore.open(str(tmp_path / "run" / "store.zarr"))
    assert (
        not st.complete
        and st.n_rows == n_rows
        and last not in st.done_shards()
        and last - 1 in st.done_shards()
    )
    resumed, seen = _harvest(cfg, tmp_path / "run", _tokens_after_store_creation)
    assert seen["shrinks"] == []  # resumed at its shrunk size, where the data ends
    known, _ = _harvest(cfg, tmp_path / "known", _all_tokens_first)
    _assert_same(_arrays(resumed["store"]), _arrays(known["store"]))


def test_an_empty_data_set_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty or shorter than one sequence"):
        run_harvest(_cfg(data={"source": str(empty)}), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "store.zarr").exists()


def test_an_error_while_tokenizing_stops_the_harvest_in_one_line_and_keeps_what_was_written(
    tmp_path: Path,
) -> None:
    """A document the tokenizer cannot read, after the store is laid out: the harvest stops with
    the tokenizer's error, the shards written stay, and a rerun (data fixed) resumes."""
    cfg = _cfg()

    def breaks_after_40(m: pytest.MonkeyPatch) -> dict[str, Any]:
        seen = _tokens_after_store_creation(m)
        gated = token_feed.token_sequences

        def failing(*args: Any, **kwargs: Any) -> Iterator[np.ndarray]:
            for i, seq in enumerate(gated(*args, **kwargs)):
                if i == 40:
                    raise UserError("data: document 40 cannot be decoded; fix the file and rerun")
                yield seq

        m.setattr(token_feed, "token_sequences", failing)
        return seen

    with pytest.raises(UserError, match="document 40 cannot be decoded"):
        _harvest(cfg, tmp_path / "run", breaks_after_40)
    st = ActivationStore.open(str(tmp_path / "run" / "store.zarr"))
    assert not st.complete and st.done_shards() == {
        0,
        1,
    }  # sequences 0-39: rows 0-1279, shards 0 and 1
    resumed, _ = _harvest(cfg, tmp_path / "run", _tokens_after_store_creation)
    known, _ = _harvest(cfg, tmp_path / "known", _all_tokens_first)
    _assert_same(_arrays(resumed["store"]), _arrays(known["store"]))


def test_a_harvest_held_up_by_the_tokenizer_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the first 8, each sequence costs the tokenizer 0.02 s of the harvest's clock, spent
    while the harvest waits for it (the tokenizer starts on one only once a reader is blocked on
    it): 64 of them, 1.28 s of waiting, all of the harvest's time.  Nothing here depends on how fast
    the machine is: the clock is the test's and the tokenizer goes in step with the reader."""
    clock = FakeClock()
    feeds: list[TokenFeed] = []

    def slow_tokens(m: pytest.MonkeyPatch) -> None:
        real, start = token_feed.token_sequences, TokenFeed.start

        def recorded(cls: type, *args: Any, **kwargs: Any) -> TokenFeed:
            feeds.append(start(*args, **kwargs))
            return feeds[-1]

        def slow(*args: Any, **kwargs: Any) -> Iterator[np.ndarray]:
            for i, seq in enumerate(real(*args, **kwargs)):
                if i >= 8:
                    # sequence i is wanted and not there yet: the reader is blocked until it is
                    waited = 0
                    while feeds[-1].wanted <= i:
                        waited += 1
                        assert waited < 10**6, f"no reader ever waited for sequence {i}"
                        time.sleep(0.0001)
                    clock.advance(0.02)
                yield seq

        m.setattr(TokenFeed, "start", classmethod(recorded))
        m.setattr(token_feed, "token_sequences", slow)

    with pytest.MonkeyPatch.context() as m:
        slow_tokens(m)
        run_harvest(_cfg(), str(tmp_path / "run"), clock=clock)
    assert (
        "harvest: 1.3 s of it waiting for the tokenizer: tokenizing (one thread) limits this "
        "harvest"
    ) in capsys.readouterr().out
    assert feeds[-1].waited_s == pytest.approx(64 * 0.02)


def test_a_ring_of_a_few_sequences_gives_them_all_in_order() -> None:
    cfg = _cfg()
    tokens = tokenize_all(cfg, byte_tokenizer())
    feed = TokenFeed.start(cfg, byte_tokenizer(), window=5)
    assert feed.window == 5
    got, a = [], 0
    while a < len(tokens):
        b = min(a + 3, len(tokens))
        assert feed.wait_for(b) == b
        got.append(feed.seqs(a, b).copy())  # across the ring's end every other time
        assert feed.ready <= a + 5  # the tokenizer waits for room
        feed.release(b)
        a = b
    np.testing.assert_array_equal(np.concatenate(got), tokens)
    with pytest.raises(ValueError, match="not held"):
        feed.seqs(0, 2)  # released
    ring = TokenFeed.start(cfg, byte_tokenizer(), window=5)
    ring.wait_for(5)
    ring.release(3)
    assert ring.wait_for(8) == 8  # sequences 3-7 sit in slots 3, 4, 0, 1, 2
    np.testing.assert_array_equal(
        ring.token_rows(3 * 32 + 5, 7 * 32 + 7), tokens[3:8].reshape(-1)[5:135]
    )


def test_a_reader_asking_past_the_window_is_told_so() -> None:
    feed = TokenFeed.start(_cfg(), byte_tokenizer(), window=4)
    with pytest.raises(ValueError, match="beyond the feed's window"):
        feed.wait_for(10)
    feed.cancel()


@pytest.mark.parametrize("late", [False, True])
def test_a_harvest_holding_a_window_of_tokens_stores_the_same_bytes(
    tmp_path: Path, late: bool
) -> None:
    """The feed holds two batches plus a shard of sequences (42 of the 72), so the tokenizer waits
    for the harvest and sequences are overwritten once their shards are handed over; also when
    the data runs out and after a stop and resume."""
    ran_out = _cfg(n_tokens=10_000, data={"source": "synthetic:mixed", "seed": 3, "max_docs": 80})
    for cfg in (_cfg(), ran_out):
        known, _ = _harvest(cfg, tmp_path / f"known{cfg.n_tokens}", _all_tokens_first)

        def small_window(m: pytest.MonkeyPatch) -> dict[str, Any]:
            m.setattr(token_feed, "WINDOW_TOKENS", 0)
            return _tokens_after_store_creation(m) if late else {}

        windowed, _ = _harvest(cfg, tmp_path / f"windowed{cfg.n_tokens}", small_window)
        _assert_same(_arrays(windowed["store"]), _arrays(known["store"]))
    assert token_feed.window_seqs(_cfg(), 4, 512) == 2**24 // 32
    with pytest.MonkeyPatch.context() as m:
        m.setattr(token_feed, "WINDOW_TOKENS", 0)
        assert token_feed.window_seqs(_cfg(), 4, 512) == 42 < _cfg().n_seqs


def test_a_windowed_harvest_resumes_in_the_middle(tmp_path: Path) -> None:
    """Shards 1 and 3 missing: the resumed run skips the sequences it does not need, which the
    tokenizer overwrites to reach the later ones."""
    cfg = _cfg()
    known, _ = _harvest(cfg, tmp_path / "known", _all_tokens_first)
    run, _ = _harvest(cfg, tmp_path / "run", _all_tokens_first)
    st = ActivationStore.open(run["store"], mode="r+")
    for shard in (1, 3):
        st.group["progress/shard_done"][shard] = 0
    st.group.attrs["manifest"] = {**st.manifest, "complete": False}

    def small_window(m: pytest.MonkeyPatch) -> dict[str, Any]:
        m.setattr(token_feed, "WINDOW_TOKENS", 0)
        return _tokens_after_store_creation(m)

    resumed, _ = _harvest(cfg, tmp_path / "run", small_window)
    _assert_same(_arrays(resumed["store"]), _arrays(known["store"]))
