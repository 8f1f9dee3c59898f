"""compsae against SAELens, side by side: caching one hook's activations, as whole processes.

The peer is SAELens' `CacheActivationsRunner` (the tool a user would otherwise pick to store LM
activations), needs the optional extra `bench` (`pip install -e .[bench]`); this script installs
nothing.  Same model, text, hook, context and batch for both:

- model: a random-weight GPT-NeoX with Pythia-70m-deduped's exact shape (d_model 512, 6 layers, 8
  heads, rotary on 1/4 of each head, vocabulary 50,304) and the GPT-NeoX-20B tokenizer (from the
  offline assets), written once as a local Hugging Face folder and as a hub-style cache entry of
  `EleutherAI/pythia-70m-deduped` (`refs/main` + `snapshots/<rev>/`) that both tools load by the
  name a user gives them (`pythia-70m-deduped`: SAELens through transformer_lens, compsae from the
  snapshot's safetensors) with `HF_HUB_OFFLINE=1`: no hub is reached.  Random weights cost the
  same forward as the real ones.
- text: HellaSwag's validation split (offline assets) as a local JSONL file with a `text` field.
- `blocks.3.hook_resid_post`, context 128, batch 32 sequences.

Every measurement is a fresh process, the tools alternating within each round (the order
reverses every round; the best of the rounds counts: the machine is shared):
  SAELens at float32 (its default) and float16; `compsae harvest` (float16); the bare truncated
  forward (the HF model's first 4 layers, no hooks, nothing stored: the ceiling).
Reported: tokens/s of each as a whole process (start-up, model load, tokenizing, writing and
finalize included) and of its loop alone, bytes per token on disk, and the measured yes/no of
what SAELens cannot do here (resume after `kill -9`, store exactly the tokens asked for, several
hooks in one pass).

    python benchmarks/peer_saelens.py --quick [--device cuda]   # 16,384 tokens: 9 processes of
    ~10-30 s each python benchmarks/peer_saelens.py --tokens 102400 --rounds 2

Ends with RESULT lines: compsae_vs_saelens (whole-process tokens/s, compsae / SAELens float16),
compsae_vs_saelens_default (against SAELens float32), compsae_bytes_vs_saelens_default (bytes per
token on disk), compsae_vs_bare_forward (compsae's loop / the bare forward), compsae_outside_loop_s
(compsae process time outside its loop) and saelens_outside_loop_s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = "blocks.3.hook_resid_post"
HOOK2 = "blocks.1.hook_resid_post"
CONTEXT = 128
HUB_NAME = "EleutherAI/pythia-70m-deduped"
TL_NAME = "pythia-70m-deduped"
REVISION = "0" * 40  # the snapshot folder's name in the hub-style cache


# ---------------------------------------------------------------------------------------------
# Assets (built once per work folder)


def prepare(work: Path) -> None:
    """Model folder, hub-style cache and JSONL text under `work` (skipped when already there)."""
    model_dir, data = work / "model", work / "data" / "hellaswag.jsonl"
    if not (model_dir / "model.safetensors").exists():
        import torch
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

        from compsae.lm.offline_assets import NEOX_TOKENIZER, asset_path

        config = GPTNeoXConfig(  # Pythia-70m-deduped's config.json, values as published
            vocab_size=50304,
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            intermediate_size=2048,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            rotary_emb_base=10000,
            use_parallel_residual=True,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        tmp = work / "model.part"
        GPTNeoXForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(asset_path(NEOX_TOKENIZER)),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
        tok.save_pretrained(tmp)
        os.replace(tmp, model_dir)
    repo = work / "hf" / "hub" / f"models--{HUB_NAME.replace('/', '--')}"
    if not (repo / "refs" / "main").exists():
        snap = repo / "snapshots" / REVISION
        snap.mkdir(parents=True, exist_ok=True)
        for f in model_dir.iterdir():
            if not (snap / f.name).exists():
                os.symlink(f, snap / f.name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(REVISION)
    if not data.exists():
        import datasets

        from compsae.lm.offline_assets import hellaswag_dir

        data.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{data}.part", "w") as out:
            for row in datasets.load_from_disk(str(hellaswag_dir())):
                # as compsae's offline:hellaswag
                text = f"{row['ctx']} {row['endings'][int(row['label'])]}"
                out.write(json.dumps({"text": text}) + "\n")
        os.replace(f"{data}.part", data)


def child_env(work: Path) -> dict[str, str]:
    """Environment of every measured process: offline, no progress bars, the hub-style cache."""
    env = dict(
        os.environ,
        HF_HOME=str(work / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TQDM_DISABLE="1",
        TOKENIZERS_PARALLELISM="true",
        HF_DATASETS_CACHE=str(work / "datasets-cache"),
        PYTHONUNBUFFERED="1",
    )
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return env


def folder_bytes(path: Path, sub: str = "") -> int:
    """Bytes of the files under `path/sub`."""
    return sum(
        f.stat().st_size for f in (path / sub).rglob("*") if f.is_file() and not f.is_symlink()
    )


# ---------------------------------------------------------------------------------------------
# The measured processes


def _without_wandb() -> None:
    """SAELens imports wandb at import time for its training loop; caching never calls it.  Where
    wandb is not installed (the GPU machine: 20 MB of wheels and their own dependencies), an empty
    module stands in for it."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        import importlib.machinery
        import types

        stub = types.ModuleType("wandb")
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = stub


