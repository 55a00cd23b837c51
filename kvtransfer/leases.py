"""Leases: every reservation of KV blocks for a transfer is held under a lease that ends in exactly one
of three ways — acknowledged (the blocks pass to their request), released (abort), or expired (no progress
for its time-to-live) — so blocks are never held forever.

`LeaseTable` is the receiver's bookkeeping, independent of the block pool: it calls `on_release(lease)`
once when a lease is released or expires (the owner frees the blocks there) and never for an
acknowledged one (the blocks now belong to the request). The clock is injectable for tests. Not
thread-safe: the owning worker serialises calls (one event loop or one lock).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from splitserve.kvtransfer.errors import LeaseNotFound


class TransferState(Enum):
    """Mirrors the protobuf enum `splitserve.v1.TransferState` (same names and numbers)."""

    RESERVED = 1
    RECEIVING = 2
    COMPLETE = 3
    ABORTED = 4
    EXPIRED = 5
    FAILED = 6


_OPEN = (TransferState.RESERVED, TransferState.RECEIVING)
_ENDED_KEPT = 1024


@dataclass
class Lease:
    lease_id: str
    request_id: str
    block_ids: list[int]  # every block of the request, cached hits first
    num_cached_blocks: int  # leading blocks the receiver already held: not transferred
    ttl_s: float
    deadline: float  # monotonic time after which the lease expires unless renewed
    state: TransferState = TransferState.RESERVED
    reason: str = ""
    kv_complete: bool = False  # every block is in place: the lease now waits for its request's admission


class LeaseTable:
    def __init__(self, on_release: Callable[[Lease], None], clock: Callable[[], float] = time.monotonic):
        self._on_release = on_release
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._ended: dict[str, Lease] = {}  # the last leases to end, for errors that say why
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, request_id: str, block_ids: list[int], num_cached_blocks: int, ttl_s: float) -> Lease:
        if ttl_s <= 0:
            raise ValueError(f"lease time-to-live must be positive, got {ttl_s}")
        lease_id = f"{request_id}/{next(self._ids)}"
        lease = Lease(lease_id, request_id, block_ids, num_cached_blocks, ttl_s, self._clock() + ttl_s)
        self._leases[lease_id] = lease
        return lease

    def get(self, lease_id: str) -> Lease:
        """The open lease with this id; expires overdue leases first. Raises `LeaseNotFound`."""
        self.expire_overdue()
        lease = self._leases.get(lease_id)
        if lease is None:
            ended = self._ended.get(lease_id)
            if ended is not None:
                raise LeaseNotFound(f"lease {lease_id!r} has ended: {ended.state.name} ({ended.reason})")
            raise LeaseNotFound(f"no open lease {lease_id!r} (unknown, or ended long ago)")
        return lease

    def state(self, lease_id: str) -> tuple[TransferState, str]:
        """(state, reason) of an open or recently ended lease; raises `LeaseNotFound` otherwise."""
        self.expire_overdue()
        lease = self._leases.get(lease_id) or self._ended.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r} (unknown, or ended long ago)")
        return lease.state, lease.reason

    def open_lease_of(self, request_id: str) -> Lease | None:
        return next((lease for lease in self._leases.values() if lease.request_id == request_id), None)

    def renew(self, lease: Lease) -> None:
        """Progress on the lease (a chunk arrived): its time-to-live starts again."""
        lease.state = TransferState.RECEIVING
        lease.deadline = self._clock() + lease.ttl_s

    def acknowledge(self, lease_id: str) -> Lease:
        """The transfer is complete and its blocks are handed over: the lease ends without a release."""
        lease = self.get(lease_id)
        lease.state = TransferState.COMPLETE
        self._forget(lease)
        return lease

    def release(self, lease_id: str, reason: str, state: TransferState = TransferState.ABORTED) -> Lease:
        """End an open lease and free its blocks (through `on_release`)."""
        lease = self.get(lease_id)
        self._end(lease, state, reason)
        return lease

    def expire_overdue(self) -> list[Lease]:
        now = self._clock()
        overdue = [lease for lease in self._leases.values() if lease.deadline <= now]
        for lease in overdue:
            self._end(lease, TransferState.EXPIRED, f"no progress for {lease.ttl_s:.3g} s")
        return overdue

    def release_all(self, reason: str) -> None:
        for lease in list(self._leases.values()):
            self._end(lease, TransferState.ABORTED, reason)

    def _end(self, lease: Lease, state: TransferState, reason: str) -> None:
        assert lease.state in _OPEN
        lease.state, lease.reason = state, reason
        self._forget(lease)
        self._on_release(lease)

    def _forget(self, lease: Lease) -> None:
        del self._leases[lease.lease_id]
        self._ended[lease.lease_id] = lease
        if len(self._ended) > _ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
