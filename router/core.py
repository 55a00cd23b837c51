"""The router's request path: hash the prompt, let the request's policy decide, run it on the workers.

`WorkerSet` holds the live workers with the load they report (polled through their Load RPC, so a busy
worker never looks idle because this router did not send its work). `ArmAssigner` maps a session to an
A/B arm deterministically. `Router.generate` hashes the prompt's full blocks (the workers' own chain, with
the tenant salt applied here, server-side), reads per-worker prefix matches from the index mirror (an
in-memory call), asks the arm's policy, and runs the request: on the decode worker alone (LOCAL), or
prefill → KV transfer → decode through `dispatch.run_disaggregated` with the failure policy, the chosen
prefill worker first and the rest of its pool, least loaded first, as recompute targets.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from splitserve.engine.block_hash import BlockHash, HashContext, hash_blocks
from splitserve.index.table import PrefixMatch
from splitserve.protos import common_pb2, workers_pb2, workers_pb2_grpc
from splitserve.router.cost_model import DEFAULT_COST_MODEL, UNMEASURED, CostModel, Measured
from splitserve.router.decision_log import Choice, DecisionLog, DecisionRecord, predicted_cached_tokens
from splitserve.router.dispatch import Emitted, FailurePolicy, PrefillTarget, run_disaggregated
from splitserve.router.fetch_plan import with_fetch
from splitserve.router.inflight import Ledger, Ticket
from splitserve.router.policies import DECODE, LOCAL, Decision, NoWorker, Policy, RequestShape, WorkerView
from splitserve.router.policy_types import blocks_to_reserve

log = logging.getLogger(__name__)

# Worker id → the leading blocks it holds, and how many of them in its host tier only
Matches = Callable[[Sequence[BlockHash]], dict[str, PrefixMatch]]


@dataclass
class WorkerHandle:
    worker_id: str
    role: str  # "fresh", "warm" or "decode"
    address: str
    channel: grpc.Channel
    stub: workers_pb2_grpc.PrefillWorkerStub | workers_pb2_grpc.DecodeWorkerStub
    load: common_pb2.WorkerLoad = field(default_factory=common_pb2.WorkerLoad)
    healthy: bool = False  # answered its last Load poll
    device: str = ""  # the compute device it registered (workers on one device slow each other)
    measured: Measured = UNMEASURED  # `load.costs` as the cost model takes them (converted once a poll)


class WorkerSet:
    """Live workers and their reported load. `poll()` asks each for its load once (a background thread
    does it every `poll_s` after `start()`); a worker that does not answer within `timeout_s` is marked
    unhealthy and left out of routing until it answers again."""

    def __init__(self, poll_s: float = 0.1, timeout_s: float = 1.0) -> None:
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._workers: dict[str, WorkerHandle] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, worker_id: str, role: str, address: str, device: str = "") -> WorkerHandle:
        if role not in ("fresh", "warm", DECODE):
            raise ValueError(f"worker role must be fresh, warm or decode; got {role!r}")
        ch = grpc.insecure_channel(address)
        stubs = workers_pb2_grpc
        stub = (stubs.DecodeWorkerStub if role == DECODE else stubs.PrefillWorkerStub)(ch)
        handle = WorkerHandle(worker_id, role, address, ch, stub, device=device)
        with self._lock:
            if worker_id in self._workers:
                ch.close()
                raise ValueError(f"worker {worker_id!r} is already registered")
            self._workers[worker_id] = handle
        self._poll_one(handle)
        return handle

    def remove(self, worker_id: str) -> None:
        with self._lock:
            handle = self._workers.pop(worker_id, None)
        if handle is not None:
            handle.channel.close()

    def get(self, worker_id: str) -> WorkerHandle:
        """Raises `NoWorker` for a worker that has just left (a decision can race its removal)."""
        with self._lock:
            handle = self._workers.get(worker_id)
        if handle is None:
            raise NoWorker(f"worker {worker_id!r} left")
        return handle

    def healthy(self) -> list[WorkerHandle]:
        with self._lock:
            return [h for h in self._workers.values() if h.healthy]

    def all(self) -> list[WorkerHandle]:
        with self._lock:
            return list(self._workers.values())

    def poll(self) -> None:
        with self._lock:
            handles = list(self._workers.values())
        for handle in handles:
            self._poll_one(handle)

    def _poll_one(self, handle: WorkerHandle) -> None:
        try:
            handle.load = handle.stub.Load(common_pb2.LoadRequest(), timeout=self.timeout_s)
            handle.measured = measured_costs(handle.load.costs)
            if not handle.healthy:
                log.info("worker %s (%s) at %s is up", handle.worker_id, handle.role, handle.address)
            handle.healthy = True
        except grpc.RpcError as exc:
            if handle.healthy:
                log.warning("worker %s stopped answering: %s", handle.worker_id, exc.code().name)
            handle.healthy = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="load-poll", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for handle in self._workers.values():
                handle.channel.close()
            self._workers.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()


class ArmAssigner:
    """A/B arms by share (e.g. {"cpd": 0.5, "least_loaded": 0.5}): a session always gets the same arm
    (SHA-256 of its id mapped to [0, 1)), so a conversation's turns see one policy."""

    def __init__(self, shares: dict[str, float]) -> None:
        if not shares or any(v <= 0 for v in shares.values()):
            raise ValueError(f"A/B shares must be positive, got {shares}")
        total = sum(shares.values())
        self.arms = list(shares)
        self._bounds, acc = [], 0.0
        for name in self.arms:
            acc += shares[name] / total
            self._bounds.append(acc)

    def arm_for(self, key: str) -> str:
        point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        return next((arm for arm, bound in zip(self.arms, self._bounds, strict=True) if point < bound),
                    self.arms[-1])  # fmt: skip


