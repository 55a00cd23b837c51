"""`python -m splitserve.decode_worker --model DIR --port P [--lease-ttl S] ...`: one decode worker
(serving DecodeWorker and KVTransfer on one port)."""

from __future__ import annotations

import argparse
import sys

from splitserve.worker.process import add_worker_arguments, build_engine, run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitserve.decode_worker", description=__doc__)
    add_worker_arguments(parser)
    parser.add_argument("--lease-ttl", type=float, default=10.0, help="seconds a transfer may stall")
    args = parser.parse_args(argv)

    from splitserve.decode_worker.service import DecodeService
    from splitserve.engine.loop import EngineLoop
    from splitserve.kvtransfer.transport import add_kvtransfer_servicer
    from splitserve.protos import workers_pb2_grpc

    loop = EngineLoop(build_engine(args, shared_kv=True))  # same-host fetches read its cache
    service = DecodeService(loop, lease_ttl_s=args.lease_ttl, max_queued_tokens=args.max_queued_tokens)

    def add(server) -> None:
        add_kvtransfer_servicer(service, server)
        workers_pb2_grpc.add_DecodeWorkerServicer_to_server(service, server)

    def close() -> None:
        service.close()
        loop.stop()

    run_worker("decode-worker", args, add, close, loop, "decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
