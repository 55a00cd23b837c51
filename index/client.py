"""The Redis connection both sides of the index use, and the backoff they retry with.

redis-py retries failed commands on its own by default (ten times, with backoff), which would hide an
outage — and a Redis restart that lost every key — behind a slow call. Index clients switch that off: every
error reaches the caller, which owns the retry policy (`Backoff`) and the resync that must follow an outage.
"""

from __future__ import annotations

import random

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from splitserve.index.config import IndexConfig


def open_client(config: IndexConfig, extra_read_timeout_s: float = 0.0) -> redis.Redis:
    """A client with bounded timeouts and no hidden retries. `extra_read_timeout_s` covers commands that
    block on purpose (XREAD BLOCK) so they do not read as a slow server."""
    return redis.Redis.from_url(
        config.redis_url,
        socket_timeout=config.socket_timeout_s + extra_read_timeout_s,
        socket_connect_timeout=config.socket_timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class Backoff:
    """Exponential delays with jitter between `base_s` and `max_s`; `reset()` after a success."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._next_s = base_s

    def next_delay(self) -> float:
        delay = self._next_s
        self._next_s = min(self.max_s, self._next_s * 2)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._next_s = self.base_s