def parse_ab(spec: str) -> dict[str, float]:
    """"cpd:0.5,least_loaded:0.5" → {"cpd": 0.5, "least_loaded": 0.5}. Raises ValueError when malformed."""
    shares = {}
    for part in spec.split(","):
        name, sep, share = part.strip().partition(":")
        if not sep or not name:
            raise ValueError(f"an A/B arm is NAME:SHARE, got {part!r}")
        shares[name] = float(share)
    return shares


@dataclass(frozen=True)
class RoutedRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    session_id: str | None = None
    tenant_salt: str | None = None  # set by the router from the caller's identity, never by the caller
    aborted: threading.Event | None = None  # set by an Abort: failures then end the request quietly


@dataclass
class Routed:
    """What `Router.generate` yields first: the decision (with its A/B arm), then `Emitted` outputs."""

    arm: str
    decision: Decision


class Router:
    """Decides and runs requests. `policies`: arm name → policy object; `arms` picks the arm per session
    (None: the single policy). `matches`: the index mirror's query (no network). `shadows`: policies
    asked on every request for what they would have chosen (the decision log's shadow scoring; the live
    ones are never asked twice, since a policy may keep state). `ledger`: this router's own assignments,
    folded into the polled loads (None: polled loads only). `decision_log`: where decisions are recorded.
    `fetch`: a request's prefill target first fetches the leading blocks another worker holds beyond its
    own when `costs` predict that cheaper than recomputing them (`fetch_plan`; a policy with a `fetch`
    option of its own plans it in its decision)."""

    def __init__(
        self,
        workers: WorkerSet,
        policies: dict[str, Policy],
        model_id: str,
        block_size: int,
        matches: Matches,
        arms: ArmAssigner | None = None,
        failure_policy: FailurePolicy = FailurePolicy.RECOMPUTE,
        shadows: dict[str, Policy] | None = None,
        ledger: Ledger | None = None,
        decision_log: DecisionLog | None = None,
        costs: CostModel = DEFAULT_COST_MODEL,
        fetch: bool = True,
    ) -> None:
        if arms is None and len(policies) != 1:
            raise ValueError("several policies need an A/B assignment")
        self.workers = workers
        self.policies = policies
        self.model_id = model_id
        self.block_size = block_size
        self.matches = matches
        self.arms = arms
        self.failure_policy = failure_policy
        self.shadows = shadows or {}
        self.ledger = ledger
        self.decision_log = decision_log
        self.costs = costs
        self.fetch = fetch
        self._deciding = threading.Lock()

    def views(self, matched: dict[str, PrefixMatch]) -> list[WorkerView]:
        """Every healthy worker as the policies see it: its prefix match (by tier), its load (with this
        router's own assignments folded in, when it keeps a ledger) and its measured costs."""
        views = []
        for h in self.workers.healthy():
            # Counts with this router's own assignments; tier stats and measured costs as polled
            load = h.load if self.ledger is None else self.ledger.adjusted(h.worker_id, h.load)
            match = matched.get(h.worker_id, PrefixMatch(0))
            views.append(WorkerView(
                h.worker_id, h.role, match.num_blocks, match.num_host_blocks,
                queued_tokens=load.queued_tokens, kv_usage=load.kv_usage, free_blocks=load.free_blocks,
                running_requests=load.running_requests + load.waiting_requests, device=h.device,
                waiting_prefills=load.waiting_requests, max_running=load.max_running_requests or None,
                step_s=load.step_ms / 1e3, step_tokens=load.step_tokens or None,
                fetch_s=h.load.tiers.fetch_ms / 1e3, fetch_bytes=h.load.tiers.fetch_mb * 1e6,
                measured=h.measured,
            ))  # fmt: skip
        return views

    def decide(self, request: RoutedRequest) -> tuple[str, Decision]:
        """The request's arm and its policy's decision (hashing and an in-memory index lookup only); the
        decision's terms include `predicted_cached_tokens`. Recorded in the decision log, with shadows."""
        matched = self._match(request)
        with self._deciding:
            arm, decision, shape, views = self._route(request, matched)
        self._record(request, arm, decision, shape, views)
        return arm, decision

    def _match(self, request: RoutedRequest) -> dict[str, PrefixMatch]:
        """Worker id → leading blocks of the prompt it holds, by tier (the prompt's hashes, tenant-salted,
        against the index mirror). Outside the decision lock: it depends on nothing another decision
        changes."""
        ctx = HashContext(self.model_id, request.tenant_salt)
        return self.matches(hash_blocks(request.prompt_token_ids, self.block_size, ctx))

    def _route(self, request: RoutedRequest, matched: dict[str, PrefixMatch]):
        arm = next(iter(self.policies)) if self.arms is None else self.arms.arm_for(
            request.session_id or request.request_id)
        views = self.views(matched)
        shape = RequestShape(len(request.prompt_token_ids), self.block_size, request.session_id,
                             request.sampling.max_tokens)  # fmt: skip
        policy = self.policies[arm]
        decision = policy.route(shape, views)
        if self.fetch:
            decision = with_fetch(decision, shape, views, self.costs, policy)
        blocks = {w: m.num_blocks for w, m in matched.items()}
        predicted = predicted_cached_tokens(decision, blocks, self.block_size, shape.num_prompt_tokens)
        decision.terms["predicted_cached_tokens"] = float(predicted)
        return arm, decision, shape, views

    def _holder(self, decision: Decision) -> workers_pb2.KVHolder | None:
        """Where the decision's target fetches from (None: nowhere, or the holder has just left)."""
        if decision.fetch_from is None:
            return None
        try:
            handle = self.workers.get(decision.fetch_from)
        except NoWorker:
            return None
        return workers_pb2.KVHolder(address=handle.address, num_blocks=decision.fetch_blocks,
                                    worker_id=handle.worker_id)  # fmt: skip

    def _record(self, request: RoutedRequest, arm: str, decision: Decision, shape: RequestShape,
                views: list[WorkerView]) -> None:  # fmt: skip
        """Log the decision (debug) and, with a decision log, record it with the shadows' choices on the
        same views — after the decision lock, so shadow scoring never delays another decision."""
        log.debug("request %s: arm %s → %s prefill %s decode %s, terms %s", request.request_id, arm,
                  decision.pool, decision.prefill, decision.decode, decision.terms)  # fmt: skip
        if self.decision_log is not None:
            predicted = int(decision.terms["predicted_cached_tokens"])
            self.decision_log.record(DecisionRecord(
                time.time(), request.request_id, arm, Choice.of(decision), dict(decision.terms),
                shape.num_prompt_tokens, predicted, self._shadow(arm, shape, views),
            ))  # fmt: skip

    def _shadow(self, arm: str, shape: RequestShape, views: list[WorkerView]) -> dict[str, Choice]:
        choices = {}
        for name, policy in self.shadows.items():
            if name == arm:
                continue
            try:
                choices[name] = Choice.of(policy.route(shape, views))
            except NoWorker:
                continue
        return choices

    def _assign(self, decision: Decision, request: RoutedRequest, matched: dict[str, PrefixMatch]) -> Ticket:
        """Enter the decision in the ledger: the prompt tokens left to compute at the prefill target, and the
        request and its KV blocks on the decode worker."""
        n, bs = len(request.prompt_token_ids), self.block_size
        target = decision.decode if decision.pool == LOCAL else decision.prefill
        new_tokens = n - int(decision.terms["predicted_cached_tokens"])
        held = matched.get(decision.decode, PrefixMatch(0)).num_blocks
        blocks = blocks_to_reserve(n, request.sampling.max_tokens, bs, held)
        entries = {decision.decode: (new_tokens if decision.pool == LOCAL else 0, 1, blocks)}
        if decision.pool != LOCAL:
            entries[target] = (new_tokens, 1, 0)
        return self.ledger.assign(entries, prefill=decision.prefill)

    def generate(self, request: RoutedRequest) -> Iterator[Routed | Emitted]:
        matched = self._match(request)
        with self._deciding:  # the next decision sees this one's assignment
            arm, decision, shape, views = self._route(request, matched)
            ticket = None if self.ledger is None else self._assign(decision, request, matched)
        try:
            self._record(request, arm, decision, shape, views)
            yield Routed(arm, decision)
            for out in self._run(decision, request):
                if ticket is not None and out.token_ids:
                    ticket.first_token()
                yield out
        finally:
            if ticket is not None:
                ticket.end()

    def _run(self, decision: Decision, request: RoutedRequest) -> Iterator[Emitted]:
        decode = self.workers.get(decision.decode)
        salt = request.tenant_salt
        if decision.pool == LOCAL:
            stream = decode.stub.Generate(workers_pb2.GenerateRequest(
                request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                sampling=request.sampling, cache_salt=salt, kv_holder=self._holder(decision),
            ))  # fmt: skip
            try:
                for i, chunk in enumerate(stream):
                    yield Emitted(list(chunk.token_ids), chunk.finish_reason, logprobs=list(chunk.logprobs),
                                  num_cached_tokens=chunk.num_cached_tokens if i == 0 else 0)  # fmt: skip
            finally:
                stream.cancel()  # no-op once finished; if the caller went away, the decode worker aborts
            return
        chosen = self.workers.get(decision.prefill)
        others = sorted((h for h in self.workers.healthy() if h.role == chosen.role and h is not chosen),
                        key=lambda h: h.load.queued_tokens)  # fmt: skip
        targets = [PrefillTarget(h.worker_id, h.stub) for h in (chosen, *others)]
        prefill = workers_pb2.PrefillRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling, cache_salt=salt, decode_address=decode.address,
            kv_holder=self._holder(decision),
        )  # fmt: skip
        policy = self.failure_policy
        yield from run_disaggregated(prefill, targets, decode.stub, policy, aborted=request.aborted)


def measured_costs(costs: common_pb2.MeasuredCosts) -> Measured:
    """What a worker's load report says its work costs, as the cost model takes it."""
    return Measured(
        host_load_bytes_per_s=costs.host_load_bytes_per_s,
        prefill_tokens_per_s=tuple((r.min_cached_tokens, r.tokens_per_s) for r in costs.prefill),
        push_bytes_per_s=tuple(sorted(costs.push_bytes_per_s.items())),
    )
