"""The options of a worker process, defined once: its engine's (`EngineOptions`) and, for a prefill worker,
how it moves KV (`KVOptions`). The workers' command line, `splitserve up` and `ClusterSpec` (which passes
them on to every worker it starts) all take them from here. Torch-free.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EngineOptions:
    """How a worker builds its engine. `num_blocks` None: from memory; `max_model_len` None: the
    checkpoint's. Raises ValueError on construction for an option out of range."""

    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 256  # a decode worker exists to run large batches (CUDA graphs up to it)
    max_model_len: int | None = None
    cpu_kv_gb: float = 0.0  # GiB of host memory for blocks evicted from KV memory (the host tier)

    def __post_init__(self) -> None:
        if self.cpu_kv_gb < 0:
            raise ValueError(f"cpu_kv_gb must be >= 0, got {self.cpu_kv_gb}")
        for name, value, allowed in (("dtype", self.dtype, DTYPES), ("device", self.device, DEVICES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("block_size", "max_num_seqs", "num_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dtype", default="auto", choices=DTYPES)
        parser.add_argument("--device", default="auto", choices=DEVICES)
        parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
        parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: from memory)")
        parser.add_argument("--max-num-seqs", type=int, default=256,
                            help="sequences a step runs at most (CUDA graphs captured up to it)")  # fmt: skip
        parser.add_argument("--max-model-len", type=int, default=None, help="default: the checkpoint's")
        parser.add_argument("--cpu-kv-gb", type=float, default=0.0,
                            help="GiB of host memory (pinned, on a GPU) keeping prefix-cache blocks "
                                 "evicted from KV memory, loaded back on a hit (0: none)")  # fmt: skip

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineOptions:
        return cls(args.dtype, args.device, args.block_size, args.num_blocks, args.max_num_seqs,
                   args.max_model_len, args.cpu_kv_gb)  # fmt: skip

    def to_args(self) -> list[str]:
        """The same options as a worker's command line (what `add_arguments` parses back)."""
        out = ["--dtype", self.dtype, "--device", self.device, "--block-size", str(self.block_size),
               "--max-num-seqs", str(self.max_num_seqs), "--cpu-kv-gb", str(self.cpu_kv_gb)]  # fmt: skip
        for flag, value in (("--num-blocks", self.num_blocks), ("--max-model-len", self.max_model_len)):
            if value is not None:
                out += [flag, str(value)]
        return out


KV_TRANSPORTS = ("auto", "grpc")  # auto: same-host when the target shares this host, else gRPC
KV_WIRE_DTYPES = ("auto", "fp8")  # auto: the cache's dtype; fp8: FP8 e4m3 with per-block scales
AUTO_LANES = {"cuda": 2, "cpu": 1}  # --kv-lanes 0, by the worker's device (measured: see KVOptions.lanes)


@dataclass(frozen=True)
class KVOptions:
    """How a prefill worker moves KV to decode workers. Raises ValueError on construction for an option
    out of range."""

    transport: str = "auto"
    # Push streams a gRPC transfer is striped over; 0: by device (AUTO_LANES). Measured (docs/benchmarks.md,
    # 1B KV layout, 4k-token prompt, 134 MB, 4 MiB chunks): on the 16-core H200 host 1 lane moved 1.24 GB/s,
    # 2 lanes 1.72, 4 lanes 1.59, 8 lanes 1.59; on a 2-core machine (sender and receiver sharing both cores)
    # 1 lane 1.06–1.09, 2 lanes 0.80–0.99, 4 lanes 0.58–0.82: the cores, not the streams, limit there.
    lanes: int = 0
    wire_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name, value, allowed in (("kv_transport", self.transport, KV_TRANSPORTS),
                                     ("kv_wire_dtype", self.wire_dtype, KV_WIRE_DTYPES)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.lanes < 0:
            raise ValueError(f"kv_lanes must be >= 0 (0: by device), got {self.lanes}")

    def lanes_for(self, device: str) -> int:
        """The lanes a worker computing on `device` ("cpu", "cuda") stripes a transfer over."""
        return self.lanes or AUTO_LANES.get(device, 1)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--kv-transport", default="auto", choices=KV_TRANSPORTS,
                            help="auto: a decode worker on this host copies the KV from the prefill "
                                 "worker's memory (CPU: shared memory; CUDA: IPC); others, or all with "
                                 "grpc: over gRPC")  # fmt: skip
        parser.add_argument("--kv-lanes", type=int, default=KVOptions.lanes,
                            help="Push streams (each on its own connection) a gRPC transfer is striped "
                                 "over; 0: 2 on a GPU, 1 on CPU (the best measured on each)")
        parser.add_argument("--kv-wire-dtype", default="auto", choices=KV_WIRE_DTYPES,
                            help="auto: KV over gRPC in the cache's dtype; fp8: FP8 e4m3 with per-block "
                                 "scales (half of bf16's bytes; lossy, see docs/benchmarks.md)")  # fmt: skip

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KVOptions:
        return cls(args.kv_transport, args.kv_lanes, args.kv_wire_dtype)

    def to_args(self) -> list[str]:
        return ["--kv-transport", self.transport, "--kv-lanes", str(self.lanes), "--kv-wire-dtype",
                self.wire_dtype]  # fmt: skip
