"""Continuous batching: which sequences run in the next step and how many tokens each computes.

Owns the waiting and running queues, the per-step token budget (chunked prefill), preemption by
recompute when KV blocks run out, and the stop checks that need only token ids (EOS, stop token ids,
max_tokens, context length). It does not run the model or sample.

Policy, one step: every running sequence gets its next tokens first (one for a decode, a chunk for an
unfinished prompt), oldest first; when blocks run out the newest running sequence is preempted (its
blocks freed; it is recomputed later, mostly from the prefix cache). Then waiting sequences are admitted
in arrival order while budget, blocks and `max_num_seqs` allow.

Lookahead: `schedule()` advances progress at once, and a sequence whose sampled token is still pending
(its step has not completed) is scheduled to compute that token; the model runner takes the token from
the device. So the engine can schedule and launch step N+1 before it reads step N's tokens, and `update`
for step N may come after `schedule` for step N+1. A sequence that step N's token stops (EOS, a stop
token) then has one wasted row in step N+1, ignored by its update; one that its length will stop is not
scheduled again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

from splitserve.engine.config import SchedulerConfig
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.outputs import FinishReason, StepOutput
from splitserve.engine.sequence import Sequence, SequenceStatus

Phase = Literal["prefill", "decode"]


class ScheduledSeq(NamedTuple):
    """A named tuple: one is made per running sequence per step."""

    seq: Sequence
    start: int  # first position computed this step (= num_computed_tokens when scheduled)
    num_new_tokens: int
    samples: bool  # the chunk reaches the end of the sequence, so its last logits are sampled


def scheduled(seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
    """The work item for the next `num_new_tokens` of a sequence; advances its progress now."""
    start = seq.num_computed_tokens
    samples = start + num_new_tokens == len(seq.token_ids) + seq.num_pending
    seq.num_computed_tokens += num_new_tokens
    seq.num_pending += samples
    return ScheduledSeq(seq, start, num_new_tokens, samples)


@dataclass(frozen=True)
class ScheduledBatch:
    """One step's work. `phase` is "decode" when every sequence computes exactly its one newest token
    (the fixed-shape path CUDA graphs capture), "prefill" when any computes a prompt chunk."""

    phase: Phase
    items: tuple[ScheduledSeq, ...]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.items)

    @cached_property
    def sampling_items(self) -> list[ScheduledSeq]:
        return [item for item in self.items if item.samples]


@dataclass
class PrefixStats:
    """Prompt tokens of the requests scheduled since start, and those found cached, by where the hit came
    from: the engine's KV memory, the host tier (loaded back), or another worker (fetched for it)."""

    prompt_tokens: int = 0
    memory_hit_tokens: int = 0
    host_hit_tokens: int = 0
    fetched_tokens: int = 0

    def count(self, seq: Sequence) -> None:
        cached = seq.num_cached_tokens
        fetched = min(seq.num_fetched_tokens, cached)
        host = min(seq.num_host_tokens, cached - fetched)
        self.prompt_tokens += seq.num_prompt_tokens
        self.fetched_tokens += fetched
        self.host_hit_tokens += host
        self.memory_hit_tokens += cached - fetched - host


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int, eos_token_ids: frozenset[int]
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_stats = PrefixStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_queued_tokens(self) -> int:
        return sum(_num_uncomputed(seq) for seq in (*self.waiting, *self.running))

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request wherever it is, freeing its blocks. Unknown ids return None."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, FinishReason.ABORT)
                    return seq
        return None

    def schedule(self) -> ScheduledBatch | None:
        budget = self.config.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        preempted = False
        running, allocate = SequenceStatus.RUNNING, self.kv.allocate
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not running or (seq.num_pending and self._length_stops_pending(seq)):
                continue  # preempted earlier in this loop, or finishes when its pending token lands
            num_new = min(_num_uncomputed(seq), budget)
            while not allocate(seq, num_new):
                preempted = True
                self._preempt(self.running[-1])
                if seq.status is not SequenceStatus.RUNNING:
                    break
            else:
                items.append(scheduled(seq, num_new))
                budget -= num_new
        if not preempted:
            budget = self._admit_waiting(items, budget)
        if not items:
            return None
        is_decode = all(it.num_new_tokens == 1 and it.start >= it.seq.num_prompt_tokens for it in items)
        return ScheduledBatch("decode" if is_decode else "prefill", tuple(items))

    def _admit_waiting(self, items: list[ScheduledSeq], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted with a token in flight: it rejoins once that token is known
            # A sequence whose prompt KV arrived by transfer already holds its blocks (see Engine.admit_kv).
            cached = [] if seq.block_ids else self.kv.find_cached_prefix(seq)
            num_new = seq.num_tokens - seq.num_computed_tokens - len(cached) * self.kv.block_size
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate(seq, num_new, cached):
                break
            self.waiting.popleft()
            if not seq.ever_scheduled:
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.ever_scheduled = True
                self.prefix_stats.count(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append(scheduled(seq, num_new))
            budget -= num_new
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.commit(seq)  # its computed full blocks stay cached for the recompute
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, batch: ScheduledBatch, sampled: list[int]) -> list[StepOutput]:
        """Record a completed step: `sampled` (one token per sampling item, in order) is appended and
        checked for stops, and newly full blocks join the prefix cache. Finished sequences release
        their blocks. Items of sequences finished or aborted since `schedule` are ignored; a sequence
        preempted since keeps its token (it is recomputed with it)."""
        if len(sampled) != len(batch.sampling_items):
            raise ValueError(f"{len(sampled)} tokens for {len(batch.sampling_items)} sampling sequences")
        outputs: list[StepOutput] = []
        tokens = iter(sampled)
        commit, stop_reason = self.kv.commit, self.stop_reason
        running, finished = SequenceStatus.RUNNING, SequenceStatus.FINISHED
        for seq, _, _, samples in batch.items:
            token = next(tokens) if samples else None
            status = seq.status
            if status is finished:
                continue
            if token is not None:
                seq.num_pending -= 1
                seq.token_ids.append(token)
            if status is running:
                commit(seq)
            if token is None:
                continue
            reason = stop_reason(seq, token)
            if reason is not None:
                (self.running if status is running else self.waiting).remove(seq)
                self._finish(seq, reason)
            outputs.append(StepOutput(seq.request_id, (token,), reason, seq.num_cached_tokens))
        return outputs

    def _length_stops_pending(self, seq: Sequence) -> bool:
        """Whether the pending token will finish the sequence by length (so nothing more to compute)."""
        if not seq.num_pending:
            return False
        num_tokens = seq.num_tokens + seq.num_pending
        return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens or num_tokens >= self.max_model_len

    def stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Why `token`, just appended to `seq`, ends it (None: it goes on)."""
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        num_tokens = len(seq.token_ids)
        if num_tokens - seq.num_prompt_tokens >= params.max_tokens or num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.kv.free(seq)


def _num_uncomputed(seq: Sequence) -> int:
    return len(seq.token_ids) + seq.num_pending - seq.num_computed_tokens
