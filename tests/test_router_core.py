"""The router's request path over real gRPC workers (fresh and warm prefill, decode, in this process):
outputs equal the offline API whatever the policy decides; cpd routes a conversation's first turn to the
fresh pool and its second to the decode worker holding the context (short suffix) or to the warm pool;
A/B arms are per session and deterministic. Prefix matches here come straight from the workers' block
pools (the index mirror's job in a deployment)."""

from __future__ import annotations

import time

import pytest
from workers_cluster import GREEDY, offline

from splitserve import LLM, SamplingParams
from splitserve.decode_worker.service import DecodeService
from splitserve.engine.block_hash import HashContext, hash_blocks
from splitserve.engine.loop import EngineLoop
from splitserve.index.table import PrefixMatch
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.kvtransfer.transport import add_kvtransfer_servicer, make_server
from splitserve.prefill_worker.service import PrefillService
from splitserve.protos import workers_pb2_grpc
from splitserve.router.core import ArmAssigner, RoutedRequest, Router, WorkerSet, parse_ab
from splitserve.router.dispatch import Emitted
from splitserve.router.policies import FRESH, LOCAL, WARM, make_policy


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=512)


@pytest.fixture
def cluster(model):
    loops, servers, services = {}, [], []
    workers = WorkerSet()
    for wid, role in (("f1", "fresh"), ("w1", "warm"), ("d1", "decode")):
        loop = EngineLoop(LLM(str(model), num_blocks=256, block_size=8, max_num_seqs=16).engine)
        server, port = make_server("127.0.0.1:0")
        if role == "decode":
            service = DecodeService(loop)
            add_kvtransfer_servicer(service, server)
            workers_pb2_grpc.add_DecodeWorkerServicer_to_server(service, server)
        else:
            service = PrefillService(loop, pool=role, max_chunk_bytes=4096, kv_transport="grpc")
            workers_pb2_grpc.add_PrefillWorkerServicer_to_server(service, server)
        server.start()
        loops[wid], servers, services = loop, [*servers, server], [*services, service]
        workers.add(wid, role, f"127.0.0.1:{port}")

    def matches(hashes):  # what the index mirror says: the engines here have no host tier
        return {wid: PrefixMatch(len(loop.call(loop.engine.block_pool.lookup, hashes)))
                for wid, loop in loops.items()}  # fmt: skip

    model_id = loops["d1"].engine.model_id
    yield workers, matches, model_id
    workers.close()
    for server in servers:
        server.stop(0).wait()
    for service in services:
        service.close()
    for loop in loops.values():
        loop.stop()


def run(router, rid, prompt, max_tokens, session=None):
    request = RoutedRequest(rid, prompt, sampling_to_proto(SamplingParams(max_tokens=max_tokens, **GREEDY)),
                            session_id=session)  # fmt: skip
    outs = list(router.generate(request))
    routed, emitted = outs[0], [o for o in outs[1:] if isinstance(o, Emitted)]
    return routed, [t for o in emitted for t in o.token_ids], emitted


@pytest.mark.parametrize(
    "policy", ["round_robin", "least_loaded", "prefix_affinity", "cpd", "cpd_threshold", "colocated"]
)
def test_every_policy_gives_the_offline_tokens(model, cluster, policy):
    workers, matches, model_id = cluster
    router = Router(workers, {policy: make_policy(policy)}, model_id, 8, matches)
    prompt = list(range(3, 70))
    routed, tokens, _ = run(router, f"r-{policy}", prompt, 8)
    assert tokens == offline(model, [prompt], 8)[0]
    assert routed.arm == policy and routed.decision.decode == "d1"


def test_cpd_routes_a_conversation_fresh_then_local_or_warm(model, cluster):
    workers, matches, model_id = cluster
    router = Router(workers, {"cpd": make_policy("cpd", local_prefill_max_tokens=16)}, model_id, 8, matches)
    turn1 = list(range(3, 83))  # 80 tokens, nothing cached anywhere
    routed, out1, _ = run(router, "t1", turn1, 8, session="s")
    assert (routed.decision.pool, routed.decision.prefill) == (FRESH, "f1")
    turn2 = [*turn1, *out1, 7, 8, 9]  # the decode worker holds turn 1's prompt: an 11-token suffix
    routed, out2, emitted = run(router, "t2", turn2, 6, session="s")
    assert routed.decision.pool == LOCAL and routed.decision.prefill is None
    assert emitted[0].num_cached_tokens >= len(turn1) - 8
    assert out2 == offline(model, [turn2], 6)[0]
    turn3 = [*turn1, *range(100, 160)]  # 60 new tokens after an 80-token cached prefix: hit ratio 0.57
    routed, out3, emitted = run(router, "t3", turn3, 4, session="s")
    # Too long a suffix for the decode worker (cap 16): the prefill worker that holds the prefix (f1
    # computed turn 1) takes it, not an empty warm worker that would recompute it.
    assert (routed.decision.pool, routed.decision.prefill) == (FRESH, "f1")
    assert emitted[0].num_cached_tokens == 80 == routed.decision.terms["predicted_cached_tokens"]
    assert out3 == offline(model, [turn3], 4)[0]
    # The threshold cpd (kept for A/B) sends it to the warm pool, which holds nothing of it.
    router.policies = {"cpd": make_policy("cpd_threshold", local_prefill_max_tokens=16)}
    routed, _, emitted = run(router, "t4", [*turn1, *range(200, 260)], 4, session="s")
    assert (routed.decision.pool, routed.decision.prefill) == (WARM, "w1")
    assert emitted[0].num_cached_tokens == 0 and routed.decision.terms["predicted_cached_tokens"] == 0


