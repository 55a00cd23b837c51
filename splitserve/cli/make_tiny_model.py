"""`splitserve make-tiny-model`: write a random-weight checkpoint with a trained tokenizer.

A thin shell over `splitserve.tiny_model`: flags map one-to-one onto `TinyModelSpec` fields, and a flag
left out keeps the default of the chosen `--shape`.
"""

from __future__ import annotations

import argparse
from typing import Any

# Flag destinations that are TinyModelSpec fields of the same name.
_SPEC_FLAGS = (
    "arch",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "tokenizer_vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "tie_word_embeddings",
    "dtype",
    "seed",
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "make-tiny-model",
        help="write a random-weight Hugging Face checkpoint (llama/qwen2/qwen3) with a trained tokenizer",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("dir", metavar="DIR", help="output directory (created if missing; files overwritten)")
    parser.add_argument(
        "--shape",
        choices=("tiny", "llama-3.2-1b"),
        default="tiny",
        help="starting shape: a ~140k-parameter model, or the exact Llama-3.2-1B shape (2.5 GB, ~30 s)",
    )
    parser.add_argument("--arch", choices=("llama", "qwen2", "qwen3"), default=None)
    for flag in ("hidden-size", "intermediate-size", "num-layers", "num-heads", "num-kv-heads"):
        parser.add_argument(f"--{flag}", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None, help="default: hidden-size / num-heads")
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="embedding rows; default: the tokenizer's size"
    )
    parser.add_argument(
        "--tokenizer-vocab-size",
        type=int,
        default=None,
        help="BPE training target (default 512; the bundled corpus saturates around 2400)",
    )
    parser.add_argument("--max-position-embeddings", type=int, default=None)
    parser.add_argument("--rope-theta", type=float, default=None)
    parser.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here so that `splitserve --help` does not load torch.
    from splitserve.tiny_model import TinyModelSpec, make_tiny_model, summarize_checkpoint

    overrides = {name: getattr(args, name) for name in _SPEC_FLAGS if getattr(args, name) is not None}
    if args.shape == "llama-3.2-1b":
        spec = TinyModelSpec.llama_3_2_1b_shape(**overrides)
    else:
        spec = TinyModelSpec(**overrides)
    summary = summarize_checkpoint(make_tiny_model(args.dir, spec))
    print(
        f"{summary.path}: arch={summary.arch} parameters={summary.num_parameters:,} "
        f"vocab_size={summary.vocab_size} tokenizer_size={summary.tokenizer_size} dtype={spec.dtype}"
    )
    return 0
