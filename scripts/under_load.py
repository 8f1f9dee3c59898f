"""Run a command while busy-loop processes burn the machine's cores: a loaded machine on demand.

CI and shared workstations run the tests beside other jobs; a test whose verdict hangs on how fast
something runs passes on an idle laptop and fails there.  This reproduces that:

    python scripts/under_load.py -- .venv/bin/pytest -q tests/test_harvest.py
    python scripts/under_load.py --workers 2 --nice 10 -- make test

starts `--workers` processes (default: one per core) that spin until the command ends, then stops
them and exits with the command's exit status.  `--nice` lowers the burners' priority (0, the
default, competes with the command as an equal, as another user's job would).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys

_SPINS_PER_CHECK = 2_000_000  # busy-loop turns between checks that the parent is still alive


def burn(nice: int, parent: int) -> None:
    """Spin on one core until the parent process is gone (a SIGKILLed parent cannot stop us)."""
    if nice:
        os.nice(nice)
    while os.getppid() == parent:
        for _ in range(_SPINS_PER_CHECK):
            pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options, and the command after `--`."""
    ap = argparse.ArgumentParser(
        description="Run a command while busy-loop workers burn the cores.",
        usage="%(prog)s [--workers N] [--nice N] -- command [args ...]",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="busy-loop processes (default: os.cpu_count(), %(default)s here)",
    )
    ap.add_argument(
        "--nice", type=int, default=0, help="niceness added to the workers (default 0: not niced)"
    )
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = ap.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        ap.error("no command given; put it after --, e.g. -- pytest -q")
    if args.workers < 0:
        ap.error(f"--workers must be 0 or more, got {args.workers}")
    if not 0 <= args.nice <= 19:
        ap.error(f"--nice must be between 0 and 19, got {args.nice}")
    return args


def run_under_load(command: list[str], workers: int, nice: int = 0) -> int:
    """Run `command` while `workers` busy-loop processes run; returns the command's exit status
    (127 when it cannot be started)."""
    ctx = mp.get_context("fork")  # a burner needs nothing from a fresh interpreter
    burners = [
        ctx.Process(target=burn, args=(nice, os.getpid()), name=f"under-load-{i}", daemon=True)
        for i in range(workers)
    ]
    for proc in burners:
        proc.start()
    print(
        f"under_load: {workers} busy-loop worker{'' if workers == 1 else 's'} (nice {nice}) on "
        f"{os.cpu_count()} cores; "
        f"running {' '.join(command)}",
        file=sys.stderr,
        flush=True,
    )
    try:
        return subprocess.run(command).returncode
    except FileNotFoundError:
        print(f"error: cannot run {command[0]!r}: no such program", file=sys.stderr)
        return 127
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in burners:
            proc.terminate()
        for proc in burners:
            proc.join()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_under_load(args.command, args.workers, args.nice)


if __name__ == "__main__":
    sys.exit(main())
