"""Where a gRPC KV push spends its time: each per-chunk stage alone, and gRPC with each end's work added.

Part 1: each stage of a 4 MiB chunk (1B KV layout, bf16) run by 1, 2, 4 and 8 threads at once, aggregate
GB/s — a stage that scales with threads releases the GIL, one that does not holds it. Stages: the CRC-32 of
the payload (zlib), the frame join (one copy), `bytes` from a memoryview (one copy), and on CUDA the
sender's gather + device checksum + device→host copy (`wire_payload`), with the frame join, against
copying the gather straight into a `bytes` frame; the receiver's host→device store (`write_blocks`), and
the device-side checksum alone (`tensors.fletcher_sums`).
Part 2: plain gRPC client streaming of 4 MiB messages to a server process (identity serializers, the
project's channel options) over 1-8 channels: bare, with the sender's per-chunk work (gather, checksum,
join), with the receiver's (checksum, store), and with both — the KV push's pipeline without its bookkeeping.
Usage: python benchmarks/kv_wire_stages.py [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import zlib

import grpc
import torch

from splitserve.kvtransfer.tensors import (
    fletcher_sums,
    host_bytes,
    read_blocks,
    wire_payload,
    write_blocks,
)
from splitserve.kvtransfer.transport import channel, make_server, tune_malloc_for_transfers

CHUNK = 4 * 2**20
LAYOUT = (16, 8, 64)  # block size, KV heads, head dim: the 1B layout, bf16 → 32 KiB per block and layer
BLOCKS_PER_CHUNK = CHUNK // (2 * 16 * 8 * 64 * 2)
TOTAL = 256 * 2**20  # bytes per gRPC measurement
METHOD = "/bench.Sink/Push"


def cache(device: str) -> torch.Tensor:
    return torch.randn(2, 4 * BLOCKS_PER_CHUNK, *LAYOUT, dtype=torch.bfloat16, device=device)


def stages(device: str) -> dict:
    payload = os.urandom(CHUNK)
    header = b"x" * 40
    kv = cache(device)
    ids = list(range(0, 2 * BLOCKS_PER_CHUNK, 2))
    out = {
        "crc32 (zlib)": lambda: zlib.crc32(payload),
        "frame join (1 copy)": lambda: b"".join((header, payload)),
        "bytes(memoryview)": lambda: bytes(memoryview(payload)),
    }
    if device == "cuda":
        torch.cuda.synchronize()
        out["wire_payload (gather + checksum + D2H)"] = lambda: staged(kv, ids)
        out["... + frame join"] = lambda: staged(kv, ids, header)
        out["gather + D2H into a bytes frame (pageable)"] = lambda: into_frame(kv, ids, header)
        out["write_blocks (H2D store)"] = lambda: (write_blocks(kv, ids, payload), torch.cuda.synchronize())
        blocks = kv[:, :BLOCKS_PER_CHUNK]
        out["device checksum"] = lambda: fletcher_sums(blocks.reshape(-1).view(torch.uint8)).tolist()
    else:
        out["read_blocks (gather)"] = lambda: read_blocks(kv, ids)
        out["write_blocks (store)"] = lambda: write_blocks(kv, ids, payload)
        host_blocks = kv[:, :BLOCKS_PER_CHUNK].reshape(-1).view(torch.uint8)
        out["fletcher on the host"] = lambda: fletcher_sums(host_blocks)
    return out


def staged(kv: torch.Tensor, ids: list[int], header: bytes | None = None) -> bytes | None:
    with wire_payload(kv, ids) as (payload, _):
        return None if header is None else b"".join((header, payload))


def into_frame(kv: torch.Tensor, ids: list[int], header: bytes) -> bytes:
    """The alternative to pinned staging + join: the gather copied straight into a new `bytes` frame."""
    frame = bytes(len(header) + CHUNK)
    view = host_bytes(frame)  # written once, before anyone else sees the object
    view[: len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    blocks = kv.index_select(1, torch.tensor(ids, device=kv.device))
    view[len(header) :].copy_(blocks.reshape(-1).view(torch.uint8))
    return frame


def scaling(fn, threads: int, repeats: int = 24) -> float:
    fn()
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(repeats):
            fn()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return threads * repeats * CHUNK / (time.perf_counter() - start) / 1e9


def serve(receiver_work: bool, device: str) -> None:
    """The server process: a Push sink, optionally checking and storing each message like a receiver."""
    tune_malloc_for_transfers()
    kv = cache(device)
    ids = list(range(BLOCKS_PER_CHUNK))

    def push(requests, context):
        n = 0
        for frame in requests:
            n += len(frame)
            if receiver_work:
                view = memoryview(frame)[40:]
                if device == "cpu":
                    zlib.crc32(view)
                else:  # the device check as write_blocks does it (its own copy to the device: a bound)
                    fletcher_sums(host_bytes(view).to(kv.device)).tolist()
                write_blocks(kv, ids, view)
        if device == "cuda":
            torch.cuda.synchronize()
        return n.to_bytes(8, "little")

    push_handler = grpc.stream_unary_rpc_method_handler(push)  # identity (de)serializers
    server, port = make_server("127.0.0.1:0")
    sink = grpc.method_handlers_generic_handler("bench.Sink", {"Push": push_handler})
    server.add_generic_rpc_handlers((sink,))
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def grpc_gbs(port: int, lanes: int, sender_work: bool, device: str) -> float:
    channels = [channel(f"127.0.0.1:{port}", lane) for lane in range(lanes)]
    calls = [ch.stream_unary(METHOD, request_serializer=None, response_deserializer=None) for ch in channels]
    kv = cache(device)
    ids = list(range(BLOCKS_PER_CHUNK))
    prepared = b"h" * 40 + os.urandom(CHUNK)
    per_lane = TOTAL // CHUNK // lanes

    def frames():
        for _ in range(per_lane):
            if not sender_work:
                yield prepared
                continue
            with wire_payload(kv, ids) as (payload, _):  # with the device checksum on CUDA
                if device == "cpu":
                    zlib.crc32(payload)
                frame = b"".join((b"h" * 40, payload))
            yield frame

    for call in calls:
        call(iter([prepared]))  # connections up
    results = [0.0] * lanes

    def lane(i: int) -> None:
        results[i] = int.from_bytes(calls[i](frames()), "little")

    start = time.perf_counter()
    threads = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for ch in channels:
        ch.close()
    return sum(results) / elapsed / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--serve", choices=("bare", "work"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve == "work", args.device)
        return
    tune_malloc_for_transfers()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}; {os.cpu_count()} CPUs; torch {torch.__version__}, grpcio {grpc.__version__}")
    thread_counts = (1, 2, 4, 8)
    print("\n| stage, 4 MiB chunk | " + " | ".join(f"{t} thr GB/s" for t in thread_counts) + " |")
    print("|---" * (len(thread_counts) + 1) + "|")
    for label, fn in stages(args.device).items():
        print(f"| {label} | " + " | ".join(f"{scaling(fn, t):.2f}" for t in thread_counts) + " |", flush=True)
    lane_counts = (1, 2, 4, 8)
    print("\n| gRPC, 4 MiB messages | " + " | ".join(f"{n} lanes GB/s" for n in lane_counts) + " |")
    print("|---" * (len(lane_counts) + 1) + "|")
    for receiver in ("bare", "work"):
        server = subprocess.Popen(
            [sys.executable, "-P", __file__, "--serve", receiver, "--device", args.device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        port = int(server.stdout.readline())
        try:
            for sender in (False, True):
                label = f"sender {'work' if sender else 'bare'}, receiver {receiver}"
                cells = [statistics.median(grpc_gbs(port, n, sender, args.device) for _ in range(3))
                         for n in lane_counts]  # fmt: skip
                print(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)
        finally:
            server.stdin.close()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
