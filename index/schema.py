"""The prefix index's data model in Redis: key names and record encodings, shared by workers and routers.

Keys, under a namespace (default `spx`):
    {ns}:workers            SET of worker ids: an enumeration only; an id counts while its lease exists.
    {ns}:lease:{worker_id}  STRING msgpack registration (who the worker is, its epoch), PX = lease TTL,
                            renewed by the worker's heartbeat. Liveness and identity live in one key, so a
                            worker is never live without its description.
    {ns}:blocks:{worker_id} SET of raw 32-byte block hashes the worker holds (in either tier), same TTL as
                            the lease, so a dead worker's blocks vanish with no cleanup.
    {ns}:host:{worker_id}   SET of those of its hashes it holds in its host-memory tier only (loaded back
                            before use; a subset of its blocks set), same TTL. Absent: none.
    {ns}:events             STREAM of msgpack records, one per block event, field `r`, trimmed ~MAXLEN.

A record is {w: worker id, e: epoch, s: seq, k: "S"|"H"|"E"|"R", h: [hashes]}: "S" (stored) the hashes are
held in KV memory (GPU) now, "H" (host) held in the host tier only now (spilled from KV memory), "E"
(evicted) held no more. `e` is random per publisher start; `s` counts that publisher's records from 1 with
no gaps. "R" (reset) says the worker's sets were rewritten (or deleted) wholesale: a reader reloads that
worker from its sets. Each record is written in the same MULTI/EXEC as the set changes it describes, so the
sets and the stream never disagree about order.
msgpack only; nothing in the index is pickled. This module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import msgpack

from splitserve.engine.block_hash import BlockHash, HashContext, hash_blocks

ROLES = ("fresh", "warm", "decode")
RECORD_FIELD = b"r"
HASH_LEN = 32
# The probe a router hashes to check that a worker computes the same chain (model identity and salt
# included) before trusting its blocks.
PROBE_SALT = "splitserve-index-probe"


class IndexRecordError(ValueError):
    """A registration or stream record that does not decode to the schema (wrong version or corrupt)."""


@dataclass(frozen=True)
class Keys:
    namespace: str = "spx"

    @property
    def workers(self) -> str:
        return f"{self.namespace}:workers"

    @property
    def events(self) -> str:
        return f"{self.namespace}:events"

    def lease(self, worker_id: str) -> str:
        return f"{self.namespace}:lease:{worker_id}"

    def blocks(self, worker_id: str) -> str:
        return f"{self.namespace}:blocks:{worker_id}"

    def host(self, worker_id: str) -> str:
        return f"{self.namespace}:host:{worker_id}"


def probe_hash(model_id: str, block_size: int) -> BlockHash:
    """The first block hash of the probe sequence 0..block_size-1 under `model_id` and the probe salt."""
    return hash_blocks(list(range(block_size)), block_size, HashContext(model_id, PROBE_SALT))[0]


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker tells routers about itself when it registers."""

    worker_id: str
    role: str  # one of ROLES
    address: str
    model_id: str
    block_size: int
    probe: BlockHash | None = None  # probe_hash(model_id, block_size) as this worker computes it
    device: str = ""  # the compute device it runs on ("cuda:<GPU UUID>", "cpu:<host>"); "" = not said

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must be non-empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.probe is not None and len(self.probe) != HASH_LEN:
            raise ValueError(f"probe must be a {HASH_LEN}-byte hash")

    def agrees_with(self, model_id: str, block_size: int) -> bool:
        """Whether this worker hashes blocks exactly as a router configured with these values does."""
        return (self.model_id == model_id and self.block_size == block_size
                and self.probe == probe_hash(model_id, block_size))


class Registration(NamedTuple):
    info: WorkerInfo
    epoch: int


class RecordKind(Enum):
    STORED = "S"
    HOST = "H"
    EVICTED = "E"
    RESET = "R"


class Record(NamedTuple):
    worker_id: str
    epoch: int
    seq: int
    kind: RecordKind
    block_hashes: tuple[BlockHash, ...] = ()


def encode_registration(reg: Registration) -> bytes:
    i = reg.info
    return msgpack.packb({"w": i.worker_id, "role": i.role, "addr": i.address, "model": i.model_id,
                          "bs": i.block_size, "probe": i.probe, "dev": i.device, "e": reg.epoch},
                         use_bin_type=True)  # fmt: skip


def decode_registration(data: bytes) -> Registration:
    m = _unpack_map(data)
    try:
        info = WorkerInfo(m["w"], m["role"], m["addr"], m["model"], m["bs"],
                          BlockHash(m["probe"]) if m["probe"] is not None else None,
                          m.get("dev", ""))  # fmt: skip
        if not isinstance(info.device, str):
            raise TypeError("device is not a string")
        epoch = m["e"]
    except (KeyError, TypeError, ValueError) as e:
        raise IndexRecordError(f"bad worker registration: {e}") from e
    if not isinstance(epoch, int):
        raise IndexRecordError("bad worker registration: epoch is not an int")
    return Registration(info, epoch)


def encode_record(rec: Record) -> bytes:
    return msgpack.packb({"w": rec.worker_id, "e": rec.epoch, "s": rec.seq, "k": rec.kind.value,
                          "h": list(rec.block_hashes)}, use_bin_type=True)


def decode_record(data: bytes) -> Record:
    m = _unpack_map(data)
    try:
        worker_id, epoch, seq, kind, hashes = m["w"], m["e"], m["s"], RecordKind(m["k"]), m["h"]
    except (KeyError, ValueError) as e:
        raise IndexRecordError(f"bad index record: {e}") from e
    if not (isinstance(worker_id, str) and worker_id and isinstance(epoch, int) and isinstance(seq, int)
            and seq >= 1 and isinstance(hashes, list)):
        raise IndexRecordError("bad index record: field types")
    if not all(isinstance(h, bytes) and len(h) == HASH_LEN for h in hashes):
        raise IndexRecordError(f"bad index record: hashes must be {HASH_LEN} bytes")
    return Record(worker_id, epoch, seq, kind, tuple(BlockHash(h) for h in hashes))


def _unpack_map(data: bytes) -> dict[str, Any]:
    try:
        m = msgpack.unpackb(data, raw=False)
    except ValueError as e:  # msgpack raises ValueError subclasses for every malformed input
        raise IndexRecordError(f"not msgpack: {e}") from e
    if not isinstance(m, dict):
        raise IndexRecordError("not a msgpack map")
    return m