def test_ab_arms_are_per_session_and_follow_the_shares():
    arms = ArmAssigner(parse_ab("cpd:0.25,least_loaded:0.75"))
    picks = [arms.arm_for(f"session-{i}") for i in range(8000)]
    assert picks == [arms.arm_for(f"session-{i}") for i in range(8000)]
    assert abs(picks.count("cpd") / len(picks) - 0.25) < 0.02
    for bad in ("cpd", "cpd:0", ":0.5"):
        with pytest.raises(ValueError):
            ArmAssigner(parse_ab(bad))


def test_the_router_front_door_over_grpc(model, cluster):
    import grpc

    from splitserve.protos import router_pb2, router_pb2_grpc
    from splitserve.router.service import RouterService

    workers, matches, model_id = cluster
    router = Router(workers, {"cpd": make_policy("cpd", local_prefill_max_tokens=16)}, model_id, 8, matches)
    server, port = make_server("127.0.0.1:0")
    router_pb2_grpc.add_RouterServicer_to_server(RouterService(router), server)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = router_pb2_grpc.RouterStub(channel)
    try:
        prompt = list(range(3, 90))
        sampling = sampling_to_proto(SamplingParams(max_tokens=8, **GREEDY))
        reply = stub.Generate(router_pb2.RouterRequest(prompt_token_ids=prompt, sampling=sampling))
        assert list(reply.token_ids) == offline(model, [prompt], 8)[0] and reply.finish_reason == "length"
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 8)
        assert reply.route.pool == FRESH and reply.ttft_ms > 0 and reply.request_id
        # A second router in front of the same workers (or this one restarted) never reuses an id.
        assert reply.request_id not in {RouterService(router).new_request_id() for _ in range(3)}
        chunks = list(
            stub.GenerateStream(
                router_pb2.RouterRequest(prompt_token_ids=[*prompt, 5], sampling=sampling, session_id="s")
            )
        )
        assert chunks[0].route.decode_worker == "d1" and chunks[-1].usage.cached_tokens >= 80
        long = router_pb2.RouterRequest(
            prompt_token_ids=list(range(3, 40)),
            sampling=sampling_to_proto(SamplingParams(max_tokens=400, **GREEDY)),
        )
        stream = stub.GenerateStream(long)
        next(stream)
        stream.cancel()  # the client goes away: the decode worker aborts the request
        decode = workers.get("d1")
        for _ in range(100):
            workers.poll()
            if decode.load.running_requests == 0:
                break
            time.sleep(0.05)
        assert decode.load.running_requests == 0
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(router_pb2.RouterRequest(sampling=sampling))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        running = stub.GenerateStream(
            router_pb2.RouterRequest(
                request_id="to-abort",
                prompt_token_ids=list(range(3, 40)),
                sampling=sampling_to_proto(SamplingParams(max_tokens=400, **GREEDY)),
            )
        )
        next(running)  # it runs
        assert stub.Abort(router_pb2.RouterAbortRequest(request_id="to-abort")).found
        assert [c.finish_reason for c in running][-1] == "abort"
        assert not stub.Abort(router_pb2.RouterAbortRequest(request_id="to-abort")).found
        status = stub.Status(router_pb2.StatusRequest())
        assert {w.worker_id for w in status.workers} == {"f1", "w1", "d1"}
        assert status.arms[0].arm == "cpd" and status.arms[0].requests >= 2
        assert stub.Health(router_pb2.HealthRequest()).serving
        # ResetCache empties every worker's prefix cache: the same prompt then finds nothing cached.
        again = router_pb2.RouterRequest(prompt_token_ids=[*prompt, 5], sampling=sampling, session_id="s")
        assert stub.Generate(again).usage.cached_tokens >= 80
        from splitserve.protos import common_pb2

        assert stub.ResetCache(common_pb2.ResetCacheRequest()).num_evicted_blocks >= 10
        assert all(matches(hash_blocks([*prompt, 5], 8, HashContext(model_id)))[w].num_blocks == 0
                   for w in ("f1", "w1", "d1"))  # fmt: skip
        assert stub.Generate(again).usage.cached_tokens == 0
    finally:
        channel.close()
        server.stop(0).wait()


