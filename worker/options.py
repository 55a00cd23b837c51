"""The engine options of a worker process, defined once: the workers' command line, `splitserve up` and
`ClusterSpec` (which passes them on to every worker it starts) all take them from here. Torch-free.
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
    max_num_seqs: int = 64
    max_model_len: int | None = None

    def __post_init__(self) -> None:
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
        parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences one step runs at most")
        parser.add_argument("--max-model-len", type=int, default=None, help="default: the checkpoint's")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineOptions:
        return cls(args.dtype, args.device, args.block_size, args.num_blocks, args.max_num_seqs,
                   args.max_model_len)  # fmt: skip

    def to_args(self) -> list[str]:
        """The same options as a worker's command line (what `add_arguments` parses back)."""
        out = ["--dtype", self.dtype, "--device", self.device, "--block-size", str(self.block_size),
               "--max-num-seqs", str(self.max_num_seqs)]  # fmt: skip
        for flag, value in (("--num-blocks", self.num_blocks), ("--max-model-len", self.max_model_len)):
            if value is not None:
                out += [flag, str(value)]
        return out
