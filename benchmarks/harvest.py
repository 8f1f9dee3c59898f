"""Harvest throughput against the bare truncated forward pass, and bytes on disk against float32.

Same model, same tokens, same batches: (a) the transformers model's own forward over its layers up
to the deepest hook, no hook of any kind, output discarded; (b) the harvest's own forward,
`run_hooks` (compsae's GPT-NeoX forward for a GPT-NeoX, `--forward transformers` for forward hooks
on the transformers model as for any other architecture; the hooks' activations captured, then
discarded), the ceiling of a harvest limited by the model; (c) the full
harvest loop into a fresh store (device-side cast and statistics, device → host copies,
background shard writer, finalize).  Each is run `--repeats` times alternately; the best time of
each counts (the machine is shared, the minimum is the least disturbed measurement).

Then the writer side alone, as on a GPU (statistics computed beforehand): host shards of 16,384
rows stored by 1, 2 and `writer_threads` (auto on this device) shard writer threads, in MB/s of
activations and against what a harvest at the bare forward's pace must store (RESULT
shard_writes_mb_s_1thread, shard_writes_2threads_vs_1; alternating, best of 3 each).

Creating the empty store (Zarr metadata, a fixed cost a long harvest pays once) is timed on its
own line and left out of `harvest_vs_forward`; everything paid per token or per shard is in,
including the last shard's write that nothing overlaps and `finalize`.  With few shards (the
default 4 of 16,384 rows) that unoverlapped tail is a large part of the run: use `--tokens` to
see the steady state of a long harvest.

`--profile` (after the timed runs): one bare forward and one harvest under torch.profiler; on a
GPU it prints how busy each kept the device and charges every idle stretch of at least 50 µs to
the harvest phase the host was in (`gpu_timeline.py`); on a CPU, the host time of each phase.

Default model: Pythia-70m-shaped GPT-NeoX (d_model 512, 6 layers, 8 heads) with random weights —
the truncated forward costs the same as the real one; `--model smollm2-135m-shaped` is the offline
demo model's shape (random weights, nothing fetched), `--model smollm2-135m` the real LM.
`--batch-size auto` picks the batch as `harvest.batch_size: auto` does.

    python benchmarks/harvest.py --quick [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import fsspec
import numpy as np
import torch
from gpu_timeline import profile_region
from torch.profiler import ProfilerActivity, profile, record_function

from compsae.harvest.batch_size import auto_batch_size
from compsae.harvest.config import HarvestConfig
from compsae.harvest.run import _harvest_into, tokenize_all
from compsae.harvest.shards import device_tokens, writer_threads
from compsae.lm.byte_tokenizer import VOCAB_SIZE, byte_tokenizer
from compsae.lm.models import (
    LoadedModel,
    _bridge,
    check_hooks,
    eager_attention,
    load_model,
    resolve_device,
    stop_layer,
    tiny_neox_hf,
    tiny_neox_residual,
)
from compsae.store import ActivationStore


def shaped(hf: Any, name: str, device: torch.device, capture: Any = None) -> LoadedModel:
    """A random-weight transformers model as a LoadedModel with the byte tokenizer (byte ids are
    valid in any vocabulary, and no unembedding is run); `capture` reads the residual hooks (None:
    forward hooks on `hf`)."""
    tok = byte_tokenizer()
    hf = eager_attention(hf.to(device).eval())
    c = hf.config
    return LoadedModel(
        tokenizer=tok,
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_ctx=c.max_position_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        device=device,
        info={"name": name},
        hf_model=hf,
        wrap=lambda: _bridge(name, hf, tok).to(device).eval(),
        capture=capture,
        n_heads=c.num_attention_heads,
    )


def pythia70m_shaped(device: torch.device, forward: str = "compsae") -> LoadedModel:
    """Random-weight GPT-NeoX with Pythia-70m's dimensions; residual hooks read by compsae's own
    forward (as a harvest of a GPT-NeoX folder does) or by forward hooks on the transformers
    model."""
    dims = {"d_model": 512, "n_layers": 6, "n_heads": 8, "n_ctx": 2048}
    native = tiny_neox_residual(0, VOCAB_SIZE, device, **dims) if forward == "compsae" else None
    return shaped(tiny_neox_hf(0, VOCAB_SIZE, **dims), "pythia70m-shaped", device, capture=native)


def smollm2_shaped(device: torch.device, forward: str = "compsae") -> LoadedModel:
    """Random-weight Llama with SmolLM2-135M's dimensions (576 wide, 30 layers, 9 heads, 3 key-value
    heads): the offline demo model's cost without its 240 MB of wheels (forward hooks: compsae has
    no Llama forward of its own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = LlamaForCausalLM(config)
    return shaped(hf, "smollm2-135m-shaped", device)


