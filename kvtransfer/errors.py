"""Typed errors of the KV transfer. Each maps to one gRPC status in the services."""

from __future__ import annotations


class TransferError(Exception):
    """Base class: a transfer that cannot proceed. Its blocks are released by whoever raises it."""


class LayoutMismatch(TransferError):
    """The sender's KV layout differs from the receiver's (model, layers, heads, head_dim, block, dtype)."""


class MalformedChunk(TransferError):
    """A chunk out of order, out of the reserved range, of the wrong size, or over the size limit."""


class CorruptChunk(TransferError):
    """A chunk whose bytes do not match its checksum."""


class NoRoom(TransferError):
    """The receiver cannot reserve the blocks a request needs."""


class LeaseNotFound(TransferError):
    """Unknown lease id, or one already released, completed or expired."""


class SinkClosed(LeaseNotFound):
    """The lease ended while its transfer was arriving: its blocks may belong to another request now."""


class Overloaded(Exception):
    """A worker's queue is full: the request is refused at once (RESOURCE_EXHAUSTED) rather than queued."""
