"""Prefill on one engine, KV moved as checksummed chunks, decode on another — in one process, no network:
the engines' side of disaggregation (watch and pin, reserve, admit, cancel) and the chunk stream between their
caches. Tokens must equal a single engine's; block pools must end where they started."""

from __future__ import annotations

import random

import pytest

from splitserve import LLM, SamplingParams
from splitserve.engine.block_pool import OutOfKVBlocks
from splitserve.engine.kv_cache_manager import cdiv
from splitserve.engine.kv_watch import KVWatch
from splitserve.engine.outputs import FinishReason
from splitserve.kvtransfer.chunks import DEFAULT_CHUNK_BYTES, plan_chunks
from splitserve.kvtransfer.frames import decode_frame
from splitserve.kvtransfer.stream import ChunkSink, kv_layout, wire_frame

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=512)


def make(model, num_blocks=200):
    return LLM(str(model), num_blocks=num_blocks, block_size=8).engine


def send_frames(kv_caches, layout, block_ids, first_block, lease_id, max_chunk_bytes=DEFAULT_CHUNK_BYTES):
    """The wire frames of blocks [first_block, len(block_ids)) of a request, all layers at once (what a
    prefill worker's push sends layer by layer as the prefill computes)."""
    spans = plan_chunks(layout, first_block, len(block_ids) - first_block, max_chunk_bytes)
    for seq, span in enumerate(spans):
        ids = block_ids[span.first_block : span.first_block + span.num_blocks]
        yield wire_frame(kv_caches[span.layer], ids, lease_id, seq, span, last=seq == len(spans) - 1)


def run(engine):
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def prefilled(prefill, rid, prompt, params):
    """Prefill `prompt` for its first token, watching its KV as a prefill worker does. Returns (first
    token, the prompt's block ids — pinned until `prefill.unpin_kv`)."""
    reports = []
    prefill.add_request(rid, prompt, params, kv_watch=KVWatch(reports.append))
    (first,) = [o.new_token_ids[0] for o in run(prefill)]
    return first, [b for r in reports if r.layer == 0 for b in r.block_ids]


def disaggregated(prefill, decode, rid, prompt, max_tokens, max_chunk_bytes=2048):
    """First token from `prefill`, KV pushed to `decode`, the rest from `decode`. Returns (tokens,
    number of blocks sent)."""
    first, src_blocks = prefilled(prefill, rid, prompt, SamplingParams(max_tokens=1, **GREEDY))
    reservation = decode.reserve_kv(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    assert len(src_blocks) == len(reservation.block_ids) == cdiv(len(prompt), prefill.kv.block_size)
    layout = kv_layout(decode.runner.kv_caches, decode.model_id)
    sink = ChunkSink(decode.runner.kv_caches, layout, reservation.block_ids, reservation.num_cached_blocks)
    sender_layout = kv_layout(prefill.runner.kv_caches, prefill.model_id)
    frames = send_frames(prefill.runner.kv_caches, sender_layout, src_blocks, reservation.num_cached_blocks,
                         "lease", max_chunk_bytes)
    for frame in frames:
        sink.accept(*decode_frame(frame))
    assert sink.complete
    prefill.unpin_kv(src_blocks)
    assert decode.admit_kv(rid, first) is None
    computed = []  # (first position, tokens) the decode engine computes for this request
    execute = decode.runner.execute

    def recording(batch, *args):
        computed.extend((it.start, it.num_new_tokens) for it in batch.items if it.seq.request_id == rid)
        return execute(batch, *args)

    decode.runner.execute = recording
    try:
        rest = [t for o in run(decode) if o.request_id == rid for t in o.new_token_ids]
    finally:
        decode.runner.execute = execute
    # The transferred prompt KV is used as it is: from the first token on, one position per step.
    assert computed == [(len(prompt) + i, 1) for i in range(len(computed))]
    return [first, *rest], len(src_blocks) - reservation.num_cached_blocks


def test_disaggregated_tokens_equal_a_single_engine(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (1, 4, 9, 30, 57)]
    single = LLM(str(model), num_blocks=200, block_size=8)
    expected = [o.outputs[0].token_ids for o in single.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=12, **GREEDY))]
    prefill, decode = make(model), make(model)
    free = (prefill.block_pool.num_free_blocks, decode.block_pool.num_free_blocks)
    for i, prompt in enumerate(prompts):
        tokens, sent = disaggregated(prefill, decode, f"r{i}", prompt, 12)
        assert tokens == expected[i]
        assert sent == cdiv(len(prompt), 8)
    assert (prefill.block_pool.num_free_blocks, decode.block_pool.num_free_blocks) == free