SHAPED = {"pythia70m-shaped": pythia70m_shaped, "smollm2-135m-shaped": smollm2_shaped}


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a timer stops when the work is done, not when it is
    queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(
    loaded: LoadedModel, tokens: np.ndarray, batch_size: int, stop: int | None
) -> float:
    """Seconds for truncated forward passes over `tokens` (host → device copy included, made as the
    harvest), outputs discarded: the transformers model's own forward over its first `stop`
    layers, no hook of any kind (the wrapper's forward when there is no transformers model)."""
    has_hf = loaded.hf_model is not None or loaded.load_hf is not None
    base = loaded.transformers_model().base_model if has_hf else None
    layers = base.layers if base is not None else None
    synchronize(loaded.device)
    t0 = time.perf_counter()
    try:
        if base is not None and stop is not None:
            base.layers = layers[:stop]
        with torch.inference_mode(), record_function("bench.forward"):
            for b in range(0, len(tokens), batch_size):
                batch = device_tokens(tokens[b : b + batch_size], loaded.device)
                if base is not None:
                    base(input_ids=batch)
                else:
                    loaded.model(batch, stop_at_layer=stop)
            synchronize(loaded.device)
    finally:
        if base is not None:
            base.layers = layers
    return time.perf_counter() - t0


def hooked_forward(
    loaded: LoadedModel, tokens: np.ndarray, batch_size: int, hooks: list[str], stop: int | None
) -> float:
    """Seconds for the harvest's own forward passes (`run_hooks`: activations captured), outputs
    discarded: what a harvest costs when the store costs nothing."""
    synchronize(loaded.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(tokens), batch_size):
            batch = device_tokens(tokens[b : b + batch_size], loaded.device)
            loaded.run_hooks(batch, hooks, stop)
    synchronize(loaded.device)
    return time.perf_counter() - t0


def full_harvest(
    cfg: HarvestConfig,
    loaded: LoadedModel,
    tokens: np.ndarray,
    widths: dict[str, int],
    stop: int | None,
    url: str,
) -> tuple[float, float, ActivationStore]:
    """Seconds to create an empty store at `url`, and seconds for the harvest loop into it (write
    every shard, finalize); prints where the loop's time went besides the forward passes."""
    with torch.inference_mode():
        synchronize(loaded.device)
        t0 = time.perf_counter()
        store = ActivationStore.create(
            url, widths, tokens.size, cfg.layout(), {"config_hash": "bench"}, overwrite=True
        )
        t1 = time.perf_counter()
        with record_function("bench.harvest"):
            [waits] = _harvest_into(store, cfg, loaded, tokens, widths, stop, None)
            synchronize(loaded.device)
        t2 = time.perf_counter()
    print(
        f"  harvest {t2 - t1:.3f} s: shard loop {waits.total:.3f} s (handing shards over blocked "
        f"{waits.blocked:.3f} s, "
        f"the last shards' writes after the last forward {waits.tail:.3f} s, writers busy "
        f"{waits.writer_busy:.0%}), "
        f"before and after the loop (rounding sample, finalize) {t2 - t1 - waits.total:.3f} s"
    )
    return t1 - t0, t2 - t1, store


