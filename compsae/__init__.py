"""compsae: harvest activations, train Compositional SAEs and baselines, analyse composition.

Public API (store units in and out): `open_store`, `load_sae`, `load_saes`, `top_pairs`,
`run_stage`; see `compsae.api`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "open_store",
    "load_sae",
    "load_saes",
    "top_pairs",
    "PairRow",
    "run_stage",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Resolve the API names on first use, so `import compsae` imports neither torch nor zarr."""
    if name in ("open_store", "load_sae", "load_saes", "top_pairs", "PairRow", "run_stage"):
        # by name: modules that read `compsae.__version__` (stages) must not depend on the whole
        # API through this package (import-linter would see train -> compsae -> api -> analysis)
        import importlib

        return getattr(importlib.import_module("compsae.api"), name)
    raise AttributeError(f"module 'compsae' has no attribute {name!r}")
