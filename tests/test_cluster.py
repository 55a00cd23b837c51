"""The whole cluster, two ways: as real processes started by hand ("processes") and as `splitserve up
--detach` on a real local Ray ("ray"); an embedded real Redis, fresh / warm prefill and decode workers that
register in the prefix index, and a router, used through the client SDK and the official `openai` client.

Both: outputs equal the offline API; a conversation's first turn goes to the fresh pool and later, mostly
cached turns to the warm pool, whose cache then serves them (cached tokens reported); a worker that hashes
differently is refused; with Redis down requests are still served (stale index) and index routing resumes
when it returns. Ray only: a killed worker process and a killed member actor are restarted and registered
again; `splitserve status` and `generate` work; `splitserve down` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from waiting import process_gone, wait_until
from workers_cluster import start_process

from splitserve import LLM, Client, SamplingParams
from splitserve.client import UnavailableError
from splitserve.cluster.state import ClusterState
from splitserve.engine.block_hash import HashContext, hash_blocks
from splitserve.engine.model_config import checkpoint_identity
from splitserve.index.redis_server import EmbeddedRedis

BLOCK = ["--block-size", "8"]
ENGINE = [*BLOCK, "--num-blocks", "256", "--max-num-seqs", "8"]
# The threshold cpd: it walks a conversation through both prefill pools, which is what these tests check.
# (The cost-based cpd keeps every prefill on the decode worker here: all workers share this host's CPU,
# so disaggregating would isolate nothing; tests/test_policies.py and test_router_core.py cover it.)
# The router prices fetches with this machine kind's cost model.
CALIBRATION = str(Path(__file__).resolve().parents[1] / "docs" / "calibration-cpu.json")
POLICY = ["--policy", "cpd_threshold", "--policy-option", "local_prefill_max_tokens=16", "--calibration",
          CALIBRATION]  # fmt: skip


def splitserve(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The `splitserve` CLI, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "splitserve", *args], capture_output=True, text=True,
                          timeout=timeout, check=True)  # fmt: skip


class RayRedis:
    """The Ray cluster's embedded Redis, stopped and started through its actor (an outage). Connects to Ray
    only for the call: a driver left connected would outlive the cluster's Ray head badly."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def stop(self) -> None:
        self._call("stop")

    def start(self) -> None:
        self._call("start")

    def _call(self, method: str) -> None:
        from splitserve.cluster.ray_head import connect

        connect(self.state.ray_address, self.state.namespace)
        import ray

        try:
            ray.get(getattr(ray.get_actor("redis"), method).remote())
        finally:
            ray.shutdown()


def _by_hand(model, tmp):
    """Workers and a router as plain processes (what runs on machines without Ray)."""
    redis = EmbeddedRedis().start()
    procs = []
    for wid, module, extra in (("decode-0", "splitserve.decode_worker", []),
                               ("fresh-0", "splitserve.prefill_worker", ["--pool", "fresh"]),
                               ("warm-0", "splitserve.prefill_worker", ["--pool", "warm"])):  # fmt: skip
        args = [
            module,
            "--model",
            str(model),
            "--port",
            "0",
            *ENGINE,
            "--redis-url",
            redis.url,
            "--worker-id",
            wid,
        ]
        procs.append(start_process([*args, *extra])[0])
    log = tmp / "router.log"
    with open(log, "w") as err:
        args = ["--model", str(model), "--port", "0", "--http-port", "0", *BLOCK, "--redis-url", redis.url]
        router, address = start_process(["splitserve.router", *args, *POLICY], stderr=err)
    procs.append(router)

    def close():
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.stop()

    return {"address": address, "http": router.http_address, "redis": redis, "log": log,
            "redis_url": redis.url,
            "close": close}  # fmt: skip


def _on_ray(model, tmp):
    state_file = tmp / "cluster.json"
    splitserve("up", "--model", str(model), "--grpc-port", "0", "--http-port", "0", *ENGINE, *POLICY,
               "--detach", "--state-file", str(state_file))  # fmt: skip
    state = ClusterState.load(state_file)
    redis = RayRedis(state)

    def close():
        if state_file.exists():
            splitserve("down", "--state-file", str(state_file))

    return {"address": state.router_address, "http": state.http_address, "redis": redis, "state": state,
            "state_file": state_file, "log": Path(state.log_dir) / "router.log", "redis_url": state.redis_url,
            "close": close}  # fmt: skip


