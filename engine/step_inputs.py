"""A step's inputs on the host: flat arrays built from the scheduled batch, the block tables kept from step
to step, and the pinned staging buffers their copies to the device go through.

Owns the host-side cost of a step, which must not grow with context length: a decode row costs a few
list reads (its position, its newest token or the row of the previous step that is sampling it, the block
its new KV goes into), and a sequence's block table is copied into the persistent host table only where it
grew since the last step. It does not run the model (the model runner) or decide what runs (the scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splitserve.engine.block_pool import NULL_BLOCK_ID
from splitserve.engine.scheduler import ScheduledBatch, ScheduledSeq


@dataclass(frozen=True)
class HostInputs:
    """One step's inputs. Token ids the host does not know yet (sampled by the step still running) are read
    on the device: input token i is `[sampled rows | token_ids][token_src[i]]`."""

    token_ids: np.ndarray  # int64 [num_tokens], 0 where the token is pending
    token_src: np.ndarray  # int64 [num_tokens]
    positions: np.ndarray  # int64 [num_tokens]
    slots: np.ndarray  # int64 [num_tokens]: block id * block size + offset
    logits_indices: np.ndarray  # int64 [num_sampling_seqs], rows of the hidden states to sample from
    query_start_loc: np.ndarray  # int32 [num_seqs + 1]
    seq_lens: np.ndarray  # int32 [num_seqs]
    block_tables: np.ndarray  # int32 [num_seqs, max_blocks], padded with the null block

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class BlockTables:
    """The block tables of recently scheduled sequences, one row each in a persistent host table, updated
    where a sequence's blocks changed: a sequence's `block_ids` list only grows in place or is replaced
    by a new list (see `Sequence`), so its length and identity tell what to copy. Rows of sequences that
    stopped running are taken back when rows run out (a sequence that returns is copied again)."""

    def __init__(self, num_rows: int, max_blocks: int) -> None:
        self.table = np.full((num_rows, max_blocks), NULL_BLOCK_ID, np.int32)
        self._entries: dict[str, list] = {}  # request id → [row, its block_ids list, blocks copied]
        self._free = list(range(num_rows - 1, -1, -1))

    def rows(self, items: tuple[ScheduledSeq, ...]) -> np.ndarray:
        """The table rows of a batch's sequences, in batch order, each up to date."""
        if len(self._free) < len(items):
            self._take_back(items)
        rows = []
        for item in items:
            seq = item.seq
            ids = seq.block_ids
            entry = self._entries.get(seq.request_id)
            if entry is None:
                entry = self._entries[seq.request_id] = [self._free.pop(), ids, 0]
            elif entry[1] is not ids:  # freed and allocated again (preempted, recomputed)
                self.table[entry[0], : entry[2]] = NULL_BLOCK_ID
                entry[1], entry[2] = ids, 0
            row, copied = entry[0], entry[2]
            if copied != len(ids):
                self.table[row, copied : len(ids)] = ids[copied:]
                entry[2] = len(ids)
            rows.append(row)
        return np.array(rows, np.int64)

    def _take_back(self, items: tuple[ScheduledSeq, ...]) -> None:
        keep = {item.seq.request_id for item in items}
        for request_id in [r for r in self._entries if r not in keep]:
            row, _, copied = self._entries.pop(request_id)
            self.table[row, :copied] = NULL_BLOCK_ID
            self._free.append(row)


