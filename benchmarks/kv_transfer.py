"""KV transfer throughput over gRPC against raw TCP on loopback (issue 4's benchmark).

One run prints the machine and versions, then:
  1. raw TCP socket throughput on loopback (one connection, 4 MiB sendall / recv_into; median of five
     1 GiB runs), the ceiling;
  2. the KV transfer between two real engines, a prefill engine in this process and a decode worker
     process (`python -m splitserve.decode_worker`), through its KVTransfer service (Reserve, then
     the prefill worker's sender, `KVPush`, fed every layer's blocks at once; validated and written
     into the reserved blocks), for the KV of a 4k-token prompt of the tiny model and of a model with
     the Llama-3.2-1B KV layout (16 layers, 8 KV heads, head_dim 64, bf16): over gRPC by chunk size and lanes
     (Push streams, each on its own connection; one unmeasured transfer first)
     (on CUDA this includes the device-to-host staging), and by the same-host path (the decode worker
     copies the blocks from the prefill engine's shared memory, or through CUDA IPC); reported as KV
     bytes / transfer time and, for gRPC, as a fraction of (1) — target >= 0.5;
  3. the transfer tail of whole prefill-worker requests (a real prefill worker service, layer-wise
     streaming during the prefill): the time from the first token to the end of the transfer,
     against one decode step of the same decode worker — target <= 1 step.
Usage: python benchmarks/kv_transfer.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
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
from splitserve.cluster.supervisor import parse_announcement
from splitserve.engine.kv_watch import KVReady, KVWatch
from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.push import KVPush
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.kvtransfer.same_host import export_source
from splitserve.kvtransfer.stream import kv_layout
from splitserve.kvtransfer.transport import channel, make_server, push_stub, tune_malloc_for_transfers
from splitserve.prefill_worker.service import PrefillService
from splitserve.protos import kvtransfer_pb2, kvtransfer_pb2_grpc, workers_pb2, workers_pb2_grpc
from splitserve.tiny_model import TinyModelSpec, make_tiny_model

PROMPT_TOKENS = 4096
MAX_LANES = 8
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
        self.prefill = LLM(path, dtype=dtype, num_blocks=blocks, max_num_batched_tokens=PROMPT_TOKENS,
                           shared_memory=True).engine  # fmt: skip
        self.source = export_source(self.prefill.kv_caches, self.prefill.kv_memfd)
        self.worker, self.address = start_decode_worker(path, dtype, blocks)
        self.channels = [channel(self.address, lane) for lane in range(MAX_LANES)]
        self.stub = kvtransfer_pb2_grpc.KVTransferStub(self.channels[0])
        self.pushes = [push_stub(ch) for ch in self.channels]
        self.layout = kv_layout(self.prefill.kv_caches, self.prefill.model_id)
        gen = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(3, 500, (PROMPT_TOKENS,), generator=gen).tolist()
        reports = []  # the prompt's blocks stay pinned (as for a transfer) for the whole benchmark
        watch = KVWatch(reports.append)
        self.prefill.add_request("src", self.prompt, SamplingParams(max_tokens=1), kv_watch=watch)
        while self.prefill.has_unfinished_requests():
            self.prefill.step()
        self.block_ids = [b for r in reports if r.layer == 0 for b in r.block_ids]
        caches = self.prefill.kv_caches
        self.kv_bytes = sum(c[:, self.block_ids].numel() * c.element_size() for c in caches)

    def transfer_s(self, chunk_bytes: int, rid: str, same_host: bool, lanes: int = 1) -> float:
        """One Reserve + Push of every block by the prefill worker's sender; the decode side then drops
        the request."""
        start = time.perf_counter()
        lease = self.stub.Reserve(kvtransfer_pb2.ReserveRequest(
            request_id=rid, layout=self.layout, prompt_token_ids=self.prompt,
            sampling=sampling_to_proto(GREEDY),
        ))  # fmt: skip
        assert lease.num_cached_blocks == 0
        source = self.source if same_host else None
        caches = self.prefill.kv_caches
        push = KVPush(self.pushes[:lanes], caches, self.layout, lease.lease_id, chunk_bytes, source)
        blocks = tuple(self.block_ids)
        for layer in range(self.layout.num_layers):  # as if the whole prefill had just ended
            push.on_ready(KVReady(rid, layer, 0, blocks, None, last=True))
        push.run()
        elapsed = time.perf_counter() - start
        self.stub.Release(kvtransfer_pb2.ReleaseRequest(lease_id=lease.lease_id, reason="benchmark"))
        return elapsed

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        stop_worker(self.worker)


def start_decode_worker(path: str, dtype: str, num_blocks: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "splitserve.decode_worker", "--model", path, "--port", "0",
         "--dtype", dtype, "--num-blocks", str(num_blocks), "--max-model-len", str(2 * PROMPT_TOKENS)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    announced = parse_announcement(line)
    if announced is None:
        proc.kill()
        raise RuntimeError(f"the decode worker did not start: {line!r}")
    return proc, announced[0]


def stop_worker(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def transfer_tail(path: str, dtype: str, transport: str) -> tuple[float, float, float, float]:
    """Medians over 4k-token requests (ms): the transfer tail the prefill worker reports (first token to
    the receiver's acknowledgement of the last chunk), its first-token time, the gap from the first
    token to the second (from the decode worker, whose Generate started on the first token: the tail
    as the user sees it, plus one decode step), and the decode step. A real prefill worker service in
    this process streams layer by layer to a decode worker process, which then decodes 32 tokens."""
    blocks = PROMPT_TOKENS // 16 + 16
    worker, address = start_decode_worker(path, dtype, blocks)
    engine = LLM(path, dtype=dtype, num_blocks=blocks, max_num_batched_tokens=PROMPT_TOKENS,
                 shared_memory=transport == "auto").engine  # fmt: skip
    prefill_loop = EngineLoop(engine)
    prefill = PrefillService(prefill_loop, kv_transport=transport)
    server, port = make_server("127.0.0.1:0")
    workers_pb2_grpc.add_PrefillWorkerServicer_to_server(prefill, server)
    server.start()
    ch, prefill_ch = channel(address), channel(f"127.0.0.1:{port}")
    tails, firsts, gaps, steps = [], [], [], []
    try:
        for i in range(4):
            gen = torch.Generator().manual_seed(i)
            prompt = torch.randint(3, 500, (PROMPT_TOKENS,), generator=gen).tolist()
            sampling = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True))
            replies = workers_pb2_grpc.PrefillWorkerStub(prefill_ch).Prefill(workers_pb2.PrefillRequest(
                request_id=f"t{i}", prompt_token_ids=prompt, sampling=sampling, decode_address=address,
            ))  # fmt: skip
            first = next(replies)
            first_at = time.perf_counter()
            stream = workers_pb2_grpc.DecodeWorkerStub(ch).Generate(workers_pb2.GenerateRequest(
                request_id=f"t{i}", lease_id=first.lease_id, first_token_id=first.first_token_id,
            ))  # fmt: skip (started at once, as a router does: the decode worker waits for the KV)
            done = next(replies)
            arrivals = [time.perf_counter() for chunk in stream if chunk.token_ids]
            if i > 0:  # the first request warms both workers up
                tails.append(done.transfer_tail_ms)
                firsts.append(first.first_token_ms)
                gaps.append((arrivals[0] - first_at) * 1e3)
                steps += [(b - a) * 1e3 for a, b in itertools.pairwise(arrivals)]
    finally:
        ch.close()
        prefill_ch.close()
        server.stop(0).wait()
        prefill.close()
        prefill_loop.stop()
        stop_worker(worker)
    return tuple(statistics.median(v) for v in (tails, firsts, gaps, steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one chunk size, fewer repeats")
    args = parser.parse_args()
    tune_malloc_for_transfers()  # this process plays the prefill worker, which does the same
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    print(f"{device}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; python "
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
    lane_counts = [1, 2] if args.quick else [1, 2, 4, 8]
    paths = [("grpc", c, n) for c in chunk_sizes for n in lane_counts] + [("same-host", 4 * 2**20, 1)]
    rows = []
    for name, (path, dtype) in models.items():
        pair = Pair(str(path), dtype)
        try:
            for transport, chunk, lanes in paths:
                rid = f"{name}-{transport}-{chunk}-{lanes}"
                pair.transfer_s(chunk, f"{rid}-warm", transport == "same-host", lanes)  # connections, buffers
                times = [pair.transfer_s(chunk, f"{rid}-{i}", transport == "same-host", lanes)
                         for i in range(3 if args.quick else 5)]  # fmt: skip
                gbs = pair.kv_bytes / statistics.median(times) / 1e9
                ms = statistics.median(times) * 1e3
                rows.append((name, transport, lanes, pair.kv_bytes, chunk, ms, gbs))
        finally:
            pair.close()
    print("\n| KV of a 4k-token prompt | path | lanes | MB | chunk MiB | transfer ms | GB/s | × raw TCP |")
    print("|---|---|---|---|---|---|---|---|")
    for name, transport, lanes, size, chunk, ms, gbs in rows:
        chunk_mib = f"{chunk / 2**20:.0f}" if transport == "grpc" else "–"
        ratio = f"{gbs / raw:.2f}"
        cells = [name, transport, str(lanes), f"{size / 1e6:.1f}", chunk_mib, f"{ms:.1f}", f"{gbs:.2f}",
                 ratio]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print("\n| prefill worker → decode worker, 4k prompt | path | first token ms | tail ms | "
          "token 1→2 gap ms | decode step ms | tail / step | (gap − step) / step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (path, dtype) in models.items():
        for transport in ("grpc", "auto"):
            tail, first, gap, step = transfer_tail(str(path), dtype, transport)
            label = "same-host" if transport == "auto" else "grpc"
            ratios = f"{tail / step:.2f}", f"{(gap - step) / step:.2f}"
            cells = [name, label, f"{first:.1f}", f"{tail:.1f}", f"{gap:.1f}", f"{step:.2f}", *ratios]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
