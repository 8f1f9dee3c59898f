"""scripts/under_load.py: the command runs beside the busy-loop workers asked for, its exit status
comes back, and no worker outlives it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "under_load.py"

# The command under load: its siblings (the other children of under_load.py) are the workers.
LIST_SIBLINGS = """
import os, sys
parent, me = os.getppid(), os.getpid()
siblings = []
for name in os.listdir("/proc"):
    if name.isdigit() and int(name) != me:
        try:
            stat = open(f"/proc/{name}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:  # field 4: the parent's pid
            siblings.append(name)
print(" ".join(siblings))
sys.exit(int(sys.argv[1]))
"""


def _under_load(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("workers", [1, 3])
def test_the_command_runs_beside_the_workers_and_none_outlives_it(workers: int) -> None:
    done = _under_load("--workers", str(workers), "--", sys.executable, "-c", LIST_SIBLINGS, "3")
    assert done.returncode == 3, done.stderr  # the command's own exit status
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == workers, done.stdout
    assert not any(map(_alive, pids))
    assert f"{workers} busy-loop worker" in done.stderr


def test_bad_use_is_one_line() -> None:
    for args, message in [
        ([], "no command given"),
        (["--workers", "-1", "--", "true"], "--workers must be 0 or more"),
        (["--workers", "0", "--", "no-such-program-here"], "cannot run 'no-such-program-here'"),
    ]:
        done = _under_load(*args)
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        assert done.returncode in (2, 127) and len(errors) == 1 and message in errors[0], (
            done.stderr
        )
        assert "Traceback" not in done.stderr
