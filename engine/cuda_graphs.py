"""Decode steps captured as CUDA graphs, one per batch-size bucket.

Owns the static input buffers that captured graphs read, the capture itself, and replay with padding.
A decode step then costs one graph launch instead of hundreds of kernel launches. Only for ops whose
decode path reads lengths on the device (`ops.supports_cuda_graphs`); prefill stays eager.

Padding rows of a bucket have sequence length 0 and write their K/V into slot 0, which lies in the null
block that the block pool never hands out.
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.model import DecoderLM


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64, then of 16: fine where batches are small and common."""
    sizes = [1, 2, 4, *range(8, 65, 8), *range(80, max(max_num_seqs, 80) + 16, 16)]
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(
        self, model: DecoderLM, kv_caches: list[torch.Tensor], max_num_seqs: int, max_blocks_per_seq: int
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = batch_buckets(max_num_seqs)
        device = kv_caches[0].device
        size = self.buckets[-1]
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(size, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            phase="decode",
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            query_start_loc_host=(),  # nothing host-side: the graph must not depend on lengths
            seq_lens_host=(),
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self._meta(size))
        return self.model.compute_logits(hidden)  # [size, vocab_size]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        pool = None
        for size in reversed(self.buckets):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up compiles kernels outside the capture
                self._forward(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def run(
        self,
        input_ids: torch.Tensor,  # [num_seqs]
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Replay the smallest bucket that holds the batch; returns logits [num_seqs, vocab_size]."""
        n = input_ids.shape[0]
        size = self.bucket_for(n)
        assert size is not None and meta.phase == "decode"
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if size > n:  # padding rows: empty sequences writing into the null block
            self.slot_mapping[n:size].zero_()
            self.seq_lens[n:size].zero_()
        self.graphs[size].replay()
        return self.logits[size][:n]
