"""Bring a cluster up on Ray, report on it, take it down: what `splitserve up`, `status` and `down` do.

`up` joins the Ray cluster at `--ray-address` or starts a Ray head of its own (`ray start --head
--block`, stopped again on `down`), starts an embedded Redis actor when no `--redis-url` is given, then one
detached `MemberActor` per member — the router on this node, the workers where Ray places them (one GPU
each when the cluster has GPUs) — and returns once every member serves and the router has registered
every worker through the index. Ray restarts a member actor whose process dies; the actor's supervisor
restarts a member process that dies. What was started is written to a state file, which `down` and
`status` read (from any later process). A failed `up` takes down what it had started. The Ray head and
this process's connection to Ray (token authentication included) are `ray_head.py`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from splitserve.client import Client, SplitserveError
from splitserve.cluster.actors import MemberActor, RedisActor
from splitserve.cluster.ray_head import ClusterStartError, connect, ray_module, start_ray_head, stop_ray_head
from splitserve.cluster.spec import ClusterSpec, MemberSpec, is_wildcard
from splitserve.cluster.state import ClusterState
from splitserve.index.config import redact_url
from splitserve.index.redis_server import free_port

STOP_GRACE_S = 20.0
REDIS_ACTOR = "redis"


def up(spec: ClusterSpec, state_file: Path, timeout_s: float = 300.0, say: Callable[[str], None] = print):
    """Start the cluster `spec` and return its `ClusterState` (also saved to `state_file`). Raises
    ValueError for a cluster that cannot be placed, `ClusterStartError` (with the member's log tail) for a
    member that cannot start, TimeoutError; everything started is stopped again before it raises."""
    if state_file.exists():
        raise ValueError(
            f"{state_file} names a running cluster: `splitserve down` first (or use --state-file)"
        )
    namespace = f"splitserve-{secrets.token_hex(4)}"
    state = ClusterState(namespace, spec.ray_address or "", str(Path(tempfile.gettempdir()) / namespace))
    try:
        if spec.ray_address is None:
            say("starting a Ray head")
            state.ray_address, state.ray_head_pid = start_ray_head(Path(state.log_dir))
        state.save(state_file)  # from here on `down` can clean up, even after a crash of this process
        connect(state.ray_address, namespace)
        redis_url = spec.redis_url
        if redis_url is None:
            state.embedded_redis = True
            redis_url = _start_redis(spec.host, timeout_s)
            say(f"embedded Redis at {redis_url}")
            if spec.host != "127.0.0.1":
                say(f"warning: the embedded Redis has no password and listens on {spec.host}; beyond one "
                    "machine give --redis-url a Redis secured as in deploy/README.md")  # fmt: skip
        state.redis_url = redact_url(redis_url)  # the state file is readable: no password in it
        spec = _fixed_router_ports(spec)
        members = [spec.router(redis_url), *spec.workers(redis_url)]
        gpus = _gpus_per_worker(spec)
        state.members = [m.name for m in members]
        state.save(state_file)
        actors = [_start_member(m, gpus if m.is_worker else 0, state.log_dir, spec.host) for m in members]
        say(f"starting {len(members) - 1} workers and a router (logs: {state.log_dir})")
        ready = _get([a.wait_ready.remote(timeout_s) for a in actors], timeout_s + 10, state.log_dir)
        state.router_address, state.http_address = ready[0]["address"], ready[0]["http_address"]
        workers = {m.name for m in members if m.is_worker}
        _wait_registered(state.router_address, workers, timeout_s, state.log_dir)
        state.save(state_file)
        return state
    except BaseException:
        teardown(state)
        state_file.unlink(missing_ok=True)
        raise


def down(state_file: Path, say: Callable[[str], None] = print) -> ClusterState:
    """Stop everything the cluster at `state_file` started and remove the file."""
    state = ClusterState.load(state_file)
    teardown(state, say)
    state_file.unlink(missing_ok=True)
    return state


def status(state_file: Path) -> dict:
    """Members (state, pid, restarts, node, address, log) and the router's view (workers with their load,
    A/B arm counters, index staleness)."""
    ray = ray_module()
    state = ClusterState.load(state_file)
    connect(state.ray_address, state.namespace)
    try:
        members = []
        for name in state.members:
            try:
                members.append(ray.get(ray.get_actor(name).status.remote(), timeout=10))
            except Exception as exc:  # a lost actor is part of the report, not a failure of it
                members.append({"name": name, "state": "unreachable", "error": str(exc).splitlines()[0]})
    finally:
        ray.shutdown()
    report = {"router_address": state.router_address, "http_address": state.http_address,
              "redis_url": state.redis_url, "ray_address": state.ray_address, "members": members}  # fmt: skip
    try:
        with Client(state.router_address, timeout=10) as client:
            report["router"] = client.status()
    except SplitserveError as exc:
        report["router"] = {"error": str(exc)}
    return report


def teardown(state: ClusterState, say: Callable[[str], None] = lambda line: None) -> None:
    """Stop the members (router first, then the workers together), the embedded Redis, and a Ray head
    this cluster started. Tolerates anything already gone."""
    ray = ray_module()
    if state.ray_address:
        try:
            connect(state.ray_address, state.namespace)
            for group in (
                state.members[:1],
                state.members[1:],
                [REDIS_ACTOR] if state.embedded_redis else [],
            ):
                _stop_actors(group)
            say(f"stopped {len(state.members)} members")
        except ConnectionError as exc:
            say(f"Ray at {state.ray_address} is not reachable ({exc}); its members go with it")
        finally:
            ray.shutdown()
    if state.ray_head_pid is not None:
        stop_ray_head(state.ray_head_pid)
        say("stopped the Ray head")


def _start_redis(bind_host: str, timeout_s: float) -> str:
    """The embedded Redis actor, on this node, on a port chosen here (it keeps it across restarts)."""
    ray = ray_module()
    port = free_port("0.0.0.0" if is_wildcard(bind_host) else bind_host)
    options = {"name": REDIS_ACTOR, "lifetime": "detached", "num_cpus": 0, "max_restarts": -1}
    placed = ray.remote(RedisActor).options(**options, scheduling_strategy=_this_node())
    actor = placed.remote(bind_host, port)
    return _get(actor.url.remote(), timeout_s)


def _fixed_router_ports(spec: ClusterSpec) -> ClusterSpec:
    """`spec` with a port chosen now where it asks for any free one (0): the router runs on this node, and a
    restarted router must come back at the address clients and the state file hold."""
    bind = "0.0.0.0" if is_wildcard(spec.host) else spec.host
    grpc_port = spec.grpc_port or free_port(bind)
    http_port = spec.http_port if spec.http_port != 0 else free_port(bind)
    return dataclasses.replace(spec, grpc_port=grpc_port, http_port=http_port)


def _start_member(member: MemberSpec, num_gpus: int, log_dir: str, bind_host: str):
    """A detached, restarting actor for `member`: the router next to this process (its address is the
    cluster's front door), workers spread over the nodes."""
    ray = ray_module()
    placement = "SPREAD" if member.is_worker else _this_node()
    return ray.remote(MemberActor).options(
        name=member.name, lifetime="detached", num_cpus=0, num_gpus=num_gpus, max_restarts=-1,
        max_concurrency=4, scheduling_strategy=placement,
    ).remote(member, log_dir, bind_host)  # fmt: skip


def _gpus_per_worker(spec: ClusterSpec) -> int:
    ray = ray_module()
    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    if spec.engine.device == "cuda" and num_gpus == 0:
        raise ValueError("--device cuda, but the Ray cluster has no GPUs")
    if spec.engine.device == "cpu" or num_gpus == 0:
        return 0
    if num_gpus < spec.num_workers:
        raise ValueError(f"{spec.num_workers} workers need one GPU each; the Ray cluster has {num_gpus}")
    return 1


def _wait_registered(router_address: str, names: set[str], timeout_s: float, log_dir: str) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(router_address, timeout=10) as client:
        while True:
            workers = client.status().get("workers", [])
            missing = names - {w["worker_id"] for w in workers if w.get("healthy")}
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router did not register {', '.join(sorted(missing))} within "
                                   f"{timeout_s:.0f} s; their logs and the router's: {log_dir}")  # fmt: skip
            time.sleep(0.2)


def _stop_actors(names: list[str]) -> None:
    ray = ray_module()
    actors = {}
    for name in names:
        with contextlib.suppress(ValueError):  # never started, or already gone
            actors[name] = ray.get_actor(name)
    pending = [actor.stop.remote(STOP_GRACE_S) for actor in actors.values()]
    # A member that cannot stop cleanly (or a lost actor) is killed below all the same.
    with contextlib.suppress(Exception):
        ray.get(pending, timeout=STOP_GRACE_S + 10)
    for actor in actors.values():
        ray.kill(actor, no_restart=True)


def _get(refs, timeout_s: float, log_dir: str | None = None):
    """`ray.get`, with a member's own error (its log tail) instead of Ray's wrapper around it."""
    ray = ray_module()
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.RayTaskError as exc:
        raise ClusterStartError(str(exc.cause) if exc.cause is not None else str(exc)) from None
    except ray.exceptions.GetTimeoutError:
        logs = f" (their logs: {log_dir})" if log_dir else ""
        raise TimeoutError(f"the cluster's members did not start within {timeout_s:.0f} s{logs}") from None


def _this_node():
    ray = ray_module()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
