"""The service definitions: committed stubs match the .proto files, and they import without torch."""

from __future__ import annotations

import subprocess
import sys

from splitserve.protos import generate, kvtransfer_pb2


def test_committed_stubs_are_current():
    assert generate.stale_stubs() == [], "run: python -m splitserve.protos.generate"


def test_stubs_import_without_torch():
    code = (
        "import sys; from splitserve.protos import workers_pb2_grpc, kvtransfer_pb2_grpc, common_pb2; "
        "assert 'torch' not in sys.modules, 'protos pulled in torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunk_round_trip_keeps_raw_bytes():
    chunk = kvtransfer_pb2.KVChunk(lease_id="l1", seq=3, layer=2, first_block=4, num_blocks=2,
                                   data=bytes(range(256)) * 4, crc32=7, last=True)
    back = kvtransfer_pb2.KVChunk.FromString(chunk.SerializeToString())
    assert back == chunk and back.data == bytes(range(256)) * 4
