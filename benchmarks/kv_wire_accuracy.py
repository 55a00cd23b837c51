"""What the FP8 KV wire (`--kv-wire-dtype fp8`) costs in accuracy: greedy tokens after a transfer in FP8
e4m3 with per-block scales, against those after a raw (lossless) transfer, which equal a single engine's
(tests/test_disaggregation_local.py).

Two engines in this process on one checkpoint (random weights, made here): the prompt is prefilled on
one, its KV moved to the other through the wire's encoding (`read_blocks` / `write_blocks`, as the
workers move it), and the other decodes. Prints, per model and wire encoding, over `--prompts` prompts:
the share of requests whose tokens all equal the reference, the share of tokens equal position by
position, and the mean position of the first difference (among requests that differ); then the logits
of the first decode step after the transfer (whose attention reads only moved KV, fed the same token
whatever the encoding) against the raw transfer's: the largest difference relative to the logits' spread,
the mean KL divergence of the distributions, and how often the top token agrees. `--model` adds a
checkpoint (e.g. one made by `splitserve make-tiny-model --shape llama-3.2-1b`) to the two tiny models.
    python benchmarks/kv_wire_accuracy.py [--prompts 32] [--max-tokens 32] [--device cpu|cuda] [--model PATH]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile

import torch

from splitserve import LLM, SamplingParams
from splitserve.engine.kv_watch import KVWatch
from splitserve.kvtransfer.tensors import read_blocks, write_blocks
from splitserve.tiny_model import TinyModelSpec, make_tiny_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def run(engine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def transferred(prefill, decode, rid: str, prompt: list[int], max_tokens: int, encoding: str) -> list[int]:
    """First token from `prefill`, the prompt's KV moved to `decode` in `encoding`, the rest from `decode`."""
    reports = []
    prefill.add_request(rid, prompt, SamplingParams(max_tokens=1, **GREEDY), kv_watch=KVWatch(reports.append))
    (first,) = [o.new_token_ids[0] for o in run(prefill)]
    src = [b for r in reports if r.layer == 0 for b in r.block_ids]
    reservation = decode.reserve_kv(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    held = reservation.num_cached_blocks  # 0: the caches are emptied before each run
    for src_cache, dst_cache in zip(prefill.kv_caches, decode.kv_caches, strict=True):
        data = read_blocks(src_cache, src[held:], encoding=encoding)
        write_blocks(dst_cache, reservation.block_ids[held:], data, encoding)
    prefill.unpin_kv(src)
    decode.admit_kv(rid, first)
    tokens = [first]
    for out in run(decode):
        tokens += out.new_token_ids
    return tokens


class FirstLogits:
    """Keeps the logits of each request's first decode step (the runner's output, float32 on the host)."""

    def __init__(self, engine) -> None:
        self.rows: list[torch.Tensor] = []
        self._execute, self._armed = engine.runner.execute, False
        engine.runner.execute = self._capture

    def arm(self) -> None:
        self._armed = True

    def _capture(self, *args, **kwargs):
        logits = self._execute(*args, **kwargs)
        if self._armed:
            self.rows.append(logits[0].float().cpu())
            self._armed = False
        return logits


def logit_errors(got: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float, float]:
    """(max |Δ| / std of the reference logits, mean KL(reference ‖ got), top-1 agreement) over requests."""
    rel, kl, top = [], [], []
    for a, b in zip(got, reference, strict=True):
        rel.append(float((a - b).abs().max() / b.std()))
        kl.append(float(torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True,
                                                   reduction="sum")))  # fmt: skip
        top.append(float(a.argmax() == b.argmax()))
    return max(rel), statistics.fmean(kl), statistics.fmean(top)


def all_tokens(engines, prompts: list[list[int]], max_tokens: int, encoding: str, tag: str,
               logits: FirstLogits) -> list:
    """Every prompt's tokens after its KV crossed the wire in `encoding` (and its first decode logits)."""
    out = []
    for i, prompt in enumerate(prompts):
        for engine in engines:  # every prompt's KV comes through the wire, none from a cache
            engine.block_pool.reset_cache()
        logits.arm()
        out.append(transferred(*engines, f"{tag}-{i}", prompt, max_tokens, encoding))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", help="a checkpoint to measure besides the tiny models (its own dtype)")
    args = p.parse_args()
    print(f"{platform.processor() or 'cpu'} / {args.device}; torch {torch.__version__}")
    tmp = tempfile.TemporaryDirectory()
    models = {
        "tiny (float32)": (TinyModelSpec(max_position_embeddings=2048), "float32"),
        "tiny, 4 layers (bfloat16)": (TinyModelSpec(num_layers=4, dtype="bfloat16",
                                                    max_position_embeddings=2048), "bfloat16"),
    }  # fmt: skip
    paths = {name: (make_tiny_model(f"{tmp.name}/{i}", spec), dtype)
             for i, (name, (spec, dtype)) in enumerate(models.items())}  # fmt: skip
    if args.model:
        paths[args.model] = (args.model, "auto")
    rng = random.Random(0)
    print("\n| model | wire | requests identical | tokens identical | first difference at (mean) | "
          "first-step logits: max abs diff / std | KL | top-1 agrees |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (path, dtype) in paths.items():
        vocab = 500  # within every tiny checkpoint's vocabulary
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(16, 400))]
                   for _ in range(args.prompts)]  # fmt: skip
        engines = [LLM(str(path), dtype=dtype, device=args.device, num_blocks=512, block_size=16).engine
                   for _ in range(2)]  # fmt: skip
        logits = FirstLogits(engines[1])
        reference = all_tokens(engines, prompts, args.max_tokens, "", "ref", logits)
        ref_logits, logits.rows = logits.rows, []
        for encoding in ("", "fp8_e4m3"):
            got = all_tokens(engines, prompts, args.max_tokens, encoding, encoding or "raw", logits)
            rel, kl, top = logit_errors(logits.rows, ref_logits)
            logits.rows = []
            same = [a == b for a, b in zip(got, reference, strict=True)]
            pairs = [(x, y) for a, b in zip(got, reference, strict=True) for x, y in zip(a, b, strict=True)]
            firsts = [next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
                      for a, b in zip(got, reference, strict=True) if a != b]  # fmt: skip
            first = f"{statistics.fmean(firsts):.1f}" if firsts else "–"
            print(f"| {name} | {encoding or 'raw (' + dtype + ')'} | {sum(same)}/{len(same)} | "
                  f"{sum(x == y for x, y in pairs) / len(pairs):.3f} | {first} | "
                  f"{rel:.4f} | {kl:.2e} | {top:.3f} |")


if __name__ == "__main__":
    main()
