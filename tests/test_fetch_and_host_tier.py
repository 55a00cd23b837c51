"""KV goes where it is needed: a prefill worker fetches the leading blocks another worker holds (over
gRPC, or same-host from that worker's memory) instead of recomputing them — tokens equal recompute's,
delta only, failures fall back to recompute with the reason counted; and blocks evicted from KV memory
spill to the host tier and come back with identical KV. Pools return to where they started."""

from __future__ import annotations

import random
import time

import pytest
import torch
from workers_cluster import GREEDY, Cluster, offline

from splitserve import LLM, SamplingParams
from splitserve.engine.block_hash import hash_blocks
from splitserve.engine.block_pool import BlockEventKind
from splitserve.kvtransfer.chunks import block_bytes
from splitserve.kvtransfer.fetch import FetchServer
from splitserve.protos import common_pb2, workers_pb2

BS = 8  # the cluster's block size


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=512)


@pytest.fixture(params=["grpc", "same-host"])
def transport(request):
    return request.param


@pytest.fixture
def cluster(model, transport):
    c = Cluster(model, transport, warm=True)
    yield c
    c.close()


def conversation(seed: int, first_len: int = 61, turn_len: int = 13):
    rng = random.Random(seed)
    first = [rng.randrange(3, 500) for _ in range(first_len)]
    return first, [rng.randrange(3, 500) for _ in range(turn_len)]


def no_leaks(cluster) -> bool:
    """Every engine's pool back at its start (a holder's pins return when its Fetch stream ends)."""
    deadline = time.monotonic() + 5
    while cluster.free_blocks() != cluster.free_at_start and time.monotonic() < deadline:
        time.sleep(0.05)
    return cluster.free_blocks() == cluster.free_at_start


def load(stub) -> common_pb2.WorkerLoad:
    return stub.Load(common_pb2.LoadRequest())