def shard_write_rate(
    widths: dict[str, int], dtype: str, shard_rows: int, n_shards: int, threads: int, tmp: str
) -> float:
    """Bytes of activations per second that `threads` shard writers store (host data, no model):
    the ceiling the writer side puts on a harvest."""
    from compsae.harvest.shards import HostShard, ShardWriter
    from compsae.store.moments import shard_moments

    rng = np.random.default_rng(0)
    acts = {
        h: rng.normal(size=(shard_rows, w)).astype(np.float16 if dtype == "float16" else np.float32)
        for h, w in widths.items()
    }
    moments = {
        h: shard_moments(a) for h, a in acts.items()
    }  # a GPU harvest computes them on the device
    layout = HarvestConfig(
        shard_rows=shard_rows, chunk_rows=min(1024, shard_rows), dtype=dtype
    ).layout()
    store = ActivationStore.create(
        f"{tmp}/writes.zarr",
        widths,
        shard_rows * n_shards,
        layout,
        {"config_hash": "bench"},
        overwrite=True,
    )
    tokens = np.zeros(shard_rows, dtype=np.int32)
    t0 = time.perf_counter()
    writer = ShardWriter(store, 128, threads=threads)
    for shard in range(n_shards):
        writer.put(
            shard,
            HostShard(
                acts=acts, moments=moments, peaks=np.zeros(len(acts), np.float32), dtype=dtype
            ),
            tokens,
        )
    writer.close()
    seconds = time.perf_counter() - t0
    return sum(a.nbytes for a in acts.values()) * n_shards / seconds