def prepare(batch: ScheduledBatch, tables: BlockTables, block_size: int, prev_rows: dict[str, int],
            num_rows: int) -> HostInputs:  # fmt: skip
    """The step's inputs. A token at or past the end of a sequence's known tokens is the one its previous
    step sampled: it is read from that step's row (`prev_rows`, by request id) of the sampled rows, the
    first `num_rows` entries of the token buffer; a known token i is entry `num_rows + i`."""
    items = batch.items
    rows = tables.rows(items)
    width = int(max(len(item.seq.block_ids) for item in items))
    block_tables = tables.table[rows, :width]
    if batch.phase == "decode":
        return _prepare_decode(items, block_tables, block_size, prev_rows, num_rows)
    token_ids: list[int] = []
    token_src: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    bs = block_size
    for seq, start, num_new, samples in items:
        end = start + num_new
        known_end = min(end, seq.num_tokens)
        token_src.extend(range(num_rows + len(token_ids), num_rows + len(token_ids) + known_end - start))
        token_ids.extend(seq.token_ids[start:known_end])
        if end > known_end:  # the pending token: exactly one, the newest
            token_src.append(prev_rows[seq.request_id])
            token_ids.append(0)
        positions.extend(range(start, end))
        for b in range(start // bs, (end - 1) // bs + 1):  # slots, one run per block
            base = seq.block_ids[b] * bs - b * bs
            slots.extend(range(base + max(start, b * bs), base + min(end, (b + 1) * bs)))
        query_start_loc.append(len(token_ids))
        seq_lens.append(end)
        if samples:
            logits_indices.append(len(token_ids) - 1)
    longs = np.array([token_ids, token_src, positions, slots], np.int64)
    return HostInputs(
        *longs,
        np.array(logits_indices, np.int64),
        np.array(query_start_loc, np.int32),
        np.array(seq_lens, np.int32),
        block_tables,
    )


def _prepare_decode(items, block_tables, block_size, prev_rows, num_rows) -> HostInputs:
    """Every sequence computes (and samples after) exactly one token, at position `start`."""
    n = len(items)
    known, src, blocks = [], [], []
    for k, (seq, start, _, _) in enumerate(items):
        token_ids = seq.token_ids
        if start < len(token_ids):
            known.append(token_ids[start])
            src.append(num_rows + k)
        else:  # pending: sampled by the step before
            known.append(0)
            src.append(prev_rows[seq.request_id])
        blocks.append(seq.block_ids[start // block_size])
    positions = np.fromiter((item.start for item in items), np.int64, n)
    slots = np.array(blocks, np.int64) * block_size + positions % block_size
    return HostInputs(
        np.array(known, np.int64),
        np.array(src, np.int64),
        positions,
        slots,
        np.arange(n, dtype=np.int64),
        np.arange(n + 1, dtype=np.int32),
        (positions + 1).astype(np.int32),
        block_tables,
    )


class StagedUploads:
    """Host-to-device copies through two pinned staging buffers used in turn, written in place: no pinned
    allocation per step, and a copy is queued behind the running step instead of waiting for it. A step's
    copies all come from one buffer; before a buffer is written again (two steps later) the copies queued
    from it are waited for, which in steady state have long completed. On CPU a copy is the array itself."""

    _ALIGN = 64

    def __init__(self, device: torch.device, capacity_bytes: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._buffers = [torch.empty(capacity_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)] \
            if self.cuda else []  # fmt: skip
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._offset = 0

    def upload(self, values: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """`values` on the device: copied into `out` (a device tensor of its size and dtype) or a new tensor.
        Never waits for the device except as said above."""
        host = torch.from_numpy(np.ascontiguousarray(values))
        if not self.cuda:
            return host if out is None else out.copy_(host)
        start = self._offset
        end = start + host.numel() * host.element_size()
        buffer = self._buffers[self._turn]
        if end > buffer.numel():
            raise ValueError(f"a step's inputs exceed the staging buffer ({buffer.numel()} bytes)")
        staged = buffer[start:end].view(host.dtype).view(host.shape)
        staged.copy_(host)
        self._offset = -(-end // self._ALIGN) * self._ALIGN
        if out is None:
            return staged.to(self.device, non_blocking=True)
        return out.copy_(staged, non_blocking=True)

    def end_step(self) -> None:
        """The step's copies are queued: mark them, and turn to the other buffer (waiting for its copies)."""
        if not self.cuda:
            return
        event = torch.cuda.Event()
        event.record()
        self._copied[self._turn] = event
        self._turn ^= 1
        self._offset = 0
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
