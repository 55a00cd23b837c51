"""The KV transfer contract, one suite over every backend: the sender (`KVPush`) and the receiver
(`KVReceiver`) in one process ("in-process"), through the decode worker's KVTransfer service over a real
gRPC channel ("grpc", and striped over 2 lanes), and the same-host path (chunks naming blocks of the
sender's shared-memory cache). Each case checks the outcome, how the lease ended, and that both engines'
blocks are back where they started: a complete transfer (the receiver's blocks equal the sender's), a lost
chunk, a flipped byte, a stall past the lease, an abort from either side, the sender or the receiver
dying mid-transfer, and a duplicate acknowledgement."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.decode_worker.service import DecodeService
from splitserve.engine.kv_watch import KVWatch
from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.errors import CorruptChunk, LeaseNotFound, MalformedChunk
from splitserve.kvtransfer.frames import decode_frame, encode_frame
from splitserve.kvtransfer.leases import TransferState
from splitserve.kvtransfer.push import KVPush
from splitserve.kvtransfer.receiver import KVReceiver
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.kvtransfer.same_host import export_source
from splitserve.kvtransfer.stream import kv_layout
from splitserve.kvtransfer.transport import add_kvtransfer_servicer, channel, make_server, push_stub
from splitserve.protos import kvtransfer_pb2, kvtransfer_pb2_grpc

BACKENDS = ["in-process", "grpc", "grpc-striped", "same-host"]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=512, num_layers=4)


class Backend:
    """A sender engine holding one prompt's computed KV, and a receiver behind `kind`'s transport."""

    def __init__(self, model, kind: str, lease_ttl_s: float = 10.0) -> None:
        def engine(**kw):
            return LLM(str(model), num_blocks=64, block_size=8, **kw).engine

        self.kind = kind
        self.sender = engine(shared_memory=kind == "same-host")
        self.loop = EngineLoop(engine())
        self.layout = kv_layout(self.sender.kv_caches, self.sender.model_id)
        self.prompt = [random.Random(0).randrange(3, 500) for _ in range(61)]
        self.reports = []
        self.sender.add_request("r", self.prompt, SamplingParams(max_tokens=1, temperature=0.0),
                                kv_watch=KVWatch(self.reports.append))  # fmt: skip
        while self.sender.has_unfinished_requests():
            self.sender.step()
        self.sender_free = self.sender.block_pool.num_free_blocks
        self.receiver_free = self.loop.call(lambda: self.loop.engine.block_pool.num_free_blocks)
        self.channels, self.server = [], None
        if kind == "in-process":
            self.receiver = KVReceiver(self.loop, lease_ttl_s)
            self.reserve, self.release = self.receiver.reserve, self.receiver.release
            self.push_fn = self.receiver.receive
        else:
            self.service = DecodeService(self.loop, lease_ttl_s=lease_ttl_s)
            self.receiver = self.service.receiver
            self.server, port = make_server("127.0.0.1:0")
            add_kvtransfer_servicer(self.service, self.server)
            self.server.start()
            lanes = 2 if kind == "grpc-striped" else 1
            self.channels = [channel(f"127.0.0.1:{port}", lane) for lane in range(lanes)]
            stub = kvtransfer_pb2_grpc.KVTransferStub(self.channels[0])
            self.reserve = stub.Reserve
            self.release = lambda lease_id, reason: stub.Release(
                kvtransfer_pb2.ReleaseRequest(lease_id=lease_id, reason=reason))

    def start(self, mutate=None, layers: int | None = None) -> tuple[KVPush, kvtransfer_pb2.ReserveReply]:
        """Reserve on the receiver and build the sender's push, its frames passed through `mutate(lane,
        frames)` (a fault) when given; the blocks of every layer (or of the first `layers`) are reported
        ready at once."""
        lease = self.reserve(kvtransfer_pb2.ReserveRequest(
            request_id="r", layout=self.layout, prompt_token_ids=self.prompt,
            sampling=sampling_to_proto(GREEDY),
        ))  # fmt: skip
        lanes = 2 if self.kind == "grpc-striped" else 1
        calls = [push_stub(ch) for ch in self.channels] if self.channels else [self.push_fn]

        def faulty(i):
            return lambda frames: calls[i](mutate(i, frames) if mutate else frames)

        same_host = self.kind == "same-host"
        source = export_source(self.sender.kv_caches, self.sender.kv_memfd) if same_host else None
        push = KVPush([faulty(i) for i in range(lanes)], self.sender.kv_caches, self.layout, lease.lease_id,
                      2048, source)  # fmt: skip
        for ready in self.reports:
            if ready.start + len(ready.block_ids) > lease.num_cached_blocks and ready.layer < (layers or 99):
                push.on_ready(ready)
        return push, lease

    def lease_state(self, lease_id: str) -> TransferState:
        return self.receiver.state(lease_id)[0]

    def check_no_leaks(self) -> None:
        """Both pools back at their start once the request's pins and reservation are given up."""
        for ready in self.reports:
            if ready.layer == 0:
                self.sender.unpin_kv(ready.block_ids)
        self.reports = []
        assert self.sender.block_pool.num_free_blocks >= self.sender_free
        free = lambda: self.loop.call(lambda: self.loop.engine.block_pool.num_free_blocks)  # noqa: E731
        deadline = time.monotonic() + 5
        while free() != self.receiver_free and time.monotonic() < deadline:
            time.sleep(0.05)
        assert free() == self.receiver_free and len(self.receiver.leases) == 0  # (read racily: 0 stays 0)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        if self.server is not None:
            self.server.stop(0).wait()
            self.service.close()
        else:
            self.receiver.close()
        self.loop.stop()


def kind_of(exc: BaseException) -> str:
    """A failure as the contract names it, whatever the backend's way of raising it."""
    if isinstance(exc, grpc.RpcError):
        return {grpc.StatusCode.INVALID_ARGUMENT: "malformed", grpc.StatusCode.DATA_LOSS: "corrupt",
                grpc.StatusCode.NOT_FOUND: "lease ended"}.get(exc.code(), "broken")  # fmt: skip
    if isinstance(exc, CorruptChunk):
        return "corrupt"
    if isinstance(exc, LeaseNotFound):
        return "lease ended"
    return "malformed" if isinstance(exc, MalformedChunk) else "broken"


def failure(push: KVPush) -> str:
    with pytest.raises(Exception) as info:
        push.run()
    return kind_of(info.value)


@pytest.fixture(params=BACKENDS)
def backend(request, model):
    b = Backend(model, request.param)
    yield b
    b.close()


def test_a_complete_transfer_lands_every_block_and_is_claimed_once(backend):
    push, lease = backend.start()
    reply = push.run()
    assert reply.state == kvtransfer_pb2.COMPLETE
    claimed = backend.receiver.claim("r", lease.lease_id)
    src = [b for r in backend.reports if r.layer == 0 for b in r.block_ids]
    for mine, theirs in zip(backend.loop.engine.kv_caches, backend.sender.kv_caches, strict=True):
        assert torch.equal(mine[:, claimed.block_ids], theirs[:, src])
    with pytest.raises(LeaseNotFound, match="COMPLETE"):  # a duplicate acknowledgement
        backend.receiver.claim("r", lease.lease_id)
    backend.loop.call(backend.loop.engine.abort_request, "r")  # the claimed request gives its blocks back
    backend.check_no_leaks()


def drop(seq: int):
    def mutate(lane, frames):
        for frame in frames:
            if not (lane == 0 and decode_frame(frame)[0].seq == seq):
                yield frame

    return mutate


def flip(lane, frames):
    for i, frame in enumerate(frames):
        yield frame[:-1] + bytes([frame[-1] ^ 1]) if lane == 0 and i == 1 else frame


def test_a_lost_chunk_or_a_flipped_byte_fails_the_lease(backend):
    push, lease = backend.start(drop(1))
    assert failure(push) == "malformed"
    assert backend.lease_state(lease.lease_id) is TransferState.FAILED
    push, lease = backend.start(flip)
    # (A same-host chunk carries block ids, not bytes: the flip lands in those ids or their checksum.)
    assert failure(push) == "corrupt"
    assert backend.lease_state(lease.lease_id) is TransferState.FAILED
    backend.check_no_leaks()


def test_the_sender_aborting_mid_transfer_fails_the_lease(backend):
    push, lease = backend.start(layers=1)  # the prefill is aborted after its first layer
    push.abort()
    assert failure(push) in ("malformed", "lease ended")  # its stream ends short
    assert backend.lease_state(lease.lease_id) is TransferState.FAILED
    backend.check_no_leaks()


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_sender_dying_mid_transfer_never_holds_the_blocks_past_the_lease(model, kind):
    # A stream that breaks after chunks arrived fails the lease at once; one that breaks before any
    # arrived names no lease to the receiver: its lease expires (1 s here) — a dead sender cannot release.
    b = Backend(model, kind, lease_ttl_s=1.0)

    def die(lane, frames):
        for i, frame in enumerate(frames):
            if i == 1:
                raise RuntimeError("the sender died")
            yield frame

    push, lease = b.start(die)
    failure(push)
    deadline = time.monotonic() + 3
    while b.lease_state(lease.lease_id) not in (TransferState.FAILED, TransferState.EXPIRED):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b.check_no_leaks()
    b.close()


def test_the_receiver_releasing_mid_transfer_stops_the_sender(backend):
    released = threading.Event()

    def release_after_first(lane, frames):
        for i, frame in enumerate(frames):
            if lane == 0 and i == 1:
                backend.release(lease.lease_id, "receiver gave up")
                released.set()
            yield frame

    push, lease = backend.start(release_after_first)
    # (The sender's RPC may end before the releasing thread is back from its Release call.)
    assert failure(push) == "lease ended" and released.wait(5)
    assert backend.lease_state(lease.lease_id) is TransferState.ABORTED
    backend.check_no_leaks()


def test_a_stall_past_the_lease_expires_it(model):
    for kind in ("in-process", "grpc"):
        b = Backend(model, kind, lease_ttl_s=0.3)

        def stall(lane, frames):
            for i, frame in enumerate(frames):
                if i == 1:
                    time.sleep(1.5)  # past the 0.3 s time-to-live (the reaper looks every 0.5 s)
                yield frame

        push, lease = b.start(stall)
        assert failure(push) == "lease ended"
        assert b.lease_state(lease.lease_id) is TransferState.EXPIRED
        b.check_no_leaks()
        b.close()


def test_the_receiver_dying_mid_transfer_fails_the_sender_and_frees_the_reservation(model):
    for kind in ("in-process", "grpc"):
        b = Backend(model, kind)

        def die_after_first(lane, frames, b=b):
            for i, frame in enumerate(frames):
                if i == 1:
                    if b.server is not None:
                        b.server.stop(0).wait()  # the receiving worker is gone
                    b.receiver.close()  # its leases end with it
                yield frame

        push, _ = b.start(die_after_first)
        assert failure(push) in ("broken", "lease ended")
        b.check_no_leaks()
        b.loop.stop()
        for ch in b.channels:
            ch.close()


def test_frames_from_a_generated_stub_decode_the_same(backend):
    # Any valid encoding of a KVChunk is accepted (frames are protobuf-compatible): re-encode each.
    def reencode(lane, frames):
        for frame in frames:
            header, payload = decode_frame(frame)
            header.data = bytes(payload)
            yield encode_frame(header, b"") if not payload else header.SerializeToString()

    push, lease = backend.start(reencode)
    assert push.run().state == kvtransfer_pb2.COMPLETE
    backend.receiver.claim("r", lease.lease_id)
    backend.loop.call(backend.loop.engine.abort_request, "r")
    backend.check_no_leaks()
