"""The prefix index's settings, one frozen dataclass shared by the worker side and the router side.

Both sides must agree on the namespace and the lease length, so they read them from the same object; the
process configs (router, prefill worker, decode worker) embed it. Nothing here reads flags or environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The environment variable a cluster's members read their Redis URL from when no --redis-url is given: a
# URL with a password stays out of command lines, which every user of the machine can list.
REDIS_URL_ENV = "SPLITSERVE_REDIS_URL"
ROUTER_REDIS_URL_ENV = "SPLITSERVE_ROUTER_REDIS_URL"  # `splitserve up`: the router's own (read-only) user


def redact_url(url: str) -> str:
    """`url` with its password replaced, for logs, status output and state files."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


@dataclass(frozen=True)
class IndexConfig:
    """Where the index lives and how hard its clients try.

    `lease_ttl_s` bounds how long a dead worker's blocks keep counting; `heartbeat_s` (default a third of
    it) is how often a live worker renews its lease. `lease_check_s` is how often a mirror reconciles the
    worker list with the leases. Retries back off from `retry_backoff_s` to `retry_max_backoff_s`.
    """

    redis_url: str = field(repr=False)  # may carry a password: never in a repr or a log (`redact_url`)
    namespace: str = "spx"
    lease_ttl_s: float = 10.0
    heartbeat_s: float | None = None
    lease_check_s: float = 1.0
    max_queued_events: int = 10_000
    max_batch_events: int = 256
    stream_maxlen: int = 100_000
    socket_timeout_s: float = 1.0
    retry_backoff_s: float = 0.05
    retry_max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            shown = redact_url(self.redis_url)
            raise ValueError(f"redis_url must be a redis://, rediss:// or unix:// URL: {shown!r}")
        if not self.namespace or ":" in self.namespace:
            raise ValueError(f"namespace must be non-empty and contain no ':', got {self.namespace!r}")
        if self.lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, got {self.lease_ttl_s}")
        if self.heartbeat_s is not None and not 0 < self.heartbeat_s < self.lease_ttl_s:
            raise ValueError(f"heartbeat_s must be in (0, lease_ttl_s), got {self.heartbeat_s}")
        for name in ("lease_check_s", "socket_timeout_s", "retry_backoff_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.retry_max_backoff_s < self.retry_backoff_s:
            raise ValueError("retry_max_backoff_s must be >= retry_backoff_s")
        for name in ("max_queued_events", "max_batch_events", "stream_maxlen"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else self.lease_ttl_s / 3

    @property
    def lease_ttl_ms(self) -> int:
        return max(1, round(self.lease_ttl_s * 1000))
