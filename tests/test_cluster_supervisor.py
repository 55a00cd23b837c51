"""`ClusterSpec` (validation, the members' command lines) and `ProcessSupervisor` on real member processes
(a router with a hand-added worker: it starts in about a second and needs no Redis): announce, restart
after a kill, no restart of a member that never served (its log tail is the error), stop, and no member
outliving its supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from waiting import process_gone, wait_until

from splitserve.cluster.spec import ClusterSpec, MemberSpec
from splitserve.cluster.supervisor import MemberFailed, MemberState, ProcessSupervisor
from splitserve.worker.options import EngineOptions, KVOptions


def test_cluster_spec_validates():
    for bad in ({"num_decode": 0}, {"num_fresh": 0, "num_warm": 0}, {"num_fresh": -1}, {"policy": "nope"},
                {"ab": "cpd:0.5,nope:0.5"}, {"grpc_port": 70000},
                {"failure_policy": "retry"}):  # fmt: skip
        with pytest.raises(ValueError):
            ClusterSpec(model="m", **bad)
    for bad in ({"dtype": "int8"}, {"device": "tpu"}, {"block_size": 0}, {"num_blocks": 0},
                {"max_num_seqs": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            EngineOptions(**bad)
    for bad in ({"transport": "ipc"}, {"lanes": -1}, {"wire_dtype": "int4"}):
        with pytest.raises(ValueError):
            KVOptions(**bad)


def test_cluster_spec_members_are_the_entry_points_with_their_flags():
    spec = ClusterSpec(
        model="/m",
        num_fresh=2,
        num_warm=1,
        num_decode=1,
        ab="cpd:0.5,least_loaded:0.5",
        http_port=None,
        engine=EngineOptions(num_blocks=64, max_num_seqs=32),
        kv=KVOptions(wire_dtype="fp8"),
        policy_options=("local_prefill_max_tokens=8",),
    )
    workers = spec.workers("redis://r:1/0")
    assert [(w.name, w.kind, w.module) for w in workers] == [
        ("fresh-0", "prefill", "splitserve.prefill_worker"),
        ("fresh-1", "prefill", "splitserve.prefill_worker"),
        ("warm-0", "prefill", "splitserve.prefill_worker"),
        ("decode-0", "decode", "splitserve.decode_worker"),
    ]
    warm = workers[2].args
    assert warm[warm.index("--pool") + 1] == "warm" and warm[warm.index("--worker-id") + 1] == "warm-0"
    assert warm[warm.index("--num-blocks") + 1] == "64" and warm[warm.index("--port") + 1] == "0"
    assert warm[warm.index("--max-num-seqs") + 1] == "32" and "--max-model-len" not in warm
    assert warm[warm.index("--kv-wire-dtype") + 1] == "fp8" and warm[warm.index("--kv-lanes") + 1] == "0"
    assert all(
        w.env == (("SPLITSERVE_REDIS_URL", "redis://r:1/0"),) and "redis://r:1/0" not in w.args
        for w in workers
    )  # a password in a URL stays out of command lines (`ps` lists those)
    router = spec.router("redis://r:1/0")
    assert ClusterSpec(model="/m", router_redis_url="redis://ro:pw@r:1/0").router("redis://r:1/0").env == (
        ("SPLITSERVE_REDIS_URL", "redis://ro:pw@r:1/0"),
    )
    assert router.kind == "router" and not router.is_worker
    assert "--ab" in router.args and "--policy" not in router.args and "--http-port" not in router.args
    assert router.args[router.args.index("--policy-option") + 1] == "local_prefill_max_tokens=8"


def _router(tiny_model, *extra: str) -> MemberSpec:
    model = str(tiny_model("llama"))
    return MemberSpec("router", "router", "splitserve.router", ("--model", model, "--port", "0",
                      "--http-port",
                      "0", "--worker", "d=decode@127.0.0.1:9", *extra))  # fmt: skip


def test_a_member_is_announced_restarted_after_a_kill_and_stopped(tiny_model, tmp_path):
    sup = ProcessSupervisor(_router(tiny_model), tmp_path / "router.log", backoff_s=0.1).start()
    try:
        first = sup.wait_ready(30)
        assert first.state is MemberState.RUNNING and first.restarts == 0 and first.pid is not None
        assert first.address.startswith("127.0.0.1:") and first.http_address.startswith("127.0.0.1:")
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (status := sup.status()).restarts == 0 or status.state is not MemberState.RUNNING:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status.pid != first.pid and status.last_exit == -signal.SIGKILL
        assert (tmp_path / "router.log").read_text().count("starting router") == 2
    finally:
        sup.stop(10)
    assert sup.status().state is MemberState.STOPPED and sup.status().pid is None
    wait_until(lambda: process_gone(status.pid), 15, "the stopped member gone")


def test_a_member_that_never_serves_fails_with_its_log(tmp_path):
    member = MemberSpec(
        "router", "router", "splitserve.router", ("--model", str(tmp_path / "missing"), "--port", "0")
    )
    sup = ProcessSupervisor(member, tmp_path / "router.log", backoff_s=0.1).start()
    with pytest.raises(
        MemberFailed, match=r"(?s)router did not start \(exit status 1\).*missing/config.json"
    ):
        sup.wait_ready(30)
    assert sup.status().state is MemberState.FAILED and sup.status().restarts == 0


def test_a_member_dies_with_its_supervisor(tiny_model, tmp_path):
    """A supervisor killed outright (as when Ray loses an actor's process) takes its member with it."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from splitserve.cluster.spec import MemberSpec\n"
        "from splitserve.cluster.supervisor import ProcessSupervisor\n"
        f"member = MemberSpec('router', 'router', 'splitserve.router', {_router(tiny_model).args!r})\n"
        f"sup = ProcessSupervisor(member, Path({str(tmp_path / 'r.log')!r})).start()\n"
        "print(sup.wait_ready(30).pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        member_pid = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_until(lambda: process_gone(member_pid), 15, "the member dying with its supervisor")
    finally:
        parent.kill()


def test_a_second_router_on_a_taken_port_fails_instead_of_sharing_it(tiny_model, tmp_path):
    """gRPC binds with SO_REUSEPORT by default: two routers on one port would split its clients."""
    first = ProcessSupervisor(_router(tiny_model), tmp_path / "a.log").start()
    try:
        port = first.wait_ready(30).address.rpartition(":")[2]
        model = str(tiny_model("llama"))
        args = ("--model", model, "--port", port, "--worker", "d=decode@127.0.0.1:9")
        second = MemberSpec("router", "router", "splitserve.router", args)
        sup = ProcessSupervisor(second, tmp_path / "b.log").start()
        with pytest.raises(MemberFailed, match=r"Address already in use|Failed to bind"):
            sup.wait_ready(30)
    finally:
        first.stop(10)
