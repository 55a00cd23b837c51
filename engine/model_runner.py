"""Runs the model on a scheduled batch: builds the flat inputs and attention metadata, owns the KV tensors.

Owns device placement, the weights in memory and the per-layer paged KV cache tensors. It does not
decide what runs (the scheduler) or pick tokens (the sampler).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.checkpoint import load_weights
from splitserve.engine.config import CacheConfig
from splitserve.engine.cuda_graphs import DecodeGraphs
from splitserve.engine.model import DecoderLM
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.ops import ModelOps
from splitserve.engine.sampler import SamplingValues
from splitserve.engine.scheduler import ScheduledBatch
from splitserve.engine.step_inputs import BlockTables, HostInputs, StagedUploads, prepare

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
        max_num_tokens: int,
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
        max_blocks = -(-max_model_len // cache.block_size)
        self._tables = BlockTables(2 * max_num_seqs, max_blocks)
        # A step's uploads at most: the eager path's int64 and int32 inputs, and the sampler's per-row values.
        int64s, int32s = 4 * max_num_tokens + max_num_seqs, 2 * max_num_seqs + 1 + max_num_seqs * max_blocks
        self.uploads = StagedUploads(device, 8 * int64s + 4 * int32s + 64 * max_num_seqs + 4096)
        self._host_tokens = [torch.empty(max_num_seqs, dtype=torch.int64, pin_memory=device.type == "cuda")
                             for _ in range(2)]  # fmt: skip
        self._host_turn = 0
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and self.ops.supports_cuda_graphs and not enforce_eager:
            self.graphs = DecodeGraphs(
                self.model, self.kv_caches, self.token_buffer, max_num_seqs, max_blocks
            )
            self.graphs.capture()

    def prepare(self, batch: ScheduledBatch) -> HostInputs:
        """The step's flat inputs on the host (see `step_inputs.prepare`); remembers which row of `sampled`
        each sampling sequence's token will be in, for the next step."""
        inputs = prepare(batch, self._tables, self.block_size, self._prev_rows, self.max_rows)
        self._prev_rows = {item.seq.request_id: k for k, item in enumerate(batch.sampling_items)}
        return inputs

    def samples_in_graph(self, batch: ScheduledBatch) -> bool:
        """Whether `execute` replays a CUDA graph for the batch, which samples too when given the values."""
        return batch.phase == "decode" and self.graphs is not None

    @torch.inference_mode()
    def execute(
        self,
        batch: ScheduledBatch,
        layer_done: Callable[[int], None] | None = None,
        sampling: SamplingValues | None = None,
    ) -> torch.Tensor:
        """Launch one step; returns logits [num_sampling_seqs, vocab_size] in the model's dtype, in
        batch order. Never waits for the device. `layer_done(i)` runs after layer i's forward is
        launched (eager steps only: the caller passes it for prefill steps). With `sampling`, on a step
        that `samples_in_graph`, the graph also draws the tokens into `sampled`."""
        inputs = self.prepare(batch)
        if self.samples_in_graph(batch):
            # Every decode row samples, so the graph's logits rows are the sampling rows.
            return self.graphs.run(inputs, self.uploads.upload, sampling)
        n, t = len(inputs.seq_lens), inputs.num_tokens
        upload = self.uploads.upload
        longs = upload(np.concatenate([inputs.token_ids, inputs.token_src, inputs.positions, inputs.slots,
                                       inputs.logits_indices]))  # fmt: skip
        ints = upload(np.concatenate([inputs.query_start_loc, inputs.seq_lens, inputs.block_tables.ravel()]))
        meta = AttentionMetadata(
            phase=batch.phase,
            slot_mapping=longs[3 * t : 4 * t],
            query_start_loc=ints[: n + 1],
            seq_lens=ints[n + 1 : 2 * n + 1],
            block_tables=ints[2 * n + 1 :].view(inputs.block_tables.shape),
            query_start_loc_host=tuple(inputs.query_start_loc.tolist()),
            seq_lens_host=tuple(inputs.seq_lens.tolist()),
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
        """Start copying the first `num_rows` sampled tokens to the host, and end the step's uploads.
        Returns the host tensor and, on CUDA, the event after which it holds them. The host tensor is
        one of two used in turn: read it before the second step after this one is launched (the engine
        completes each step before launching the next but one)."""
        self.uploads.end_step()
        if self.device.type != "cuda":
            return self.sampled[:num_rows].clone(), None
        host = self._host_tokens[self._host_turn][:num_rows]
        self._host_turn ^= 1
        host.copy_(self.sampled[:num_rows], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done
