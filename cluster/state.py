"""`ClusterState`: what `splitserve up` started, kept in a JSON state file so that `down`, `status` and
`generate` (other processes, later) find the cluster. Holds addresses and names only, no secrets."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


def default_state_file() -> Path:
    return Path.home() / ".splitserve" / "cluster.json"


@dataclass
class ClusterState:
    namespace: str  # the Ray namespace of the cluster's actors
    ray_address: str
    log_dir: str
    ray_head_pid: int | None = None  # a Ray head this cluster started (stopped on down)
    redis_url: str | None = None  # with its password redacted
    embedded_redis: bool = False  # the Redis is the cluster's own actor (stopped on down)
    router_address: str | None = None
    http_address: str | None = None
    members: list[str] = field(default_factory=list)  # actor names, router first

    def save(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ClusterState:
        """Raises FileNotFoundError naming the file when no cluster was started with it."""
        if not path.exists():
            raise FileNotFoundError(f"no cluster state at {path} (start one with `splitserve up`)")
        return cls(**json.loads(path.read_text()))
