"""Errors that reach the user as one line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the CLI prints the message on one line and exits 2."""


class StoreCorruptError(UserError):
    """A store's bytes do not match their checksum, or a shard is missing."""
