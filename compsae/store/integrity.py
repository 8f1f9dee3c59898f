"""What makes a store's contents trustworthy beyond each chunk's own crc32c.

- Bound checksums: every activation chunk and every shard of the side arrays (tokens, seq_id,
  pos) has a crc32c bound to (store id, array, index) recorded when it was written
  (`format.bound_crc`).  A chunk swapped with a sibling, moved inside its shard or copied from
  another store fails it exactly as a flipped bit does.
- A metadata digest: when the store is finalized, the manifest and every array's `zarr.json`
  get a digest each, kept in the manifest under "integrity".  A reader recomputes them on open, so
  an edited dtype, row count or statistic is refused instead of used.
- Recomputed statistics (`verify --deep`): the normalisation statistics from the data itself.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from compsae import durable
from compsae.errors import StoreCorruptError
from compsae.store.format import SIDE_ARRAYS, SIDE_TABLE, bound_crc, chunk_table, from_storage
from compsae.store.moments import shard_moments, stats_from_shards

if TYPE_CHECKING:
    from compsae.store.activation_store import ActivationStore

INTEGRITY = "integrity"  # manifest key of the metadata digests
# recomputed statistics agree with the recorded ones this closely (float64 sums in another order)
STATS_RTOL = 1e-4


def array_names(hooks: list[str]) -> list[str]:
    """Every array of a format-2 store, relative to its root."""
    names = []
    for hook in hooks:
        names += [f"acts/{hook}", f"progress/stats/{hook}", chunk_table(hook)]
    return [
        *names,
        *(n for n, _ in SIDE_ARRAYS),
        SIDE_TABLE,
        "progress/shard_done",
        "progress/shard_crc",
    ]


def _manifest_digest(manifest: dict[str, Any]) -> str:
    return durable.json_digest({k: v for k, v in manifest.items() if k != INTEGRITY})


def metadata_digests(store: ActivationStore) -> dict[str, str]:
    """Digest of the manifest ("manifest") and of each array's parsed `zarr.json`
    ("<array>/zarr.json")."""
    out = {"manifest": _manifest_digest(store.manifest)}
    for name in array_names(store.hooks):
        out[f"{name}/zarr.json"] = durable.json_digest(_array_meta(store, name))
    return out


def _array_meta(store: ActivationStore, name: str) -> Any:
    where = f"{store.url}/{name}/zarr.json"
    try:
        return json.loads(store.fs.cat_file(f"{store.path}/{name}/zarr.json"))
    except FileNotFoundError:
        raise StoreCorruptError(
            f"store {store.url}: {name}/zarr.json is missing; re-harvest the store"
        ) from None
    except (ValueError, OSError) as e:
        raise StoreCorruptError(
            f"{where} is not valid JSON ({e.__class__.__name__}); re-harvest the store"
        ) from None


def metadata_problems(store: ActivationStore) -> list[str]:
    """One line per metadata file whose digest differs from the one recorded at finalize."""
    recorded = store.manifest.get(INTEGRITY)
    if not isinstance(recorded, dict):
        return [
            f"store {store.url}: the manifest has no metadata digests (edited?); re-harvest the "
            "store"
        ]
    problems = []
    for what, digest in metadata_digests(store).items():
        if recorded.get(what) != digest:
            name = "the manifest (zarr.json)" if what == "manifest" else what
            problems.append(
                f"store {store.url}: {name} does not match the digest recorded when the store was "
                "written (edited after the harvest?); restore it or re-harvest"
            )
    return problems


def check_side_part(
    store: ActivationStore, name: str, shard: int, values: np.ndarray, table: np.ndarray
) -> None:
    """Raise when shard `shard` of side array `name` (`values`: that shard's rows) fails its bound
    checksum (`table`: the store's side checksum table)."""
    dt = dict(SIDE_ARRAYS)[name]
    col = SIDE_ARRAYS.index((name, dt))
    got = bound_crc(np.ascontiguousarray(values, dtype=dt), store.manifest["store_id"], name, shard)
    if got != int(table[shard, col]):
        raise StoreCorruptError(
            f"store {store.url}, {name}, shard {shard}: fails its checksum (corrupt, moved or from "
            "another "
            "store); run `compsae verify` and re-harvest"
        )


def deep_stats_problems(store: ActivationStore) -> list[str]:
    """Recompute every hook's statistics from its data; one line per hook whose recorded ones
    differ."""
    problems = []
    for hook in store.hooks:
        rows = []
        for shard in range(store.n_shards):
            lo, hi = store.shard_range(shard)
            raw = store.read_rows_raw(hook, lo, hi)
            rows.append(
                shard_moments(
                    raw if store.layout.dtype != "bfloat16" else from_storage(raw, "bfloat16")
                )
            )
        got = stats_from_shards(np.stack(rows), store.d_model(hook))
        rec = store.manifest.get("stats", {}).get(hook)
        if not isinstance(rec, dict) or not _stats_agree(got, rec):
            problems.append(
                f"store {store.url}, hook {hook}: the recorded statistics (manifest) differ from "
                "those of the data; restore the manifest or re-harvest"
            )
    return problems


def _stats_agree(got: dict[str, Any], rec: dict[str, Any]) -> bool:
    try:
        var = np.asarray(got["var"])
        std = np.sqrt(var)
        return (
            int(rec["count"]) == got["count"]
            and np.allclose(
                rec["mean"], got["mean"], rtol=STATS_RTOL, atol=STATS_RTOL * (std.max() + 1e-12)
            )
            and np.allclose(rec["var"], var, rtol=STATS_RTOL, atol=STATS_RTOL * (var.max() + 1e-12))
            and np.isclose(float(rec["mean_norm"]), got["mean_norm"], rtol=STATS_RTOL)
        )
    except (KeyError, TypeError, ValueError):
        return False
