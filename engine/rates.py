"""What a worker's own work costs as it measures it: the running estimates it publishes with its load
(`WorkerLoad.costs`), which the router's cost model uses in place of its calibration where present.

- `RateMeter`: the amount per second of one kind of work whose fixed cost is negligible (KV bytes loaded
  back from the host tier: one DMA per run of slots): the moving averages (`average_step_time`) of the
  amounts and of their times, divided, so a large piece of work weighs more than a small one.
- `LineFit`: the rate of work that has a fixed cost too (a prefill step, a KV push's tail): an exponentially
  weighted least-squares line of seconds on amount, whose slope's inverse is the rate. It reports a rate
  only once the amounts seen spread enough to tell the fixed cost from the rate's; never a lower bound (every
  second counted per unit, which the cost model's own fixed cost would then count twice).
- `PrefillRate`: prefill tokens/s by cached context, one `LineFit` per context bucket over the engine's
  prefill steps (a step's time = a fixed cost + its prompt tokens / the rate), so that the rate holds for
  prompts longer or shorter than those seen.
- `DeviceTimer`: the time of work issued to the compute device: the host clock on CPU (where the work is
  done when the call returns), CUDA events on a GPU, read once they have fired (no one waits for them).
All are thread-safe.
"""

from __future__ import annotations

import bisect
import threading
import time

import torch

from splitserve.engine.config import average_step_time

# Cached-context buckets of `PrefillRate`, by their first context length (tokens): attention makes a token
# after 8k cached ones costlier than one after none.
PREFILL_CONTEXT_BUCKETS = (0, 1024, 4096, 16384)


class RateMeter:
    """Amount per second of one kind of work as measured; 0 before the first observation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mean_amount = 0.0
        self._mean_s = 0.0

    def observe(self, amount: float, seconds: float) -> None:
        """One piece of work: `amount` (bytes, tokens) done in `seconds`. Empty or untimed ones count not."""
        if amount <= 0 or seconds <= 0:
            return
        with self._lock:
            self._mean_amount = average_step_time(self._mean_amount, amount)
            self._mean_s = average_step_time(self._mean_s, seconds)

    @property
    def per_s(self) -> float:
        with self._lock:
            return self._mean_amount / self._mean_s if self._mean_s else 0.0


class LineFit:
    """Exponentially weighted least squares of seconds on amount: t = fixed + amount × slope. Each
    observation weighs `decay` times the one after it (about 1 / (1 - decay) remembered)."""

    def __init__(self, decay: float = 0.9, min_steps: int = 3, min_share: float = 0.25) -> None:
        self.decay, self.min_steps, self.min_share = decay, min_steps, min_share
        self._lock = threading.Lock()
        self.num_steps = 0
        self._w = self._x = self._t = self._xx = self._xt = 0.0

    def observe(self, amount: float, seconds: float) -> None:
        """One piece of work; empty or untimed ones count not."""
        if amount <= 0 or seconds <= 0:
            return
        d = self.decay
        with self._lock:
            self._w, self._x, self._t = d * self._w + 1, d * self._x + amount, d * self._t + seconds
            self._xx, self._xt = d * self._xx + amount * amount, d * self._xt + amount * seconds
            self.num_steps += 1

    @property
    def per_s(self) -> float:
        """1 / slope once `min_steps` are seen whose amounts spread (a coefficient of variation over 0.1) and
        the fit has a positive slope, a non-negative fixed cost, and its amounts' part of the mean time is at
        least `min_share` of it (else the slope is mostly noise on a fixed cost: small KV pushes whose tail
        is the wire's latency); else 0 (not measured)."""
        with self._lock:
            if self.num_steps < self.min_steps:
                return 0.0
            mean_x, mean_t = self._x / self._w, self._t / self._w
            var = self._xx / self._w - mean_x * mean_x
            if var <= (0.1 * mean_x) ** 2:
                return 0.0
            slope = (self._xt / self._w - mean_x * mean_t) / var
            if slope <= 0 or slope * mean_x > mean_t or slope * mean_x < self.min_share * mean_t:
                return 0.0
            return 1.0 / slope


class PrefillRate:
    """Prefill tokens/s of this engine by cached context: one `LineFit` per bucket of
    `PREFILL_CONTEXT_BUCKETS`, over the prefill steps whose prompt tokens follow that much context
    (token-weighted mean)."""

    def __init__(self, decay: float = 0.9, min_steps: int = 3) -> None:
        self._fits = [LineFit(decay, min_steps) for _ in PREFILL_CONTEXT_BUCKETS]

    def observe(self, num_tokens: int, num_cached: float, seconds: float) -> None:
        """A prefill step computed `num_tokens` prompt tokens after `num_cached` others (their mean) in
        `seconds`."""
        bucket = bisect.bisect_right(PREFILL_CONTEXT_BUCKETS, num_cached) - 1
        self._fits[bucket].observe(num_tokens, seconds)

    def steps(self) -> list[int]:
        """How many prefill steps each bucket has observed (whether or not they determine a rate)."""
        return [fit.num_steps for fit in self._fits]

    def buckets(self) -> list[tuple[int, float]]:
        """(first cached-context length, tokens/s) of every bucket, ascending; 0 where not measured yet."""
        return [(start, fit.per_s) for start, fit in zip(PREFILL_CONTEXT_BUCKETS, self._fits, strict=True)]


class DeviceTimer:
    """Times work issued to `device` between construction and `stop()`. On CUDA the events are recorded on
    the current stream; `seconds` is valid once `done()` (at once on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._seconds = 0.0
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._end.record()
        else:
            self._seconds = time.perf_counter() - self._t0

    def done(self) -> bool:
        return not self._cuda or self._end.query()

    def seconds(self) -> float:
        return self._start.elapsed_time(self._end) / 1e3 if self._cuda else self._seconds