@pytest.fixture(scope="module", params=["processes", "ray"])
def cluster(request, tiny_model, tmp_path_factory):
    model = tiny_model("llama", max_position_embeddings=1024)
    tmp = tmp_path_factory.mktemp(request.param)
    c = (_by_hand if request.param == "processes" else _on_ray)(model, tmp)
    odd = None
    try:  # a worker hashing blocks of another size: the router must refuse it
        odd, _ = start_process(
            [
                "splitserve.decode_worker",
                "--model",
                str(model),
                "--port",
                "0",
                "--block-size",
                "16",
                "--num-blocks",
                "64",
                "--redis-url",
                c["redis_url"],
                "--worker-id",
                "odd",
            ]
        )
        client = Client(c["address"], timeout=60)
        deadline = time.monotonic() + 30
        while client.generate([5, 6, 7], max_tokens=1).route["decode_worker"] != "decode-0":
            assert time.monotonic() < deadline, "the workers never registered"
            time.sleep(0.2)
        yield {**c, "kind": request.param, "model": model, "client": client}
        client.close()
    finally:
        if odd is not None:
            odd.terminate()
            odd.wait(30)
        c["close"]()


def offline(model, prompt, max_tokens):
    llm = LLM(str(model), num_blocks=256, block_size=8)
    return (
        llm.generate(
            {"prompt_token_ids": prompt},
            SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )[0]
        .outputs[0]
        .token_ids
    )


def test_a_conversation_goes_fresh_then_warm_with_cached_tokens(cluster):
    client, model = cluster["client"], cluster["model"]
    turn1 = list(range(10, 90))
    out1 = client.generate(turn1, max_tokens=8, temperature=0.0, ignore_eos=True, session_id="conv")
    assert out1.token_ids == offline(model, turn1, 8)
    assert (out1.route["pool"], out1.route["prefill_worker"]) == ("fresh", "fresh-0")
    turn2 = [*turn1, *out1.token_ids, *range(200, 260)]  # 88 cached-able tokens, 60 new: hit ratio ≥ 0.5
    deadline = time.monotonic() + 10
    while True:  # the index learns of turn 1's blocks asynchronously (worker → Redis → mirror)
        out2 = client.generate(turn2, max_tokens=6, temperature=0.0, ignore_eos=True, session_id="conv")
        if out2.route["pool"] == "warm" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (out2.route["pool"], out2.route["prefill_worker"]) == ("warm", "warm-0")
    assert out2.token_ids == offline(model, turn2, 6)
    assert out2.usage.prompt_tokens == len(turn2)
    turn3 = [*turn2, *out2.token_ids, *range(300, 360)]  # the warm worker now holds turn 2: its cache serves
    out3 = client.generate(turn3, max_tokens=4, temperature=0.0, ignore_eos=True, session_id="conv")
    assert (out3.route["pool"], out3.route["prefill_worker"]) == ("warm", "warm-0")
    assert out3.usage.cached_tokens >= len(turn2) // 8 * 8 - 8
    assert out3.token_ids == offline(model, turn3, 4)


