"""One request's state inside the engine: its tokens, progress, KV blocks and status.

The scheduler and the KV cache manager mutate sequences; nothing else does.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import TYPE_CHECKING

from splitserve.engine.block_hash import BlockHash
from splitserve.engine.outputs import FinishReason
from splitserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from splitserve.engine.kv_watch import KVWatch


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """A request's token ids (prompt + output) and where its KV lives.

    Invariants: `num_computed_tokens <= num_tokens + num_pending`; the KV of tokens
    [0, num_computed_tokens) is in `block_ids` (or being written by a step still running);
    `block_hashes[i]` is the chained hash of full block i of `token_ids`.

    The engine schedules step N+1 while step N still runs, so a sequence can be scheduled again before
    the token it sampled in step N is known: `num_pending` counts such tokens (0 or 1). Their position is
    counted in `num_computed_tokens` when scheduled; the token joins `token_ids` when step N completes.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        seed: int = 0,
        kv_watch: KVWatch | None = None,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.cache_salt = cache_salt
        self.seed = seed  # its draws' key (the request's own seed, or one the engine gave it)
        self.kv_watch = kv_watch  # report the prompt's KV layer by layer as it is computed
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_pending = 0
        self.num_cached_tokens = 0
        self.num_fetched_tokens = 0  # of the prompt's prefix hits: fetched from another worker for it
        self.num_host_tokens = 0  # ... loaded back from the host tier for it
        self.ever_scheduled = False
        self.block_ids: list[int] = []
        self.block_hashes: list[BlockHash] = []
        self.num_committed_blocks = 0  # leading blocks registered in the prefix cache
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={self.block_ids}, status={self.status.name})"
        )
