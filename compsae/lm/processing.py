"""The transformer_lens weight processing a harvest applied, as its store's manifest records it,
and the check that a store was harvested with the processing its pipeline asks for.

`harvest.weight_processing` asks for all four of transformer_lens' load-time steps or none.  Which
ones a harvest actually applied depends on the code path and the installed transformer_lens (its
3.x `TransformerBridge` folds nothing unless told to, its `HookedTransformer.from_pretrained` folds
everything): two installs could harvest different activations under one config.  So the manifest
records the flags that were applied (`model.tl_processing`), and the train and analyze stages
refuse a store whose flags are not the ones the config asks for.
"""

from __future__ import annotations

from typing import Any

from compsae.errors import UserError

# transformer_lens' load-time weight processing steps, in its own names
PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def processing_flags(applied: bool) -> dict[str, bool]:
    """Every processing flag set to `applied` (the four steps go together)."""
    return dict.fromkeys(PROCESSING_FLAGS, bool(applied))


def recorded_flags(manifest: dict[str, Any]) -> dict[str, bool] | None:
    """The processing flags a store's manifest records: `model.tl_processing`, else (stores
    written before every harvest recorded them) the `model.processing` switch for all four; None
    when the store records neither (not harvested from a language model)."""
    model = manifest.get("model") or {}
    if not isinstance(model, dict):
        return None
    flags = model.get("tl_processing")
    if isinstance(flags, dict) and any(f in flags for f in PROCESSING_FLAGS):
        return {f: bool(flags.get(f, False)) for f in PROCESSING_FLAGS}
    if isinstance(model.get("processing"), bool):
        return processing_flags(model["processing"])
    return None


def check_store_processing(manifest: dict[str, Any], weight_processing: bool, store: str) -> None:
    """Refuse, in one line, a store whose recorded weight processing is not what
    `harvest.weight_processing` asks for: which flag differs and how to fix it."""
    flags = recorded_flags(manifest)
    if flags is None:
        return
    asked = processing_flags(weight_processing)
    differ = [f for f in PROCESSING_FLAGS if flags[f] != asked[f]]
    if not differ:
        return
    first = differ[0]
    more = f" (and {', '.join(differ[1:])})" if len(differ) > 1 else ""
    setting = "true" if flags[first] else "false"
    raise UserError(
        f"the store at {store} was harvested with {first}={setting}{more} but the config asks "
        f"harvest.weight_processing={str(weight_processing).lower()}; re-harvest it "
        f"(`compsae harvest --force`) or set harvest.weight_processing={setting}"
    )


def check_harvest_processing(harvest: dict[str, Any]) -> None:
    """`check_store_processing` for a stage that reads the harvest stage whose record (config and
    outputs) is `harvest`; nothing to check for a data source without `weight_processing` (ground
    truth)."""
    asked = (harvest.get("config") or {}).get("weight_processing")
    store = (harvest.get("outputs") or {}).get("store")
    if not isinstance(asked, bool) or not isinstance(store, str):
        return
    from compsae.store import ActivationStore

    check_store_processing(ActivationStore.open(store).manifest, asked, store)
