"""The transfer failure policy (router.dispatch): a prefill worker that dies or whose KV transfer fails
either fails the request with a clear `TransferFailed`, or — `RECOMPUTE` — has its prefill recomputed on
the next prefill worker, giving the same tokens as the offline API. Errors another worker would hit too
are not retried. Block pools end where they started on every worker."""

from __future__ import annotations

import grpc
import pytest
from workers_cluster import GREEDY, Cluster, offline

from splitserve import SamplingParams
from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.kvtransfer.transport import channel, make_server
from splitserve.prefill_worker.service import PrefillService
from splitserve.protos import workers_pb2, workers_pb2_grpc
from splitserve.router.dispatch import FailurePolicy, PrefillTarget, TransferFailed, run_disaggregated

PROMPT = list(range(3, 43))  # 5 blocks of 8: several chunks per layer at 4 KiB


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=512)


class Workers(Cluster):
    """The cluster's prefill worker ("p1", which can be made to fail) and a second one ("p2")."""

    def __init__(self, model):
        super().__init__(model)
        engine = type(self.prefill_loop.engine)(self.prefill_loop.engine.config)
        self.loop2 = EngineLoop(engine)
        self.prefill2 = PrefillService(self.loop2, max_chunk_bytes=4096, kv_transport="grpc")
        self.server2, port = make_server("127.0.0.1:0")
        workers_pb2_grpc.add_PrefillWorkerServicer_to_server(self.prefill2, self.server2)
        self.server2.start()
        self.channels.append(channel(f"127.0.0.1:{port}"))
        self.targets = [PrefillTarget("p1", self.prefiller),
                        PrefillTarget("p2", workers_pb2_grpc.PrefillWorkerStub(self.channels[-1]))]
        self.free2 = self.loop2.call(lambda: engine.block_pool.num_free_blocks)

    def corrupt_p1_transfers(self):
        """p1's pushes flip the last byte of their second frame (payload): the receiver's checksum fails."""
        new_push = self.prefill._new_push

        def corrupting(address, lease):
            push = new_push(address, lease)
            frames = push._chunks

            def flipped(lane):
                for i, frame in enumerate(frames(lane)):
                    yield frame[:-1] + bytes([frame[-1] ^ 1]) if i == 1 else frame

            push._chunks = flipped
            return push

        self.prefill._new_push = corrupting

    def run(self, rid, policy, max_tokens=6):
        request = workers_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=PROMPT, decode_address=self.decode_address,
            sampling=sampling_to_proto(SamplingParams(max_tokens=max_tokens, **GREEDY)),
        )  # fmt: skip
        outs = list(run_disaggregated(request, self.targets, self.decoder, policy, timeout_s=30))
        return [t for out in outs for t in out.token_ids], outs

    def assert_no_leaks(self):
        assert self.free_blocks() == self.free_at_start
        assert self.loop2.call(lambda: self.loop2.engine.block_pool.num_free_blocks) == self.free2

    def close(self):
        self.server2.stop(0).wait()
        super().close()
        self.prefill2.close()
        self.loop2.stop()


@pytest.fixture
def workers(model):
    w = Workers(model)
    yield w
    w.close()


def test_a_failed_transfer_is_recomputed_on_the_next_prefill_worker(model, workers):
    workers.corrupt_p1_transfers()
    tokens, outs = workers.run("r", FailurePolicy.RECOMPUTE)
    assert tokens == offline(model, [PROMPT], 6)[0]
    assert outs[-1].finish_reason == "length"
    workers.assert_no_leaks()


def test_a_failed_transfer_fails_the_request_under_the_fail_policy(workers):
    workers.corrupt_p1_transfers()
    with pytest.raises(TransferFailed) as info:
        workers.run("r", FailurePolicy.FAIL)
    message = str(info.value)
    assert "p1" in message and "DATA_LOSS" in message and "checksum" in message
    workers.assert_no_leaks()


def test_a_dead_prefill_worker_is_skipped_or_reported(model, workers):
    workers.prefill_server.stop(0).wait()  # p1 is gone
    with pytest.raises(TransferFailed, match="p1: UNAVAILABLE"):
        workers.run("a", FailurePolicy.FAIL)
    tokens, outs = workers.run("b", FailurePolicy.RECOMPUTE)
    assert tokens == offline(model, [PROMPT], 6)[0] and outs[0].prefill == "p2"
    workers.assert_no_leaks()


def test_errors_another_worker_would_hit_too_are_not_retried(workers):
    too_long = workers_pb2.PrefillRequest(
        request_id="long", prompt_token_ids=list(range(3, 600)), decode_address=workers.decode_address,
        sampling=sampling_to_proto(SamplingParams(max_tokens=2, **GREEDY)),
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:
        list(run_disaggregated(too_long, workers.targets, workers.decoder, FailurePolicy.RECOMPUTE))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    workers.assert_no_leaks()
