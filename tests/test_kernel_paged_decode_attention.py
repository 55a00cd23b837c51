"""Split-KV paged decode attention: the Triton kernel against its plain-torch reference, and the reference
against a naive dense computation. Without CUDA the kernels run in Triton's interpreter at small sizes."""

from __future__ import annotations

import itertools
import math
import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it decorates a function, its own library functions (tl.sum, tl.cdiv) included,
    # so it must be set before triton is first imported in this process.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "on"):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; set it earlier (conftest)")
    os.environ["TRITON_INTERPRET"] = "1"

import splitserve.kernels.paged_decode_attention as pda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")


def make_inputs(
    seed: int,
    seq_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    max_blocks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q and cache, shuffled block tables padded with the null block 0. The null block and every
    slot past a sequence's length hold NaN, so reading any of them poisons the output."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max_blocks or max(max(blocks_per_seq), 1) + 1  # a padded column beyond every sequence
    num_blocks = sum(blocks_per_seq) + 4
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q = 2 * torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen)  # peaky softmax
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # non-contiguous, never block 0
    kv_cache[:, 0] = NAN
    for i, (seq_len, num_used) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        ids = [free.pop() for _ in range(num_used)]
        block_tables[i, :num_used] = torch.tensor(ids, dtype=torch.int32)
        if seq_len % block_size:
            kv_cache[:, ids[-1], seq_len % block_size :] = NAN
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q.to(dtype), kv_cache.to(dtype), block_tables, seq_lens_t))


def run_kernel(q, kv_cache, block_tables, seq_lens, scale, **kwargs) -> torch.Tensor:
    out = torch.full_like(q, NAN)  # [num_seqs, num_heads, head_dim], poisoned
    result = pda.paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, out=out, **kwargs)
    assert result is out
    assert torch.isfinite(out).all(), "some output element was not written (or read poison)"
    return out


def lengths(gen: torch.Generator, num_seqs: int, block_size: int) -> list[int]:
    """1 token, a non-multiple of the block size, and 100-200 tokens; one sequence gets the long one."""
    long_len = int(torch.randint(100, 201, (1,), generator=gen))
    short = block_size + int(torch.randint(1, block_size, (1,), generator=gen))
    return [long_len] if num_seqs == 1 else [1, short, long_len][:num_seqs]


# Small token tiles with one-chunk minimum splits make even 200-token contexts split: BLOCK_N 16 keeps
# chunks inside a cache block, BLOCK_N 64 makes them span four 16-token blocks.
TUNINGS = {
    "n16": pda.DecodeTuning(block_n=16, min_split_chunks=1),
    "n64": pda.DecodeTuning(min_split_chunks=1),
}
GRID = [
    (num_seqs, 2, group, head_dim, 16, max_splits, tuning, torch.float32)
    for num_seqs, group, head_dim, max_splits, tuning in itertools.product(
        [1, 3], [1, 4], [16, 32, 24], [1, 4], TUNINGS
    )
] + [
    (3, 1, 8, 32, 64, 4, "n16", torch.float32),  # GQA 8, 64-token blocks
    (3, 2, 4, 32, 64, 4, "n64", torch.float32),
    (3, 2, 4, 24, 16, 3, "n16", torch.float16),  # bf16 is left out: the interpreter's tl.dot mangles it
]


