"""Start-up of the `compsae` command, and the library floor under it: every figure a fresh process.

What a short harvest spends outside its loop is mostly importing torch and transformers' model
code, which any tool that runs a `transformers` model pays.  This measures that floor next to
compsae's own commands, each in a fresh interpreter (the best of `--repeats`):

- `import torch`; then `tokenizers` and `safetensors` (all a forward of the residual stream over
  the weights would need beside torch); then `import transformers`; then the GPT-NeoX modeling
  module (what loading a Pythia-shaped model imports), each timed inside the process after the
  previous ones;
- `compsae --help` and `compsae status -p tiny` (nothing run yet), whole processes: neither
  imports torch;
- `compsae harvest -p tiny` (tiny-neox, synthetic text), whole process, and its time outside the
  harvest loop (the process's wall time minus the loop's own line).

    python benchmarks/startup.py --quick     # ~1 minute
Ends with RESULT lines: startup_import_torch_s, startup_import_tokenizers_safetensors_s,
startup_import_transformers_s,
startup_import_neox_modeling_s, startup_help_s, startup_status_s, startup_harvest_tiny_s and
startup_harvest_tiny_outside_loop_s (goal for the harvest's outside-the-loop time: 3 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import safetensors.torch, tokenizers
t2 = time.perf_counter()
import transformers
t3 = time.perf_counter()
from transformers.models.gpt_neox import modeling_gpt_neox
t4 = time.perf_counter()
print("CHILD " + json.dumps({"torch": t1 - t0, "tokenizers_safetensors": t2 - t1,
                             "transformers": t3 - t2, "neox_modeling": t4 - t3}))
"""


def env() -> dict[str, str]:
    """Offline, no progress bars, this checkout first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")


def wall(cmd: list[str], cwd: str) -> tuple[float, str]:
    """(seconds, output) of a fresh process; raises when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return seconds, proc.stdout + proc.stderr


def harvest_loop_s(out: str) -> float:
    """The harvest's own timing line, `harvest: N tokens in S s (...)`."""
    for line in out.splitlines():
        if line.startswith("harvest: ") and " tokens in " in line:
            return float(line.split(" tokens in ")[1].split(" s ")[0])
    raise RuntimeError("compsae harvest printed no timing line:\n" + out[-2000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two repeats of each (about a minute)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="fresh processes per measurement (default 3, quick 2)",
    )
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    py, cfg = sys.executable, str(ROOT / "pipelines.yaml")
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = f"runs_root={tmp}/runs"
        for r in range(repeats):
            _, out = wall([py, "-c", IMPORTS], tmp)
            child = json.loads(next(ln for ln in out.splitlines() if ln.startswith("CHILD "))[6:])
            got = {f"import_{name}": value for name, value in child.items()}
            got["help"] = wall([py, "-m", "compsae.cli", "--help"], tmp)[0]
            got["status"] = wall(
                [py, "-m", "compsae.cli", "status", "-p", "tiny", "-c", cfg, "--set", runs], tmp
            )[0]
            seconds, out = wall(
                [
                    py,
                    "-m",
                    "compsae.cli",
                    "harvest",
                    "-p",
                    "tiny",
                    "-c",
                    cfg,
                    "--set",
                    runs,
                    "--force",
                ],
                tmp,
            )
            got["harvest_tiny"] = seconds
            got["harvest_tiny_outside_loop"] = seconds - harvest_loop_s(out)
            print(f"round {r}: " + ", ".join(f"{k} {v:.2f} s" for k, v in got.items()), flush=True)
            best = {k: min(v, best.get(k, float("inf"))) for k, v in got.items()}
    print(
        f"best of {repeats} fresh processes each; {os.cpu_count()} cpus, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    for name in (
        "import_torch",
        "import_tokenizers_safetensors",
        "import_transformers",
        "import_neox_modeling",
        "help",
        "status",
        "harvest_tiny",
        "harvest_tiny_outside_loop",
    ):
        print(f"RESULT startup_{name}_s={best[name]:.2f}")


if __name__ == "__main__":
    main()
