from splitserve.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_STATE_UNSPECIFIED: _ClassVar[TransferState]
    RESERVED: _ClassVar[TransferState]
    RECEIVING: _ClassVar[TransferState]
    COMPLETE: _ClassVar[TransferState]
    ABORTED: _ClassVar[TransferState]
    EXPIRED: _ClassVar[TransferState]
    FAILED: _ClassVar[TransferState]
TRANSFER_STATE_UNSPECIFIED: TransferState
RESERVED: TransferState
RECEIVING: TransferState
COMPLETE: TransferState
ABORTED: TransferState
EXPIRED: TransferState
FAILED: TransferState

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "layout", "prompt_token_ids", "sampling", "cache_salt", "lease_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: _common_pb2.KVLayout
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    cache_salt: str
    lease_ms: int
    def __init__(self, request_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., cache_salt: _Optional[str] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class ReserveReply(_message.Message):
    __slots__ = ("lease_id", "num_cached_blocks", "num_blocks", "lease_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    num_cached_blocks: int
    num_blocks: int
    lease_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., num_cached_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("lease_id", "seq", "layer", "first_block", "num_blocks", "data", "crc32", "last")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    seq: int
    layer: int
    first_block: int
    num_blocks: int
    data: bytes
    crc32: int
    last: bool
    def __init__(self, lease_id: _Optional[str] = ..., seq: _Optional[int] = ..., layer: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("state", "chunks_received", "bytes_received")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    state: TransferState
    chunks_received: int
    bytes_received: int
    def __init__(self, state: _Optional[_Union[TransferState, str]] = ..., chunks_received: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: TransferState
    def __init__(self, state: _Optional[_Union[TransferState, str]] = ...) -> None: ...
