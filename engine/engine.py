"""The engine: requests in, token ids out, one step at a time.

Owns the wiring of model runner, block pool, KV cache manager, scheduler and sampler, and the checks a
request must pass before it is queued. Not thread-safe: one caller drives `step()`; the worker services
wrap it in their own loop. Knows nothing about tokenization or networking.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from splitserve.engine.block_hash import BlockHash, hash_blocks
from splitserve.engine.block_pool import BlockPool, OutOfKVBlocks
from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import InvalidRequest
from splitserve.engine.host_tier import HostKVTier
from splitserve.engine.kv_cache_manager import KVCacheManager, cdiv
from splitserve.engine.kv_watch import KVReady, KVWatch
from splitserve.engine.model_config import ModelConfig, checkpoint_identity
from splitserve.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from splitserve.engine.ops import select_ops
from splitserve.engine.outputs import FinishReason, StepOutput, TokenLogprob
from splitserve.engine.rates import DeviceTimer, PrefillRate
from splitserve.engine.sampler import Logprobs, Sampler, SampleRow
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledBatch, Scheduler
from splitserve.engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVReservation:
    request_id: str
    block_ids: list[int]  # every block of the prompt, in token order
    num_cached_blocks: int  # leading blocks already holding the prompt's KV (prefix hits): not sent


@dataclass(frozen=True)
class PrefixRoom:
    """Room to receive a prompt's leading blocks from another worker (`Engine.prefix_room`)."""

    block_hashes: tuple[BlockHash, ...]  # the blocks wanted, from the prompt's first
    block_ids: tuple[int, ...]  # one per hash, all pinned: [0, num_held) held here, the rest to fill
    num_held: int

    @property
    def num_missing(self) -> int:
        return len(self.block_ids) - self.num_held


