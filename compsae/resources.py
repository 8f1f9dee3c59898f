"""Up-front resource checks: say what a run needs before it starts instead of failing half-way.

A harvest of 10^12 tokens or a dictionary of 10^8 latents validates as a config but cannot run;
these checks compare the bytes it needs with what this machine has and name both in one line."""

from __future__ import annotations

import os
import shutil

import fsspec
from fsspec.implementations.local import LocalFileSystem

from compsae.errors import UserError


def human_bytes(n: float) -> str:
    """`n` bytes as a short text, e.g. 3.6 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"


def available_memory() -> int | None:
    """Bytes of memory this process can still use (Linux MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: int, what: str, fix: str, device: str = "cpu") -> None:
    """Refuse when `what` needs more than the free memory of `device` ("cpu" or a CUDA device)."""
    have: int | None
    where = "memory"
    if str(device).startswith("cuda"):
        import torch

        have = (
            int(torch.cuda.mem_get_info(torch.device(device))[0])
            if torch.cuda.is_available()
            else None
        )
        where = f"{device} memory"
    else:
        have = available_memory()
    if have is not None and need > have:
        raise UserError(
            f"{what} needs {human_bytes(need)} of {where}, {human_bytes(have)} is free; {fix}"
        )


def check_disk(url: str, need: int, what: str, fix: str) -> None:
    """Refuse when writing `need` bytes under `url` (local paths only) would not fit on its disk."""
    fs, path = fsspec.core.url_to_fs(url)
    if not isinstance(fs, LocalFileSystem):
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(
            f"{what} needs {human_bytes(need)} of disk at {url}, {human_bytes(free)} is free; {fix}"
        )
