"""The router's OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions (with SSE streaming and
`stream_options.include_usage`), /v1/models, /health, /metrics (Prometheus text).

Every request runs through the same `RouterService.run` as the gRPC front (routing, A/B arm, counters).
`usage.prompt_tokens_details.cached_tokens` reports the prompt tokens served from a prefix cache. The
`user` field (or an `X-Session-Id` header) names the session: one A/B arm and its cache affinity. A client
that disconnects mid-stream aborts the request on the workers. Errors use OpenAI's error body. Standard
library server (one thread per connection); no torch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from splitserve.protos import common_pb2, router_pb2
from splitserve.router.service import RequestError, RouterService

log = logging.getLogger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}  # fmt: skip


class BadRequest(Exception):
    pass


def _sampling(body: dict) -> common_pb2.SamplingParams:
    def number(name: str, default, kind):
        value = body.get(name, default)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise BadRequest(f"'{name}' must be a number")
        return kind(value)

    sampling = common_pb2.SamplingParams(
        max_tokens=number("max_tokens", body.get("max_completion_tokens") or 16, int),
        temperature=number("temperature", 1.0, float), top_p=number("top_p", 1.0, float),
        top_k=number("top_k", 0, int), ignore_eos=bool(body.get("ignore_eos", False)),
    )  # fmt: skip
    if body.get("seed") is not None:
        sampling.seed = number("seed", 0, int)
    return sampling


def parse_request(path: str, body: dict, session: str) -> router_pb2.RouterRequest:
    """An OpenAI completions / chat body as the router's request. Raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    request = router_pb2.RouterRequest(sampling=_sampling(body), stop=stop, session_id=session)
    if path == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise BadRequest("each message needs a string 'role' and 'content'")
            request.messages.add(role=str(m.get("role", "")), content=m["content"])
        return request
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        request.prompt_token_ids.extend(prompt)
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids (one prompt)")
    return request


class HTTPFront:
    """Serves the HTTP API for `service` on (host, port); `model_name` is what /v1/models lists."""

    def __init__(self, service: RouterService, model_name: str, host: str = "127.0.0.1", port: int = 0):
        front = self

        class Handler(_Handler):
            pass

        Handler.front = front
        self.service = service
        self.model_name = model_name
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="http-front", daemon=True)

    def start(self) -> HTTPFront:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def metrics(self) -> str:
        status = self.service.Status()
        lines = ["# TYPE splitserve_index_stale gauge", f"splitserve_index_stale {int(status.index_stale)}"]
        counters = (("requests_total", "requests"), ("failures_total", "failures"),
                    ("prompt_tokens_total", "prompt_tokens"), ("cached_tokens_total", "cached_tokens"),
                    ("ttft_ms_sum", "ttft_ms_sum"))  # fmt: skip
        for name, value in counters:
            lines.append(f"# TYPE splitserve_arm_{name} counter")
            lines += [f'splitserve_arm_{name}{{arm="{a.arm}"}} {getattr(a, value)}' for a in status.arms]
        gauges = (("up", lambda w: int(w.healthy)), ("queued_tokens", lambda w: w.load.queued_tokens),
                  ("running_requests", lambda w: w.load.running_requests),
                  ("kv_usage", lambda w: w.load.kv_usage))  # fmt: skip
        for name, value in gauges:
            lines.append(f"# TYPE splitserve_worker_{name} gauge")
            lines += [f'splitserve_worker_{name}{{worker="{w.worker_id}",role="{w.role}"}} {value(w)}'
                      for w in status.workers]  # fmt: skip
        return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    front: HTTPFront
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # the default writes every request to stderr
        log.debug("http %s", fmt % args)

    def do_GET(self) -> None:
        front = self.front
        if self.path == "/health":
            health = front.service.Health()
            self._json(200 if health.serving else 503, {"status": "ok" if health.serving else "unavailable",
                                                         "index_stale": health.index_stale})  # fmt: skip
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": front.model_name, "object": "model", "created": 0, "owned_by": "splitserve"}]})
        elif self.path == "/metrics":
            self._send(200, front.metrics().encode(), "text/plain; version=0.0.4")
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(404, f"no route {self.path}", "not_found")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            session = self.headers.get("X-Session-Id") or str(body.get("user") or "")
            request = parse_request(self.path, body, session)
        except (BadRequest, json.JSONDecodeError, ValueError) as exc:
            self._error(400, str(exc), "invalid_request_error")
            return
        chat = self.path == "/v1/chat/completions"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        service = self.front.service
        chunks = service.run(request, service.new_request_id(), self.headers.get("Authorization"))
        try:
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._stream(chunks, rid, chat, include_usage)
            else:
                self._complete(chunks, rid, chat)
        except RequestError as exc:
            self._error(_HTTP_STATUS.get(exc.code, 500), exc.detail, exc.code.name.lower())
        finally:
            chunks.close()

    def _complete(self, chunks, rid: str, chat: bool) -> None:
        text, finish, usage = "", None, None
        for chunk in chunks:
            text += chunk.text
            if chunk.finish_reason:
                finish, usage = chunk.finish_reason, chunk.usage
        choice = {"index": 0, "finish_reason": _finish(finish), "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        self._json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": self.front.model_name, "choices": [choice],
                         "usage": _usage(usage)})  # fmt: skip

    def _stream(self, chunks, rid: str, chat: bool, include_usage: bool) -> None:
        first = next(chunks)  # errors before the first token still get a status code
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.front.model_name}  # fmt: skip
        usage = None
        try:
            for i, chunk in enumerate(_chain(first, chunks)):
                delta = {"content": chunk.text} | ({"role": "assistant"} if i == 0 else {})
                choice = {"index": 0, "finish_reason": _finish(chunk.finish_reason)}
                choice.update({"delta": delta} if chat else {"text": chunk.text, "logprobs": None})
                self._event(base | {"choices": [choice]})
                if chunk.finish_reason:
                    usage = chunk.usage
            if include_usage:
                self._event(base | {"choices": [], "usage": _usage(usage)})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.info("client of %s went away: aborting", rid)  # closing `chunks` aborts on the workers

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str, kind: str) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _chain(first, rest):
    yield first
    yield from rest


def _finish(reason: str | None) -> str | None:
    """OpenAI knows "stop" and "length" (None while streaming)."""
    return {"abort": "stop", "": None}.get(reason, reason)


def _usage(usage: router_pb2.Usage | None) -> dict:
    u = usage or router_pb2.Usage()
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}  # fmt: skip
