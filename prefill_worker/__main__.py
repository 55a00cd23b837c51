"""`python -m splitserve.prefill_worker --model DIR --port P [--pool fresh|warm] ...`: one prefill worker."""

from __future__ import annotations

import argparse
import sys

from splitserve.kvtransfer.chunks import DEFAULT_CHUNK_BYTES
from splitserve.kvtransfer.transport import DEFAULT_KV_LANES
from splitserve.worker.process import add_worker_arguments, build_engine, run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitserve.prefill_worker", description=__doc__)
    add_worker_arguments(parser)
    parser.add_argument("--pool", default="fresh", choices=["fresh", "warm"])
    parser.add_argument("--max-chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--kv-lanes", type=int, default=DEFAULT_KV_LANES,
                        help="Push streams (each on its own connection) a gRPC transfer is striped over")
    parser.add_argument("--kv-wire-dtype", default="auto", choices=["auto", "fp8"],
                        help="auto: KV over gRPC in the cache's dtype; fp8: FP8 e4m3 with per-block scales "
                             "(half of bf16's bytes; lossy, see docs/benchmarks.md)")
    parser.add_argument("--kv-transport", default="auto", choices=["auto", "grpc"],
                        help="auto: a decode worker on this host copies the KV from this worker's "
                             "memory (CPU: shared memory; CUDA: IPC); others, or all with grpc: over gRPC")
    args = parser.parse_args(argv)

    from splitserve.engine.loop import EngineLoop
    from splitserve.prefill_worker.service import PrefillService
    from splitserve.protos import workers_pb2_grpc

    loop = EngineLoop(build_engine(args, shared_kv=args.kv_transport == "auto"))
    service = PrefillService(
        loop, pool=args.pool, max_chunk_bytes=args.max_chunk_bytes, max_queued_tokens=args.max_queued_tokens,
        kv_transport=args.kv_transport, kv_lanes=args.kv_lanes, kv_wire_dtype=args.kv_wire_dtype,
    )  # fmt: skip

    def close() -> None:
        service.close()
        loop.stop()

    run_worker(f"prefill-worker[{args.pool}]", args,
               lambda server: workers_pb2_grpc.add_PrefillWorkerServicer_to_server(service, server), close,
               loop, args.pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