def test_the_client_sdk_blocking_and_async(model, cluster):
    import asyncio

    from splitserve import AsyncClient, Client
    from splitserve.client import InvalidRequestError
    from splitserve.protos import router_pb2_grpc
    from splitserve.router.service import RouterService
    from splitserve.router.text import TextCodec

    workers, matches, model_id = cluster
    router = Router(workers, {"cpd": make_policy("cpd", local_prefill_max_tokens=4)}, model_id, 8, matches)
    server, port = make_server("127.0.0.1:0")
    router_pb2_grpc.add_RouterServicer_to_server(RouterService(router, TextCodec(model)), server)
    server.start()
    llm = LLM(str(model), num_blocks=256, block_size=8)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            text = "The weather in the mountains is"
            out = client.generate(text, max_tokens=12, temperature=0.0, ignore_eos=True, session_id="u1")
            expected = llm.generate(text, SamplingParams(max_tokens=12, **GREEDY))[0].outputs[0]
            assert (out.text, out.token_ids) == (expected.text, expected.token_ids)
            assert out.finish_reason == "length" and out.usage.completion_tokens == 12 and out.ttft_ms > 0
            chunks = list(client.stream(text, max_tokens=12, temperature=0.0, ignore_eos=True))
            assert "".join(c.text for c in chunks) == expected.text and chunks[-1].usage.prompt_tokens > 0
            stop = expected.text[len(expected.text) // 2 :][:3]
            cut = client.generate(text, max_tokens=12, temperature=0.0, ignore_eos=True, stop=stop)
            assert cut.finish_reason == "stop" and cut.text == expected.text[: expected.text.index(stop)]
            messages = [{"role": "user", "content": "How do I plant tomatoes?"}]
            chat = client.generate(messages=messages, max_tokens=6, temperature=0.0, ignore_eos=True)
            offline_chat = llm.chat(messages, SamplingParams(max_tokens=6, **GREEDY))[0].outputs[0]
            assert chat.token_ids == offline_chat.token_ids
            with pytest.raises(InvalidRequestError):
                client.generate("", max_tokens=4)
            stream = client.stream(text, max_tokens=400, ignore_eos=True, request_id="mine")
            next(stream)
            assert client.abort("mine") and [c.finish_reason for c in stream][-1] == "abort"

        async def use_async():
            async with AsyncClient(f"127.0.0.1:{port}") as client:
                assert (await client.health())["serving"]
                assert {w["worker_id"] for w in (await client.status())["workers"]} == {"f1", "w1", "d1"}
                stream = client.stream(text, max_tokens=400, ignore_eos=True, request_id="mine-async")
                await anext(stream)
                assert await client.abort("mine-async") and not await client.abort("no-such-request")
                assert [c.finish_reason async for c in stream][-1] == "abort"
                return await client.generate(text, max_tokens=12, temperature=0.0, ignore_eos=True)

        assert asyncio.run(use_async()).token_ids == expected.token_ids
    finally:
        server.stop(0).wait()


def test_the_openai_http_front_with_the_official_client(model, cluster):
    import urllib.request

    import openai

    from splitserve.router.http_front import HTTPFront
    from splitserve.router.service import RouterService
    from splitserve.router.text import TextCodec

    workers, matches, model_id = cluster
    router = Router(workers, {"cpd": make_policy("cpd", local_prefill_max_tokens=4)}, model_id, 8, matches)
    front = HTTPFront(RouterService(router, TextCodec(model)), "tiny").start()
    base = f"http://127.0.0.1:{front.port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    llm = LLM(str(model), num_blocks=256, block_size=8)
    greedy = {"temperature": 0.0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}
    try:
        text = "The weather in the mountains is"
        expected = llm.generate(text, SamplingParams(max_tokens=10, **GREEDY))[0].outputs[0].text
        done = client.completions.create(model="tiny", prompt=text, **greedy)
        assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
        assert done.usage.completion_tokens == 10
        stream = client.completions.create(
            model="tiny",
            prompt=text,
            stream=True,
            stream_options={"include_usage": True},
            user="conv",
            **greedy,
        )
        events = list(stream)
        assert "".join(e.choices[0].text for e in events if e.choices) == expected
        usage = events[-1].usage
        assert usage.prompt_tokens > 0 and usage.prompt_tokens_details.cached_tokens >= 0
        messages = [{"role": "user", "content": "How do I plant tomatoes?"}]
        want = llm.chat(messages, SamplingParams(max_tokens=10, **GREEDY))[0].outputs[0].text
        chat = client.chat.completions.create(model="tiny", messages=messages, **greedy)
        assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True, **greedy))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        again = client.chat.completions.create(model="tiny", messages=messages, **greedy)  # cached now
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        assert [m.id for m in client.models.list()] == ["tiny"]
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt=[], max_tokens=4)
        with urllib.request.urlopen(f"{base}/health") as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{base}/metrics") as r:
            metrics = r.read().decode()
        assert 'splitserve_arm_requests_total{arm="cpd"}' in metrics and "splitserve_worker_up" in metrics
    finally:
        front.stop()


