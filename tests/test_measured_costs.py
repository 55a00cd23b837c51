"""Costs, measured: an engine times its prefill steps (tokens/s by cached context) and its host tier's loads
back into KV memory, a prefill worker its KV pushes per transport; the worker publishes them with its load,
the router's views carry them to the cost model (which uses them in place of its calibration), and
`splitserve status` shows them. Real engines, real gRPC; no assertion on how fast anything ran."""

from __future__ import annotations

import random

import pytest
from google.protobuf import json_format
from workers_cluster import GREEDY, Cluster

from splitserve import LLM, SamplingParams
from splitserve.cli.status import render
from splitserve.engine.loop import EngineLoop
from splitserve.engine.rates import PREFILL_CONTEXT_BUCKETS, LineFit, PrefillRate, RateMeter
from splitserve.kvtransfer.requests import worker_load
from splitserve.protos import common_pb2, router_pb2
from splitserve.router.core import Router, WorkerSet, measured_costs
from splitserve.router.cost_model import DEFAULT_COST_MODEL
from splitserve.router.policies import make_policy
from splitserve.router.service import RouterService

BS = 8


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=512)


def test_the_prefill_rate_fits_a_steps_fixed_cost_apart_from_its_tokens_by_context():
    rate = PrefillRate()
    for num_tokens in (64, 256, 1024, 64, 256, 1024):  # 2 ms a step + 20 µs a token
        rate.observe(num_tokens, 100, 0.002 + num_tokens / 50_000)
    for _ in range(3):  # one size only: the fixed cost cannot be told apart, so no rate (not a lower bound)
        rate.observe(512, 2000, 0.02)
    rate.observe(512, 5000, 0.02)  # one step is not enough to report
    rate.observe(100, 5000, 0.01)
    buckets = rate.buckets()
    assert [start for start, _ in buckets] == list(PREFILL_CONTEXT_BUCKETS) == [0, 1024, 4096, 16384]
    assert buckets[0][1] == pytest.approx(50_000)
    assert buckets[1][1] == buckets[2][1] == buckets[3][1] == 0.0
    meter = RateMeter()
    meter.observe(100, 1.0)
    meter.observe(300, 1.0)  # moving averages: 100 + 0.2 × 200 bytes per 1 s
    meter.observe(0, 1.0)  # nothing moved: not counted
    assert meter.per_s == pytest.approx(140.0)


def test_a_line_fit_reports_a_rate_only_when_its_amounts_tell_the_fixed_cost_apart():
    fit = LineFit(decay=0.9, min_steps=3)
    fit.observe(1e6, 0.005 + 1e6 / 2e9)
    fit.observe(4e6, 0.005 + 4e6 / 2e9)
    assert fit.per_s == 0.0  # two steps: too few
    fit.observe(16e6, 0.005 + 16e6 / 2e9)
    assert fit.per_s == pytest.approx(2e9)  # 5 ms apart from 2 GB/s (bytes / seconds: ~1 GB/s)
    shrinking = LineFit()
    for amount, seconds in ((1e6, 0.02), (4e6, 0.01), (16e6, 0.005)):  # more bytes, less time: no rate
        shrinking.observe(amount, seconds)
    assert shrinking.per_s == 0.0
    latency_only = LineFit()  # mostly a fixed cost: the bytes' part of the time is 4% of it
    for amount in (1e5, 2e5, 4e5):
        latency_only.observe(amount, 0.005 + amount / 1e9)
    assert latency_only.per_s == 0.0


def run(engine, rid, prompt):
    engine.add_request(rid, prompt, SamplingParams(max_tokens=2, **GREEDY))
    while engine.has_unfinished_requests():
        engine.step()