def saelens_child(args: argparse.Namespace) -> None:
    """Run SAELens' CacheActivationsRunner once (in a fresh process); print a JSON result line."""
    _without_wandb()
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    bytes_per_token = 512 * (4 if args.dtype == "float32" else 2)
    cfg = CacheActivationsRunnerConfig(
        dataset_path=str(Path(args.work) / "data"),
        model_name=TL_NAME,
        model_batch_size=args.batch_size,
        hook_name=args.hooks.split(",") if "," in args.hooks else args.hooks,
        d_in=512,
        training_tokens=args.tokens,
        context_size=CONTEXT,
        new_cached_activations_path=args.out,
        dtype=args.dtype,
        device=args.device,
        prepend_bos=True,
        # one buffer = one compsae shard (16,384 tokens): SAELens stores whole buffers
        buffer_size_gb=16_384 * bytes_per_token / 1e9,
    )
    runner = CacheActivationsRunner(cfg)
    t0 = time.perf_counter()
    dataset = runner.run()
    loop = time.perf_counter() - t0
    tokens = len(dataset) * cfg.sliced_context_size  # a row of its dataset is one sequence
    print("CHILD " + json.dumps({"loop_s": loop, "tokens": tokens}), flush=True)


def bare_child(args: argparse.Namespace) -> None:
    """The HF model's first 4 layers over `tokens` random sequences in batches, nothing kept."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    model = (
        AutoModelForCausalLM.from_pretrained(Path(args.work) / "model", dtype=torch.float32)
        .to(device)
        .eval()
    )
    model.config._attn_implementation = "eager"  # as both tools run it
    base = model.base_model
    base.layers = base.layers[:4]  # truncated: blocks 0..3, as a harvest of blocks.3 runs
    tokens = torch.randint(0, 50_000, (args.tokens // CONTEXT, CONTEXT))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base(input_ids=tokens[: args.batch_size].to(device))  # warm-up
    sync()
    t0 = time.perf_counter()
    for b in range(0, len(tokens), args.batch_size):
        base(input_ids=tokens[b : b + args.batch_size].to(device))
    sync()
    print(
        "CHILD " + json.dumps({"loop_s": time.perf_counter() - t0, "tokens": int(tokens.numel())}),
        flush=True,
    )


def compsae_config(work: Path, tokens: int, batch_size: int, device: str, hooks: list[str]) -> Path:
    """A pipelines file with one pipeline `peer` (the harvest stage only)."""
    import yaml

    path = work / f"pipelines-{len(hooks)}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "runs_root": str(work / "runs"),
                "pipelines": {
                    "peer": {
                        "harvest": {
                            "model": TL_NAME,
                            "hooks": hooks,
                            "data": {"source": str(work / "data" / "hellaswag.jsonl")},
                            "context": CONTEXT,
                            "n_tokens": tokens,
                            "batch_size": batch_size,
                            "dtype": "float16",
                            "device": device,
                        }
                    }
                },
            }
        )
    )
    return path


def timed(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float, str, int]:
    """(wall seconds, output, exit code) of a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, proc.stdout + proc.stderr, proc.returncode


