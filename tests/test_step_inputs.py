"""A step's host inputs: the persistent block tables stay equal to each sequence's blocks through growth,
reallocation and row reuse; the decode fast path builds what the general path builds; staged uploads
deliver what was written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.engine.block_pool import NULL_BLOCK_ID
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledBatch, ScheduledSeq
from splitserve.engine.sequence import Sequence
from splitserve.engine.step_inputs import BlockTables, StagedUploads, prepare


def seq(name: str, num_tokens: int, block_ids: list[int]) -> Sequence:
    s = Sequence(name, list(range(1, num_tokens + 1)), SamplingParams())
    s.block_ids = block_ids
    return s


def table_of(tables: BlockTables, items) -> list[list[int]]:
    rows = tables.rows(tuple(items))
    width = max(len(it.seq.block_ids) for it in items)
    return [[b for b in tables.table[r, :width].tolist()] for r in rows]


def expected(items) -> list[list[int]]:
    width = max(len(it.seq.block_ids) for it in items)
    return [it.seq.block_ids + [NULL_BLOCK_ID] * (width - len(it.seq.block_ids)) for it in items]


def test_block_tables_follow_growth_reallocation_and_row_reuse():
    tables = BlockTables(num_rows=3, max_blocks=8)
    a, b, c, d = seq("a", 20, [5, 6]), seq("b", 9, [7]), seq("c", 3, [8]), seq("d", 3, [9])

    def items(*seqs):
        return [ScheduledSeq(s, 0, 1, True) for s in seqs]

    assert table_of(tables, items(a, b)) == expected(items(a, b))
    a.block_ids.append(11)  # grows in place
    b.block_ids = [12, 13]  # freed and allocated again: a new list (longer)
    assert table_of(tables, items(b, a)) == expected(items(b, a))
    b.block_ids = [14, 15]  # a new list of the same length: copied again, not taken for the old one
    assert table_of(tables, items(a, b, c)) == expected(items(a, b, c))
    # Rows run out: those of sequences outside the batch are taken back; a returning one is copied anew.
    assert table_of(tables, items(d, c)) == expected(items(d, c))
    a.block_ids.append(16)
    assert table_of(tables, items(a, d, c)) == expected(items(a, d, c))
    with pytest.raises(IndexError):  # more sequences in one batch than rows: a configuration error
        tables.rows(tuple(items(a, b, c, d)))


def test_decode_inputs_equal_the_general_path():
    """The decode fast path gives what the general (prefill) path gives for the same one-token rows."""
    bs, num_rows = 4, 8
    known = seq("known", 10, [3, 4, 5])  # computes its token 9 (known)
    known.num_computed_tokens = 9
    pending = seq("pending", 8, [6, 7, 9])  # computes token 8, sampled by the step before (row 2)
    pending.num_computed_tokens = 8
    pending.num_pending = 1
    items = (ScheduledSeq(known, 9, 1, True), ScheduledSeq(pending, 8, 1, True))
    prev_rows = {"pending": 2}
    fast = prepare(ScheduledBatch("decode", items), BlockTables(4, 8), bs, prev_rows, num_rows)
    general = prepare(ScheduledBatch("prefill", items), BlockTables(4, 8), bs, prev_rows, num_rows)
    for field in ("token_ids", "token_src", "positions", "slots", "logits_indices", "query_start_loc",
                  "seq_lens", "block_tables"):  # fmt: skip
        assert np.array_equal(getattr(fast, field), getattr(general, field)), field
    assert fast.token_ids.tolist() == [10, 0] and fast.token_src.tolist() == [num_rows + 0, 2]
    assert fast.slots.tolist() == [5 * bs + 1, 9 * bs + 0] and fast.seq_lens.tolist() == [10, 9]


def test_staged_uploads_on_cpu_are_the_arrays():
    uploads = StagedUploads(torch.device("cpu"), 0)
    values = np.arange(5, dtype=np.int64)
    assert uploads.upload(values).tolist() == values.tolist()
    out = torch.zeros(5, dtype=torch.int64)
    uploads.upload(values, out=out)
    uploads.end_step()
    assert out.tolist() == values.tolist()


@pytest.mark.gpu
def test_staged_uploads_survive_the_host_writing_ahead_of_the_device():
    """Each step's uploads land intact though the host writes the next steps' while the device is busy."""
    uploads = StagedUploads(torch.device("cuda"), 1 << 20)
    big = torch.randn(4096, 4096, device="cuda")
    landed = []
    for step in range(8):
        big @ big  # keep the device busy so the copies queue behind it
        landed.append(uploads.upload(np.full(1000, step, np.int64)))
        uploads.end_step()
    assert [t.unique().tolist() for t in landed] == [[s] for s in range(8)]
