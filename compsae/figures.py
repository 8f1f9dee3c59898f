"""Matplotlib for every figure compsae draws: headless, and all text drawn exactly as given.

Labels come from data and config (token text, contexts, model and family names).  Matplotlib reads
text between two `$` as TeX math (mathtext) and a context like `costs $5 or $^$` stops the whole
report with a parse error, so math parsing is off while a compsae figure is built: a `$` is a
dollar sign."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def pyplot() -> Any:
    """`matplotlib.pyplot` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_text(fn: F) -> F:
    """Run a figure-drawing function with math parsing off (see the module docstring); the
    setting is scoped to the call, never changed for the rest of the process."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(PLAIN_TEXT):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


MAX_LOG_TICKS = 6


def tick_text(value: float) -> str:
    """A log-axis tick label as plain text: `0.01`, `300`, `1e-5`, `1e6` (never TeX)."""
    return f"{value:g}".replace("e+", "e").replace("e0", "e").replace("e-0", "e-")


def log_axis(ax: Any, which: str = "y") -> None:
    """Put `ax`'s x or y axis on a log scale with at most `MAX_LOG_TICKS` labelled ticks.

    Matplotlib's own log labels are mathtext (`$\\mathdefault{10^{-2}}$`), which shows up raw with
    math parsing off, and it labels minor ticks on short ranges, so the labels overlap.  Call this
    after the data is drawn: the tick spacing is chosen from the data's range (even steps within a
    decade, 1-3 over two, whole decades beyond), and minor ticks are never labelled."""
    import math

    from matplotlib.ticker import (
        FixedLocator,
        FuncFormatter,
        LogLocator,
        MaxNLocator,
        NullFormatter,
    )

    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    decades = math.log10(hi / lo) if lo > 0 else math.inf
    if decades <= 1.0:
        # under a decade whole powers of ten leave one label or none: evenly stepped values instead
        ticks = [
            t for t in MaxNLocator(nbins=MAX_LOG_TICKS - 1).tick_values(lo, hi) if lo <= t <= hi
        ]
        axis.set_major_locator(FixedLocator(ticks))
    else:
        subs = (1.0, 3.0) if decades <= 2.0 else (1.0,)
        axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=MAX_LOG_TICKS))
    axis.set_major_formatter(FuncFormatter(lambda v, _: tick_text(v)))
    axis.set_minor_formatter(NullFormatter())
