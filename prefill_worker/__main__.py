"""`python -m splitserve.prefill_worker --model DIR --port P [--pool fresh|warm] ...`: one prefill worker."""

from __future__ import annotations

import argparse
import sys

from splitserve.kvtransfer.chunks import DEFAULT_CHUNK_BYTES
from splitserve.worker.options import KVOptions
from splitserve.worker.process import add_worker_arguments, build_engine, run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitserve.prefill_worker", description=__doc__)
    add_worker_arguments(parser)
    parser.add_argument("--pool", default="fresh", choices=["fresh", "warm"])
    parser.add_argument("--max-chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    KVOptions.add_arguments(parser)
    args = parser.parse_args(argv)
    kv = KVOptions.from_args(args)

    from splitserve.engine.loop import EngineLoop
    from splitserve.kvtransfer.transport import add_kvtransfer_servicer
    from splitserve.prefill_worker.service import PrefillService
    from splitserve.protos import workers_pb2_grpc

    loop = EngineLoop(build_engine(args, shared_kv=kv.transport == "auto"))
    service = PrefillService(
        loop, pool=args.pool, max_chunk_bytes=args.max_chunk_bytes, max_queued_tokens=args.max_queued_tokens,
        kv_transport=kv.transport, kv_lanes=kv.lanes, kv_wire_dtype=kv.wire_dtype,
    )  # fmt: skip

    def add(server) -> None:
        workers_pb2_grpc.add_PrefillWorkerServicer_to_server(service, server)
        add_kvtransfer_servicer(service, server)  # Fetch: other workers take blocks this one holds

    def close() -> None:
        service.close()
        loop.stop()

    run_worker(f"prefill-worker[{args.pool}]", args, add, close, loop, args.pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
