"""The workers as real processes (`python -m splitserve.{prefill,decode}_worker`) over real gRPC: a
disaggregated request equals the offline API; a prefill worker killed mid-transfer leaves the decode
worker's reserved blocks to its lease, which expires and frees them, and the request fails clearly;
SIGTERM stops both cleanly. Run for both KV paths (`--kv-transport grpc`, and `auto`: same host, so the
decode worker copies from the prefill worker's shared memory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from workers_cluster import start_process

from splitserve import LLM, SamplingParams
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.kvtransfer.stream import kv_layout
from splitserve.kvtransfer.transport import channel
from splitserve.protos import common_pb2, workers_pb2, workers_pb2_grpc

GREEDY = {"temperature": 0.0, "ignore_eos": True}
WORKER_ARGS = ["--port", "0", "--block-size", "8", "--num-blocks", "64", "--max-num-seqs", "8"]


def start(module: str, model, *extra: str) -> tuple[subprocess.Popen, str]:
    return start_process([module, "--model", str(model), *WORKER_ARGS, *extra])


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=512)


@pytest.fixture(scope="module", params=["grpc", "auto"])
def workers(model, request):
    decode, decode_address = start("splitserve.decode_worker", model, "--lease-ttl", "1.0")
    prefill, prefill_address = start(
        "splitserve.prefill_worker", model, "--pool", "warm", "--kv-transport", request.param
    )
    channels = [channel(decode_address), channel(prefill_address)]
    yield {"decode": decode, "prefill": prefill, "decode_address": decode_address, "mode": request.param,
           "decoder": workers_pb2_grpc.DecodeWorkerStub(channels[0]),
           "prefiller": workers_pb2_grpc.PrefillWorkerStub(channels[1])}
    for ch in channels:
        ch.close()
    for proc in (prefill, decode):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def free_blocks(workers) -> int:
    return workers["decoder"].Load(common_pb2.LoadRequest()).free_blocks


def test_disaggregated_request_across_processes(model, workers):
    prompt = list(range(3, 60))
    sampling = sampling_to_proto(SamplingParams(max_tokens=8, **GREEDY))
    expected = LLM(str(model), num_blocks=64, block_size=8).generate(
        {"prompt_token_ids": prompt}, SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0].token_ids
    free = free_blocks(workers)
    address = workers["decode_address"]
    first, reply = workers["prefiller"].Prefill(workers_pb2.PrefillRequest(
        request_id="p1", prompt_token_ids=prompt, sampling=sampling, decode_address=address))
    tokens = [first.first_token_id]
    for chunk in workers["decoder"].Generate(workers_pb2.GenerateRequest(
            request_id="p1", lease_id=reply.lease_id, first_token_id=reply.first_token_id)):
        tokens.extend(chunk.token_ids)
    assert tokens == expected and reply.num_blocks_sent == 8
    assert reply.transport == {"grpc": "grpc", "auto": "same-host"}[workers["mode"]]
    assert free_blocks(workers) == free


KILLED_SENDER = textwrap.dedent("""
    import os, signal, sys
    from splitserve import LLM
    from splitserve.kvtransfer.chunks import plan_chunks, encode_chunk, block_bytes
    from splitserve.kvtransfer.same_host import export_source
    from splitserve.kvtransfer.transport import channel
    from splitserve.protos import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc
    stub = kvtransfer_pb2_grpc.KVTransferStub(channel(sys.argv[1]))
    layout = common_pb2.KVLayout.FromString(bytes.fromhex(sys.argv[2]))
    lease = stub.Reserve(kvtransfer_pb2.ReserveRequest(
        request_id="dies", layout=layout, prompt_token_ids=list(range(100, 140)),
        sampling=common_pb2.SamplingParams(max_tokens=4)))
    print(lease.lease_id, flush=True)
    spans = plan_chunks(layout, 0, lease.num_blocks, block_bytes(layout))
    if sys.argv[3] == "grpc":
        first = encode_chunk(lease.lease_id, 0, spans[0], bytes(block_bytes(layout)), last=False)
    else:  # same-host: chunk 0 names this process's shared cache and its blocks
        runner = LLM(sys.argv[4], num_blocks=64, block_size=8, shared_memory=True).engine.runner
        first = kvtransfer_pb2.KVChunk(lease_id=lease.lease_id, seq=0, layer=0, first_block=0,
                                       num_blocks=1, src_block_ids=[1])
        first.source.CopyFrom(export_source(runner.kv_caches, runner.kv_memfd))
    def chunks():
        yield first
        os.kill(os.getpid(), signal.SIGKILL)  # the prefill worker dies mid-transfer
    stub.Push(chunks())
""")


def test_sender_killed_mid_transfer_frees_blocks_when_the_lease_expires(model, workers):
    engine = LLM(str(model), num_blocks=8, block_size=8).engine
    layout = kv_layout(engine.runner.kv_caches, engine.model_id)
    free = free_blocks(workers)
    sender = subprocess.run(
        [sys.executable, "-c", KILLED_SENDER, workers["decode_address"], layout.SerializeToString().hex(),
         workers["mode"], str(model)],
        capture_output=True, text=True, timeout=60,
    )
    assert sender.returncode == -signal.SIGKILL, sender.stderr
    lease_id = sender.stdout.split()[0]
    deadline = time.monotonic() + 10
    while free_blocks(workers) != free and time.monotonic() < deadline:
        time.sleep(0.1)
    assert free_blocks(workers) == free  # the 1 s lease expired and gave the 5 reserved blocks back
    with pytest.raises(grpc.RpcError) as info:
        list(workers["decoder"].Generate(workers_pb2.GenerateRequest(
            request_id="dies", lease_id=lease_id, first_token_id=5)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # The decode worker notices the broken stream (FAILED) or, at the latest, the lease expires (EXPIRED).
    details = info.value.details()
    assert "did not arrive" in details and ("EXPIRED" in details or "FAILED" in details)


def test_sigterm_stops_both_workers_cleanly(workers):
    for name in ("prefill", "decode"):
        os.kill(workers[name].pid, signal.SIGTERM)
    assert [workers[name].wait(timeout=30) for name in ("prefill", "decode")] == [0, 0]