def profiled(
    cfg: HarvestConfig,
    loaded: LoadedModel,
    tokens: np.ndarray,
    widths: dict[str, int],
    stop: int | None,
    url: str,
    tmp: str,
) -> str:
    """One bare forward and one harvest under torch.profiler: where each one's GPU time went."""
    trace = f"{tmp}/trace.json"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bare_forward(loaded, tokens, cfg.batch_size, stop)
        full_harvest(cfg, loaded, tokens, widths, stop, url)
    prof.export_chrome_trace(trace)
    return "\n".join(
        [profile_region(trace, "bench.forward"), profile_region(trace, "bench.harvest")]
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small run, under a minute")
    ap.add_argument(
        "--model",
        default="pythia70m-shaped",
        help="pythia70m-shaped | smollm2-135m-shaped (random weights) | tiny-neox | smollm2-135m",
    )
    ap.add_argument(
        "--hook", action="append", help="hook(s) to harvest (default blocks.3.hook_resid_post)"
    )
    ap.add_argument("--tokens", type=int, help="tokens to harvest")
    ap.add_argument("--batch-size", default="16", help="sequences per forward pass, or auto")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--compressor", default="none", choices=["none", "zstd"])
    ap.add_argument(
        "--repeats", type=int, help="runs of each measurement (default 2 with --quick, else 3)"
    )
    ap.add_argument(
        "--writer-threads", default="auto", help="threads writing shards (harvest.writer_threads)"
    )
    ap.add_argument(
        "--forward",
        default="compsae",
        choices=["compsae", "transformers"],
        help="what reads the residual hooks of pythia70m-shaped: compsae's GPT-NeoX forward (as a "
        "harvest does) or forward hooks on the transformers model",
    )
    ap.add_argument(
        "--no-writer-rates",
        action="store_true",
        help="skip the shard writers' own rates (shard_writes_* lines)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the timed runs, one bare forward and one harvest under torch.profiler: the "
        "GPU's "
        "busy and idle time, and the harvest phase behind each idle gap (on a CPU: the host phases "
        "only)",
    )
    ap.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (auto: CUDA when available)",
    )
    args = ap.parse_args()
    device = resolve_device(args.device)

    n_tokens = args.tokens or (6_144 if args.quick else 131_072)
    repeats = args.repeats or (2 if args.quick else 3)
    hooks = args.hook or ["blocks.3.hook_resid_post"]
    shard_rows = 2048 if args.quick else 16_384
    cfg = HarvestConfig(
        model="tiny-neox" if args.model in SHAPED else args.model,
        hooks=hooks,
        context=128,
        n_tokens=n_tokens,
        batch_size=16,
        dtype=args.dtype,
        chunk_rows=1024,
        shard_rows=shard_rows,
        compressor=args.compressor,
        device=device.type,
        writer_threads=args.writer_threads
        if args.writer_threads == "auto"
        else int(args.writer_threads),
        data={"source": "synthetic:mixed", "seed": 0},
    )
    torch.set_grad_enabled(False)
    loaded = SHAPED[args.model](device, args.forward) if args.model in SHAPED else load_model(cfg)
    widths = check_hooks(loaded, hooks, cfg.context)
    stop = stop_layer(hooks)
    tokens = tokenize_all(cfg, loaded.tokenizer)
    if args.batch_size == "auto":
        args.batch_size = auto_batch_size(loaded, hooks, tokens, stop, cfg.shard_rows)
    args.batch_size = int(args.batch_size)
    cfg = cfg.model_copy(update={"batch_size": args.batch_size})
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"model {args.model} on {where}, hooks {hooks}, stop_at_layer {stop}, {tokens.size} "
        "tokens, "
        f"batch {args.batch_size}, {writer_threads(cfg, device)} writer thread(s), hooks read by "
        f"{type(loaded.capture).__name__ if loaded.captures(hooks) else 'transformer_lens'}"
    )
    bare_forward(loaded, tokens[: args.batch_size], args.batch_size, stop)  # warm-up

    forward_s, hooked_s, create_s, harvest_s = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/bench.zarr"
        for _ in range(repeats):
            forward_s.append(bare_forward(loaded, tokens, args.batch_size, stop))
            hooked_s.append(hooked_forward(loaded, tokens, args.batch_size, hooks, stop))
            created, seconds, store = full_harvest(cfg, loaded, tokens, widths, stop, url)
            create_s.append(created)
            harvest_s.append(seconds)
        if args.profile:
            print(profiled(cfg, loaded, tokens, widths, stop, url, tmp))
        fs, path = fsspec.core.url_to_fs(url)
        act_bytes = fs.du(f"{path}/acts", total=True)
        fp32_bytes = sum(store.n_rows * d * 4 for d in widths.values())
        write_rates = dict.fromkeys(sorted({1, 2, writer_threads(cfg, device)}), 0.0)
        # alternating, best of each: the page cache makes single runs erratic
        for _ in range(0 if args.no_writer_rates else max(3, repeats)):
            for n in write_rates:
                write_rates[n] = max(
                    write_rates[n], shard_write_rate(widths, args.dtype, 16_384, 16, n, tmp)
                )
    fwd_tps, hooked_tps, hv_tps = (tokens.size / min(t) for t in (forward_s, hooked_s, harvest_s))
    itemsize = 4 if args.dtype == "float32" else 2
    stored_mb_s = tokens.size * sum(widths.values()) * itemsize / min(harvest_s) / 1e6

    def runs(times: list[float]) -> str:
        return ", ".join(f"{t:.2f}s" for t in times)

    print(f"bare truncated forward:    {fwd_tps:,.0f} tokens/s (runs: {runs(forward_s)})")
    print(f"forward with hook capture: {hooked_tps:,.0f} tokens/s (runs: {runs(hooked_s)})")
    print(
        f"full harvest:              {hv_tps:,.0f} tokens/s (runs: {runs(harvest_s)}), "
        f"{stored_mb_s:,.0f} MB/s of activations stored"
    )
    print(f"store creation (once per harvest, not in the ratios): {min(create_s) * 1e3:.0f} ms")
    print(f"activation bytes on disk: {act_bytes:,} vs float32 {fp32_bytes:,}")
    needed = (
        fwd_tps * sum(widths.values()) * itemsize
    )  # bytes/s a harvest at the bare forward's pace stores
    if not args.no_writer_rates:
        for n, rate in write_rates.items():
            print(
                f"shard writers, {n} thread(s): {rate / 1e6:,.0f} MB/s of activations "
                f"({rate / needed:.2f}x what the bare forward's pace needs)"
            )
        print(f"RESULT shard_writes_mb_s_1thread={write_rates[1] / 1e6:.0f}")
        print(f"RESULT shard_writes_2threads_vs_1={write_rates[2] / write_rates[1]:.2f}")
    print(f"RESULT harvest_vs_forward={hv_tps / fwd_tps:.3f}")
    print(f"RESULT harvest_vs_hooked_forward={hv_tps / hooked_tps:.3f}")
    print(f"RESULT bytes_vs_fp32={act_bytes / fp32_bytes:.3f}")


if __name__ == "__main__":
    main()
