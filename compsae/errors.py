"""Errors that reach the user as one line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the CLI prints the message on one line and exits 2."""


class StoreCorruptError(UserError):
    """A store's bytes do not match their checksum, or a shard is missing."""


class ForeignFilesError(UserError):
    """A folder `--force` would replace holds files compsae did not write: nothing is deleted."""

    def __init__(self, folder: str, foreign: list[str], kind: str) -> None:
        """`foreign`: the files, relative to `folder`, sorted; `kind`: what the folder is (e.g.
        "store folder"), for the advice."""
        n = len(foreign)
        which = "a file" if n == 1 else f"{n} files"
        first = foreign[0] if n == 1 else f"the first: {foreign[0]}"
        them = "it" if n == 1 else "them"
        super().__init__(
            f"{folder} holds {which} compsae did not write ({first}); --force never deletes "
            f"{them}: move {them} out of the {kind} and rerun"
        )
        self.foreign = foreign
