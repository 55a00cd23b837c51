"""Paged prefill attention: the Triton kernel against its plain-torch reference and against the engine's
torch path (`engine.attention.prefill_attention`), and the reference against a dense computation. Without
CUDA the kernel runs in Triton's interpreter at small sizes."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import splitserve.kernels.paged_prefill_attention as ppa
from splitserve.engine.attention import AttentionMetadata, prefill_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")
TOLERANCES = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # atol = rtol


def skip_bf16_in_interpreter(dtype: torch.dtype) -> None:
    """Triton's interpreter keeps bf16 tensors as uint16 bit patterns and its tl.dot multiplies those
    integers, so bf16 runs only on a GPU (the gpu tests below)."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter's tl.dot mishandles bf16")


class Batch:
    """Kernel inputs for sequences of (num_cached, num_new) tokens, plus the engine's metadata."""

    def __init__(self, seed, seqs, num_kv_heads, group, head_dim, block_size, dtype, max_blocks=None):
        """q is the query part of a packed qkv projection [num_tokens, (heads + 2 kv_heads) * head_dim],
        so its token stride is not num_heads * head_dim. Block tables hold shuffled ids, never the null
        block 0, padded with 0. The null block and every slot past a sequence's length hold NaN, so
        reading any of them poisons the output."""
        gen = torch.Generator().manual_seed(seed)
        seq_lens = [c + n for c, n in seqs]
        blocks_per_seq = [-(-n // block_size) for n in seq_lens]
        max_blocks = max_blocks or max(blocks_per_seq) + 1  # a padded column beyond every sequence
        num_blocks = sum(blocks_per_seq) + 4
        num_heads, num_tokens = num_kv_heads * group, sum(n for _, n in seqs)
        kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
        qkv = 2 * torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)  # peaky
        block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
        free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # non-contiguous, never 0
        kv_cache[:, 0] = NAN
        for i, (seq_len, num_used) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
            ids = [free.pop() for _ in range(num_used)]
            block_tables[i, :num_used] = torch.tensor(ids, dtype=torch.int32)
            if seq_len % block_size:
                kv_cache[:, ids[-1], seq_len % block_size :] = NAN
        starts = [0, *itertools.accumulate(n for _, n in seqs)]
        qkv = qkv.to(dtype).to(DEVICE)
        self.q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
        self.kv_cache = kv_cache.to(dtype).to(DEVICE)
        self.block_tables = block_tables.to(DEVICE)
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        self.max_query_len = max(n for _, n in seqs)
        self.meta = AttentionMetadata(
            phase="prefill",
            slot_mapping=self._slots(seqs, block_tables, block_size).to(DEVICE),
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            query_start_loc_host=tuple(starts),
            seq_lens_host=tuple(seq_lens),
        )

    @staticmethod
    def _slots(seqs, block_tables, block_size) -> torch.Tensor:
        positions = [(i, p) for i, (c, n) in enumerate(seqs) for p in range(c, c + n)]
        return torch.tensor(
            [int(block_tables[i, p // block_size]) * block_size + p % block_size for i, p in positions],
            dtype=torch.int64,
        )  # [num_tokens]

    @property
    def args(self) -> tuple:
        return self.q, self.kv_cache, self.block_tables, self.query_start_loc, self.seq_lens


def run_kernel(batch: Batch, scale: float, **kwargs) -> torch.Tensor:
    kwargs.setdefault("max_query_len", batch.max_query_len)
    out = torch.full(batch.q.shape, NAN, dtype=batch.q.dtype, device=DEVICE)  # poisoned
    result = ppa.paged_prefill_attention(*batch.args, scale, out=out, **kwargs)
    assert result is out
    assert torch.isfinite(out).all(), "some output element was not written (or read poison)"
    return out


def assert_matches_reference(out: torch.Tensor, batch: Batch, scale: float) -> None:
    tol = TOLERANCES[batch.q.dtype]
    expected = ppa.paged_prefill_attention_reference(*batch.args, scale)
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def contexts(seed: int, num_seqs: int, block_size: int) -> list[tuple[int, int]]:
    """(num_cached, num_new) per sequence: several blocks cached (the last one partial) with many new
    tokens, nothing cached, a partial block with one new token (a decode-like row), exactly one block."""
    gen = torch.Generator().manual_seed(seed)
    new = [int(torch.randint(lo, 41, (1,), generator=gen)) for lo in (20, 2, 1, 1)]
    new[2] = 1
    cached = [3 * block_size - 5, 0, block_size // 2 + 1, block_size]
    return list(zip(cached, new, strict=True))[:num_seqs]


# Small tiles make even short contexts take several query and key tiles: m16 holds 2..16 tokens, n16 keeps
# key tiles inside a cache block, n64 makes them span four 16-token blocks.
TUNINGS = {
    "m16n16": ppa.PrefillTuning(block_m=16, block_n=16),
    "m32n64": ppa.PrefillTuning(block_m=32, block_n=64),
    "m64n32": ppa.PrefillTuning(block_m=64, block_n=32),
}
GRID = [
    (num_seqs, 2, group, head_dim, block_size, tuning, torch.float32)
    for (num_seqs, group, head_dim), (block_size, tuning) in itertools.product(
        [(1, 1, 32), (4, 2, 16), (3, 4, 64), (4, 4, 32)], [(16, "m16n16"), (64, "m32n64"), (16, "m64n32")]
    )
] + [
    (2, 2, 2, 48, 16, "m32n64", torch.float32),  # head_dim not a power of two
    (3, 1, 4, 80, 64, "m64n32", torch.float32),
    (3, 1, 8, 32, 8, "m16n16", torch.float32),  # GQA 8 (two tokens per m16 tile), 8-token blocks
    (2, 2, 3, 32, 16, "m16n16", torch.float32),  # a group that is not a power of two: 5 tokens, 15 rows
    (4, 2, 2, 32, 128, "m64n32", torch.float32),
    (4, 2, 4, 32, 16, "m32n64", torch.float16),
    (3, 2, 2, 64, 64, "m16n16", torch.float16),
    (4, 2, 4, 32, 16, "m32n64", torch.bfloat16),
    (3, 1, 2, 48, 64, "m64n32", torch.bfloat16),
]


def seed_of(*case) -> int:
    return zlib.crc32(repr(case).encode())


def dtype_id(value) -> str | None:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


@pytest.mark.parametrize(
    ("num_seqs", "num_kv_heads", "group", "head_dim", "block_size", "tuning", "dtype"), GRID, ids=dtype_id
)
def test_kernel_matches_reference_and_engine(
    num_seqs, num_kv_heads, group, head_dim, block_size, tuning, dtype
):
    seed = seed_of(num_seqs, num_kv_heads, group, head_dim, block_size, tuning, dtype)
    seqs = contexts(seed, num_seqs, block_size)
    skip_bf16_in_interpreter(dtype)
    batch = Batch(seed, seqs, num_kv_heads, group, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    out = run_kernel(batch, scale, tuning=TUNINGS[tuning])
    assert_matches_reference(out, batch, scale)
    engine = prefill_attention(batch.q, batch.kv_cache, batch.meta, scale)
    torch.testing.assert_close(out, engine, atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])


@pytest.mark.parametrize(
    ("head_dim", "dtype"),
    [
        (32, torch.float32),
        (64, torch.float16),
        (128, torch.bfloat16),
        (128, torch.float32),
        (256, torch.float16),
    ],
    ids=dtype_id,
)
def test_default_tuning_matches_reference(head_dim, dtype):
    skip_bf16_in_interpreter(dtype)
    batch = Batch(head_dim, [(37, 9), (0, 21)], 1, 4, head_dim, 16, dtype)
    assert_matches_reference(run_kernel(batch, 0.1), batch, 0.1)


def test_strided_output_and_contiguous_q():
    """out a per-head view of a wider buffer, q contiguous: both are addressed through their strides."""
    batch = Batch(3, [(20, 17), (5, 3)], 2, 2, 32, 16, torch.float32)
    batch.q = batch.q.contiguous()
    wide = torch.full((batch.q.shape[0], 4, 2 * 32), NAN, device=DEVICE)  # [num_tokens, heads, 2 * head_dim]
    out = wide[:, :, 16:48]
    ppa.paged_prefill_attention(*batch.args, 0.2, max_query_len=17, out=out, tuning=TUNINGS["m16n16"])
    assert_matches_reference(out, batch, 0.2)
    assert wide[:, :, :16].isnan().all() and wide[:, :, 48:].isnan().all(), "wrote outside the view"


def test_empty_sequences_and_a_larger_grid():
    """Padding rows (no cached and no new tokens), a cached sequence with no new tokens, and a grid sized
    for longer queries than any sequence has: the extra programs exit without writing."""
    batch = Batch(5, [(0, 0), (40, 0), (17, 6), (0, 0), (0, 1)], 2, 2, 16, 16, torch.float32)
    out = run_kernel(batch, 0.3, max_query_len=64, tuning=TUNINGS["m16n16"])
    assert_matches_reference(out, batch, 0.3)


@pytest.mark.parametrize("max_query_len", [0, 5])
def test_no_launch_without_tokens(max_query_len):
    batch = Batch(6, [(12, 0), (0, 0)], 1, 2, 16, 16, torch.float32)
    out = ppa.paged_prefill_attention(*batch.args, 0.3, max_query_len=max_query_len)
    assert out.shape == (0, 2, 16)


def test_hundreds_of_sequences():
    """A wide batch: 200 sequences of 1 to 3 new tokens after 0 to 40 cached, one KV head."""
    gen = torch.Generator().manual_seed(8)
    num_cached = torch.randint(0, 41, (200,), generator=gen).tolist()
    num_new = torch.randint(1, 4, (200,), generator=gen).tolist()
    batch = Batch(8, list(zip(num_cached, num_new, strict=True)), 1, 2, 16, 16, torch.float16)
    out = run_kernel(batch, 0.25, tuning=ppa.PrefillTuning(block_m=16, block_n=64))
    assert_matches_reference(out, batch, 0.25)


def test_reference_matches_dense_softmax():
    """Write dense per-sequence K/V into a shuffled paged cache, then compare the reference against the
    causal softmax(q K^T * scale) V computed query by query, head by head on the dense tensors."""
    gen = torch.Generator().manual_seed(3)
    num_kv_heads, group, head_dim, block_size = 2, 3, 8, 4
    seqs = [(3, 4), (0, 5), (6, 1)]  # (num_cached, num_new)
    kv_cache = torch.zeros(2, 10, block_size, num_kv_heads, head_dim)
    block_tables = torch.zeros(3, 3, dtype=torch.int32)
    block_ids = iter(torch.randperm(9, generator=gen).add(1).tolist())
    q = torch.randn(10, num_kv_heads * group, head_dim, generator=gen)  # [num_tokens, num_heads, head_dim]
    expected = torch.empty_like(q)
    token = 0
    for i, (num_cached, num_new) in enumerate(seqs):
        seq_len = num_cached + num_new
        k, v = torch.randn(2, seq_len, num_kv_heads, head_dim, generator=gen)  # [seq_len, kv_heads, dim]
        for t in range(seq_len):
            if t % block_size == 0:
                block_tables[i, t // block_size] = next(block_ids)
            kv_cache[:, block_tables[i, t // block_size], t % block_size] = torch.stack([k[t], v[t]])
        for r, h in itertools.product(range(num_new), range(num_kv_heads * group)):
            visible = num_cached + r + 1
            weights = torch.softmax(k[:visible, h // group] @ q[token + r, h] * 0.5, dim=0)  # [visible]
            expected[token + r, h] = weights @ v[:visible, h // group]
        token += num_new
    query_start_loc = torch.tensor([0, 4, 9, 10], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32)
    got = ppa.paged_prefill_attention_reference(q, kv_cache, block_tables, query_start_loc, seq_lens, 0.5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


BAD_INPUTS = {  # case: (what the message names, the arguments it replaces)
    "int64 block tables": ("block_tables", lambda b: {"block_tables": b.block_tables.long()}),
    "int64 lengths": ("seq_lens", lambda b: {"seq_lens": b.seq_lens.long()}),
    "int64 query starts": ("query_start_loc", lambda b: {"query_start_loc": b.query_start_loc.long()}),
    "query starts without the end": (
        "query_start_loc",
        lambda b: {"query_start_loc": b.query_start_loc[:-1]},
    ),
    "heads not a multiple of kv heads": ("multiple", lambda b: {"q": b.q[:, :3]}),
    "head_dim mismatch": ("head_dim must match", lambda b: {"q": b.q[..., :8]}),
    "dtype mismatch": ("share", lambda b: {"q": b.q.half()}),
    "unsupported dtype": ("share", lambda b: {"q": b.q.double(), "kv_cache": b.kv_cache.double()}),
    "batch mismatch": ("block_tables", lambda b: {"block_tables": b.block_tables.repeat(2, 1)}),
    "cache without the K/V axis": ("kv_cache", lambda b: {"kv_cache": b.kv_cache[0]}),
    "non-contiguous cache": ("contiguous", lambda b: {"kv_cache": b.kv_cache.mT.contiguous().mT}),
    "q with strided head_dim": ("unit-stride", lambda b: {"q": b.q.mT.contiguous().mT}),
    "head_dim over 256": (
        "head_dim must be in",
        lambda b: {"q": b.q.new_zeros(5, 4, 264), "kv_cache": b.kv_cache.new_zeros(2, 3, 8, 2, 264)},
    ),
    "q on another device": ("one device", lambda b: {"q": b.q.to("meta")}),
    "out of another dtype": ("out must be", lambda b: {"out": b.q.new_zeros(b.q.shape, dtype=torch.float16)}),
    "out of another shape": ("out must be", lambda b: {"out": b.q.new_zeros(6, 4, 16)}),
    "negative max_query_len": ("max_query_len", lambda b: {"max_query_len": -1}),
    "max_query_len on the device": ("max_query_len", lambda b: {"max_query_len": torch.tensor(3)}),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_launcher_rejects_bad_inputs(case):
    batch = Batch(5, [(4, 3), (0, 2)], 2, 2, 16, 16, torch.float32)  # q [5, 4, 16], cache [2, 6, 16, 2, 16]
    match, replace = BAD_INPUTS[case]
    kwargs = {"q": batch.q, "kv_cache": batch.kv_cache, "block_tables": batch.block_tables,
              "query_start_loc": batch.query_start_loc, "seq_lens": batch.seq_lens, "scale": 0.25,
              "max_query_len": 3} | replace(batch)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        ppa.paged_prefill_attention(**kwargs)


@pytest.mark.parametrize("knobs", [{"block_m": 8}, {"block_n": 48}, {"num_warps": 0}])
def test_tuning_rejects_bad_knobs(knobs):
    with pytest.raises(ValueError):
        ppa.PrefillTuning(**knobs)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("seqs", "num_kv_heads", "group", "head_dim", "block_size", "dtype"),
    [
        ([(1500, 2048), (3000, 1024)], 8, 4, 64, 16, torch.bfloat16),
        ([(1500, 2048), (3000, 1024)], 8, 4, 128, 16, torch.bfloat16),
        ([(2048, 1200), (0, 1), (1024, 1777)], 8, 4, 128, 64, torch.float16),
        ([(0, 2000), (2500, 1000)], 4, 8, 64, 32, torch.bfloat16),
        ([(3000, 512), (5, 1)], 8, 1, 256, 16, torch.bfloat16),
        ([(100, 700), (900, 3)], 8, 2, 80, 128, torch.float16),
    ],
)
def test_gpu_full_size_matches_reference_and_engine(seqs, num_kv_heads, group, head_dim, block_size, dtype):
    batch = Batch(seed_of(seqs, head_dim), seqs, num_kv_heads, group, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    out = run_kernel(batch, scale)
    assert_matches_reference(out, batch, scale)
    engine = prefill_attention(batch.q, batch.kv_cache, batch.meta, scale)
    torch.testing.assert_close(out, engine, atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])


@pytest.mark.gpu
def test_gpu_launch_never_syncs_and_a_captured_graph_follows_new_lengths():
    """Capture once; replay after rewriting the lengths, query starts and q in place."""
    capacity, block_size, scale, max_query_len = 4096, 16, 64**-0.5, 512
    seqs = [(capacity - 256, 256)] * 4
    batch = Batch(1, seqs, 8, 4, 64, block_size, torch.bfloat16, max_blocks=capacity // block_size)
    # Slots past each length hold real data here: kernel and reference must both stop at the length.
    out = torch.empty_like(batch.q)  # [num_tokens, num_heads, head_dim]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        ppa.paged_prefill_attention(*batch.args, scale, max_query_len=max_query_len, out=out)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the launcher raises
    try:
        ppa.paged_prefill_attention(*batch.args, scale, max_query_len=max_query_len, out=out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync here would fail the capture
        ppa.paged_prefill_attention(*batch.args, scale, max_query_len=max_query_len, out=out)
    gen = torch.Generator().manual_seed(2)
    steps = [
        ([256] * 4, [3840] * 4),  # (num_new, num_cached) per sequence
        ([1, 512, 0, 511], [0, 100, 4096, 3000]),
        ([7, 9, 1, 1], [0] * 4),
    ]
    for new, cached in steps:
        starts = [0, *itertools.accumulate(new)]
        batch.query_start_loc.copy_(torch.tensor(starts, dtype=torch.int32))
        batch.seq_lens.copy_(torch.tensor([c + n for c, n in zip(cached, new, strict=True)]).int())
        batch.q.copy_(2 * torch.randn(batch.q.shape, generator=gen).to(batch.q.dtype))
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        expected = ppa.paged_prefill_attention_reference(*batch.args, scale)
        torch.testing.assert_close(out[: starts[-1]], expected[: starts[-1]], atol=2e-2, rtol=2e-2)