def test_a_follow_up_on_a_worker_without_its_context_fetches_it_from_the_holder(cluster):
    # A long first turn (fresh-0 computes it, decode-0 receives it); the follow-up goes to the warm pool,
    # whose worker never saw the conversation: it fetches the turn's blocks (predicted cheaper than
    # recomputing 480 tokens with this machine's costs) and reports them cached.
    client, model = cluster["client"], cluster["model"]
    turn1 = [(7 * i) % 500 + 3 for i in range(480)]
    out1 = client.generate(turn1, max_tokens=8, temperature=0.0, ignore_eos=True, session_id="long")
    assert out1.route["pool"] == "fresh"
    turn2 = [*turn1, *out1.token_ids, *range(100, 140)]
    seen = len(turn1) // 8 * 8
    # The index learns of turn 1's blocks asynchronously (worker → Redis → the router's mirror): wait until
    # Redis has the last of them, then give the mirror a moment; one try, so no earlier try can have put
    # them in the warm worker's own cache.
    last = hash_blocks(turn1, 8, HashContext(checkpoint_identity(str(model))))[-1]
    index = redis.Redis.from_url(cluster["redis_url"])
    wait_until(lambda: index.sismember("spx:blocks:fresh-0", last), timeout_s=10)
    index.close()
    time.sleep(0.5)
    out2 = client.generate(turn2, max_tokens=6, temperature=0.0, ignore_eos=True, session_id="long")
    assert out2.route["pool"] == "warm" and out2.usage.cached_tokens >= 0.9 * seen
    assert out2.token_ids == offline(model, turn2, 6)

    def fetched() -> int:  # as the router last polled the warm worker's load (every 0.1 s)
        loads = {w["worker_id"]: w["load"] for w in client.status()["workers"]}
        return int(loads[out2.route["prefill_worker"]]["tiers"]["fetched_tokens"])

    wait_until(lambda: fetched() >= 0.9 * seen, timeout_s=5, what="the fetched tokens reported")


def test_the_official_openai_client_streaming_and_not(cluster):
    import openai

    client = openai.OpenAI(base_url=f"http://{cluster['http']}/v1", api_key="unused", max_retries=0)
    llm = LLM(str(cluster["model"]), num_blocks=256, block_size=8)
    messages = [{"role": "user", "content": "How do I plant tomatoes in a small garden?"}]
    want = (
        llm.chat(messages, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].outputs[0].text
    )
    greedy = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}, "user": "tomatoes"}
    done = client.chat.completions.create(model="x", messages=messages, **greedy)
    assert done.choices[0].message.content == want
    stream = client.chat.completions.create(model="x", messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **greedy)  # fmt: skip
    events = list(stream)
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == want
    assert events[-1].usage.completion_tokens == 8


def test_a_worker_that_hashes_differently_is_refused(cluster):
    assert "refusing worker odd" in cluster["log"].read_text()
    assert "odd" not in {w["worker_id"] for w in cluster["client"].status()["workers"]}


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


def _members(cluster) -> dict[str, dict]:
    report = json.loads(splitserve("status", "--json", "--state-file", str(cluster["state_file"])).stdout)
    return {m["name"]: m for m in report["members"]}


def _wait_restarted(cluster, name: str, old_pid: int) -> dict:
    """`name` runs again under a new pid and serves: a worker is healthy in the router's view, the router
    sees every worker again."""
    deadline = time.monotonic() + 60
    while True:
        member = _members(cluster)[name]
        try:
            healthy = {w["worker_id"] for w in cluster["client"].status()["workers"] if w["healthy"]}
        except UnavailableError:  # the router itself is restarting
            healthy = set()
        serving = name in healthy or (name == "router" and {"fresh-0", "warm-0", "decode-0"} <= healthy)
        if member["state"] == "running" and member["pid"] not in (None, old_pid) and serving:
            return member
        assert time.monotonic() < deadline, f"{name} was not restarted: {member}"
        time.sleep(0.5)


