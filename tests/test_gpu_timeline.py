"""benchmarks/gpu_timeline.py: a profiled region's GPU busy and idle time, each gap charged to a
phase."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_timeline.py"
_spec = importlib.util.spec_from_file_location("gpu_timeline", _PATH)
assert _spec is not None and _spec.loader is not None
gpu_timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_timeline)


def _span(name: str, cat: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid, "pid": 1}


def test_busy_idle_and_phases(tmp_path: Path) -> None:
    events = [
        _span("bench.harvest", "user_annotation", 1000, 1000),
        _span("harvest.rounding", "user_annotation", 1000, 120),
        _span("harvest.put", "user_annotation", 1380, 80),
        _span("harvest.finalize", "user_annotation", 1890, 110),
        _span("harvest.put", "user_annotation", 1500, 10, tid=2),  # another thread: not a phase
        _span("gemm", "kernel", 1100, 300, tid=7),
        _span("gemm", "kernel", 1300, 100, tid=8),  # overlaps the first: counted once
        _span("Memcpy DtoH", "gpu_memcpy", 1450, 450, tid=9),
        _span("before", "kernel", 500, 100, tid=7),  # outside the region
        _span("straddles", "kernel", 1990, 50, tid=7),  # clipped to the region's end
        _span("cudaLaunchKernel", "cuda_runtime", 1100, 5),  # host side: not device time
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    report = gpu_timeline.profile_region(trace, "bench.harvest").splitlines()
    # busy 1100-1400 + 1450-1900 + 1990-2000 = 760 µs; idle gaps ≥ 50 µs: 1000-1100, 1400-1450,
    # 1900-1990
    assert report[0] == (
        "profile bench.harvest: wall 1.0 ms, GPU busy 0.8 ms (76%), idle 0.2 ms in gaps of ≥ 50 µs"
    )
    assert "  GPU idle while the host was in harvest.rounding: 0.1 ms" in report
    assert "  GPU idle while the host was in harvest.put: 0.1 ms" in report  # 50 µs
    assert "  GPU idle while the host was in harvest.finalize: 0.1 ms" in report  # 90 µs
    assert "  host time in harvest.rounding: 0.1 ms" in report
    assert report[-3:] == [
        "  gap at +0.0 ms: 0.10 ms (harvest.rounding)",
        "  gap at +0.9 ms: 0.09 ms (harvest.finalize)",
        "  gap at +0.4 ms: 0.05 ms (harvest.put)",
    ]


def test_missing_region(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [_span("gemm", "kernel", 0, 10)]}))
    assert (
        gpu_timeline.profile_region(trace, "bench.harvest")
        == "profile: no 'bench.harvest' annotation in the trace"
    )


@pytest.mark.parametrize(
    "spans, union",
    [
        ([(0, 1), (2, 3)], [(0, 1), (2, 3)]),
        ([(2, 5), (0, 3), (4, 6)], [(0, 6)]),
        ([(0, 1), (1, 2)], [(0, 2)]),
    ],
)
def test_merge(spans: list, union: list) -> None:
    assert gpu_timeline._merge(spans) == union


def test_cpu_run_reports_host_phases_only(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    trace.write_text(
        json.dumps(
            {
                "traceEvents": [
                    _span("bench.harvest", "user_annotation", 0, 2000),
                    _span("harvest.forward", "user_annotation", 100, 1500),
                ]
            }
        )
    )
    assert gpu_timeline.profile_region(trace, "bench.harvest").splitlines() == [
        "profile bench.harvest: wall 2.0 ms, no device activity (host phases only)",
        "  host time in harvest.forward: 1.5 ms",
    ]
