"""The errors the weight transfer raises; all derive from TransferError."""

from __future__ import annotations


class TransferError(RuntimeError):
    """A refit failed; the connection stays usable for the next refit."""


class TransferTimeout(TransferError, TimeoutError):
    """The peer did not answer within `timeout_s` (dead, stuck, or never started)."""


class PeerError(TransferError):
    """The peer aborted the refit and said why (e.g. the receiver's consume raised)."""


class IntegrityError(TransferError):
    """A bucket's checksum did not match (`verify=True`)."""