def child_result(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("CHILD ")]
    return json.loads(lines[-1][6:])


def compsae_loop(out: str) -> tuple[int, float]:
    """(tokens, seconds) from compsae harvest's own line `harvest: N tokens in S s (...)`."""
    for line in out.splitlines():
        if line.startswith("harvest: ") and " tokens in " in line:
            n, rest = line[len("harvest: ") :].split(" tokens in ")
            return int(n.replace(",", "")), float(rest.split(" s ")[0])
    raise RuntimeError("compsae harvest printed no timing line:\n" + out[-2000:])


def run_saelens(
    work: Path,
    env: dict[str, str],
    args: argparse.Namespace,
    dtype: str,
    tag: str,
    hooks: str = HOOK,
    tokens: int | None = None,
) -> dict:
    out_dir = work / "saelens" / tag
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "saelens",
        "--work",
        str(work),
        "--dtype",
        dtype,
        "--out",
        str(out_dir),
        "--tokens",
        str(tokens or args.tokens),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--hooks",
        hooks,
    ]
    wall, out, rc = timed(cmd, env, args.timeout)
    if rc != 0:
        return {"ok": False, "error": out.strip().splitlines()[-1] if out.strip() else f"exit {rc}"}
    res = child_result(out)
    res.update(ok=True, wall_s=wall, bytes=folder_bytes(out_dir))
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


def run_compsae(work: Path, env: dict[str, str], args: argparse.Namespace, tag: str) -> dict:
    cfg = compsae_config(work, args.tokens, args.batch_size, args.device, [HOOK])
    shutil.rmtree(work / "runs", ignore_errors=True)
    wall, out, rc = timed(
        [sys.executable, "-m", "compsae.cli", "harvest", "-c", str(cfg), "-p", "peer"],
        env,
        args.timeout,
    )
    if rc != 0:
        return {"ok": False, "error": out.strip().splitlines()[-1] if out.strip() else f"exit {rc}"}
    tokens, loop = compsae_loop(out)
    store = next((work / "runs" / "peer").glob("harvest-*/store.zarr"))
    res = {
        "ok": True,
        "wall_s": wall,
        "loop_s": loop,
        "tokens": tokens,
        "bytes": folder_bytes(store),
        "act_bytes": folder_bytes(store, "acts"),
    }
    shutil.rmtree(work / "runs", ignore_errors=True)
    return res


def run_bare(work: Path, env: dict[str, str], args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "bare",
        "--work",
        str(work),
        "--tokens",
        str(args.tokens),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
    ]
    wall, out, rc = timed(cmd, env, args.timeout)
    if rc != 0:
        return {"ok": False, "error": out.strip().splitlines()[-1] if out.strip() else f"exit {rc}"}
    return {"ok": True, "wall_s": wall, **child_result(out)}


# ---------------------------------------------------------------------------------------------
# Capabilities, measured


def kill_when(proc: subprocess.Popen, ready: callable, timeout: float) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False when it ended (or timed out) first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return False


