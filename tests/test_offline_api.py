"""The offline API end to end: stop strings, stop tokens, seeds, chat, KV events, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitserve import LLM, SamplingParams
from splitserve.engine.block_hash import hash_blocks
from splitserve.engine.block_pool import BlockEventKind


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("qwen2")), num_blocks=128)


def greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


def test_stop_string_cuts_the_text(llm):
    base = llm.generate("Once upon a time", greedy(max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop = base.text[5:8]  # a substring that greedy decoding is known to produce
    cut = llm.generate("Once upon a time", greedy(max_tokens=20, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[: base.text.index(stop)]
    assert base.token_ids[: len(cut.token_ids)] == cut.token_ids
    kept = llm.generate(
        "Once upon a time",
        greedy(max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
    )[0].outputs[0]
    assert kept.text == base.text[: base.text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm):
    base = llm.generate("abc", greedy(max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_at = base.token_ids[3]
    out = llm.generate("abc", greedy(max_tokens=10, ignore_eos=True, stop_token_ids=[stop_at]))[0].outputs[0]
    first = base.token_ids.index(stop_at)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert base.finish_reason == "length" and len(base.token_ids) == 10


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=42, max_tokens=16, ignore_eos=True)
    alone = llm.generate("The river", params)[0].outputs[0].token_ids
    batch = llm.generate(
        ["Something else entirely", "The river", "x"],
        [SamplingParams(temperature=1.0, max_tokens=16), params, SamplingParams(temperature=0.7)],
    )
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=43, max_tokens=16, ignore_eos=True)
    assert llm.generate("The river", other_seed)[0].outputs[0].token_ids != alone


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "Hi there"}], greedy(max_tokens=4))[0]
    expected = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt == expected
    assert out.prompt_token_ids == llm.tokenizer.encode(expected)


def test_block_events_fire_on_store_and_evict(tiny_model):
    llm = LLM(str(tiny_model("qwen2")), num_blocks=9, block_size=16)
    events = []
    llm.engine.block_pool.add_listener(events.append)
    first = list(range(10, 58))  # 48 tokens: 3 full blocks, the last one only after decoding
    llm.generate({"prompt_token_ids": first}, greedy(max_tokens=2, ignore_eos=True))
    stored = [h for e in events if e.kind is BlockEventKind.STORED for h in e.block_hashes]
    assert stored == hash_blocks(first, 16, llm.engine.kv.hash_context(None))
    events.clear()
    # 113 tokens take all 8 blocks, so every cached block is evicted.
    llm.generate({"prompt_token_ids": list(range(100, 213))}, greedy(max_tokens=1))
    evicted = [h for e in events if e.kind is BlockEventKind.EVICTED for h in e.block_hashes]
    assert sorted(evicted) == sorted(stored)


def test_cli_generate_prints_json(tiny_model):
    result = subprocess.run(
        [sys.executable, "-m", "splitserve", "generate", "--model", str(tiny_model("llama")),
         "Hello", "--max-tokens", "5", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(payload["token_ids"]) <= 5 and payload["finish_reason"] in ("stop", "length")


def test_cli_bad_input_is_one_line_not_a_traceback(tiny_model):
    result = subprocess.run(
        [sys.executable, "-m", "splitserve", "generate", "--model", str(tiny_model("llama")),
         "Hello", "--temperature", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "temperature must be in [0, 100]" in result.stderr and "Traceback" not in result.stderr
