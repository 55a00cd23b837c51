"""What a cluster is made of: `ClusterSpec` (the `splitserve up` configuration) and the members it
implies (`MemberSpec`: one router, the fresh and warm prefill workers, the decode workers), each as the
command line of the same entry point a person would run by hand (`python -m splitserve.router`, ...).

It knows nothing about Ray or processes: `launcher.py` places the members, `supervisor.py` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from splitserve.index.config import REDIS_URL_ENV
from splitserve.router.core import parse_ab
from splitserve.router.dispatch import FailurePolicy
from splitserve.router.policies import POLICIES
from splitserve.worker.options import EngineOptions, KVOptions

MemberKind = Literal["router", "prefill", "decode"]
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")  # bind hosts meaning "every interface": not an address to reach


def is_wildcard(host: str) -> bool:
    return host in WILDCARD_HOSTS


@dataclass(frozen=True)
class MemberSpec:
    """One supervised process: its name (the worker id in the index), kind, `python -m` module,
    arguments, and environment additions (secrets go there, not into the command line)."""

    name: str
    kind: MemberKind
    module: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    @property
    def is_worker(self) -> bool:
        return self.kind != "router"


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster: pool sizes, routing, ports, where Redis and Ray are (None: start them), and the
    workers' engine settings. `host` is the interface every member binds; with a wildcard (0.0.0.0)
    members advertise their node's address. `engine`: every worker's engine options (the workers' own
    definition, passed on as their command line). `tenants`: a JSON file of tenant name → SHA-256 of its
    API key (see router/tenants.py)."""

    model: str
    num_fresh: int = 1
    num_warm: int = 1
    num_decode: int = 1
    policy: str = "cpd"
    ab: str | None = None
    policy_options: tuple[str, ...] = ()
    failure_policy: str = FailurePolicy.RECOMPUTE.value
    fetch: bool = True  # targets fetch leading blocks other workers hold (the router's --no-fetch: False)
    calibration: str | None = None  # the router's cost model file (None: its built-in H200 figures)
    grpc_port: int = 50051
    http_port: int | None = 8000
    host: str = "127.0.0.1"
    redis_url: str | None = None
    router_redis_url: str | None = None  # the router's own (read-only) Redis user; default: redis_url
    ray_address: str | None = None
    tenants: str | None = None
    engine: EngineOptions = field(default_factory=EngineOptions)
    kv: KVOptions = field(default_factory=KVOptions)  # how the prefill workers move KV

    def __post_init__(self) -> None:
        if self.num_decode < 1:
            raise ValueError(f"a cluster needs at least one decode worker, got {self.num_decode}")
        if min(self.num_fresh, self.num_warm) < 0 or self.num_fresh + self.num_warm < 1:
            raise ValueError(
                "a cluster needs at least one prefill worker (fresh or warm), and no negative counts"
            )
        arms = parse_ab(self.ab) if self.ab else {self.policy: 1.0}
        unknown = sorted(set(arms) - set(POLICIES))
        if unknown:
            raise ValueError(f"unknown policy {', '.join(unknown)}; known: {', '.join(sorted(POLICIES))}")
        FailurePolicy(self.failure_policy)
        for port in (self.grpc_port, self.http_port):
            if port is not None and not 0 <= port < 65536:
                raise ValueError(f"a port is in [0, 65535], got {port}")

    @property
    def num_workers(self) -> int:
        return self.num_fresh + self.num_warm + self.num_decode

    def workers(self, redis_url: str) -> list[MemberSpec]:
        """The prefill and decode workers, registering in the index at `redis_url` under their names."""
        env = ((REDIS_URL_ENV, redis_url),)
        engine = ["--model", self.model, "--host", self.host, "--port", "0", *self.engine.to_args()]
        members = []
        for pool, count in (("fresh", self.num_fresh), ("warm", self.num_warm)):
            for i in range(count):
                args = (
                    *engine,
                    "--worker-id",
                    f"{pool}-{i}",
                    "--pool",
                    pool,
                    *self.kv.to_args(),
                )
                members.append(MemberSpec(f"{pool}-{i}", "prefill", "splitserve.prefill_worker", args, env))
        for i in range(self.num_decode):
            args = (*engine, "--worker-id", f"decode-{i}")
            members.append(MemberSpec(f"decode-{i}", "decode", "splitserve.decode_worker", args, env))
        return members

    def router(self, redis_url: str) -> MemberSpec:
        """The router: it finds the workers through the index at `redis_url` (they register there), as
        `router_redis_url`'s user when one is given."""
        args = ["--model", self.model, "--host", self.host, "--port", str(self.grpc_port),
                "--block-size", str(self.engine.block_size),
                "--failure-policy", self.failure_policy]  # fmt: skip
        args += ["--ab", self.ab] if self.ab else ["--policy", self.policy]
        args += [] if self.fetch else ["--no-fetch"]
        args += [] if self.calibration is None else ["--calibration", self.calibration]
        for option in self.policy_options:
            args += ["--policy-option", option]
        if self.http_port is not None:
            args += ["--http-port", str(self.http_port)]
        if self.tenants is not None:
            args += ["--tenants", self.tenants]
        env = ((REDIS_URL_ENV, self.router_redis_url or redis_url),)
        return MemberSpec("router", "router", "splitserve.router", tuple(args), env)
