"""Runs the model on a scheduled batch: builds the flat inputs and attention metadata, owns the KV tensors.

Owns device placement, the weights in memory and the per-layer paged KV cache tensors. It does not
decide what runs (the scheduler) or pick tokens (the sampler).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.block_pool import NULL_BLOCK_ID
from splitserve.engine.checkpoint import load_weights
from splitserve.engine.config import CacheConfig
from splitserve.engine.cuda_graphs import DecodeGraphs
from splitserve.engine.model import DecoderLM
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.ops import ModelOps
from splitserve.engine.scheduler import ScheduledBatch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shared_kv_caches(shape: tuple[int, ...], dtype: torch.dtype, num_layers: int):
    """Zeroed per-layer CPU caches, back to back in one memfd (freed with the last process mapping it).
    Returns (fd, caches); another process of the same user reads them through /proc/<pid>/fd/<fd>."""
    layer_bytes = math.prod(shape) * dtype.itemsize
    total = num_layers * layer_bytes
    fd = os.memfd_create("splitserve-kv", os.MFD_CLOEXEC)
    os.ftruncate(fd, total)
    flat = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=total, dtype=torch.uint8)
    return fd, [
        flat[i * layer_bytes : (i + 1) * layer_bytes].view(dtype).view(shape) for i in range(num_layers)
    ]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and not what the CPU tests compare
    return _DTYPES.get(cfg.torch_dtype, torch.bfloat16)


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.kv_size * dtype.itemsize


def num_kv_blocks(
    cache: CacheConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_tokens: int
) -> int:
    """Blocks for the KV cache: as configured, else what the memory budget holds, but never more than
    `max_tokens` (every sequence at full length) could use, plus the null block."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * cache.gpu_memory_utilization
    else:
        budget = cache.kv_cache_memory_gib * 2**30
    by_memory = int(budget // kv_block_bytes(cfg, cache.block_size, dtype))
    by_need = -(-max_tokens // cache.block_size) + 1
    return max(2, min(by_memory, by_need))


@dataclass(frozen=True)
class HostInputs:
    """One step's inputs, built on the host. Token ids the host does not know yet (sampled by the step
    still running) are read on the device: input token i is `[sampled rows | token_ids][token_src[i]]`."""

    token_ids: list[int]  # [num_tokens], 0 where the token is pending
    token_src: list[int]  # [num_tokens]
    positions: list[int]
    slots: list[int]
    logits_indices: list[int]  # [num_sampling_seqs], rows of the hidden states to sample from
    query_start_loc: list[int]  # [num_seqs + 1]
    seq_lens: list[int]  # [num_seqs]
    block_tables: np.ndarray  # [num_seqs, max_blocks] int32, padded with the null block

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        path: str | Path,
        cache: CacheConfig,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        max_num_seqs: int,
        ops: ModelOps,
        enforce_eager: bool = False,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.block_size = cache.block_size
        self.ops = ops
        with torch.device(device):
            self.model = DecoderLM(cfg, max_positions=max_model_len, ops=self.ops).to(dtype)
        self.model.rotary.float()  # cos/sin tables stay float32, as in transformers
        load_weights(self.model, path)
        self.num_blocks = num_kv_blocks(cache, cfg, dtype, device, max_num_seqs * max_model_len)
        shape = (2, self.num_blocks, cache.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_memfd: int | None = None  # the caches' memfd when they are shared (CPU)
        if cache.shared_memory and device.type == "cpu":
            self.kv_memfd, self.kv_caches = shared_kv_caches(shape, dtype, cfg.num_layers)
        else:
            self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        # [sampled tokens (a row per sampling sequence) | the graphs' static inputs]: each step's sampler
        # writes the front, and the next step reads its pending input tokens from there.
        self.max_rows = max_num_seqs
        size = DecodeGraphs.buffer_size(max_num_seqs)
        self.token_buffer = torch.zeros(size, dtype=torch.int64, device=device)
        self.sampled = self.token_buffer[:max_num_seqs]
        self._prev_rows: dict[str, int] = {}  # request id → its row in `sampled`, from the last step
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and self.ops.supports_cuda_graphs and not enforce_eager:
            max_blocks = -(-max_model_len // cache.block_size)
            self.graphs = DecodeGraphs(
                self.model, self.kv_caches, self.token_buffer, max_num_seqs, max_blocks
            )
            self.graphs.capture()

    def prepare(self, batch: ScheduledBatch) -> HostInputs:
        """The step's flat inputs on the host. A token at or past the end of a sequence's known tokens
        is the one its previous step sampled: it is read from that step's row of `sampled`."""
        token_ids: list[int] = []
        token_src: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        bs, rows = self.block_size, self.max_rows
        for item in batch.items:
            seq, start, end = item.seq, item.start, item.start + item.num_new_tokens
            known_end = min(end, seq.num_tokens)
            token_src.extend(range(rows + len(token_ids), rows + len(token_ids) + known_end - start))
            token_ids.extend(seq.token_ids[start:known_end])
            if end > known_end:  # the pending token: exactly one, the newest
                token_src.append(self._prev_rows[seq.request_id])
                token_ids.append(0)
            positions.extend(range(start, end))
            for b in range(start // bs, (end - 1) // bs + 1):  # slots, one run per block
                base = seq.block_ids[b] * bs - b * bs
                slots.extend(range(base + max(start, b * bs), base + min(end, (b + 1) * bs)))
            query_start_loc.append(len(token_ids))
            seq_lens.append(end)
            if item.samples:
                logits_indices.append(len(token_ids) - 1)
        width = max(len(it.seq.block_ids) for it in batch.items)
        tables = np.full((len(batch.items), width), NULL_BLOCK_ID, np.int32)
        for row, item in enumerate(batch.items):
            tables[row, : len(item.seq.block_ids)] = item.seq.block_ids
        self._prev_rows = {item.seq.request_id: k for k, item in enumerate(batch.sampling_items)}
        return HostInputs(
            token_ids, token_src, positions, slots, logits_indices, query_start_loc, seq_lens, tables
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """Launch one step; returns logits [num_sampling_seqs, vocab_size] in the model's dtype, in
        batch order. Never waits for the device. `layer_done(i)` runs after layer i's forward is
        launched (eager steps only: the caller passes it for prefill steps)."""
        inputs = self.prepare(batch)
        if batch.phase == "decode" and self.graphs is not None:
            # Every decode row samples, so the graph's logits rows are the sampling rows.
            return self.graphs.run(inputs, self._pinned)
        n, t = len(inputs.seq_lens), inputs.num_tokens
        longs = self._upload(
            np.array(
                inputs.token_ids + inputs.token_src + inputs.positions + inputs.slots + inputs.logits_indices,
                np.int64,
            )
        )
        ints = self._upload(
            np.concatenate(
                [np.array(inputs.query_start_loc + inputs.seq_lens, np.int32), inputs.block_tables.ravel()]
            )
        )
        meta = AttentionMetadata(
            phase=batch.phase,
            slot_mapping=longs[3 * t : 4 * t],
            query_start_loc=ints[: n + 1],
            seq_lens=ints[n + 1 : 2 * n + 1],
            block_tables=ints[2 * n + 1 :].view(inputs.block_tables.shape),
            query_start_loc_host=tuple(inputs.query_start_loc),
            seq_lens_host=tuple(inputs.seq_lens),
        )
        input_ids = torch.cat([self.sampled, longs[:t]])[longs[t : 2 * t]]
        hidden = self.model(input_ids, longs[2 * t : 3 * t], self.kv_caches, meta, layer_done)
        return self.model.compute_logits(hidden[longs[4 * t :]])

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Start copying a small device tensor to the host (pinned; valid once the next `tokens_to_host`
        event has fired); on CPU, the tensor itself."""
        if self.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def tokens_to_host(self, num_rows: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying the first `num_rows` sampled tokens to the host. Returns the host tensor and,
        on CUDA, the event after which it holds them."""
        if self.device.type != "cuda":
            return self.sampled[:num_rows].clone(), None
        host = torch.empty(num_rows, dtype=torch.int64, pin_memory=True)
        host.copy_(self.sampled[:num_rows], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def _pinned(self, values: np.ndarray) -> torch.Tensor:
        """A host array as a tensor, in pinned memory on CUDA so that a non-blocking copy is queued behind
        the running step instead of waiting for it (the allocator keeps it until the copy is done)."""
        host = torch.from_numpy(values)
        return host.pin_memory() if self.device.type == "cuda" else host

    def _upload(self, values: np.ndarray) -> torch.Tensor:
        return self._pinned(values).to(self.device, non_blocking=True)
