"""Shard buffers on the model's device: the cast, the range check and the statistics made there
equal the host's; on CUDA a harvest resumes to the same bytes and matches the CPU harvest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compsae.errors import UserError
from compsae.harvest.config import HarvestConfig
from compsae.harvest.run import run_harvest
from compsae.harvest.shards import HostShard, HostStaging, ShardBuffer, ShardWriter, rounding_error
from compsae.store import ActivationStore, StoreLayout
from compsae.store.activation_store import from_storage, shard_moments, to_storage

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _finish(buf: ShardBuffer, staging: HostStaging | None) -> HostShard:
    host = buf.finish(staging)
    host.wait()
    return host


STAGINGS = ["views", "staged"]  # the CPU's zero-copy views; host slots (pinned and async on CUDA)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("how", STAGINGS)
def test_buffer_gives_the_hosts_stored_values_and_moments(
    device: str, dtype: str, how: str
) -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(300, 24)).astype(np.float32) * 4)
    staging = (
        HostStaging(512, {"h": 24}, dtype, torch.device(device), slots=1)
        if how == "staged"
        else None
    )
    buf = ShardBuffer(300, {"h": 24}, dtype, torch.device(device))
    buf.fill(0, {"h": x[:120].to(device)})  # two batches, the second cut by the shard's end
    buf.fill(120, {"h": x[120:].to(device)})
    host = _finish(buf, staging)
    host.check()
    expect = to_storage(x.numpy(), dtype, "h")
    assert host.acts["h"].dtype == expect.dtype
    np.testing.assert_array_equal(host.acts["h"], expect)
    if device == "cpu":
        assert host.moments is None  # left to the writer thread
    else:
        assert host.moments is not None
        np.testing.assert_allclose(
            host.moments["h"], shard_moments(from_storage(expect, dtype)), rtol=1e-12, atol=1e-12
        )
    if staging is not None:  # one slot: the next shard gets it back only once this one is released
        assert staging.free.empty()
        host.release()
        assert staging.free.qsize() == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", STAGINGS)
def test_buffer_refuses_float16_overflow_and_nan(device: str, how: str) -> None:
    def staging(dtype: str) -> HostStaging | None:
        return (
            HostStaging(8, {"h": 4}, dtype, torch.device(device), slots=1)
            if how == "staged"
            else None
        )

    big = torch.zeros(8, 4)
    big[5, 2] = -7e4
    buf = ShardBuffer(8, {"blocks.0.hook_x": 4}, "float16", torch.device(device))
    buf.fill(0, {"blocks.0.hook_x": big.to(device)})
    host = _finish(
        buf,
        None
        if how == "views"
        else HostStaging(8, {"blocks.0.hook_x": 4}, "float16", torch.device(device), slots=1),
    )
    with pytest.raises(UserError, match="blocks.0.hook_x reach 7e\\+04.*bfloat16 or float32"):
        host.check()
    nan = torch.ones(8, 4)
    nan[1, 1] = float("nan")
    buf = ShardBuffer(8, {"h": 4}, "bfloat16", torch.device(device))
    buf.fill(0, {"h": nan.to(device)})
    with pytest.raises(UserError, match="NaN or inf"):
        _finish(buf, staging("bfloat16")).check()


def test_writer_hands_back_every_slot_after_an_error(tmp_path: Path) -> None:
    """A float16 overflow stops the writer; shards queued after it are drained and their host
    slots released, so the harvesting thread never waits forever for a slot."""
    store = ActivationStore.create(
        str(tmp_path / "s.zarr"),
        {"h": 4},
        32,
        StoreLayout(chunk_rows=8, shard_rows=8),
        {"config_hash": "t"},
    )
    staging = HostStaging(8, {"h": 4}, "float16", torch.device("cpu"), slots=2)
    writer = ShardWriter(store, 8)
    for shard in range(4):
        buf = ShardBuffer(8, {"h": 4}, "float16", torch.device("cpu"))
        buf.fill(0, {"h": torch.full((8, 4), 7e4 if shard == 1 else 1.0)})
        try:
            writer.put(
                shard, buf.finish(staging), np.zeros(8, np.int32)
            )  # blocks while both slots are taken
        except UserError:
            break
    with pytest.raises(UserError, match="reach 7e\\+04"):
        writer.close()
    assert staging.free.qsize() == 2 and store.done_shards() == {0}


def _cfg(device: str, **over: Any) -> HarvestConfig:
    base: dict[str, Any] = dict(
        model="tiny-neox",
        hooks=["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"],
        context=32,
        n_tokens=2300,
        batch_size=6,
        chunk_rows=128,
        shard_rows=512,
        device=device,
        data={"source": "synthetic:mixed", "seed": 3},
    )
    return HarvestConfig(**{**base, **over})


def _arrays(url: str) -> dict[str, np.ndarray]:
    st = ActivationStore.open(url)
    out = {f"acts/{h}": st.zarr_array(h)[:] for h in st.hooks}
    out.update({f"stats/{h}": st.group[f"progress/stats/{h}"][:] for h in st.hooks})
    out.update(
        tokens=st.tokens, seq_id=st.seq_id, pos=st.pos, crc=st.group["progress/shard_crc"][:]
    )
    return out


@needs_cuda
def test_cuda_harvest_resumes_to_the_same_bytes_and_matches_the_cpu(tmp_path: Path) -> None:
    full = run_harvest(_cfg("cuda"), str(tmp_path / "full"))

    def stop_after_shard_1(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_harvest(_cfg("cuda"), str(tmp_path / "resumed"), on_shard_written=stop_after_shard_1)
    resumed = run_harvest(_cfg("cuda"), str(tmp_path / "resumed"))
    a, b = _arrays(full["store"]), _arrays(resumed["store"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert ActivationStore.open(resumed["store"]).verify() == []

    cpu = run_harvest(_cfg("cpu"), str(tmp_path / "cpu"))
    gpu_st, cpu_st = ActivationStore.open(full["store"]), ActivationStore.open(cpu["store"])
    for h in gpu_st.hooks:
        g, c = gpu_st.read_rows(h, 0, gpu_st.n_rows), cpu_st.read_rows(h, 0, cpu_st.n_rows)
        np.testing.assert_allclose(g, c, rtol=1e-2, atol=1e-2 * np.abs(c).max())
        gs, cs = gpu_st.stats(h), cpu_st.stats(h)
        np.testing.assert_allclose(gs["mean"], cs["mean"], atol=1e-3 * np.abs(c).max())
        np.testing.assert_allclose(gs["var"], cs["var"], rtol=2e-2)
        assert gs["count"] == cs["count"] and gs["mean_norm"] == pytest.approx(
            cs["mean_norm"], rel=1e-3
        )


def _loop_inputs(device: str, tmp_path: Path) -> tuple[Any, ...]:
    """What `harvest_shards` takes, for a two-hook harvest read by compsae's own forward: (cfg,
    loaded, widths, stop, tokens, an empty store, batch 0's activations, which the rounding
    sample reads back on purpose)."""
    from compsae.harvest.run import tokenize_all
    from compsae.harvest.shards import measure_rounding
    from compsae.lm.models import check_hooks, load_model, stop_layer

    cfg = _cfg(device, hooks=["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"])
    loaded = load_model(cfg)
    widths = check_hooks(loaded, list(cfg.hooks), cfg.context)
    stop = stop_layer(list(cfg.hooks))
    tokens = tokenize_all(cfg, loaded.tokenizer)
    store = ActivationStore.create(
        str(tmp_path / "s.zarr"), widths, tokens.size, cfg.layout(), {"config_hash": "x"}
    )
    with torch.inference_mode():
        _rounding, batch0 = measure_rounding(cfg, loaded, tokens, widths, stop)
    return cfg, loaded, widths, stop, tokens, store, batch0


@needs_cuda
def test_the_harvest_loop_never_waits_for_the_gpu(tmp_path: Path) -> None:
    """The harvesting thread only launches work: a read of a CUDA value, or a copy from pageable
    memory (which first drains the GPU's queue), would leave the GPU idle at every batch."""
    from compsae.harvest.shards import harvest_shards

    cfg, loaded, widths, stop, tokens, store, batch0 = _loop_inputs("cuda", tmp_path)
    with torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            harvest_shards(
                store,
                cfg,
                loaded,
                tokens,
                widths,
                stop,
                range(store.n_shards),
                batch0=batch0,
                progress=False,
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    store.finalize()
    assert store.verify() == []


class HostReads(TorchDispatchMode):
    """Records, in the thread that enters it, every op that on a GPU would make the host wait for
    the device: a value read back (`float(t)`, `.item()`, `if t:`, boolean-mask indexing,
    nonzero) or a tensor made from host data other than a batch's token ids (`torch.tensor(...,
    device=cuda)` copies from pageable memory, which first drains the GPU's queue)."""

    READS = {
        "aten.item.default",
        "aten._local_scalar_dense.default",
        "aten.is_nonzero.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten.equal.default",
    }

    def __init__(self, token_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.token_shape = token_shape
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in self.READS or (
            name.startswith("aten.index.Tensor")
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        ):
            self.found.append(name)
        elif name == "aten.lift_fresh.default" and not (
            out.dtype in (torch.int32, torch.int64)
            and out.dim() == 2
            and out.shape[1:] == self.token_shape[1:]
            if self.token_shape
            else False
        ):
            self.found.append(f"{name} {tuple(out.shape)} {out.dtype}")
        return out


def test_shard_buffers_and_device_statistics_read_nothing_back() -> None:
    """The CPU stand-in for the CUDA test below, run everywhere: filling a shard, its device-side
    statistics and handing it to the host staging never read a value back nor upload host data
    (a row count made with torch.tensor once drained the GPU's queue at every shard)."""
    from compsae.harvest.shards import device_moments

    x = torch.randn(300, 24)
    staging = HostStaging(512, {"h": 24}, "float16", torch.device("cpu"), slots=1)
    with torch.inference_mode(), HostReads() as reads:
        buf = ShardBuffer(300, {"h": 24}, "float16", torch.device("cpu"))
        buf.fill(0, {"h": x[:120]})
        buf.fill(120, {"h": x[120:]})
        moments = device_moments(buf.data["h"])
        host = buf.finish(staging)
    assert reads.found == []
    host.check()
    np.testing.assert_allclose(
        moments.numpy(), shard_moments(host.acts["h"]), rtol=1e-12, atol=1e-12
    )


def test_the_harvest_loop_reads_nothing_back_on_any_device(tmp_path: Path) -> None:
    """The harvesting thread's torch ops over a whole CPU harvest (compsae's own forward, two hooks,
    batches straddling shards): none would make a GPU's host wait (`HostReads`)."""
    from compsae.harvest.shards import harvest_shards

    cfg, loaded, widths, stop, tokens, store, batch0 = _loop_inputs("cpu", tmp_path)
    with torch.inference_mode(), HostReads(token_shape=(cfg.batch_size, cfg.context)) as reads:
        harvest_shards(
            store,
            cfg,
            loaded,
            tokens,
            widths,
            stop,
            range(store.n_shards),
            batch0=batch0,
            progress=False,
        )
    assert reads.found == []
    store.finalize()
    assert store.verify() == []


def test_the_host_read_recorder_sees_what_it_looks_for() -> None:
    """`HostReads` is not blind: each kind of host wait it names is caught."""
    x = torch.randn(8)
    with HostReads(token_shape=(2, 4)) as reads:
        float(x.max())
        _ = x[x > 0]
        _ = torch.tensor([3.0])
        _ = torch.from_numpy(np.zeros((2, 4), dtype=np.int64))  # token ids: allowed
    assert len(reads.found) == 3 and "aten.lift_fresh.default (1,) torch.float32" in reads.found


def test_rounding_error_is_small_and_ordered():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(256, 32)).astype(np.float32))
    assert rounding_error(x, "float32", "h") == 0.0
    assert 0 < rounding_error(x, "float16", "h") < rounding_error(x, "bfloat16", "h") < 1e-2
    # the same error as storing the values and reading them back
    q = from_storage(to_storage(x.numpy(), "bfloat16", "h"), "bfloat16").astype(np.float64)
    expect = np.linalg.norm(x.numpy().astype(np.float64) - q) / np.linalg.norm(
        x.numpy().astype(np.float64)
    )
    assert rounding_error(x, "bfloat16", "h") == pytest.approx(expect, rel=1e-12)
    with pytest.raises(UserError, match="float16's range"):
        rounding_error(x * 1e5, "float16", "h")