@pytest.mark.parametrize(
    ("num_seqs", "num_kv_heads", "group", "head_dim", "block_size", "max_splits", "tuning", "dtype"), GRID
)
def test_kernel_matches_reference(
    num_seqs, num_kv_heads, group, head_dim, block_size, max_splits, tuning, dtype
):
    seed = zlib.crc32(
        repr((num_seqs, num_kv_heads, group, head_dim, block_size, max_splits, tuning, dtype)).encode()
    )
    seq_lens = lengths(torch.Generator().manual_seed(seed), num_seqs, block_size)
    inputs = make_inputs(seed, seq_lens, num_kv_heads, group, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    out = run_kernel(*inputs, scale, max_splits=max_splits, tuning=TUNINGS[tuning])
    expected = pda.paged_decode_attention_reference(*inputs, scale)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_default_splits_and_tuning_match_reference():
    inputs = make_inputs(7, [1, 45, 300], 2, 4, 32, 16, torch.float32, max_blocks=24)
    out = run_kernel(*inputs, 0.2)
    expected = pda.paged_decode_attention_reference(*inputs, 0.2)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("max_splits", [1, 4])
def test_padding_row_with_zero_length_gives_zeros(max_splits):
    q, kv_cache, block_tables, seq_lens = make_inputs(11, [0, 40, 0], 2, 4, 16, 16, torch.float32)
    out = run_kernel(q, kv_cache, block_tables, seq_lens, 0.25, max_splits=max_splits, tuning=TUNINGS["n16"])
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    expected = pda.paged_decode_attention_reference(q, kv_cache, block_tables, seq_lens, 0.25)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_reference_matches_dense_softmax():
    """Write dense per-sequence K/V into a shuffled paged cache, then compare the reference against
    softmax(q K^T * scale) V computed head by head on the dense tensors."""
    gen = torch.Generator().manual_seed(3)
    num_kv_heads, group, head_dim, block_size, seq_lens = 2, 3, 8, 4, [5, 9]
    kv_cache = torch.zeros(2, 8, block_size, num_kv_heads, head_dim)
    block_tables = torch.zeros(2, 4, dtype=torch.int32)
    block_ids = iter(torch.randperm(7, generator=gen).add(1).tolist())
    q = torch.randn(2, num_kv_heads * group, head_dim, generator=gen)  # [num_seqs, num_heads, head_dim]
    expected = torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens):
        k, v = torch.randn(2, seq_len, num_kv_heads, head_dim, generator=gen)  # [seq_len, kv_heads, dim]
        for t in range(seq_len):
            if t % block_size == 0:
                block_tables[i, t // block_size] = next(block_ids)
            kv_cache[:, block_tables[i, t // block_size], t % block_size] = torch.stack([k[t], v[t]])
        for h in range(num_kv_heads * group):
            weights = torch.softmax(k[:, h // group] @ q[i, h] * 0.5, dim=0)  # [seq_len]
            expected[i, h] = weights @ v[:, h // group]
    got = pda.paged_decode_attention_reference(q, kv_cache, block_tables, torch.tensor(seq_lens).int(), 0.5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_choose_max_splits_fills_the_device_from_shapes():
    choose = pda.choose_max_splits
    assert choose(1, 8, 131072, 132, 64, programs_per_sm=2) == math.ceil(2 * 132 / 8)
    assert choose(128, 8, 131072, 132, 64) == 1  # the batch alone fills the device
    assert choose(1, 8, 512, 132, 64, min_split_chunks=4) == 2  # no split shorter than 4 chunks
    assert choose(1, 1, 10**6, 132, 64) == pda.MAX_SPLITS
    with pytest.raises(ValueError):
        choose(0, 8, 4096, 132, 64)


BAD_INPUTS = {
    "int64 block tables": lambda q, kv, bt, sl: (q, kv, bt.long(), sl),
    "int64 lengths": lambda q, kv, bt, sl: (q, kv, bt, sl.long()),
    "heads not a multiple of kv heads": lambda q, kv, bt, sl: (q[:, :3], kv, bt, sl),
    "head_dim mismatch": lambda q, kv, bt, sl: (q[..., :8], kv, bt, sl),
    "dtype mismatch": lambda q, kv, bt, sl: (q.half(), kv, bt, sl),
    "batch mismatch": lambda q, kv, bt, sl: (q, kv, bt, sl.repeat(2)),
    "cache without the K/V axis": lambda q, kv, bt, sl: (q, kv[0], bt, sl),
    "non-contiguous cache": lambda q, kv, bt, sl: (q, kv.transpose(3, 4), bt, sl),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_launcher_rejects_bad_inputs(case):
    args = BAD_INPUTS[case](*make_inputs(5, [3], 2, 2, 16, 16, torch.float32))
    with pytest.raises(ValueError):
        pda.paged_decode_attention(*args, 0.25)


def test_launcher_rejects_too_many_splits():
    inputs = make_inputs(5, [3], 2, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="max_splits"):
        pda.paged_decode_attention(*inputs, 0.25, max_splits=pda.MAX_SPLITS + 1)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("head_dim", "num_kv_heads", "group", "block_size", "context", "batch", "dtype"),
    [
        (128, 8, 4, 16, 4096, 8, torch.bfloat16),
        (128, 8, 4, 64, 16384, 1, torch.bfloat16),
        (128, 4, 8, 16, 16384, 8, torch.float16),
        (64, 8, 4, 16, 1024, 64, torch.float16),
        (64, 2, 8, 64, 4096, 64, torch.bfloat16),
        (128, 8, 4, 16, 1024, 1, torch.float16),
        (256, 1, 8, 16, 4096, 8, torch.bfloat16),
    ],
)
def test_gpu_full_size_matches_reference(head_dim, num_kv_heads, group, block_size, context, batch, dtype):
    gen = torch.Generator().manual_seed(context + batch + head_dim)
    seq_lens = [context, *torch.randint(1, context + 1, (batch - 1,), generator=gen).tolist()]
    inputs = make_inputs(batch + context, seq_lens, num_kv_heads, group, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    out = run_kernel(*inputs, scale)
    expected = pda.paged_decode_attention_reference(*inputs, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_gpu_cuda_graph_stays_valid_as_lengths_change():
    """Capture once with short lengths; replay after rewriting seq_lens and q in place, up to capacity."""
    capacity, block_size, dtype, scale = 4096, 16, torch.bfloat16, 128**-0.5
    q, kv_cache, block_tables, seq_lens = make_inputs(
        1, [capacity] * 8, 8, 4, 128, block_size, dtype, max_blocks=capacity // block_size
    )
    # Slots past each length hold real data here: kernel and reference must both stop at the length.
    out = torch.empty_like(q)  # [num_seqs, num_heads, head_dim]
    seq_lens.copy_(torch.tensor([1, 17, 100, 0, 5, 64, 300, 2], dtype=torch.int32))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        pda.paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, out=out)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the launcher raises
    try:
        pda.paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, out=out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync here would fail the capture
        pda.paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, out=out)
    gen = torch.Generator().manual_seed(2)
    for new_lens in ([1, 17, 100, 0, 5, 64, 300, 2], [4096, 4000, 1, 0, 2048, 3333, 129, 4095], [0] * 8):
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q.copy_(2 * torch.randn(q.shape, generator=gen).to(dtype))
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        expected = pda.paged_decode_attention_reference(q, kv_cache, block_tables, seq_lens, scale)
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
