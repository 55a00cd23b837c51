"""KV transfer throughput over gRPC against raw TCP on loopback (issue 4's benchmark).

One run prints the machine and versions, then:
  1. raw TCP socket throughput on loopback (one connection, 4 MiB sendall / recv_into; median of five
     1 GiB runs), the ceiling;
  2. the KV transfer between two real engines, a prefill engine in this process and a decode worker
     process (`python -m splitserve.decode_worker`), through its KVTransfer service (Reserve,
     then Push of every block, validated and written into the reserved blocks), for the KV of a
     4k-token prompt of the tiny model and of a model with the Llama-3.2-1B KV layout (16 layers,
     8 KV heads, head_dim 64, bf16), by chunk size; reported as KV bytes / transfer time and as a
     fraction of (1) — target >= 0.5;
  3. the transfer tail of a whole prefill-worker request (prefill, first token, push): the time from
     the first token to the end of the push, against one decode step of the same engine.
Usage: python benchmarks/kv_transfer.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import torch

from splitserve import LLM, SamplingParams
from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.kvtransfer.stream import kv_layout, send_frames
from splitserve.kvtransfer.transport import channel, make_server, push_stub
from splitserve.prefill_worker.service import PrefillService
from splitserve.protos import kvtransfer_pb2, kvtransfer_pb2_grpc, workers_pb2, workers_pb2_grpc
from splitserve.tiny_model import TinyModelSpec, make_tiny_model

PROMPT_TOKENS = 4096
GREEDY = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)


def raw_socket_gbs(total_bytes: int = 2**30, buf_bytes: int = 4 * 2**20) -> float:
    """Bytes per second through one loopback TCP connection."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def sink() -> None:
        conn, _ = server.accept()
        buf = bytearray(buf_bytes)
        view = memoryview(buf)
        received = 0
        while received < total_bytes:
            n = conn.recv_into(view)
            if n == 0:
                break
            received += n
        conn.sendall(b"k")
        conn.close()

    thread = threading.Thread(target=sink)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port))
    payload = bytes(buf_bytes)
    start = time.perf_counter()
    for _ in range(total_bytes // buf_bytes):
        client.sendall(payload)
    client.recv(1)
    elapsed = time.perf_counter() - start
    client.close()
    thread.join()
    server.close()
    return total_bytes / elapsed / 1e9


class Pair:
    """A prefill engine in this process and a decode worker process (KVTransfer over localhost gRPC), on
    one model: the two ends run on their own cores, as deployed."""

    def __init__(self, path: str, dtype: str) -> None:
        blocks = PROMPT_TOKENS // 16 + 8
        self.prefill = LLM(path, dtype=dtype, num_blocks=blocks, max_num_batched_tokens=PROMPT_TOKENS).engine
        self.worker, self.address = start_decode_worker(path, dtype, blocks)
        self.channel = channel(self.address)
        self.stub = kvtransfer_pb2_grpc.KVTransferStub(self.channel)
        self.push = push_stub(self.channel)
        self.layout = kv_layout(self.prefill.runner.kv_caches, self.prefill.model_id)
        gen = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(3, 500, (PROMPT_TOKENS,), generator=gen).tolist()
        self.prefill.add_request("src", self.prompt, SamplingParams(max_tokens=1), hold_kv=True)
        while self.prefill.has_unfinished_requests():
            self.prefill.step()
        self.block_ids = self.prefill.held_kv("src")
        caches = self.prefill.runner.kv_caches
        self.kv_bytes = sum(c[:, self.block_ids].numel() * c.element_size() for c in caches)

    def transfer_s(self, chunk_bytes: int, rid: str) -> float:
        """One Reserve + Push of every block; the decode side then drops the request."""
        start = time.perf_counter()
        lease = self.stub.Reserve(kvtransfer_pb2.ReserveRequest(
            request_id=rid, layout=self.layout, prompt_token_ids=self.prompt,
            sampling=sampling_to_proto(GREEDY),
        ))  # fmt: skip
        assert lease.num_cached_blocks == 0
        caches = self.prefill.runner.kv_caches
        self.push(send_frames(caches, self.layout, self.block_ids, 0, lease.lease_id, chunk_bytes))
        elapsed = time.perf_counter() - start
        self.stub.Release(kvtransfer_pb2.ReleaseRequest(lease_id=lease.lease_id, reason="benchmark"))
        return elapsed

    def close(self) -> None:
        self.channel.close()
        stop_worker(self.worker)


def start_decode_worker(path: str, dtype: str, num_blocks: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve.decode_worker", "--model", path, "--port", "0", "--dtype", dtype,
         "--num-blocks", str(num_blocks), "--max-model-len", str(2 * PROMPT_TOKENS)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the decode worker did not start: {line!r}")
    return proc, line.split()[-1]


def stop_worker(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def transfer_tail(path: str) -> tuple[float, float]:
    """(transfer tail ms of a 4k-token prefill-worker request, one decode step ms), tiny model; the
    prefill service serves from this process, the decode worker from its own."""
    blocks = PROMPT_TOKENS // 16 + 16
    worker, address = start_decode_worker(path, "float32", blocks)
    prefill_loop = EngineLoop(LLM(path, num_blocks=blocks, max_num_batched_tokens=PROMPT_TOKENS).engine)
    prefill = PrefillService(prefill_loop)
    server, port = make_server("127.0.0.1:0")
    workers_pb2_grpc.add_PrefillWorkerServicer_to_server(prefill, server)
    server.start()
    ch, prefill_ch = channel(address), channel(f"127.0.0.1:{port}")
    tails, steps = [], []
    try:
        for i in range(3):
            gen = torch.Generator().manual_seed(i)
            prompt = torch.randint(3, 500, (PROMPT_TOKENS,), generator=gen).tolist()
            sampling = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True))
            reply = workers_pb2_grpc.PrefillWorkerStub(prefill_ch).Prefill(workers_pb2.PrefillRequest(
                request_id=f"t{i}", prompt_token_ids=prompt, sampling=sampling, decode_address=address,
            ))  # fmt: skip
            tails.append(reply.transfer_tail_ms)
            stream = workers_pb2_grpc.DecodeWorkerStub(ch).Generate(workers_pb2.GenerateRequest(
                request_id=f"t{i}", prompt_token_ids=prompt, sampling=sampling, lease_id=reply.lease_id,
                first_token_id=reply.first_token_id,
            ))  # fmt: skip
            last = None
            for chunk in stream:
                now = time.perf_counter()
                if last is not None and chunk.token_ids:
                    steps.append((now - last) * 1e3)
                last = now
    finally:
        ch.close()
        prefill_ch.close()
        server.stop(0).wait()
        prefill.close()
        prefill_loop.stop()
        stop_worker(worker)
    return statistics.median(tails), statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one chunk size, fewer repeats")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; python "
          f"{platform.python_version()}, torch {torch.__version__}, grpcio {grpc.__version__}")
    raws = [raw_socket_gbs() for _ in range(5)]  # loopback throughput on a shared 2-core box varies
    raw = statistics.median(raws)
    print(f"raw TCP loopback: {raw:.2f} GB/s (median of {', '.join(f'{r:.2f}' for r in raws)})")
    tmp = tempfile.TemporaryDirectory()
    models = {
        "tiny (fp32)": (
            make_tiny_model(f"{tmp.name}/tiny", TinyModelSpec(max_position_embeddings=8192)), "float32"
        ),
        "1B KV layout (bf16)": (make_tiny_model(f"{tmp.name}/kv1b", TinyModelSpec(
            hidden_size=512, intermediate_size=1024, num_layers=16, num_heads=8, num_kv_heads=8, head_dim=64,
            vocab_size=1024, max_position_embeddings=8192)), "bfloat16"),
    }  # fmt: skip
    chunk_sizes = [4 * 2**20] if args.quick else [2**20, 4 * 2**20, 16 * 2**20]
    rows = []
    for name, (path, dtype) in models.items():
        pair = Pair(str(path), dtype)
        try:
            for chunk in chunk_sizes:
                times = [pair.transfer_s(chunk, f"{name}-{chunk}-{i}") for i in range(2 if args.quick else 5)]
                gbs = pair.kv_bytes / statistics.median(times) / 1e9
                rows.append((name, pair.kv_bytes, chunk, statistics.median(times) * 1e3, gbs, gbs / raw))
        finally:
            pair.close()
    tail_ms, step_ms = transfer_tail(str(models["tiny (fp32)"][0]))
    print("\n| KV of a 4k-token prompt | MB | chunk MiB | transfer ms | GB/s | × raw TCP |")
    print("|---|---|---|---|---|---|")
    for name, size, chunk, ms, gbs, frac in rows:
        print(f"| {name} | {size / 1e6:.1f} | {chunk / 2**20:.0f} | {ms:.1f} | {gbs:.2f} | {frac:.2f} |")
    print(f"\ntransfer tail after the first token (tiny model, 4k prompt): {tail_ms:.1f} ms; "
          f"one decode step: {step_ms:.2f} ms; tail / step = {tail_ms / step_ms:.1f}")


if __name__ == "__main__":
    main()