def test_ray_restarts_a_dead_worker_and_a_dead_member_actor(cluster):
    if cluster["kind"] != "ray":
        pytest.skip("restarts are the Ray cluster's")
    client, model = cluster["client"], cluster["model"]
    decode = _members(cluster)["decode-0"]
    stream = client.stream(list(range(10, 60)), max_tokens=5000, ignore_eos=True, temperature=0.0)
    received = 0
    while received < 10:  # past the first token (from the prefill worker): the decode worker streams
        received += len(next(stream).token_ids)
    os.kill(decode["pid"], signal.SIGKILL)  # mid-stream: the request fails in band, with who and when
    with pytest.raises(UnavailableError, match=r"decode worker decode-0, after \d+ tokens"):
        list(stream)
    # The worker process: its supervisor restarts it.
    after = _wait_restarted(cluster, "decode-0", decode["pid"])
    assert after["restarts"] == decode["restarts"] + 1
    prompt = list(range(100, 140))
    assert client.generate(prompt, max_tokens=4, temperature=0.0, ignore_eos=True).token_ids == offline(
        model, prompt, 4
    )
    fresh = _members(cluster)["fresh-0"]
    actor_pid = int(Path(f"/proc/{fresh['pid']}/stat").read_text().split()[3])  # its parent: the actor
    os.kill(actor_pid, signal.SIGKILL)  # the actor: Ray restarts it; its old worker dies with it
    _wait_restarted(cluster, "fresh-0", fresh["pid"])
    assert process_gone(fresh["pid"])
    _kill_the_redis_actor_and_see_the_index_return(cluster)
    router = _members(cluster)["router"]
    os.kill(router["pid"], signal.SIGKILL)  # the router comes back at the same address (even from port 0)
    _wait_restarted(cluster, "router", router["pid"])
    assert client.generate(prompt, max_tokens=4, temperature=0.0, ignore_eos=True).token_ids == offline(
        model, prompt, 4)
    out = splitserve("generate", "The weather in the mountains", "--max-tokens", "4", "--ignore-eos",
                     "--json",
                     "--state-file", str(cluster["state_file"]))  # fmt: skip
    assert len(json.loads(out.stdout)["token_ids"]) == 4


def _kill_the_redis_actor_and_see_the_index_return(cluster):
    """The embedded Redis's actor dies: its server dies with it (no orphan holding the port), Ray restarts
    the actor, the server comes back on the same URL, and the workers register again."""
    import redis

    port = int(cluster["redis_url"].rsplit(":", 1)[1].split("/")[0])
    server = next(p for p in _pids("redis-server") if f":{port}" in Path(f"/proc/{p}/cmdline").read_text())
    actor = int(Path(f"/proc/{server}/stat").read_text().split()[3])
    os.kill(actor, signal.SIGKILL)
    wait_until(lambda: process_gone(server), 60, "the Redis server going with its actor")
    deadline = time.monotonic() + 60
    while True:
        try:
            if redis.Redis.from_url(cluster["redis_url"], socket_timeout=1).ping():
                break
        except redis.exceptions.ConnectionError:
            assert time.monotonic() < deadline, "Ray did not bring the embedded Redis back"
            time.sleep(0.5)
    while not cluster["client"].health()["serving"] or cluster["client"].health()["index_stale"]:
        assert time.monotonic() < deadline, "the index did not recover"
        time.sleep(0.5)


def test_down_stops_everything(cluster):
    if cluster["kind"] != "ray":
        pytest.skip("`splitserve down` is the Ray cluster's")
    pids = [m["pid"] for m in _members(cluster).values()]
    head = cluster["state"].ray_head_pid
    splitserve("down", "--state-file", str(cluster["state_file"]))
    assert not cluster["state_file"].exists()
    wait_until(lambda: all(process_gone(pid) for pid in [*pids, head]), 30, "every process gone after `down`")
    import redis

    with pytest.raises(redis.exceptions.ConnectionError):  # the embedded Redis is gone too
        redis.Redis.from_url(cluster["redis_url"], socket_timeout=1).ping()


def test_up_with_a_member_that_cannot_start_fails_with_its_log_and_leaves_nothing(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("llama"), broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)  # config and tokenizer load; the weights do not
    state_file = tmp_path / "cluster.json"
    args = ["up", "--model", str(broken), "--grpc-port", "0", "--http-port", "0", "--fresh-prefill", "1",
            "--warm-prefill", "0", "--decode", "1", "--detach", "--state-file", str(state_file)]  # fmt: skip
    heads_before = _pids("ray.scripts.scripts start")
    with pytest.raises(subprocess.CalledProcessError) as failed:
        splitserve(*args)
    assert failed.value.returncode == 1
    assert re.search(r"the cluster did not start: (fresh|decode)-0 did not start \(exit status 1\)",
                     failed.value.stderr), failed.value.stderr  # fmt: skip
    assert "SafetensorError" in failed.value.stderr  # the member's own log tail
    assert not state_file.exists()
    assert not _pids(str(broken)) and _pids("ray.scripts.scripts start") <= heads_before  # no member, no head


