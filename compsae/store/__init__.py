"""The only code that knows the on-disk format: Zarr v3 activation stores and their loader."""

from compsae.store.activation_store import (
    ActivationStore,
    manifest_digest,
    refuse_foreign_folder,
    store_exists,
    writer_lock,
)
from compsae.store.layout import StoreLayout
from compsae.store.writer import refuse_foreign_files

__all__ = [
    "ActivationStore",
    "StoreLayout",
    "manifest_digest",
    "refuse_foreign_files",
    "refuse_foreign_folder",
    "store_exists",
    "writer_lock",
]
