"""The cluster as real processes: an embedded Redis, fresh / warm prefill and decode workers that register
in the prefix index, and a router (`python -m splitserve.router`), used through the client SDK. Outputs
equal the offline API; a conversation's first turn goes to the fresh pool and later, mostly cached turns
to the warm pool, whose cache then serves them (cached tokens reported); a worker that hashes
differently is refused; with Redis down requests are still served (stale index) and index routing
resumes when it returns."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from workers_cluster import start_process

from splitserve import LLM, Client, SamplingParams
from splitserve.index.redis_server import EmbeddedRedis

WORKER = ["--port", "0", "--block-size", "8", "--num-blocks", "256", "--max-num-seqs", "8"]


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    model = tiny_model("llama", max_position_embeddings=1024)
    redis = EmbeddedRedis().start()
    procs = []
    try:
        for wid, module, extra in (("d1", "splitserve.decode_worker", []),
                                   ("f1", "splitserve.prefill_worker", ["--pool", "fresh"]),
                                   ("w1", "splitserve.prefill_worker", ["--pool", "warm"])):
            args = [module, "--model", str(model), *WORKER, "--redis-url", redis.url, "--worker-id", wid]
            proc, _ = start_process([*args, *extra])
            procs.append(proc)
        odd, _ = start_process(["splitserve.decode_worker", "--model", str(model), "--port", "0",
                                "--block-size", "16", "--num-blocks", "64", "--redis-url", redis.url,
                                "--worker-id", "odd"])  # fmt: skip
        procs.append(odd)
        log = tmp_path_factory.mktemp("router") / "router.log"
        with open(log, "w") as err:
            router, address = start_process(["splitserve.router", "--model", str(model), "--port", "0",
                                             "--block-size", "8", "--redis-url", redis.url, "--policy", "cpd",
                                             "--policy-option", "local_prefill_max_tokens=16"],
                                            stderr=err)  # fmt: skip
        procs.append(router)
        client = Client(address, timeout=60)
        deadline = time.monotonic() + 30
        while client.generate([5, 6, 7], max_tokens=1).route["decode_worker"] != "d1":
            assert time.monotonic() < deadline, "the workers never registered"
            time.sleep(0.2)
        yield {"model": model, "redis": redis, "client": client, "log": log}
        client.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.stop()


def offline(model, prompt, max_tokens):
    llm = LLM(str(model), num_blocks=256, block_size=8)
    return llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                     ignore_eos=True))[0].outputs[0].token_ids


def test_a_conversation_goes_fresh_then_warm_with_cached_tokens(cluster):
    client, model = cluster["client"], cluster["model"]
    turn1 = list(range(10, 90))
    out1 = client.generate(turn1, max_tokens=8, temperature=0.0, ignore_eos=True, session_id="conv")
    assert out1.token_ids == offline(model, turn1, 8)
    assert (out1.route["pool"], out1.route["prefill_worker"]) == ("fresh", "f1")
    turn2 = [*turn1, *out1.token_ids, *range(200, 260)]  # 88 cached-able tokens, 60 new: hit ratio ≥ 0.5
    deadline = time.monotonic() + 10
    while True:  # the index learns of turn 1's blocks asynchronously (worker → Redis → mirror)
        out2 = client.generate(turn2, max_tokens=6, temperature=0.0, ignore_eos=True, session_id="conv")
        if out2.route["pool"] == "warm" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (out2.route["pool"], out2.route["prefill_worker"]) == ("warm", "w1")
    assert out2.token_ids == offline(model, turn2, 6)
    assert out2.usage.prompt_tokens == len(turn2)
    turn3 = [*turn2, *out2.token_ids, *range(300, 360)]  # the warm worker now holds turn 2: its cache serves
    out3 = client.generate(turn3, max_tokens=4, temperature=0.0, ignore_eos=True, session_id="conv")
    assert (out3.route["pool"], out3.route["prefill_worker"]) == ("warm", "w1")
    assert out3.usage.cached_tokens >= len(turn2) // 8 * 8 - 8
    assert out3.token_ids == offline(model, turn3, 4)


def test_a_worker_that_hashes_differently_is_refused(cluster):
    assert "refusing worker odd" in cluster["log"].read_text()


def test_redis_down_keeps_serving_and_index_routing_resumes(cluster):
    client, model, redis = cluster["client"], cluster["model"], cluster["redis"]
    redis.stop()
    prompt = list(range(300, 380))
    out = client.generate(prompt, max_tokens=4, temperature=0.0, ignore_eos=True)
    assert out.token_ids == offline(model, prompt, 4)
    assert out.route["terms"]["hit_ratio"] == 0.0  # computed while the index could not learn of anything
    redis.start()
    follow = [*prompt, *out.token_ids, *range(400, 460)]
    deadline = time.monotonic() + 30
    while True:  # the workers re-register and resync their blocks (cached during the outage); the mirror
        # rebuilds. Routing sees them again: a non-zero predicted hit ratio for the follow-up.
        again = client.generate(follow, max_tokens=2, temperature=0.0, ignore_eos=True)
        if again.route["terms"]["hit_ratio"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert again.route["terms"]["hit_ratio"] >= 80 // 8 * 8 / len(follow)
    assert again.token_ids == offline(model, follow, 2)