def compsae_capabilities(
    work: Path, env: dict[str, str], args: argparse.Namespace, tokens: int
) -> dict[str, str]:
    """Two hooks in one harvest, killed -9 after its first shard, then rerun: resumes, holds both
    hooks and exactly the tokens asked for?"""
    cfg = compsae_config(work, tokens, args.batch_size, args.device, [HOOK, HOOK2])
    shutil.rmtree(work / "runs", ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "compsae.cli",
        "harvest",
        "-c",
        str(cfg),
        "-p",
        "peer",
        "--set",
        "harvest.shard_rows=4096",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def one_shard_done() -> (
        bool
    ):  # a shard's completion mark is a chunk file of progress/shard_done
        return any((work / "runs" / "peer").glob("harvest-*/store.zarr/progress/shard_done/c/*"))

    killed = kill_when(proc, one_shard_done, args.timeout)
    wall, out, rc = timed(cmd, env, args.timeout)
    found: dict[str, str] = {}
    if rc == 0:
        n, _ = compsae_loop(out)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from compsae.store import ActivationStore

        store = ActivationStore.open(
            str(next((work / "runs" / "peer").glob("harvest-*/store.zarr")))
        )
        found["resume_after_kill9"] = (
            "yes" if killed and n < store.n_rows and store.complete else "no"
        )
        found["exact_token_count"] = "yes" if store.n_rows == tokens else "no"
        found["hooks_in_one_pass"] = str(len(store.hooks)) if store.complete else "0"
    shutil.rmtree(work / "runs", ignore_errors=True)
    return found


def saelens_capabilities(
    work: Path, env: dict[str, str], args: argparse.Namespace, tokens: int
) -> dict[str, str]:
    """SAELens killed -9 once it has written a buffer, then rerun with the same command; and two
    hooks asked for in one config."""
    out_dir = work / "saelens" / "kill"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "saelens",
        "--work",
        str(work),
        "--dtype",
        "float16",
        "--out",
        str(out_dir),
        "--tokens",
        str(tokens),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--hooks",
        HOOK,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = kill_when(
        proc, lambda: any((out_dir / ".tmp_shards").glob("shard_*/dataset_info.json")), args.timeout
    )
    _, out, rc = timed(cmd, env, args.timeout)
    # a rerun that succeeds starts over (nothing of the killed run is kept), so it is also what a
    # fresh run of a count that is no whole number of buffers stores
    stored = child_result(out)["tokens"] if rc == 0 else None
    resumed = killed and stored is not None and stored >= tokens
    two = run_saelens(
        work, env, args, "float16", "two-hooks", hooks=f"{HOOK},{HOOK2}", tokens=tokens
    )
    if (
        stored is None
    ):  # the rerun failed (it refuses the killed run's folder): a fresh run of that count
        one = run_saelens(work, env, args, "float16", "exact", tokens=tokens)
        stored = one["tokens"] if one["ok"] else None
    shutil.rmtree(work / "saelens", ignore_errors=True)
    found = {
        "resume_after_kill9": "yes" if resumed else "no",
        "hooks_in_one_pass": "2" if two["ok"] else "1",
    }
    if stored is not None:
        found["exact_token_count"] = (
            f"{'yes' if stored == tokens else 'no'} ({stored:,} stored for {tokens:,} asked)"
        )
    return found


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="16,384 tokens, one round, small capability runs"
    )
    ap.add_argument(
        "--tokens", type=int, help="tokens asked of each tool (default 102,400; --quick 16,384)"
    )
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 2; --quick 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--work", help="folder for the model, cache and text (default: a temporary one)"
    )
    ap.add_argument(
        "--no-capabilities", action="store_true", help="skip the kill -9 / hooks / count checks"
    )
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed to each process")
    ap.add_argument("--child", choices=["saelens", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--hooks", default=HOOK, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.tokens = args.tokens or 16_384
        (saelens_child if args.child == "saelens" else bare_child)(args)
        return
    try:
        _without_wandb()
        import sae_lens  # noqa: F401  (the check only; children import it)
    except ImportError:
        sys.exit(
            "SAELens is not installed: pip install -e '.[bench]' (this script installs nothing)"
        )
    # quick: one SAELens buffer as configured here (it stores whole buffers), so both tools store
    # the same count and neither spreads its start-up over more tokens than the other
    args.tokens = args.tokens or (16_384 if args.quick else 102_400)
    rounds = args.rounds or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        prepare(work)
        env = child_env(work)
        print(
            f"assets ready in {time.perf_counter() - t0:.1f} s; {args.tokens:,} tokens asked, "
            "batch "
            f"{args.batch_size} x {CONTEXT}, {HOOK}, device {args.device}, {os.cpu_count()} cpus",
            flush=True,
        )
        runs: dict[str, list[dict]] = {
            k: [] for k in ("saelens_fp32", "saelens_fp16", "compsae", "bare")
        }
        order = list(runs)
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                if name == "compsae":
                    res = run_compsae(work, env, args, f"r{r}")
                elif name == "bare":
                    res = run_bare(work, env, args)
                else:
                    res = run_saelens(
                        work, env, args, "float32" if name == "saelens_fp32" else "float16", f"r{r}"
                    )
                runs[name].append(res)
                if res["ok"]:
                    print(
                        f"round {r} {name:<13} {res['tokens']:>9,} tokens  whole process "
                        f"{res['wall_s']:6.1f} s "
                        f"({res['tokens'] / res['wall_s']:7,.0f} tokens/s)  loop "
                        f"{res['loop_s']:6.1f} s "
                        f"({res['tokens'] / res['loop_s']:7,.0f} tokens/s)"
                        + (
                            f"  {res['bytes'] / res['tokens']:,.0f} bytes/token"
                            if "bytes" in res
                            else ""
                        ),
                        flush=True,
                    )
                else:
                    print(f"round {r} {name}: FAILED: {res['error']}", flush=True)
        caps: dict[str, dict[str, str]] = {}
        if not args.no_capabilities:
            small = (
                2 * 4096 + 1024 if args.quick else 8 * 4096 + 1024
            )  # whole sequences, not whole batches
            caps["compsae"] = compsae_capabilities(work, env, args, small)
            caps["saelens"] = saelens_capabilities(work, env, args, small)

    def best(name: str, key: str = "wall_s") -> float | None:
        ok = [r["tokens"] / r[key] for r in runs[name] if r["ok"]]
        return max(ok) if ok else None

    def bytes_per_token(name: str) -> float | None:
        ok = [r["bytes"] / r["tokens"] for r in runs[name] if r["ok"]]
        return min(ok) if ok else None

    c, s16, s32, bare = (
        best("compsae"),
        best("saelens_fp16"),
        best("saelens_fp32"),
        best("bare", "loop_s"),
    )
    c_loop = best("compsae", "loop_s")
    for name, tool in (
        ("compsae", "compsae"),
        ("saelens_fp16", "saelens"),
    ):  # from the timed runs too
        cached = sorted({r["tokens"] for r in runs[name] if r["ok"]})
        if cached and "exact_token_count" not in caps.get(tool, {}):
            exact = "yes" if cached == [args.tokens] else "no"
            caps.setdefault(tool, {})["exact_token_count"] = (
                f"{exact} ({', '.join(f'{c:,}' for c in cached)} stored for {args.tokens:,} asked)"
            )
    for tool, found in caps.items():
        for what, value in found.items():
            print(f"capability {tool} {what}: {value}")
    if c and s16:
        print(f"RESULT compsae_vs_saelens={c / s16:.3f}")
    if c and s32:
        print(f"RESULT compsae_vs_saelens_default={c / s32:.3f}")
    if bytes_per_token("compsae") and bytes_per_token("saelens_fp32"):
        ratio = bytes_per_token("compsae") / bytes_per_token("saelens_fp32")
        print(f"RESULT compsae_bytes_vs_saelens_default={ratio:.3f}")
    if c_loop and bare:
        print(f"RESULT compsae_vs_bare_forward={c_loop / bare:.3f}")
    for name, key in (
        ("compsae", "compsae_outside_loop_s"),
        ("saelens_fp16", "saelens_outside_loop_s"),
    ):
        ok = [r["wall_s"] - r["loop_s"] for r in runs[name] if r["ok"]]
        if ok:
            print(f"RESULT {key}={min(ok):.2f}")


if __name__ == "__main__":
    main()
