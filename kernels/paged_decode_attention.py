"""Split-KV (flash-decoding) paged attention for decode: one query token per sequence over its paged context.

Owns the two Triton kernels (per-split partial attention, then a log-sum-exp merge), their launcher, the
host-side choice of the split count, and a plain-torch reference. It does not write K/V into the cache nor
build block tables; it reads the cache layout of `splitserve.engine.attention`:
kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V), contiguous.

CUDA graphs: the launch grid depends only on shapes (num_seqs, num_kv_heads, max_splits); each program
reads its sequence's length on the device and derives its own KV range, so a captured graph stays valid as
lengths change. The launcher never syncs with the host. A row with seq_len 0 (a graph's padding row)
reads no K/V and its output is zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from splitserve.kernels.paged_checks import check_block_tables, check_out_and_devices, check_q_and_cache

MAX_SPLITS = 64  # the merge reads each (sequence, head)'s split LSEs as one vector
CPU_NUM_SMS = 4  # the interpreter runs programs one by one: few splits keep CPU tests fast
# Batches of at most SMALL_BATCH sequences take finer splits and fewer stages (see `default_tuning`):
# measured in CUDA graphs on an H100, batch 1 / context 2k 9.1 -> 7.5 µs, batch 8 / 4k 33.5 -> 32.1 µs
# (benchmarks/decode_attention_sweep.py, docs/benchmarks.md).
SMALL_BATCH = 8
SMALL_BATCH_TUNING = {"num_stages": 2, "min_split_chunks": 1, "programs_per_sm": 4}


@dataclass(frozen=True)
class DecodeTuning:
    """Launch knobs, the ones a GPU sweep varies; the defaults are first guesses for H100."""

    block_n: int = 64  # tokens per inner-loop iteration (K and V tiles of [block_n, head_dim])
    num_warps: int = 4
    num_stages: int = 3  # 3 lets the block-id gather run one iteration ahead of the K/V copies
    min_split_chunks: int = 4  # a split covers at least this many block_n chunks (256 tokens)
    # Full-context batches aim for this many stage-1 programs per SM. 2 measured best at batch 64 on an
    # H100 (one split, no merge: 0.82-0.89 of copy bandwidth against 0.64-0.71 with 4); see
    # benchmarks/decode_attention_sweep.py and docs/benchmarks.md.
    programs_per_sm: int = 2

    @property
    def min_split_len(self) -> int:
        return self.min_split_chunks * self.block_n


def default_tuning(head_dim: int, num_seqs: int = 64) -> DecodeTuning:
    """Wide heads halve the token tile so K+V tiles of all pipeline stages fit in shared memory. Small
    batches (each CUDA-graph bucket is its own launch) spread each sequence over more, shorter splits:
    with few (sequence, KV head) pairs the SMs would otherwise idle."""
    block_n = 32 if head_dim > 128 else 64
    if num_seqs <= SMALL_BATCH:
        return DecodeTuning(block_n=block_n, **SMALL_BATCH_TUNING)
    return DecodeTuning(block_n=block_n)


@triton.jit
def _split_kv_kernel(
    q_ptr, kv_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale_log2, max_splits, min_split_len, max_context_len, num_heads,
    stride_q_seq, stride_q_head, stride_kv, stride_block, stride_token, stride_bt_seq,
    stride_out_seq, stride_out_head,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (seq, kv_head, split): every query head of the KV group over one slice of the context.

    Tokens are walked in BLOCK_N chunks that may span several cache blocks: each token's physical block
    is gathered from the block table, so BLOCK_N is tuned independently of block_size (block_size 16
    would otherwise cap the tile at 16 tokens). Every token row is HEAD_DIM contiguous elements, so each
    K/V tile load is BLOCK_N wide contiguous rows. Scores and partial sums are kept in base 2.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Clamped to the block table's capacity so a bad length cannot read past the table row.
    seq_len = tl.minimum(tl.maximum(tl.load(seq_lens_ptr + seq), 0), max_context_len)
    # The split count is decided here, per sequence: short contexts use fewer, longer-than-minimum
    # splits; splits past the end (or all of them when seq_len is 0) get an empty range.
    num_splits = tl.minimum(tl.maximum(tl.cdiv(seq_len, min_split_len), 1), max_splits)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    kv_start = split * split_len
    kv_end = tl.minimum(kv_start + split_len, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # query head h attends with kv head h // GROUP
    q_mask = g_mask[:, None] & d_mask[None, :]
    q_ptrs = q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [GROUP_PAD, BLOCK_D], padded heads and dims zero

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt_seq
    k_base = kv_ptr + kv_head * HEAD_DIM
    for start in range(kv_start, kv_end, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < kv_end  # every chunk holds at least one live token, so m_new below is finite
        block_ids = tl.load(block_table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        rows = block_ids * stride_block + (pos % BLOCK_SIZE) * stride_token  # [BLOCK_N]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(k_base + stride_kv + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_work = l_i > 0  # l_i >= 1 after any live token; 0 for an empty split
    l_safe = tl.where(has_work, l_i, 1.0)
    o = acc / l_safe[:, None]  # zeros for an empty split
    if DIRECT:  # one split: the partial result is the answer
        o_ptrs = out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (seq * num_heads + heads) * max_splits + split  # [GROUP_PAD] workspace rows
        tl.store(part_lse_ptr + row, tl.where(has_work, m_i + tl.log2(l_safe), float("-inf")), mask=g_mask)
        # An empty split's LSE of -inf tells the merge to skip it, so its partial output is not written.
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=q_mask & has_work[:, None])


@triton.jit
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, max_splits, stride_out_seq, stride_out_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr, MERGE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Program (seq, head): out = sum_s 2^(lse_s - lse_max) * o_s / sum_s 2^(lse_s - lse_max)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    first_row = (seq * tl.num_programs(1) + head) * max_splits
    offs_p = tl.arange(0, SPLITS_PAD)
    lse = tl.load(part_lse_ptr + first_row + offs_p, mask=offs_p < max_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # Every split empty (seq_len 0): any finite shift keeps the weights 0 instead of NaN.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp2(lse - lse_max), 0)

    offs_c = tl.arange(0, MERGE_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], tl.float32)
    # Chunks of splits bound the [chunk, BLOCK_D] tile held in registers.
    for chunk in range(0, max_splits, MERGE_CHUNK):
        split = chunk + offs_c
        lse_c = tl.load(part_lse_ptr + first_row + split, mask=split < max_splits, other=float("-inf"))
        live = lse_c > float("-inf")
        parts = tl.load(
            part_out_ptr + (first_row + split)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=live[:, None] & d_mask[None, :],
            other=0.0,
        )  # [MERGE_CHUNK, BLOCK_D]
        acc += tl.sum(tl.exp2(lse_c - lse_max)[:, None] * parts, 0)
    o = acc / tl.where(total > 0, total, 1.0)
    o_ptrs = out_ptr + seq * stride_out_seq + head * stride_out_head + offs_d
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def choose_max_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int,
    block_n: int,
    *,
    min_split_chunks: int = DecodeTuning.min_split_chunks,
    programs_per_sm: int = DecodeTuning.programs_per_sm,
) -> int:
    """Splits per (sequence, kv head) for a launch, from shapes and capacity only (never current lengths,
    so the grid of a captured graph fits every later step): enough that a batch at full context
    (`max_seq_len`, the model's or block table's capacity) gives `programs_per_sm` programs per SM, no
    more than would leave a full-context split shorter than `min_split_chunks * block_n`, at most
    MAX_SPLITS. Raises ValueError on non-positive sizes."""
    if min(num_seqs, num_kv_heads, max_seq_len, num_sms, block_n, min_split_chunks, programs_per_sm) < 1:
        raise ValueError("choose_max_splits needs positive sizes")
    wanted = math.ceil(programs_per_sm * num_sms / (num_seqs * num_kv_heads))
    useful = math.ceil(max_seq_len / (min_split_chunks * block_n))
    return max(1, min(wanted, useful, MAX_SPLITS))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_NUM_SMS


def _validate(q, kv_cache, block_tables, seq_lens, out) -> None:
    """Shape, dtype, device and layout checks that read no device memory."""
    check_q_and_cache(q, kv_cache, rows="num_seqs")
    num_seqs = q.shape[0]
    check_block_tables(block_tables, num_seqs)
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        raise ValueError(
            f"seq_lens must be contiguous int32 [{num_seqs}]; got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    check_out_and_devices(q, out, kv_cache=kv_cache, block_tables=block_tables, seq_lens=seq_lens)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, including the current token
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_splits: int | None = None,
    tuning: DecodeTuning | None = None,
) -> torch.Tensor:
    """Decode attention, [num_seqs, num_heads, head_dim] in q's dtype, written into `out` when given
    (and returned). Rows with seq_len 0 come out as zeros. `max_splits` defaults to `choose_max_splits`
    at the block table's capacity (max_blocks * block_size). Raises ValueError on mismatched inputs;
    lengths past the block table's capacity are clamped to it; block ids must lie in the cache."""
    _validate(q, kv_cache, block_tables, seq_lens, out)
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    tuning = tuning or default_tuning(head_dim, num_seqs)
    max_context_len = block_tables.shape[1] * block_size
    if max_splits is None:
        max_splits = choose_max_splits(
            max(num_seqs, 1), num_kv_heads, max(max_context_len, 1), _num_sms(q.device), tuning.block_n,
            min_split_chunks=tuning.min_split_chunks, programs_per_sm=tuning.programs_per_sm,
        )  # fmt: skip
    if not 1 <= max_splits <= MAX_SPLITS:
        raise ValueError(f"max_splits must be in [1, {MAX_SPLITS}]; got {max_splits}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [num_seqs, num_heads, head_dim]
    if num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every tile side >= 16
    direct = max_splits == 1
    part_out = part_lse = out  # unused placeholders when one split writes `out` directly
    if not direct:
        f32 = {"dtype": torch.float32, "device": q.device}
        part_out = torch.empty(num_seqs, num_heads, max_splits, head_dim, **f32)  # [.., max_splits, head_dim]
        part_lse = torch.empty(num_seqs, num_heads, max_splits, **f32)  # [num_seqs, num_heads, max_splits]
    _split_kv_kernel[(num_seqs, num_kv_heads, max_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * math.log2(math.e), max_splits, tuning.min_split_len, max_context_len, num_heads,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=tuning.block_n, BLOCK_SIZE=block_size, DIRECT=direct,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 tests want exact products
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )  # fmt: skip
    if not direct:
        splits_pad = triton.next_power_of_2(max_splits)
        _merge_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, max_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS_PAD=splits_pad, MERGE_CHUNK=min(splits_pad, 16),
            num_warps=4,
        )  # fmt: skip
    return out


def paged_decode_attention_reference(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain torch, fp32 math, one sequence at a time; same contract as the kernel (seq_len 0 → zeros).
    Reads the lengths on the host: for tests and benchmarks, not for CUDA graphs."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_seqs, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len <= 0:
            continue
        block_ids = block_tables[i, : -(-seq_len // block_size)].long()
        k = kv_cache[0, block_ids].flatten(0, 1)[:seq_len].float()  # [seq_len, num_kv_heads, head_dim]
        v = kv_cache[1, block_ids].flatten(0, 1)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[i].float(), k) * scale  # [num_heads, seq_len]
        out[i] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), v)
    return out.to(q.dtype)
