"""Which KV blocks each sequence holds: prefix-cache matching, allocation, commit and release.

Owns the mapping sequence → block ids and the sequence's block hashes. It does not decide who runs
(the scheduler does) and never touches KV tensors.
"""

from __future__ import annotations

from splitserve.engine.block_hash import BlockHash, HashContext, hash_blocks
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, model_id: str) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.model_id = model_id
        self._contexts: dict[str | None, HashContext] = {}

    def hash_context(self, cache_salt: str | None) -> HashContext:
        ctx = self._contexts.get(cache_salt)
        if ctx is None:
            ctx = self._contexts[cache_salt] = HashContext(self.model_id, cache_salt)
        return ctx

    def update_hashes(self, seq: Sequence) -> None:
        """Extend `seq.block_hashes` to cover every full block of its tokens."""
        start = len(seq.block_hashes)
        if (start + 1) * self.block_size > seq.num_tokens:
            return
        parent = seq.block_hashes[-1] if start else None
        seq.block_hashes.extend(
            hash_blocks(
                seq.token_ids,
                self.block_size,
                self.hash_context(seq.cache_salt),
                parent=parent,
                start_block=start,
            )
        )

    def find_cached_prefix(self, seq: Sequence, leave_one: bool = True) -> list[int]:
        """Block ids of the longest cached prefix of a sequence that holds no blocks. Changes nothing.

        With `leave_one`, at least one token is left to compute, since its logits are needed to sample;
        without it (KV arriving by transfer, nothing is sampled here) every full block may match.
        """
        assert not seq.block_ids, "prefix matching is only for sequences without blocks"
        if not self.pool.enable_caching:
            return []
        self.update_hashes(seq)
        max_blocks = (seq.num_tokens - leave_one) // self.block_size
        block_ids, num_loaded = self.lookup(seq.block_hashes[:max_blocks])
        seq.num_host_tokens = num_loaded * self.block_size
        return block_ids

    def lookup(self, block_hashes: list[BlockHash]) -> tuple[list[int], int]:
        """Block ids of the longest prefix of the chain `block_hashes` held here, and how many of them
        (the last) were loaded back from the host tier for it: those are in the prefix cache again, free
        like every other hit until the caller takes them (before any other allocation)."""
        found = self.pool.lookup(block_hashes)
        tier, rest = self.pool.spill, block_hashes[len(found) :]
        if tier is None or not rest:
            return found, 0
        # Room: free blocks not among the hits; at most half the tier, so that what loading evicts
        # (spilled in turn) cannot push out what is being loaded.
        free_hits = sum(1 for b in found if self.pool.ref_count(b) == 0)
        num = min(tier.match(rest), self.pool.num_free_blocks - free_hits, tier.capacity // 2)
        if num <= 0:
            return found, 0
        tier.keep(rest[:num])
        self.pool.touch(found)  # not evicted by the allocation below
        new = self.pool.allocate(num)
        tier.load(rest[:num], new)
        self.pool.cache(new, rest[:num])
        self.pool.free(reversed(found + new))
        return found + new, num

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_block_ids: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more computed tokens; attach `cached_block_ids` first.

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        room = len(seq.block_ids) * self.block_size - seq.num_computed_tokens
        if not cached_block_ids and num_new_tokens <= room:
            return True  # room in the blocks it holds (most decode steps)
        cached_block_ids = cached_block_ids or []
        assert not cached_block_ids or not seq.block_ids, "cache hits attach only to an empty sequence"
        num_hits = len(cached_block_ids)
        total_tokens = seq.num_computed_tokens + num_hits * self.block_size + num_new_tokens
        num_needed = cdiv(total_tokens, self.block_size) - len(seq.block_ids) - num_hits
        # Hits that sit unreferenced in the free list stop being allocatable once touched.
        num_free_hits = sum(1 for b in cached_block_ids if self.pool.ref_count(b) == 0)
        if num_needed > self.pool.num_free_blocks - num_free_hits:
            return False
        if cached_block_ids:
            self.pool.touch(cached_block_ids)
            seq.block_ids.extend(cached_block_ids)
            seq.num_computed_tokens += num_hits * self.block_size
            seq.num_committed_blocks = num_hits
        if num_needed > 0:
            seq.block_ids.extend(self.pool.allocate(num_needed))
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly computed full blocks whose tokens are known in the prefix cache.
        A block may still be being written by a running step: later steps read it in stream order."""
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if num_full <= seq.num_committed_blocks:
            return
        self.update_hashes(seq)
        start = seq.num_committed_blocks
        self.pool.cache(seq.block_ids[start:num_full], seq.block_hashes[start:num_full])
        seq.num_committed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence, tail first, and reset its progress."""
        self.pool.free(reversed(seq.block_ids))
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0
