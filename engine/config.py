"""Engine configuration: one frozen dataclass composed of cache and scheduler parts.

Built by the CLI or the offline API from user options; validated here with `ValueError`. Nothing in the
engine reads flags or environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Kernels = Literal["auto", "triton", "torch"]


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache. `num_blocks` None sizes the cache from `kv_cache_memory_gib` on CPU and from
    free device memory × `gpu_memory_utilization` on CUDA."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    # CPU: put the caches in one memfd that a worker on the same host can map (same-host KV transfer).
    shared_memory: bool = False
    # Host memory (pinned on CUDA) for the prefix cache's blocks evicted from KV memory; 0: none.
    host_kv_gib: float = 0.0

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {self.num_blocks}")
        if self.host_kv_gib < 0:
            raise ValueError(f"host_kv_gib must be >= 0, got {self.host_kv_gib}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be positive, got {self.kv_cache_memory_gib}")
        if not 0.0 < self.gpu_memory_utilization < 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {self.gpu_memory_utilization}")


def average_step_time(previous_s: float, newest_s: float) -> float:
    """The step time a worker reports: an exponential moving average weighing the newest step 0.2 (the
    first step alone when there is no previous one). The engine loop and the simulator both use it."""
    return newest_s if not previous_s else previous_s + 0.2 * (newest_s - previous_s)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits. With chunked prefill off, a prompt is prefilled in one step, so
    `max_num_batched_tokens` must cover the longest prompt."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: Dtype = "auto"
    device: Device = "auto"
    seed: int = 0
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    model_id: str | None = None  # identity in block hashes; None: derived from the checkpoint's files
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    kernels: Kernels = "auto"  # auto: Triton on CUDA, the torch reference on CPU
    # Decode batches of at most this many rows run their projections on the fused GEMV kernels (norm
    # prologue, SiLU epilogue); larger ones on cuBLAS. Triton kernels only; 0: never.
    fused_gemv_max_tokens: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("EngineConfig.model must name a checkpoint directory")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch; got {self.kernels!r}")
        if not 0 <= self.fused_gemv_max_tokens <= 16:
            raise ValueError(f"fused_gemv_max_tokens must be in [0, 16], got {self.fused_gemv_max_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.model_id is not None and not self.model_id:
            raise ValueError("model_id must be non-empty when given")
