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