def test_only_blocks_the_decode_worker_lacks_are_sent(model):
    rng = random.Random(1)
    shared = [rng.randrange(3, 500) for _ in range(40)]  # 5 full blocks
    first, second = [*shared, 7, 8, 9], [*shared, 10, 11, 12, 13, 14, 15]
    prefill, decode = make(model), make(model)
    single = LLM(str(model), num_blocks=200, block_size=8)
    expected = single.generate({"prompt_token_ids": second}, SamplingParams(max_tokens=8, **GREEDY))
    _, sent_first = disaggregated(prefill, decode, "a", first, 8)
    assert sent_first == 6
    tokens, sent_second = disaggregated(prefill, decode, "b", second, 8)
    assert sent_second == cdiv(len(second), 8) - 5  # the shared 5 blocks were cached on the decode side
    assert tokens == expected[0].outputs[0].token_ids


def test_reservation_without_room_changes_nothing(model):
    decode = make(model, num_blocks=6)  # 5 usable blocks of 8 tokens
    params = SamplingParams(max_tokens=2, **GREEDY)
    decode.reserve_kv("a", list(range(3, 27)), params)  # 3 blocks
    free = decode.block_pool.num_free_blocks
    with pytest.raises(OutOfKVBlocks, match="3 free KV blocks needed, 2 free"):
        decode.reserve_kv("b", list(range(30, 54)), params)
    assert decode.block_pool.num_free_blocks == free
    assert decode.cancel_kv("a") and not decode.cancel_kv("a")
    assert decode.block_pool.num_free_blocks == 5


def test_first_token_that_ends_the_request_and_abort_of_a_reservation(model):
    decode = make(model)
    free = decode.block_pool.num_free_blocks
    decode.reserve_kv("one", [5, 6, 7], SamplingParams(max_tokens=1, **GREEDY))
    done = decode.admit_kv("one", 42)
    assert done is not None and done.finish_reason is FinishReason.LENGTH
    decode.reserve_kv("gone", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4, **GREEDY))
    assert decode.abort_request("gone")
    assert decode.block_pool.num_free_blocks == free and not decode.has_unfinished_requests()
    # Aborted while its KV was landing (the client went away after the first token): admitting it then
    # ends it as aborted, with nothing left behind.
    assert decode.admit_kv("gone", 42).finish_reason is FinishReason.ABORT
    assert decode.block_pool.num_free_blocks == free and not decode.has_unfinished_requests()


def test_seeded_sampling_across_the_split_equals_a_single_engine(model):
    prompt = list(range(7, 40))
    params = {"temperature": 0.8, "top_p": 0.9, "seed": 1234, "ignore_eos": True}
    single = LLM(str(model), num_blocks=200, block_size=8)
    expected = single.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=10, **params))
    prefill, decode = make(model), make(model)
    first, src_blocks = prefilled(prefill, "s", prompt, SamplingParams(max_tokens=1, **params))
    reservation = decode.reserve_kv("s", prompt, SamplingParams(max_tokens=10, **params))
    sink = ChunkSink(decode.runner.kv_caches, kv_layout(decode.runner.kv_caches, decode.model_id),
                     reservation.block_ids, 0)
    for frame in send_frames(prefill.runner.kv_caches, kv_layout(prefill.runner.kv_caches, prefill.model_id),
                             src_blocks, 0, "lease"):
        sink.accept(*decode_frame(frame))
    prefill.unpin_kv(src_blocks)
    decode.admit_kv("s", first)
    tokens = [first] + [t for o in run(decode) for t in o.new_token_ids]
    assert tokens == expected[0].outputs[0].token_ids
