"""Runs the model on a scheduled batch: builds the flat inputs and attention metadata, owns the KV tensors.

Owns device placement, the weights in memory and the per-layer paged KV cache tensors. It does not
decide what runs (the scheduler) or pick tokens (the sampler).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling_seqs], rows of the hidden states to sample from


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
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and self.ops.supports_cuda_graphs and not enforce_eager:
            max_blocks = -(-max_model_len // cache.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, max_blocks)
            self.graphs.capture()

    def prepare(self, batch: ScheduledBatch) -> ModelInputs:
        """Flat inputs and attention metadata, moved to the device in two copies (one int64, one int32)
        because each host-to-device copy of pageable memory costs a synchronisation."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        bs = self.block_size
        for item in batch.items:
            seq, end = item.seq, item.start + item.num_new_tokens
            input_ids.extend(seq.token_ids[item.start : end])
            positions.extend(range(item.start, end))
            slots.extend(seq.block_ids[p // bs] * bs + p % bs for p in range(item.start, end))
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            if item.samples:
                logits_indices.append(len(input_ids) - 1)
        num_tokens, num_seqs = len(input_ids), len(seq_lens)
        max_blocks = max(len(item.seq.block_ids) for item in batch.items)
        tables: list[int] = []
        for item in batch.items:
            tables.extend(item.seq.block_ids)
            tables.extend([NULL_BLOCK_ID] * (max_blocks - len(item.seq.block_ids)))
        longs = self._to_device(input_ids + positions + slots + logits_indices, torch.int64)
        ints = self._to_device(query_start_loc + seq_lens + tables, torch.int32)
        meta = AttentionMetadata(
            phase=batch.phase,
            slot_mapping=longs[2 * num_tokens : 3 * num_tokens],
            query_start_loc=ints[: num_seqs + 1],
            seq_lens=ints[num_seqs + 1 : 2 * num_seqs + 1],
            block_tables=ints[2 * num_seqs + 1 :].view(num_seqs, max_blocks),
            query_start_loc_host=tuple(query_start_loc),
            seq_lens_host=tuple(seq_lens),
        )
        return ModelInputs(
            input_ids=longs[:num_tokens],
            positions=longs[num_tokens : 2 * num_tokens],
            meta=meta,
            logits_indices=longs[3 * num_tokens :],
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampling_seqs, vocab_size] in batch order."""
        inputs = self.prepare(batch)
        if batch.phase == "decode" and self.graphs is not None:
            # Every decode row samples, so the graph's logits rows are the sampling rows.
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta).float()
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_indices]).float()

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
