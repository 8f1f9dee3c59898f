"""Where a GPU's time went in a profiled region: busy, idle, and the host phase behind each idle
gap.

Reads a Chrome trace written by `torch.profiler` (`export_chrome_trace`) and measures, inside the
span of one `record_function` annotation (the region), the union of the device's kernels and
copies against the region's wall time.  The harvest names its phases with `record_function`
(`harvest.rounding`, `harvest.forward`, `harvest.hand_over`, ...): each idle stretch of the GPU is
charged to the phase the harvesting thread was in when it began, which says what kept the GPU
waiting (the host launching, a sync, the last shard's write, finalize).

    from gpu_timeline import profile_region
    print(profile_region(trace_path, "bench.harvest"))
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

_DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, non-overlapping union of `(start, end)` intervals."""
    out: list[tuple[float, float]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def profile_region(trace: str | Path, region: str, min_gap_us: float = 50.0, top: int = 8) -> str:
    """A short report on the GPU's busy and idle time inside the annotation `region` of `trace`."""
    events = json.loads(Path(trace).read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    regions = [e for e in spans if e.get("name") == region and e.get("cat") == "user_annotation"]
    if not regions:
        return f"profile: no '{region}' annotation in the trace"
    r0 = float(regions[0]["ts"])
    r1 = r0 + float(regions[0]["dur"])
    device = _merge(
        [
            (max(r0, float(e["ts"])), min(r1, float(e["ts"]) + float(e["dur"])))
            for e in spans
            if e.get("cat") in _DEVICE_CATS
            and float(e["ts"]) < r1
            and float(e["ts"]) + float(e["dur"]) > r0
        ]
    )
    busy = sum(hi - lo for lo, hi in device)
    idle: list[tuple[float, float]] = []
    at = r0
    for lo, hi in device:
        if lo - at >= min_gap_us:
            idle.append((at, lo))
        at = max(at, hi)
    if r1 - at >= min_gap_us:
        idle.append((at, r1))
    # the harvesting thread's phases (annotations other than the region itself, on its thread)
    tid = regions[0].get("tid")
    phases = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"])
        for e in spans
        if e.get("cat") == "user_annotation"
        and e.get("tid") == tid
        and e["name"] != region
        and r0 <= float(e["ts"]) < r1
    )

    def phase_at(t: float) -> str:
        inner = [name for lo, hi, name in phases if lo <= t < hi]
        return inner[-1] if inner else "(between phases)"

    host = defaultdict(float)
    for lo, hi, name in phases:
        host[name] += hi - lo
    charged = defaultdict(float)
    for lo, hi in idle:
        charged[phase_at(lo)] += hi - lo
    wall = r1 - r0
    if not device:  # a CPU run: no device activity to measure
        return "\n".join(
            [f"profile {region}: wall {wall / 1e3:.1f} ms, no device activity (host phases only)"]
            + [
                f"  host time in {name}: {us / 1e3:.1f} ms"
                for name, us in sorted(host.items(), key=lambda kv: -kv[1])
            ]
        )
    lines = [
        f"profile {region}: wall {wall / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms "
        f"({busy / wall:.0%}), "
        f"idle {sum(h - lo for lo, h in idle) / 1e3:.1f} ms in gaps of ≥ {min_gap_us:.0f} µs"
    ]
    lines += [
        f"  GPU idle while the host was in {name}: {us / 1e3:.1f} ms"
        for name, us in sorted(charged.items(), key=lambda kv: -kv[1])
    ]
    lines += [
        f"  host time in {name}: {us / 1e3:.1f} ms"
        for name, us in sorted(host.items(), key=lambda kv: -kv[1])
    ]
    lines += [
        f"  gap at +{(lo - r0) / 1e3:.1f} ms: {(hi - lo) / 1e3:.2f} ms ({phase_at(lo)})"
        for lo, hi in sorted(idle, key=lambda s: s[0] - s[1])[:top]
    ]
    return "\n".join(lines)
