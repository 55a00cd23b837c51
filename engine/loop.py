"""Runs an engine on its own thread so that service threads (gRPC handlers) can use it.

Owns the engine: every engine call goes through `call`, executed on the loop thread between steps, so
the engine itself needs no locks. Outputs are routed to per-request queues registered with `listen`.
The loop steps while any request is unfinished and sleeps on its call queue otherwise.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from splitserve.engine.config import average_step_time
from splitserve.engine.engine import Engine
from splitserve.engine.outputs import FinishReason, StepOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineLoop:
    """`step_s`: the engine's recent step time while busy (`average_step_time` of the wall time of its
    `step` calls, which are pipelined: one call per step), 0 before the first; a load figure."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.step_s = 0.0
        self._calls: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._listeners: dict[str, queue.Queue[StepOutput]] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the loop thread and return its result (or raise its error)."""
        future: Future = Future()
        self._calls.put((lambda: fn(*args, **kwargs), future))
        return future.result()

    def listen(self, request_id: str) -> queue.Queue[StepOutput]:
        """A queue that receives the request's outputs, up to and including the finishing one. Register
        it before the request is added. Called on the loop thread (through `call`) or before outputs."""
        q: queue.Queue[StepOutput] = queue.Queue()
        self._listeners[request_id] = q
        return q

    @staticmethod
    def take(outputs: queue.Queue[StepOutput]) -> StepOutput:
        """A listener's next output, merged with the later ones already queued (their tokens and logprobs
        in order, the last one's finish): a reader that lags behind the engine sends one message for
        several tokens instead of falling further behind."""
        out = outputs.get()
        while not out.finished:
            try:
                later = outputs.get_nowait()
            except queue.Empty:
                break
            logprobs = None if out.logprobs is None and later.logprobs is None else \
                (*(out.logprobs or ()), *(later.logprobs or ()))  # fmt: skip
            out = StepOutput(out.request_id, out.new_token_ids + later.new_token_ids, later.finish_reason,
                             later.num_cached_tokens, logprobs)  # fmt: skip
        return out

    def forget(self, request_id: str) -> None:
        self._listeners.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        """Abort a request; its listener (if any) receives a final ABORT output. False if unknown."""
        return self.call(self._abort, request_id)

    def _abort(self, request_id: str) -> bool:
        found = self.engine.abort_request(request_id)
        if found:
            self._deliver([StepOutput(request_id, (), FinishReason.ABORT, 0)])
        return found

    def stop(self) -> None:
        self._calls.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests()
            try:
                item = self._calls.get(block=not busy)
                while True:
                    if item is None:
                        return
                    fn, future = item
                    try:
                        future.set_result(fn())
                    except Exception as exc:  # handed to the caller, who owns the error
                        future.set_exception(exc)
                    item = self._calls.get_nowait()
            except queue.Empty:
                pass
            if self.engine.has_unfinished_requests():
                started = time.perf_counter()
                try:
                    outputs = self.engine.step()
                    self.step_s = average_step_time(self.step_s, time.perf_counter() - started)
                except Exception:
                    log.exception("engine step failed: aborting the requests in flight")
                    outputs = self._abort_all()
                self._deliver(outputs)

    def _abort_all(self) -> list[StepOutput]:
        """After a failed step: end every listened-to request with ABORT so that no caller hangs."""
        for request_id in list(self._listeners):
            self.engine.abort_request(request_id)
        return [StepOutput(request_id, (), FinishReason.ABORT, 0) for request_id in list(self._listeners)]

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            listener = self._listeners.get(out.request_id)
            if listener is not None:
                listener.put(out)
                if out.finished:
                    del self._listeners[out.request_id]
