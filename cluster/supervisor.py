"""`ProcessSupervisor`: runs one cluster member as a child process and keeps it running.

It owns the child's life and nothing else: start it (`python -m splitserve.cluster.child`, which ties
the child to this process so it never outlives it), read the address it announces ("<name> listening on
HOST:PORT [http HOST:PORT]"), send the rest of its output to a log file, restart it when it dies (backing
off while it keeps dying), and stop it (SIGTERM, then SIGKILL). A member that dies before it ever
announced an address at its first start is not restarted: that is a configuration error (a bad model path,
a port in use), reported with its log's tail. The member registers itself with the router through the
prefix index; the supervisor knows nothing about routing. A plain class: the Ray actor in `actors.py` is
a shell around it.
"""

from __future__ import annotations

import enum
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from splitserve.cluster.child import tied_command
from splitserve.cluster.spec import MemberSpec, is_wildcard

_ANNOUNCE = re.compile(r"listening on (\S+)(?: http (\S+))?")
_LOG_TAIL_BYTES = 3000


class MemberState(enum.Enum):
    STARTING = "starting"  # spawned, no address announced yet
    RUNNING = "running"
    BACKOFF = "backoff"  # died; waiting before the restart
    FAILED = "failed"  # died before it ever served: not restarted
    STOPPED = "stopped"


@dataclass(frozen=True)
class MemberStatus:
    name: str
    state: MemberState
    pid: int | None
    address: str | None  # gRPC, as others reach it
    http_address: str | None  # the router's HTTP API, if it serves one
    restarts: int
    last_exit: int | None  # the last exit status (negative: killed by that signal)

    def to_dict(self) -> dict:
        return {**self.__dict__, "state": self.state.value}


def parse_announcement(line: str) -> tuple[str, str | None] | None:
    """(gRPC address, HTTP address or None) from a member's "<name> listening on HOST:PORT [http
    HOST:PORT]" line (see `worker.process.run_worker` and the router's main); None for other lines."""
    match = _ANNOUNCE.search(line)
    return (match.group(1), match.group(2)) if match else None


class MemberFailed(RuntimeError):
    """The member died before it announced an address (the message carries its log's tail)."""


class ProcessSupervisor:
    """Keeps `member` running. `public_host` replaces a wildcard bind host in the announced addresses.
    Restarts back off from `backoff_s`, doubling up to `max_backoff_s`; a member that ran `stable_s`
    starts again from `backoff_s`."""

    def __init__(
        self,
        member: MemberSpec,
        log_path: Path,
        public_host: str | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
    ) -> None:
        self.member = member
        self.log_path = Path(log_path)
        self.public_host = public_host
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._state = MemberState.STOPPED
        self._address: str | None = None
        self._http: str | None = None
        self._restarts = 0
        self._last_exit: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ProcessSupervisor:
        """Start the member; returns at once (see `wait_ready`). The monitor thread that spawns the child
        lives as long as the child: the child's parent-death signal is tied to it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._state = MemberState.STARTING
        self._thread = threading.Thread(
            target=self._monitor, name=f"supervise-{self.member.name}", daemon=True
        )
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float) -> MemberStatus:
        """Block until the member serves; raises `MemberFailed` if it cannot start, `TimeoutError`."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._state is not MemberState.RUNNING:
                if self._state in (MemberState.FAILED, MemberState.STOPPED):
                    raise MemberFailed(f"{self.member.name} did not start ({self._exit_text()}); its log "
                                       f"ends:\n{self.log_tail()}")  # fmt: skip
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.member.name} did not serve within {timeout_s:.0f} s; its log "
                                       f"ends:\n{self.log_tail()}")  # fmt: skip
                self._changed.wait(left)
        return self.status()

    def status(self) -> MemberStatus:
        with self._lock:
            pid = self._proc.pid if self._proc is not None and self._proc.poll() is None else None
            return MemberStatus(self.member.name, self._state, pid, self._address, self._http, self._restarts,
                                self._last_exit)  # fmt: skip

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the member (it drains and leaves the index), SIGKILL after `grace_s`; no restart.
        Idempotent."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(grace_s)
        self._set(MemberState.STOPPED)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return "(no log)"

    def _monitor(self) -> None:
        backoff = self.backoff_s
        while not self._stopping.is_set():
            started = time.monotonic()
            served = self._run_once()
            if self._stopping.is_set():
                return
            if not served and self._restarts == 0:
                self._set(MemberState.FAILED)
                return
            backoff = self.backoff_s if time.monotonic() - started >= self.stable_s else backoff
            self._set(MemberState.BACKOFF)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff_s)
            with self._lock:
                self._restarts += 1
                self._state = MemberState.STARTING

    def _run_once(self) -> bool:
        """Run the member until it exits; True if it announced its address (served)."""
        command = tied_command(self.member.module, *self.member.args)
        served = False
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.member.name}\n".encode())
            log.flush()
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **dict(self.member.env)})  # fmt: skip
            with self._lock:
                self._proc = proc
            if self._stopping.is_set():  # stop() ran before the child existed
                proc.terminate()
            for line in proc.stdout:
                announced = None if served else parse_announcement(line.decode(errors="replace"))
                if announced is not None:
                    served = True
                    self._announce(*announced)
                else:
                    log.write(line)
                    log.flush()
            proc.wait()
        with self._lock:
            self._last_exit, self._address, self._http = proc.returncode, None, None
        return served

    def _announce(self, address: str, http: str | None) -> None:
        with self._changed:
            self._address, self._http = self._public(address), (self._public(http) if http else None)
            self._state = MemberState.RUNNING
            self._changed.notify_all()

    def _public(self, address: str) -> str:
        host, _, port = address.rpartition(":")
        return f"{self.public_host}:{port}" if self.public_host and is_wildcard(host) else address

    def _set(self, state: MemberState) -> None:
        with self._changed:
            self._state = state
            self._changed.notify_all()

    def _exit_text(self) -> str:
        code = self._last_exit
        if code is None:
            return "stopped"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