def test_an_engines_prefills_and_host_tier_loads_are_measured_and_published(model):
    engine = LLM(str(model), num_blocks=24, block_size=BS, host_kv_gib=0.001).engine
    rng = random.Random(7)
    prompt = [rng.randrange(3, 500) for _ in range(70)]
    loop = EngineLoop(engine)
    try:
        before = loop.call(worker_load, loop).costs
    finally:
        loop.stop()
    assert [(r.min_cached_tokens, r.tokens_per_s) for r in before.prefill] == [
        (start, 0.0) for start in PREFILL_CONTEXT_BUCKETS]  # fmt: skip
    assert before.host_load_bytes_per_s == 0.0 and not before.push_bytes_per_s
    run(engine, "first", prompt)
    for i in range(2):  # other prompts push every block of the first out of KV memory, into the host tier
        run(engine, f"other{i}", [rng.randrange(3, 500) for _ in range(90)])
    run(engine, "again", prompt)  # its prefix loaded back from the host tier
    assert engine.scheduler.prefix_stats.host_hit_tokens == (len(prompt) - 1) // BS * BS
    loop = EngineLoop(engine)
    try:
        costs = loop.call(worker_load, loop).costs
    finally:
        loop.stop()
    rates = {r.min_cached_tokens: r.tokens_per_s for r in costs.prefill}
    # Every prefill step was timed, in the short-context bucket; whether 4 steps of a tiny model tell a
    # fixed cost from a rate depends on the machine's noise, so the figure is checked against the fit.
    assert engine.prefill_rate.steps() == [4, 0, 0, 0]
    assert rates == pytest.approx(dict(engine.prefill_rate.buckets()))
    assert rates[1024] == rates[4096] == rates[16384] == 0.0
    assert costs.host_load_bytes_per_s > 0 and not costs.push_bytes_per_s  # an engine pushes nothing
    # As the router's cost model takes them: a worker's figures in place of the calibration's.
    m = measured_costs(costs)
    assert m.prefill_rate(100) == pytest.approx(rates[0]) and m.prefill_rate(2000) == 0.0
    model = DEFAULT_COST_MODEL  # its fixed cost and the measured rate; the calibration's while unmeasured
    want = model.prefill.fixed_s + 500 / rates[0] if rates[0] else model.prefill.seconds(500, 100)
    assert model.prefill_seconds(500, 100, m) == pytest.approx(want)
    assert model.prefill_seconds(500, 2000, m) == pytest.approx(model.prefill.seconds(500, 2000))
    assert DEFAULT_COST_MODEL.host_load_seconds(640, m) == pytest.approx(
        DEFAULT_COST_MODEL.kv_bytes(640) / costs.host_load_bytes_per_s)  # fmt: skip


@pytest.fixture(params=["grpc", "same-host"])
def cluster(request, model):
    c = Cluster(model, request.param)
    c.transport = request.param
    yield c
    c.close()


def test_a_prefill_workers_pushes_are_measured_per_transport_and_reach_the_router_and_status(cluster):
    load = cluster.prefiller.Load(common_pb2.LoadRequest())
    assert not load.costs.push_bytes_per_s
    rng = random.Random(8)
    for i, n in enumerate((30, 61, 90)):
        _, reply = cluster.generate(f"r{i}", [rng.randrange(3, 500) for _ in range(n)], 2)
        assert reply.transport == cluster.transport and reply.bytes_sent > 0
    tails = cluster.prefill.push_rates[cluster.transport]
    assert tails.num_steps == 3  # each push's tail (bytes after the last layer's report, time) observed
    # How fast a tiny push's tail went on a busy 2-core machine does not tell a rate reliably: feed the fit
    # a known line (as if three more pushes had measured it) to see the figure published and used.
    for _ in range(30):  # the real ones weigh 0.9^90 of these: nothing
        for num_bytes in (1e6, 4e6, 16e6):
            tails.observe(num_bytes, 0.004 + num_bytes / 3e9)
    load = cluster.prefiller.Load(common_pb2.LoadRequest())
    assert set(load.costs.push_bytes_per_s) == {cluster.transport}
    assert load.costs.push_bytes_per_s[cluster.transport] == pytest.approx(3e9, rel=1e-3)
    assert not cluster.decoder.Load(common_pb2.LoadRequest()).costs.push_bytes_per_s  # it pushed nothing
    workers = WorkerSet()  # the router's views, from the loads it polls over gRPC
    workers.add("fresh-0", "fresh", cluster.prefill_address)
    workers.add("decode-0", "decode", cluster.decode_address)
    try:
        router = Router(workers, {"cpd": make_policy("cpd")}, "m", BS, lambda hashes: {})
        views = {v.worker_id: v for v in router.views({})}
        measured = views["fresh-0"].measured
        pushed = load.costs.push_bytes_per_s[cluster.transport]
        assert measured.push_rate(cluster.transport) == pytest.approx(pushed)
        published = tuple((r.min_cached_tokens, r.tokens_per_s) for r in load.costs.prefill)
        assert measured.prefill_tokens_per_s == published
        assert views["decode-0"].measured.push_bytes_per_s == ()
        push = DEFAULT_COST_MODEL.push(measured, cluster.transport)
        assert push.bytes_per_s == pytest.approx(pushed)
        assert push.latency_s == DEFAULT_COST_MODEL.transfer(cluster.transport).latency_s
        status = json_format.MessageToDict(RouterService(router).Status(router_pb2.StatusRequest()),
                                           preserving_proto_field_name=True,
                                           always_print_fields_with_no_presence=True)  # fmt: skip
    finally:
        workers.close()
    report = {
        "router_address": "127.0.0.1:1",
        "http_address": "",
        "redis_url": "redis://-",
        "router": status,
        "members": [{"name": "fresh-0", "state": "running"}, {"name": "decode-0", "state": "running"}],
    }
    lines = {line.split(":")[0]: line for line in render(report) if line.startswith("costs ")}
    assert set(lines) == {"costs fresh-0", "costs decode-0"}
    assert lines["costs fresh-0"].startswith("costs fresh-0: prefill tok/s 0:")
    assert f"push {cluster.transport} " in lines["costs fresh-0"] and "B/s" in lines["costs fresh-0"]
    assert lines["costs decode-0"].endswith("host load -  push -")
