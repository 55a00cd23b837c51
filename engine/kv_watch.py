"""Reporting a request's KV layer by layer as a prefill computes it, for a transfer that overlaps compute.

A request added with a `KVWatch` is reported during every prefill step that completes more of its
blocks: once per layer, right after that layer's KV is written (on CUDA: with an event recorded after
the layer's kernels, to wait on before reading). The engine holds one reference on each reported block
for the watcher — a preemption or the request's end cannot recycle them under a transfer — which the
watcher gives back with `Engine.unpin_kv` when it is done with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVReady:
    """Blocks [start, start + len(block_ids)) of a request whose KV for `layer` is final once `event`
    has fired (None: already). `last`: the prompt's KV for this layer is complete with them."""

    request_id: str
    layer: int
    start: int
    block_ids: tuple[int, ...]
    event: torch.cuda.Event | None
    last: bool


@dataclass
class KVWatch:
    """`callback` runs on the engine's thread, once per layer per step; it must only hand the report on.
    Blocks before `first_block` are not reported (the receiver already holds them)."""

    callback: Callable[[KVReady], None]
    first_block: int = 0

    def __post_init__(self) -> None:
        self.reported = self.first_block  # blocks [first_block, reported) were reported