def test_a_follow_up_fetches_its_context_from_the_holder_and_matches_recompute(model, cluster, transport):
    first, turn = conversation(0)
    answer, _ = cluster.generate("t1", first, 6)  # fresh worker computes turn 1, pushes it to decode
    follow_up = [*first, *answer, *turn]
    expected = offline(model, [follow_up], 6)[0]
    for holder_address, name in ((cluster.prefill_address, "fresh"), (cluster.decode_address, "decode")):
        cluster.warm_loop.call(cluster.warm_loop.engine.block_pool.reset_cache)
        holder = workers_pb2.KVHolder(address=holder_address, num_blocks=len(first) // BS, worker_id=name)
        tokens, reply = cluster.generate(f"t2-{name}", follow_up, 6, cluster.warm_prefiller, holder)
        assert tokens == expected
        assert (reply.num_fetched_blocks, reply.fetch_fallback) == (len(first) // BS, "")
        assert reply.num_cached_tokens >= len(first) // BS * BS
    tiers = load(cluster.warm_prefiller).tiers
    assert tiers.fetched_tokens == 2 * (len(first) // BS) * BS and not tiers.fetch_fallbacks
    assert tiers.fetch_ms > 0 and tiers.fetch_mb > 0  # what its fetches cost, measured for the router
    # The KV it took (over the wire, or copied from the holder's memory), every layer's K and V.
    layout = cluster.prefill.layout
    assert tiers.fetched_bytes == 2 * (len(first) // BS) * layout.num_layers * block_bytes(layout)
    assert no_leaks(cluster)


def test_only_the_blocks_the_receiver_lacks_are_fetched(model, cluster):
    first, turn = conversation(1, first_len=64)
    cluster.generate("a", first, 2)
    # The warm worker already holds the first 3 blocks (a prompt sharing them).
    cluster.generate("w", first[: 3 * BS + 2], 2, cluster.warm_prefiller)
    holder = workers_pb2.KVHolder(address=cluster.prefill_address, num_blocks=8)
    prompt = [*first, *turn]
    tokens, reply = cluster.generate("b", prompt, 4, cluster.warm_prefiller, holder)
    assert reply.num_fetched_blocks == 8 - 3 and tokens == offline(model, [prompt], 4)[0]
    assert no_leaks(cluster)


def test_failed_fetches_recompute_and_count_the_reason(model, cluster, monkeypatch):
    first, turn = conversation(2)
    prompt = [*first, *turn]
    expected = offline(model, [prompt], 4)[0]
    cases = [
        ("unavailable", workers_pb2.KVHolder(address="127.0.0.1:1", num_blocks=7)),  # nobody there
        ("holds_none", workers_pb2.KVHolder(address=cluster.prefill_address, num_blocks=7)),  # never saw it
    ]
    for i, (reason, holder) in enumerate(cases):
        cluster.warm_loop.call(cluster.warm_loop.engine.block_pool.reset_cache)
        tokens, reply = cluster.generate(f"f{i}", prompt, 4, cluster.warm_prefiller, holder)
        assert tokens == expected and (reply.num_fetched_blocks, reply.fetch_fallback) == (0, reason)
    # A corrupt frame from the holder (a flipped payload byte): checksum fails, recomputed.
    cluster.generate("src", prompt, 2)
    frames = FetchServer._frames

    def flipped(self, *args):
        for i, frame in enumerate(frames(self, *args)):
            yield frame[:-1] + bytes([frame[-1] ^ 1]) if i == 1 else frame

    monkeypatch.setattr(FetchServer, "_frames", flipped)
    cluster.warm_loop.call(cluster.warm_loop.engine.block_pool.reset_cache)
    holder = workers_pb2.KVHolder(address=cluster.prefill_address, num_blocks=7)
    tokens, reply = cluster.generate("f-corrupt", prompt, 4, cluster.warm_prefiller, holder)
    assert tokens == expected
    assert reply.fetch_fallback == "corrupt"  # same-host: the flip lands in the block ids or their checksum
    fallbacks = dict(load(cluster.warm_prefiller).tiers.fetch_fallbacks)
    assert fallbacks == {"unavailable": 1, "holds_none": 1, "corrupt": 1}
    assert no_leaks(cluster)


def test_a_decode_worker_prefilling_locally_fetches_from_a_prefill_worker(model, cluster):
    first, turn = conversation(3)
    cluster.generate("p", first, 2)
    cluster.decode_loop.call(cluster.decode_loop.engine.block_pool.reset_cache)
    prompt = [*first, *turn]
    holder = workers_pb2.KVHolder(address=cluster.prefill_address, num_blocks=len(first) // BS)
    sampling = workers_pb2.GenerateRequest(request_id="local", prompt_token_ids=prompt, kv_holder=holder)
    sampling.sampling.CopyFrom(common_pb2.SamplingParams(max_tokens=5, ignore_eos=True))
    chunks = list(cluster.decoder.Generate(sampling))
    assert chunks[0].num_fetched_blocks == len(first) // BS and not chunks[0].fetch_fallback
    assert [t for c in chunks for t in c.token_ids] == offline(model, [prompt], 5)[0]
    assert no_leaks(cluster)


# ------------------------------------------------------------------------------------------ host tier


def run(engine, rid, prompt, max_tokens=4):
    engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
    out = []
    while engine.has_unfinished_requests():
        out += [o for o in engine.step() if o.request_id == rid]
    return [t for o in out for t in o.new_token_ids], out[0].num_cached_tokens


def block_kv(engine, block_ids):
    return [cache[:, block_ids].clone() for cache in engine.kv_caches]


def test_blocks_evicted_to_the_host_tier_come_back_with_identical_kv(model):
    llm = LLM(str(model), num_blocks=24, block_size=BS, host_kv_gib=0.001)
    engine = llm.engine
    tier = engine.host_tier
    assert tier is not None and tier.capacity >= 16
    events = []
    engine.block_pool.add_listener(events.append)
    rng = random.Random(4)
    prompt = [rng.randrange(3, 500) for _ in range(70)]
    expected, _ = run(LLM(str(model), num_blocks=256, block_size=BS).engine, "ref", prompt)
    tokens, cached = run(engine, "first", prompt)
    assert tokens == expected and cached == 0
    chain = hash_blocks(prompt, BS, engine.kv.hash_context(None))
    before = block_kv(engine, engine.block_pool.lookup(chain))
    free_at_start = engine.block_pool.num_free_blocks
    for i in range(2):  # other prompts push every block of the first out of KV memory
        run(engine, f"other{i}", [rng.randrange(3, 500) for _ in range(90)])
    assert engine.block_pool.lookup(chain) == []  # not in KV memory...
    assert tier.match(chain) == len(chain)  # ...but in the host tier
    evicted = {h for e in events if e.kind is BlockEventKind.EVICTED for h in e.block_hashes}
    assert not evicted & set(chain)  # the index keeps them: this worker still holds them
    assert set(chain) <= set(engine.block_pool.cached_hashes())
    tokens, cached = run(engine, "again", prompt)
    assert tokens == expected and cached == (len(prompt) - 1) // BS * BS
    after = block_kv(engine, engine.block_pool.lookup(chain))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    stats = engine.scheduler.prefix_stats
    assert stats.host_hit_tokens == cached and stats.memory_hit_tokens == 0
    assert engine.block_pool.num_free_blocks == free_at_start
    engine.block_pool.reset_cache()
    assert len(tier) == 0 and engine.block_pool.cached_hashes() == []


def test_a_full_host_tier_drops_its_least_recently_used_blocks(model):
    engine = LLM(str(model), num_blocks=24, block_size=BS, host_kv_gib=0.00004).engine
    tier = engine.host_tier
    events = []
    engine.block_pool.add_listener(events.append)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(90)] for _ in range(6)]
    for i, prompt in enumerate(prompts):
        run(engine, f"p{i}", prompt, max_tokens=2)
    assert 0 < tier.capacity < 4 * 11 and len(tier) == tier.capacity  # full, never over
    oldest = hash_blocks(prompts[0], BS, engine.kv.hash_context(None))
    assert tier.match(oldest) == 0 and not engine.block_pool.lookup(oldest)  # dropped: gone everywhere
    evicted = {h for e in events if e.kind is BlockEventKind.EVICTED for h in e.block_hashes}
    assert set(oldest) <= evicted  # and the index is told
    held = engine.block_pool.cached_hashes()
    assert set(tier.hashes()) <= set(held) and len(held) == len(set(held))
