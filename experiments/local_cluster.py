"""A cluster of plain processes on this host for `bench ab --model`: an embedded Redis, prefill and decode
workers that register in its prefix index, and a router that can be restarted with another policy.

The same entry points `splitserve up` supervises on Ray (`python -m splitserve.{router,prefill_worker,
decode_worker}`), started directly: the lent GPU machine has no Ray, and an experiment needs nothing Ray
adds. Each process's output goes to `log_dir/<name>.log`; a process that does not announce its address
fails `start` with its log's tail. `close()` stops everything it started (SIGTERM, then SIGKILL); if this
process is killed first, its children get SIGTERM from the kernel (`cluster.child`).
Torch-free: the workers import torch in their own processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitserve.client import Client, SplitserveError
from splitserve.cluster.child import tied_command
from splitserve.cluster.supervisor import parse_announcement
from splitserve.index.redis_server import EmbeddedRedis


@dataclass(frozen=True)
class LocalClusterSpec:
    model: str
    log_dir: Path
    num_fresh: int = 1
    num_warm: int = 1
    num_decode: int = 1
    block_size: int = 16
    worker_args: tuple[str, ...] = ()  # engine options for every worker (--device, --num-blocks, ...)
    gpus: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES given to the workers in turn; () = inherited
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.num_decode < 1 or self.num_fresh < 0 or self.num_warm < 0:
            raise ValueError("a cluster needs a decode worker; prefill pool sizes must be non-negative")

    @property
    def num_workers(self) -> int:
        return self.num_fresh + self.num_warm + self.num_decode


@dataclass
class _Process:
    name: str
    proc: subprocess.Popen
    log_path: Path
    address: str = ""
    drain: threading.Thread | None = field(default=None, repr=False)


class LocalCluster:
    def __init__(self, spec: LocalClusterSpec) -> None:
        self.spec = spec
        self.redis: EmbeddedRedis | None = None
        self.workers: list[_Process] = []
        self.router: _Process | None = None

    def start(self) -> LocalCluster:
        """Redis, then every worker at once (their engines load in parallel); returns once all announced."""
        self.spec.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis().start()
        spec = self.spec
        roles = [(role, i) for role, n in (("fresh", spec.num_fresh), ("warm", spec.num_warm),
                                           ("decode", spec.num_decode)) for i in range(n)]  # fmt: skip
        try:
            for n, (role, i) in enumerate(roles):
                module = "splitserve.decode_worker" if role == "decode" else "splitserve.prefill_worker"
                args = [module, "--model", self.spec.model, "--port", "0", "--block-size",
                        str(self.spec.block_size), "--redis-url", self.redis.url, "--worker-id",
                        f"{role}-{i}", *self.spec.worker_args]  # fmt: skip
                if role != "decode":
                    args += ["--pool", role]
                env = {"CUDA_VISIBLE_DEVICES": spec.gpus[n % len(spec.gpus)]} if spec.gpus else {}
                self.workers.append(self._spawn(f"{role}-{i}", args, env))
            for worker in self.workers:
                self._announced(worker)
        except BaseException:
            self.close()
            raise
        return self

    def start_router(self, router_args: list[str]) -> str:
        """(Re)start the router with these options (policy, decision log, ...); returns its address once
        every worker is registered and healthy there."""
        self._stop(self.router)
        args = ["splitserve.router", "--model", self.spec.model, "--port", "0", "--block-size",
                str(self.spec.block_size), "--redis-url", self.redis.url, *router_args]  # fmt: skip
        self.router = self._spawn("router", args, {})
        address = self._announced(self.router)
        self._wait_registered(address)
        return address

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> _Process:
        log_path = self.spec.log_dir / f"{name}.log"
        log = open(log_path, "a")  # noqa: SIM115 - the child holds it; closed here once the child started
        # Through cluster.child: the process dies with this one, however this one ends (a kill -9 too).
        command = tied_command(*args)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, **env})  # fmt: skip
        log.close()
        return _Process(name, proc, log_path)

    def _announced(self, p: _Process) -> str:
        line = p.proc.stdout.readline()
        announced = parse_announcement(line)
        if announced is None:
            tail = p.log_path.read_text()[-2000:]
            raise RuntimeError(f"{p.name} did not start (exit {p.proc.poll()}); {p.log_path}:\n{tail}")
        p.address = announced[0]

        def drain() -> None:  # whatever it prints later must not fill the pipe and block it
            with open(p.log_path, "a") as log:
                for rest in p.proc.stdout:
                    log.write(rest)

        p.drain = threading.Thread(target=drain, name=f"drain-{p.name}", daemon=True)
        p.drain.start()
        return p.address

    def _wait_registered(self, address: str) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        with Client(address, timeout=5.0) as client:
            while time.monotonic() < deadline:
                try:
                    healthy = [w for w in client.status().get("workers", []) if w["healthy"]]
                except SplitserveError:
                    healthy = []
                if len(healthy) == self.spec.num_workers:
                    return
                time.sleep(0.2)
        raise TimeoutError(f"the router at {address} did not register {self.spec.num_workers} workers within "
                           f"{self.spec.start_timeout_s:.0f} s; logs in {self.spec.log_dir}")  # fmt: skip

    def _stop(self, p: _Process | None, grace_s: float = 30.0) -> None:
        if p is None or p.proc.poll() is not None:
            return
        p.proc.send_signal(signal.SIGTERM)
        try:
            p.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()

    def close(self) -> None:
        for p in [self.router, *self.workers]:
            if p is not None and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in [self.router, *self.workers]:
            self._stop(p)
        self.router, self.workers = None, []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
