"""The engine's layer-by-layer KV reports (`KVWatch`), which a transfer overlapping the prefill relies
on: each layer is reported right after its KV is written and before the next layer runs, blocks once
each from `first_block` on, across chunked-prefill steps; reported blocks stay pinned — through the
request's end — until `unpin_kv`."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams
from splitserve.engine.kv_watch import KVWatch

GREEDY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=256, num_layers=3)


def run(engine):
    while engine.has_unfinished_requests():
        engine.step()


def test_each_layer_is_reported_after_its_kv_is_written_and_before_the_next_layer(model):
    engine = LLM(str(model), num_blocks=64, block_size=8, max_num_batched_tokens=16).engine
    caches = engine.runner.kv_caches
    reports, seen = [], []

    def on_ready(ready):
        ids = list(ready.block_ids)
        written = [bool(caches[layer][:, ids].abs().sum() > 0) for layer in range(len(caches))]
        seen.append((ready.layer, written))
        reports.append(ready)

    prompt = list(range(3, 40))  # 37 tokens: 5 blocks of 8, prefilled in chunks of 16 tokens
    engine.add_request("r", prompt, GREEDY, kv_watch=KVWatch(on_ready, first_block=1))
    run(engine)
    for layer, written in seen:
        assert written[: layer + 1] == [True] * (layer + 1)  # this layer and those before: written
        assert not any(written[layer + 1 :])  # the next layers: not yet
    # Steps of 16 tokens complete blocks [0, 2), [2, 4), then [4, 5) with the partial last block; block 0
    # is skipped (first_block=1). Per step: one report per layer, in layer order.
    spans = [(r.layer, r.start, len(r.block_ids), r.last) for r in reports]
    steps = ((1, 1, False), (2, 2, False), (4, 1, True))
    assert spans == [(layer, start, n, last) for start, n, last in steps for layer in range(3)]
    pinned = [b for r in reports if r.layer == 0 for b in r.block_ids]
    assert all(engine.block_pool.ref_count(b) == 1 for b in pinned)  # the request ended; the pins hold
    free = engine.block_pool.num_free_blocks
    engine.unpin_kv(pinned)
    assert engine.block_pool.num_free_blocks == free + len(pinned)


def test_an_aborted_request_reports_no_more_and_keeps_only_what_it_reported_pinned(model):
    engine = LLM(str(model), num_blocks=64, block_size=8, max_num_batched_tokens=16).engine
    start_free = engine.block_pool.num_free_blocks
    reports = []
    engine.add_request("r", list(range(3, 60)), GREEDY, kv_watch=KVWatch(reports.append))
    engine.step()
    engine.step()
    engine.abort_request("r")
    count = len(reports)
    run(engine)
    assert len(reports) == count and not any(r.last for r in reports)
    pinned = [b for r in reports if r.layer == 0 for b in r.block_ids]
    assert engine.block_pool.num_free_blocks == start_free - len(pinned)
    engine.unpin_kv(pinned)
    assert engine.block_pool.num_free_blocks == start_free
