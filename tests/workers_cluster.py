"""In-process workers for the worker tests: one prefill and one decode worker, each with its own engine
on its own loop thread, serving on localhost over real gRPC."""

from __future__ import annotations

import subprocess
import sys

from splitserve import LLM, SamplingParams
from splitserve.cluster.supervisor import parse_announcement
from splitserve.decode_worker.service import DecodeService
from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.kvtransfer.transport import add_kvtransfer_servicer, channel, make_server
from splitserve.prefill_worker.service import PrefillService
from splitserve.protos import kvtransfer_pb2_grpc, workers_pb2, workers_pb2_grpc

GREEDY = {"temperature": 0.0, "ignore_eos": True}


class Cluster:
    """One prefill and one decode worker, each with its own engine, serving on localhost (both also serve
    KVTransfer/Fetch), and with `warm` a second prefill worker (`warm_prefiller`). `transport`: "grpc",
    "grpc-striped" (each transfer's layers over 2 lanes) or "same-host"."""

    def __init__(self, model, transport="grpc", num_blocks=256, lease_ttl_s=10.0, max_chunk_bytes=4096,
                 kv_wire_dtype="auto", warm=False, host_kv_gib=0.0):  # fmt: skip
        def engine(n, **kw):
            return LLM(str(model), num_blocks=n, block_size=8, max_num_seqs=16, host_kv_gib=host_kv_gib,
                       **kw).engine  # fmt: skip

        same_host = transport == "same-host"
        self.prefill_loop = EngineLoop(engine(256, shared_memory=same_host))
        self.decode_loop = EngineLoop(engine(num_blocks, shared_memory=same_host))
        self.decode = DecodeService(self.decode_loop, lease_ttl_s=lease_ttl_s)
        self.prefill = PrefillService(self.prefill_loop, max_chunk_bytes=max_chunk_bytes,
                                      kv_transport="auto" if same_host else "grpc",
                                      kv_lanes=2 if transport == "grpc-striped" else 1,
                                      kv_wire_dtype=kv_wire_dtype)  # fmt: skip
        self.decode_server, port = make_server("127.0.0.1:0")
        add_kvtransfer_servicer(self.decode, self.decode_server)
        workers_pb2_grpc.add_DecodeWorkerServicer_to_server(self.decode, self.decode_server)
        self.decode_address = f"127.0.0.1:{port}"
        self.decode_server.start()
        self.channels = [channel(self.decode_address)]
        self.kv = kvtransfer_pb2_grpc.KVTransferStub(self.channels[0])
        self.decoder = workers_pb2_grpc.DecodeWorkerStub(self.channels[0])
        self.loops = [self.prefill_loop, self.decode_loop]
        self.servers, self.services = [self.decode_server], [self.decode]
        self.prefiller, self.prefill_address = self._serve_prefill(self.prefill)
        self.prefill_server = self.servers[-1]
        if warm:
            self.warm_loop = EngineLoop(engine(256, shared_memory=same_host))
            self.loops.append(self.warm_loop)
            self.warm = PrefillService(self.warm_loop, "warm", max_chunk_bytes=max_chunk_bytes,
                                       kv_transport="auto" if same_host else "grpc")  # fmt: skip
            self.warm_prefiller, self.warm_address = self._serve_prefill(self.warm)
        self.free_at_start = self.free_blocks()

    def _serve_prefill(self, service):
        server, port = make_server("127.0.0.1:0")
        workers_pb2_grpc.add_PrefillWorkerServicer_to_server(service, server)
        add_kvtransfer_servicer(service, server)
        server.start()
        self.servers.append(server)
        self.services.append(service)
        self.channels.append(channel(f"127.0.0.1:{port}"))
        return workers_pb2_grpc.PrefillWorkerStub(self.channels[-1]), f"127.0.0.1:{port}"

    def free_blocks(self):
        """Each engine's free blocks (prefill, decode[, warm])."""
        return tuple(loop.call(lambda e=loop.engine: e.block_pool.num_free_blocks) for loop in self.loops)

    def generate(self, rid, prompt, max_tokens, prefiller=None, holder=None, sampling=None):
        """As a router does: Generate starts on the first token, while the KV may still be travelling.
        Returns (tokens, the prefill worker's transfer report). `holder`: a KVHolder to fetch from;
        `sampling`: SamplingParams fields (greedy when None)."""
        sampling = sampling_to_proto(SamplingParams(max_tokens=max_tokens, **(sampling or GREEDY)))
        replies = (prefiller or self.prefiller).Prefill(workers_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling, decode_address=self.decode_address,
            kv_holder=holder))
        first = next(replies)
        stream = self.decoder.Generate(workers_pb2.GenerateRequest(
            request_id=rid, lease_id=first.lease_id, first_token_id=first.first_token_id))
        done = next(replies)
        assert done.transfer_done and done.lease_id == first.lease_id
        done.num_fetched_blocks, done.fetch_fallback = first.num_fetched_blocks, first.fetch_fallback
        tokens = [first.first_token_id] + [t for chunk in stream for t in chunk.token_ids]
        return tokens, done

    def close(self):
        for ch in self.channels:
            ch.close()
        for server in self.servers:
            server.stop(0).wait()
        for service in self.services:
            service.close()
        for loop in self.loops:
            loop.stop()


def offline(model, prompts, max_tokens):
    llm = LLM(str(model), num_blocks=256, block_size=8)
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]




def start_process(args: list[str], stderr=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """`python -m ARGS...` (a worker or the router), once it prints "<name> listening on HOST:PORT".
    Returns the process and that address."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = proc.stdout.readline()
    announced = parse_announcement(line)
    if announced is None:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    address, proc.http_address = announced  # the HTTP one: a router started with --http-port
    return proc, address