def test_tenants_keys_and_salted_caches_over_grpc_and_http(model, cluster, tmp_path):
    """A tenant's repeated prompt hits its own cache, never another tenant's; no key or an unknown key is
    refused (the SDK's AuthenticationError, HTTP 401); a tenant cannot abort another's request."""
    import hashlib
    import json

    import openai

    from splitserve import Client
    from splitserve.client import AuthenticationError
    from splitserve.protos import router_pb2_grpc
    from splitserve.router.http_front import HTTPFront
    from splitserve.router.service import RouterService
    from splitserve.router.tenants import Tenants
    from splitserve.router.text import TextCodec

    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({t: hashlib.sha256(f"key-{t}".encode()).hexdigest() for t in ("a", "b")}))
    workers, matches, model_id = cluster
    router = Router(workers, {"prefix_affinity": make_policy("prefix_affinity")}, model_id, 8, matches)
    service = RouterService(router, TextCodec(model), tenants=Tenants.from_file(path))
    server, port = make_server("127.0.0.1:0")
    router_pb2_grpc.add_RouterServicer_to_server(service, server)
    server.start()
    front = HTTPFront(service, "tiny").start()
    prompt = list(range(20, 60))
    greedy = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    try:
        address = f"127.0.0.1:{port}"
        with Client(address, api_key="key-a") as a, Client(address, api_key="key-b") as b:
            first = a.generate(prompt, **greedy)
            assert a.generate(prompt, **greedy).usage.cached_tokens == 32  # its own cache (the last block
            # of a 40-token prompt is computed again: its last token must be)
            other = b.generate(prompt, **greedy)
            assert other.usage.cached_tokens == 0 and other.token_ids == first.token_ids  # salted apart
            stream = b.stream(prompt, max_tokens=300, ignore_eos=True, request_id="b-long")
            next(stream)
            assert not a.abort("b-long") and b.abort("b-long")
            assert [c.finish_reason for c in stream][-1] == "abort"
        for key in (None, "key-c"):
            with Client(f"127.0.0.1:{port}", api_key=key, retries=0) as c, pytest.raises(AuthenticationError):
                c.generate(prompt, **greedy)
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{front.port}/v1", api_key="key-b", max_retries=0)
        done = http.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0.0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
        assert done.usage.prompt_tokens_details.cached_tokens == 32  # tenant b's cache from above
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{front.port}/v1", api_key="nope", max_retries=0
                          ).completions.create(model="tiny", prompt="hi", max_tokens=2)  # fmt: skip
    finally:
        front.stop()
        server.stop(0).wait()


@pytest.mark.parametrize(
    "policy", ["round_robin", "colocated"]
)  # through a prefill pool; on the decode worker
def test_logprobs_reach_the_sdk_as_the_offline_api_gives_them(model, cluster, policy):
    from splitserve import Client
    from splitserve.protos import router_pb2_grpc
    from splitserve.router.service import RouterService
    from splitserve.router.text import TextCodec

    workers, matches, model_id = cluster
    router = Router(workers, {policy: make_policy(policy)}, model_id, 8, matches)
    server, port = make_server("127.0.0.1:0")
    router_pb2_grpc.add_RouterServicer_to_server(RouterService(router, TextCodec(model)), server)
    server.start()
    prompt = list(range(3, 60))
    try:
        with Client(f"127.0.0.1:{port}") as client:
            out = client.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
            plain = client.generate(prompt, max_tokens=2, temperature=0.0, ignore_eos=True)
    finally:
        server.stop(0).wait()
    want = (
        LLM(str(model), num_blocks=256, block_size=8)
        .generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=6, logprobs=3, **GREEDY))[0]
        .outputs[0]
    )
    assert (out.route["pool"] == "decode-local") == (policy == "colocated")
    assert out.token_ids == want.token_ids and len(out.logprobs) == 6  # the first from the prefill side too
    for lp, token, entry in zip(out.logprobs, want.token_ids, want.logprobs, strict=True):
        assert lp.token_id == token and lp.rank == entry[token].rank == 1
        assert lp.logprob == pytest.approx(entry[token].logprob, abs=1e-5)
        assert [t for t, _ in lp.top] == [t for t, e in sorted(entry.items(), key=lambda kv: kv[1].rank)][:3]
    assert plain.logprobs is None