def _pids(pattern: str) -> set[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return {int(pid) for pid in found.split()} - {os.getpid()}


def test_up_joins_a_ray_cluster_with_one_gpu_per_worker_and_down_leaves_that_cluster_running(
    tiny_model, tmp_path
):
    """A Ray head that declares 3 GPUs (logical: Ray hands out their ids; this machine has none, so the
    workers compute on CPU): 3 workers get one distinct GPU each, 4 are refused, and `down` stops only
    what `up` started."""
    from splitserve.cluster.ray_head import start_ray_head, stop_ray_head

    address, head = start_ray_head(tmp_path, ("--num-gpus=3",))
    try:
        state_file = tmp_path / "cluster.json"
        common = ["--model", str(tiny_model("llama")), "--grpc-port", "0", "--http-port", "-1",
                  "--ray-address", address, "--state-file", str(state_file), "--detach"]  # fmt: skip
        with pytest.raises(subprocess.CalledProcessError) as refused:
            splitserve("up", *common, "--fresh-prefill", "2", "--warm-prefill", "1", "--decode", "1")
        assert "4 workers need one GPU each; the Ray cluster has 3" in refused.value.stderr
        splitserve("up", *common, "--fresh-prefill", "1", "--warm-prefill", "1", "--decode", "1")
        members = json.loads(splitserve("status", "--json", "--state-file", str(state_file)).stdout)[
            "members"
        ]
        gpus = {}
        for m in members:
            entries = Path(f"/proc/{m['pid']}/environ").read_text().split("\0")
            environ = dict(kv.split("=", 1) for kv in entries if "=" in kv)
            gpus[m["name"]] = environ.get("CUDA_VISIBLE_DEVICES")
        assert sorted(gpus[w] for w in ("fresh-0", "warm-0", "decode-0")) == ["0", "1", "2"]
        assert gpus["router"] in (None, "")  # the router takes no GPU
        assert (
            Client(ClusterState.load(state_file).router_address).generate([1, 2, 3], max_tokens=2).token_ids
        )
        splitserve("down", "--state-file", str(state_file))
        assert not process_gone(head)  # not this cluster's head: it keeps running
    finally:
        stop_ray_head(head)


def test_up_in_the_foreground_serves_until_interrupted(tiny_model, tmp_path):
    state_file = tmp_path / "cluster.json"
    heads_before = _pids("ray.scripts.scripts start")
    up = subprocess.Popen([sys.executable, "-m", "splitserve", "up", "--model", str(tiny_model("llama")),
                           "--grpc-port", "0", "--http-port", "-1", "--warm-prefill", "0", "--state-file",
                           str(state_file)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        while "cluster up" not in (line := up.stdout.readline()):
            assert line, "up exited before the cluster served"
        with Client(ClusterState.load(state_file).router_address) as client:
            assert len(client.generate([1, 2, 3], max_tokens=3).token_ids) == 3
        members = [m["pid"] for m in json.loads(splitserve("status", "--json", "--state-file",
                                                           str(state_file)).stdout)["members"]]  # fmt: skip
        up.send_signal(signal.SIGINT)  # Ctrl-C: the cluster goes down with the command
        assert up.wait(120) == 0
        assert not state_file.exists()  # `up` took the cluster down itself
    finally:
        if up.poll() is None:
            up.kill()
        if state_file.exists():
            splitserve("down", "--state-file", str(state_file))
    wait_until(lambda: all(process_gone(pid) for pid in members), 30, "the members gone with `up`")
    assert _pids("ray.scripts.scripts start") <= heads_before


def test_down_after_the_ray_cluster_died_cleans_up_at_once(tmp_path):
    """A state file whose Ray head is gone (a reboot, a crash): `down` says so and removes the file instead
    of waiting on Ray; `status` fails with a clear line."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    state_file = tmp_path / "cluster.json"
    ClusterState("splitserve-gone", f"127.0.0.1:{port}", str(tmp_path), members=["router"]).save(state_file)
    with pytest.raises(subprocess.CalledProcessError) as failed:
        splitserve("status", "--state-file", str(state_file), timeout=30)
    assert f"no Ray cluster at 127.0.0.1:{port}" in failed.value.stderr
    out = splitserve("down", "--state-file", str(state_file), timeout=30)
    assert "not reachable" in out.stdout and not state_file.exists()
