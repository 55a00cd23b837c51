"""The Ray actors of a cluster, as plain classes: `launcher.py` wraps them with `ray.remote(...)` and
chooses their options (name, GPUs, restarts, placement). Each is a thin shell around a plain object.

`MemberActor` owns one `ProcessSupervisor` (a router or worker process on the actor's node); when Ray
restarts the actor after its process died, the constructor runs again and starts the member again (the
old member died with its supervisor: see `child.py`). `RedisActor` owns the embedded Redis of a cluster
started without `--redis-url`. Ray carries only these calls' small arguments (names, command lines,
statuses); requests and KV never pass through Ray.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from splitserve.cluster.child import tied_command
from splitserve.cluster.spec import MemberSpec, is_wildcard
from splitserve.cluster.supervisor import ProcessSupervisor
from splitserve.index.redis_server import EmbeddedRedis


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


class MemberActor:
    def __init__(self, member: MemberSpec, log_dir: str, bind_host: str) -> None:
        public_host = node_address() if is_wildcard(bind_host) else None
        if public_host is not None and member.is_worker:  # the index must name a reachable address
            member = dataclasses.replace(member, args=(*member.args, "--advertise", public_host))
        log = Path(log_dir) / f"{member.name}.log"
        self.supervisor = ProcessSupervisor(member, log, public_host).start()

    def wait_ready(self, timeout_s: float) -> dict:
        return self.supervisor.wait_ready(timeout_s).to_dict()

    def status(self) -> dict:
        return {
            **self.supervisor.status().to_dict(),
            "node": node_address(),
            "log": str(self.supervisor.log_path),
        }

    def stop(self, grace_s: float) -> None:
        self.supervisor.stop(grace_s)


class RedisActor:
    """The embedded Redis on a fixed `port`, so that when Ray restarts this actor (its process died, and
    the server with it) the index comes back at the same URL, empty: an outage the index recovers from."""

    def __init__(self, bind_host: str, port: int) -> None:
        tied = tuple(tied_command("--exec"))
        self.redis = EmbeddedRedis(port, host=bind_host, command_prefix=tied).start()
        self.public_host = node_address() if is_wildcard(bind_host) else bind_host

    def url(self) -> str:
        return f"redis://{self.public_host}:{self.redis.port}/0"

    def start(self) -> None:
        """Start again after `stop` (empty, on the same port: an outage's end)."""
        self.redis.start()

    def stop(self, grace_s: float = 0.0) -> None:
        """As `MemberActor.stop`, also for an outage; redis-server needs no grace (persistence off)."""
        self.redis.stop()