@dataclass(frozen=True)
class _InFlight:
    batch: ScheduledBatch
    tokens: torch.Tensor  # host int64 [num_sampling_seqs]; valid once `done` has fired
    done: torch.cuda.Event | None  # None on CPU, where the tokens are ready at once
    logprobs: Logprobs | None  # host copies of the rows' logprobs (valid with the tokens), if any asked
    timer: DeviceTimer | None  # a prefill step's compute and sampling (timed for `Engine.prefill_rate`)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        cfg = self.model_config
        max_len = cfg.max_position_embeddings
        self.max_model_len = min(config.max_model_len or max_len, max_len)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, cfg, self.device)
        self.model_id = config.model_id or checkpoint_identity(config.model)
        self.runner = ModelRunner(
            cfg,
            config.model,
            config.cache,
            self.device,
            self.dtype,
            self.max_model_len,
            config.scheduler.max_num_seqs,
            config.scheduler.max_num_batched_tokens,
            ops=select_ops(self.device, config.kernels, config.fused_gemv_max_tokens),
            enforce_eager=config.enforce_eager,
        )
        self.block_pool = BlockPool(self.runner.num_blocks, config.cache.enable_prefix_caching)
        host_blocks = HostKVTier.blocks_for(self.runner.kv_caches, config.cache.host_kv_gib * 2**30)
        if host_blocks and config.cache.enable_prefix_caching:
            self.block_pool.spill = HostKVTier(self.runner.kv_caches, host_blocks)
        self.kv = KVCacheManager(self.block_pool, config.cache.block_size, self.model_id)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, cfg.eos_token_ids)
        self.sampler = Sampler(self.device, self.runner.uploads.upload)
        self._seeds = random.Random(config.seed)  # the draws' keys of requests without a seed
        self._sequences: dict[str, Sequence] = {}
        self._in_flight: _InFlight | None = None  # the launched step whose tokens are not read yet
        self._reserved: dict[str, Sequence] = {}  # waiting for their KV by transfer (reserve_kv)
        self.prefill_rate = PrefillRate()  # its prefill steps as measured: a load figure
        log.info(
            "engine ready: %s %s on %s, %d KV blocks of %d tokens",
            cfg.family,
            self.dtype,
            self.device,
            self.runner.num_blocks,
            config.cache.block_size,
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        kv_watch: KVWatch | None = None,
        fetched_tokens: int = 0,
    ) -> None:
        """Queue a request. Raises `InvalidRequest` (changing nothing) when it can never run. With
        `kv_watch` its prompt KV is reported layer by layer as it is computed, and the reported blocks
        outlive the request until `unpin_kv` (for a transfer; see `kv_watch`). `fetched_tokens`: leading
        prompt tokens whose KV was fetched for it (`fill_prefix`), counted as such among its hits."""
        seq = self._new_sequence(request_id, prompt_token_ids, params, cache_salt)
        seq.kv_watch = kv_watch
        seq.num_fetched_tokens = fetched_tokens
        self._sequences[request_id] = seq
        self.scheduler.add(seq)

    @property
    def host_tier(self) -> HostKVTier | None:
        """The host-memory tier evicted blocks spill to (`CacheConfig.host_kv_gib`), or None."""
        return self.block_pool.spill

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """The paged KV cache, one [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer:
        what a KV transfer reads blocks from and writes them into (under a pin or a reservation only)."""
        return self.runner.kv_caches

    @property
    def kv_memfd(self) -> int | None:
        """The memfd holding the caches when they are in shared memory (CPU, for the same-host path)."""
        return self.runner.kv_memfd

    def unpin_kv(self, block_ids: list[int] | tuple[int, ...]) -> None:
        """Give back the references `KVReady` reports held on `block_ids` (each once)."""
        self.block_pool.free(reversed(block_ids))

    def pin_prefix(self, block_hashes: list[BlockHash]) -> list[int]:
        """The blocks holding the longest leading run of `block_hashes` here, pinned for a transfer to
        another worker (give them back with `unpin_kv`)."""
        block_ids, _ = self.kv.lookup(block_hashes)  # the host tier's too, loaded back for it
        self.block_pool.touch(block_ids)
        return block_ids

    def prefix_room(self, prompt_token_ids: list[int], cache_salt: str | None, num_blocks: int) -> PrefixRoom:
        """Room to receive blocks of a prompt's first `num_blocks` (at most its full blocks) from a worker
        that holds them: those held here already pinned, new blocks for the rest. Fill them, then
        `fill_prefix`, then add the request in the same loop call (the blocks are then prefix hits).
        Raises `InvalidRequest` for bad token ids, `OutOfKVBlocks` when the free blocks do not suffice
        (changing nothing)."""
        self._check_token_ids(prompt_token_ids)
        bs = self.kv.block_size
        num_blocks = min(num_blocks, len(prompt_token_ids) // bs)
        hashes = hash_blocks(prompt_token_ids[: num_blocks * bs], bs, self.kv.hash_context(cache_salt))
        held = self.pin_prefix(hashes) if self.block_pool.enable_caching else []
        try:
            new = self.block_pool.allocate(len(hashes) - len(held))
        except OutOfKVBlocks:
            self.unpin_kv(held)
            raise
        return PrefixRoom(tuple(hashes), (*held, *new), len(held))

    def fill_prefix(self, room: PrefixRoom, num_filled: int) -> None:
        """The first `num_filled` missing blocks of `room` hold their KV now (0: the transfer failed):
        they join the prefix cache, and every block of `room` is unpinned (the rest return to the pool)."""
        filled = room.num_held + num_filled
        self.block_pool.cache(list(room.block_ids[room.num_held : filled]),
                              list(room.block_hashes[room.num_held : filled]))  # fmt: skip
        self.unpin_kv(room.block_ids)

    def reserve_kv(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> KVReservation:
        """Blocks for a prompt whose KV another worker computed: the longest cached prefix (every full
        block may match) plus new blocks for the rest. The request waits, holding them, until
        `admit_kv` (KV written) or `cancel_kv`. Raises `InvalidRequest`, or `OutOfKVBlocks` when the
        free blocks do not suffice (changing nothing)."""
        seq = self._new_sequence(request_id, prompt_token_ids, params, cache_salt)
        cached = self.kv.find_cached_prefix(seq, leave_one=False)
        num_rest = seq.num_tokens - len(cached) * self.kv.block_size
        if not self.kv.allocate(seq, num_rest, cached):
            raise OutOfKVBlocks(
                f"{cdiv(seq.num_tokens, self.kv.block_size) - len(cached)} free KV blocks needed, "
                f"{self.block_pool.num_free_blocks} free"
            )
        self._sequences[request_id] = seq
        self._reserved[request_id] = seq
        return KVReservation(request_id, list(seq.block_ids), len(cached))

    def admit_kv(self, request_id: str, first_token_id: int) -> StepOutput | None:
        """The reserved request's prompt KV is in its blocks and `first_token_id` was sampled from it:
        it joins continuous batching from its second token on. Returns the finishing output when the
        first token already ends it (its blocks are then freed), else None; an ABORT output when the
        reservation is gone (the request was aborted while its KV was landing)."""
        seq = self._reserved.pop(request_id, None)
        if seq is None:
            return StepOutput(request_id, (), FinishReason.ABORT, 0)
        seq.num_computed_tokens = seq.num_prompt_tokens  # the prompt's KV is in place: never recomputed
        seq.token_ids.append(first_token_id)
        seq.ever_scheduled = True  # cached-token accounting belongs to the worker that prefilled
        self.kv.commit(seq)
        reason = self.scheduler.stop_reason(seq, first_token_id)
        if reason is not None:
            self.kv.free(seq)
            del self._sequences[request_id]
            return StepOutput(request_id, (), reason, 0)
        self.scheduler.add(seq)
        return None

    def cancel_kv(self, request_id: str) -> bool:
        """Give up a reservation (transfer failed or expired): its blocks are freed."""
        seq = self._reserved.pop(request_id, None)
        if seq is None:
            return False
        self.kv.free(seq)
        del self._sequences[request_id]
        return True

    def _new_sequence(self, request_id, prompt_token_ids, params, cache_salt) -> Sequence:
        self._validate(request_id, prompt_token_ids, params)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        return Sequence(request_id, list(prompt_token_ids), params, cache_salt, seed)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks. Returns False for unknown or finished ids."""
        if request_id in self._reserved:
            return self.cancel_kv(request_id)
        seq = self.scheduler.abort(request_id)
        self._sequences.pop(request_id, None)
        return seq is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[StepOutput]:
        """One continuous-batching iteration, pipelined: schedule and launch step N, then wait for step
        N-1 and return its outputs. The host's work for step N (scheduling, input preparation, launch)
        thus overlaps the device's work for step N-1; pending tokens reach step N on the device."""
        batch = self.scheduler.schedule()
        outputs = []
        if batch is not None and self._in_flight is not None and _needs_landed_tokens(batch):
            outputs, self._in_flight = self._complete(self._in_flight), None
        launched = self._launch(batch) if batch is not None else None
        if self._in_flight is not None:
            outputs = self._complete(self._in_flight)
        self._in_flight = launched
        return outputs

    def _launch(self, batch: ScheduledBatch) -> _InFlight:
        reports = self._kv_reports(batch)
        timer = DeviceTimer(self.device) if batch.phase == "prefill" else None
        items = batch.sampling_items
        rows = [_sample_row(it) for it in items]
        out = self.runner.sampled[: len(items)]
        # A decode step's graph samples too, unless penalties need the tokens seen (sampled eagerly then).
        in_graph = self.runner.samples_in_graph(batch) and not any(r.params.penalized for r in rows)
        hook = self._layer_hook(reports) if reports else None
        logits = self.runner.execute(batch, hook, self.sampler.values(rows) if in_graph else None)
        if in_graph:
            logprobs = self.sampler.logprobs(logits, out, rows)
        else:
            _, logprobs = self.sampler(logits, rows, out=out)
        if timer is not None:
            timer.stop()
        if logprobs is not None:  # queued before the tokens' copy: `done` covers both
            logprobs = logprobs.map(self.runner.to_host)
        tokens, done = self.runner.tokens_to_host(len(items))
        return _InFlight(batch, tokens, done, logprobs, timer)

    def _kv_reports(self, batch: ScheduledBatch) -> list[tuple[Sequence, int, tuple[int, ...], bool]]:
        """For each watched sequence of a prefill step whose blocks this step completes: (sequence, first
        new block, the new blocks — pinned here for the watcher —, whether its prompt KV is then all
        in). Counts are those after this step: the scheduler has advanced them already."""
        reports = []
        if batch.phase != "prefill":
            return reports
        for item in batch.items:
            seq, watch = item.seq, item.seq.kv_watch
            if watch is None:
                continue
            computed = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            done = computed == seq.num_prompt_tokens  # the partial last block is final too
            final = cdiv(computed, self.kv.block_size) if done else computed // self.kv.block_size
            if final > watch.reported:
                new = tuple(seq.block_ids[watch.reported : final])
                self.block_pool.touch(new)
                reports.append((seq, watch.reported, new, done))
                watch.reported = final
        return reports

    def _layer_hook(self, reports) -> Callable[[int], None]:
        """Called by the model after each layer's forward: report that layer's KV of `reports`."""
        cuda = self.device.type == "cuda"

        def layer_done(layer: int) -> None:
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
            for seq, start, block_ids, done in reports:
                seq.kv_watch.callback(KVReady(seq.request_id, layer, start, block_ids, event, done))

        return layer_done

    def _complete(self, step: _InFlight) -> list[StepOutput]:
        if step.done is not None:
            step.done.synchronize()
        if step.timer is not None:  # done: its events are before `done`
            # Its prompt chunks' tokens (a decode row's time is a fixed cost of the step, to the fit)
            chunks = [it for it in step.batch.items if it.start < it.seq.num_prompt_tokens]
            num_tokens = sum(it.num_new_tokens for it in chunks)
            context = sum(it.start * it.num_new_tokens for it in chunks) / max(1, num_tokens)
            self.prefill_rate.observe(num_tokens, context, step.timer.seconds())
        outputs = self.scheduler.update(step.batch, step.tokens.tolist())
        if step.logprobs is not None:
            outputs = self._with_logprobs(step, outputs)
        for out in outputs:
            if out.finished:
                del self._sequences[out.request_id]
        return outputs

    def _with_logprobs(self, step: _InFlight, outputs: list[StepOutput]) -> list[StepOutput]:
        """The outputs, each new token with its logprobs where its request asked for them."""
        rows = {
            it.seq.request_id: (k, it.seq.params.logprobs) for k, it in enumerate(step.batch.sampling_items)
        }
        sampled, rank, top_ids, top = step.logprobs.map(torch.Tensor.tolist)
        with_lp = []
        for out in outputs:
            k, n = rows[out.request_id]
            if n is not None and out.new_token_ids:
                entry = TokenLogprob(
                    out.new_token_ids[0],
                    sampled[k],
                    rank[k],
                    tuple(zip(top_ids[k][:n], top[k][:n], strict=True)),
                )
                out = out._replace(logprobs=(entry,))
            with_lp.append(out)
        return with_lp

    def _check_token_ids(self, token_ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})")

    def _validate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._sequences:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        num_tokens = len(prompt_token_ids)
        if num_tokens == 0:
            raise InvalidRequest("the prompt is empty")
        if num_tokens >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {num_tokens} tokens; the model's context is {self.max_model_len} tokens "
                "and at least one must remain for the output"
            )
        self._check_token_ids(prompt_token_ids)
        most_tokens = min(num_tokens + params.max_tokens, self.max_model_len)
        if cdiv(most_tokens, self.kv.block_size) > self.block_pool.num_usable_blocks:
            raise InvalidRequest(
                f"the request may need {most_tokens} tokens of KV cache; the cache holds "
                f"{self.block_pool.num_usable_blocks * self.kv.block_size}"
            )
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and most_tokens > sched.max_num_batched_tokens:
            raise InvalidRequest(
                f"with chunked prefill off a request of up to {most_tokens} tokens exceeds "
                f"max_num_batched_tokens={sched.max_num_batched_tokens}"
            )


def _sample_row(item) -> SampleRow:
    """What the sampler needs of a scheduled item: its parameters, key and the position it draws for; the
    tokens seen for a penalized one (all landed: see `_needs_landed_tokens`)."""
    seq = item.seq
    position = item.start + item.num_new_tokens
    if not seq.params.penalized:
        return SampleRow(seq.params, seq.seed, position)
    n = seq.num_prompt_tokens
    return SampleRow(seq.params, seq.seed, position, seq.token_ids[:n], seq.token_ids[n:])


def _needs_landed_tokens(batch: ScheduledBatch) -> bool:
    """Whether a penalized sequence of the batch samples while its previous token is still in flight: its
    penalties need every token it has, so that step is completed first (no lookahead for such batches)."""
    return any(it.seq.params.penalized and it.seq.num_pending > 1 for it in batch.sampling_items)
