"""Routing decision latency and index ingest (issue 5's benchmark).

One run prints the machine and versions, then:
  1. index ingest: 16 worker publishers (`index.publisher`, in this process) write block events of 16
     hashes each through a real embedded Redis; a router mirror (`index.mirror`) applies them — events
     per second from the first write to the mirror holding them all;
  2. decision latency: `Router.decide` for 4k-token prompts (256 blocks of 16) — SHA-256 chain hashing,
     the mirror's in-memory match over 16 workers whose caches hold random prefixes of the prompts,
     building the views, the `cpd` policy — p50 / p99 and decisions per second on one thread.
Targets: p99 <= 1 ms and >= 2,000 decisions/s per router process.
The 16 workers' Load RPC (polled in the background, not on the decision path) is answered by one small
gRPC server in this process standing in for them: the decision reads only what the poll stored.
Usage: python benchmarks/router.py [--decisions N]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from splitserve.engine.block_hash import HashContext, hash_blocks
from splitserve.engine.block_pool import BlockEvent, BlockEventKind, Holdings
from splitserve.index.config import IndexConfig
from splitserve.index.mirror import IndexMirror
from splitserve.index.publisher import IndexPublisher
from splitserve.index.redis_server import EmbeddedRedis
from splitserve.index.schema import WorkerInfo, probe_hash
from splitserve.protos import common_pb2, workers_pb2_grpc
from splitserve.router.core import RoutedRequest, Router, WorkerSet
from splitserve.router.policies import make_policy

MODEL_ID, BLOCK, PROMPT = "bench-model", 16, 4096
ROLES = ["fresh"] * 6 + ["warm"] * 6 + ["decode"] * 4


class LoadOnly(workers_pb2_grpc.PrefillWorkerServicer, workers_pb2_grpc.DecodeWorkerServicer):
    """Answers Load for the stand-in workers (varying, so policies see different loads)."""

    def Load(self, request, context):
        load = common_pb2.WorkerLoad
        return load(queued_tokens=random.randrange(4096), running_requests=random.randrange(8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=5000)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}; python {platform.python_version()}, grpcio "
          f"{grpc.__version__}")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(PROMPT)] for _ in range(32)]
    chains = [hash_blocks(p, BLOCK, HashContext(MODEL_ID)) for p in prompts]
    with EmbeddedRedis() as redis:
        config = IndexConfig(redis.url)
        mirror = IndexMirror(config)
        mirror.start()
        publishers = []
        for i, role in enumerate(ROLES):
            probe = probe_hash(MODEL_ID, BLOCK)
            info = WorkerInfo(f"w{i}", role, f"127.0.0.1:{9000 + i}", MODEL_ID, BLOCK, probe)
            pub = IndexPublisher(config, info, lambda: Holdings([], []))
            pub.start()
            publishers.append(pub)
        # 1. ingest: every worker stores random prefixes of the prompts, 16 hashes per event
        events = [(pub, chain[start : start + 16]) for pub in publishers for chain in chains
                  for start in range(0, rng.randrange(16, 257) // 16 * 16, 16)]  # fmt: skip
        start = time.perf_counter()
        for pub, hashes in events:
            pub.on_block_event(BlockEvent(BlockEventKind.STORED, tuple(hashes)))
        while mirror.stats["events_applied"] < len(events):
            time.sleep(0.005)
        ingest = len(events) / (time.perf_counter() - start)
        print(f"index ingest: {len(events)} events of 16 hashes in {len(events) / ingest:.2f} s = "
              f"{ingest:,.0f} events/s ({ingest * 16:,.0f} block hashes/s)")
        for pub in publishers:  # workers live in their own processes: keep their leases, stop their threads
            pub.stop(deregister=False)
        # 2. decisions (within the leases' 10 s)
        server = grpc.server(ThreadPoolExecutor(4))
        service = LoadOnly()
        workers_pb2_grpc.add_PrefillWorkerServicer_to_server(service, server)
        workers_pb2_grpc.add_DecodeWorkerServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        workers = WorkerSet()
        for i, role in enumerate(ROLES):
            workers.add(f"w{i}", role, f"127.0.0.1:{port}")
        router = Router(workers, {"cpd": make_policy("cpd")}, MODEL_ID, BLOCK, mirror.match_tiers)
        requests = [RoutedRequest(f"r{i}", prompts[i % len(prompts)], None) for i in range(args.decisions)]
        latencies = []
        begin = time.perf_counter()
        for request in requests:
            t = time.perf_counter()
            router.decide(request)
            latencies.append((time.perf_counter() - t) * 1e3)
        rate = len(requests) / (time.perf_counter() - begin)
        latencies.sort()
        p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies))]
        verdicts = "met" if p99 <= 1 else "missed", "met" if rate >= 2000 else "missed"
        print(f"decision (4k-token prompt, 16 workers, hashing incl.): p50 {p50:.3f} ms, p99 {p99:.3f} ms, "
              f"{rate:,.0f} decisions/s on one thread; targets p99 <= 1 ms: {verdicts[0]}, >= 2,000/s: "
              f"{verdicts[1]}")
        workers.close()
        server.stop(0)
        mirror.stop()


if __name__ == "__main__":
    main()
