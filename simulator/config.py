"""The simulated cluster's shape: how many workers of each role, their KV room, their batching limits.

Owns only the configuration of one simulated cluster (`SimConfig`); the costs of work come from the
router's `CostModel`, the traffic from a `Trace`. Blocks are the trace's blocks (`trace.meta.block_len`
tokens each): a worker's KV room is counted in them.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.router.policies import DECODE, FRESH, WARM


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster. Raises ValueError on construction for a shape that cannot serve.

    Defaults: 4 fresh + 4 warm prefill workers and 8 decode workers (the 16-worker cluster of the
    benchmarks); 8,192 KV blocks per prefill worker and 16,384 per decode worker (at 16 tokens a block,
    128k and 256k tokens: 4 and 8 GiB of Llama-3.2-1B KV in bf16); a decode batch of at most 256
    sequences; local prefills sliced into chunks of up to 2,048 tokens (the engine's default step
    budget), one per decode step; KV moved over the same-host transport; every worker on its own device
    (`shared_device=True`: all on one).
    """

    num_fresh: int = 4
    num_warm: int = 4
    num_decode: int = 8
    prefill_kv_blocks: int = 8192
    decode_kv_blocks: int = 16384
    decode_max_seqs: int = 256
    local_chunk_tokens: int = 2048
    transport: str = "same-host"
    shared_device: bool = False
    fetch: bool = True  # prefill targets fetch leading blocks others hold, as the router plans (`fetch_plan`)

    def __post_init__(self) -> None:
        for name in ("num_fresh", "num_warm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_decode", "prefill_kv_blocks", "decode_kv_blocks", "decode_max_seqs",
                     "local_chunk_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.transport:
            raise ValueError("transport must name a calibrated transport (e.g. 'same-host', 'grpc')")

    @property
    def num_workers(self) -> int:
        return self.num_fresh + self.num_warm + self.num_decode

    def worker_ids(self) -> list[tuple[str, str]]:
        """(worker id, role) of every worker, fresh then warm then decode: "fresh-0", …, "decode-7"."""
        shape = ((FRESH, self.num_fresh), (WARM, self.num_warm), (DECODE, self.num_decode))
        return [(f"{role}-{i}", role) for role, count in shape for i in range(count)]
