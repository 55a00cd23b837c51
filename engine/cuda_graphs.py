"""Decode steps captured as CUDA graphs, one per batch-size bucket.

Owns the static input buffers that captured graphs read, the capture itself, and replay with padding.
A decode step then costs one graph launch instead of hundreds of kernel launches. Only for ops whose
decode path reads lengths on the device (`ops.supports_cuda_graphs`); prefill stays eager.

Padding rows of a bucket have sequence length 0 and write their K/V into slot 0, which lies in the null
block that the block pool never hands out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.model import DecoderLM
from splitserve.kernels.sampling import sample

if TYPE_CHECKING:
    from splitserve.engine.sampler import SamplingValues
    from splitserve.engine.step_inputs import HostInputs


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64, of 16 up to 256, then of 32: fine where batches are small
    and common, and at most ~6% padding beyond (512 sequences take 31 graphs)."""
    sizes = [1, 2, 4, *range(8, 65, 8), *range(80, 257, 16), *range(288, max(max_num_seqs, 288) + 32, 32)]
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Static inputs live in `token_buffer` (shared with the model runner): the first `max_num_seqs`
    entries hold the last step's sampled tokens; a bucket of size S reads its inputs from the next 4S
    entries, laid out [token ids | token sources | positions | slots], so one host copy fills them.
    Input token i is `token_buffer[token_source[i]]`: a known id from the inputs, or a sampled token of
    the previous step (see `ModelRunner.prepare`).

    A graph also samples (`kernels.sampling.sample`, from static per-row values: `SamplingValues`) into
    the front of `token_buffer`; a step that samples otherwise (penalties) replays it with temperature 0
    everywhere (greedy, cheap) and overwrites those tokens."""

    @staticmethod
    def buffer_size(max_num_seqs: int) -> int:
        return 5 * max_num_seqs

    def __init__(
        self,
        model: DecoderLM,
        kv_caches: list[torch.Tensor],
        token_buffer: torch.Tensor,
        max_num_seqs: int,
        max_blocks_per_seq: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = batch_buckets(max_num_seqs)
        self.rows = max_num_seqs
        device = kv_caches[0].device
        assert token_buffer.numel() >= self.buffer_size(max_num_seqs) and self.buckets[-1] == max_num_seqs
        self.token_buffer = token_buffer
        self.seq_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)
        # The sampler's per-row values (see `SamplingValues`); padding rows are greedy (temperature 0).
        self.sample_floats = torch.zeros(3, max_num_seqs, dtype=torch.float32, device=device)
        self.sample_top_k = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.sample_ints = torch.zeros(2, max_num_seqs, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token ids, token sources, positions, slots) views of a bucket's static inputs."""
        r = self.rows
        ids, src, pos, slots = self.token_buffer[r : r + 4 * size].view(4, size)
        return ids, src, pos, slots

    def _forward(self, size: int) -> torch.Tensor:
        _, src, positions, slots = self._inputs(size)
        input_ids = self.token_buffer[: self.rows + size][src]  # sampled tokens and known ids
        meta = AttentionMetadata(
            phase="decode",
            slot_mapping=slots,
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            query_start_loc_host=(),  # nothing host-side: the graph must not depend on lengths
            seq_lens_host=(),
        )
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden)  # [size, vocab_size]
        floats, ints = self.sample_floats[:, :size], self.sample_ints[:, :size]
        sample(logits, floats[0], self.sample_top_k[:size], floats[1], floats[2], ints[0], ints[1],
               out=self.token_buffer[:size])  # fmt: skip
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool. Inputs are zero: empty
        sequences writing into the null block."""
        pool = None
        for size in reversed(self.buckets):
            # Buckets lay their inputs over one region differently: clear it, so that positions and
            # slots are 0 (the null block) rather than another bucket's leftovers.
            self.token_buffer[self.rows : self.rows + 4 * size].zero_()
            _, src, _, _ = self._inputs(size)
            src.copy_(torch.arange(self.rows, self.rows + size))  # every token is a known id (0)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up compiles kernels outside the capture
                self._forward(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads in this process (another engine's loop, a KV
            # sender's copies) do not invalidate this capture; only this thread's would.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def run(
        self, inputs: HostInputs, upload: Callable[..., torch.Tensor], sampling: SamplingValues | None
    ) -> torch.Tensor:
        """Replay the smallest bucket that holds a decode batch; returns logits [num_seqs, vocab_size], and
        the tokens drawn with `sampling` are in the front of `token_buffer` (None: greedy there, for the
        caller to sample). Padding rows are empty sequences (length 0) writing into slot 0 of the null
        block. `upload(values, out=)` copies a host array into a device tensor without waiting for it."""
        n = len(inputs.seq_lens)
        size = self.bucket_for(n)
        assert size is not None and inputs.num_tokens == n
        longs = np.zeros((4, size), np.int64)
        longs[0, :n] = inputs.token_ids
        longs[1] = np.arange(self.rows, self.rows + size)
        longs[1, :n] = inputs.token_src
        longs[2, :n] = inputs.positions
        longs[3, :n] = inputs.slots
        r = self.rows
        upload(longs.ravel(), out=self.token_buffer[r : r + 4 * size])
        seq_lens = np.zeros(size, np.int32)
        seq_lens[:n] = inputs.seq_lens
        upload(seq_lens, out=self.seq_lens[:size])
        tables = inputs.block_tables
        upload(tables, out=self.block_tables[:n, : tables.shape[1]])
        floats, top_k, ints = (
            np.zeros((3, size), np.float32),
            np.zeros(size, np.int32),
            np.zeros((2, size), np.int64),
        )
        if sampling is not None:
            floats[:, :n], top_k[:n], ints[:, :n] = sampling
        upload(floats, out=self.sample_floats[:, :size])
        upload(top_k, out=self.sample_top_k[:size])
        upload(ints, out=self.sample_ints[:, :size])
        self.graphs[size].replay()
        return self.logits[size][:n]
