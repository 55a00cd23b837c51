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

class FetchRequest(_message.Message):
    __slots__ = ("request_id", "layout", "block_hashes", "first_block", "host_id", "same_host_devices")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SAME_HOST_DEVICES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: _common_pb2.KVLayout
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    first_block: int
    host_id: str
    same_host_devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., first_block: _Optional[int] = ..., host_id: _Optional[str] = ..., same_host_devices: _Optional[_Iterable[str]] = ...) -> None: ...

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
    __slots__ = ("lease_id", "num_cached_blocks", "num_blocks", "lease_ms", "host_id", "same_host_devices")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SAME_HOST_DEVICES_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    num_cached_blocks: int
    num_blocks: int
    lease_ms: int
    host_id: str
    same_host_devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_id: _Optional[str] = ..., num_cached_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ..., lease_ms: _Optional[int] = ..., host_id: _Optional[str] = ..., same_host_devices: _Optional[_Iterable[str]] = ...) -> None: ...

class KVSource(_message.Message):
    __slots__ = ("host_id", "num_blocks", "shm", "cuda", "pid")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    num_blocks: int
    shm: SharedMemorySource
    cuda: CudaIpcSource
    pid: int
    def __init__(self, host_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., shm: _Optional[_Union[SharedMemorySource, _Mapping]] = ..., cuda: _Optional[_Union[CudaIpcSource, _Mapping]] = ..., pid: _Optional[int] = ...) -> None: ...

class SharedMemorySource(_message.Message):
    __slots__ = ("fd", "nbytes")
    FD_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    fd: int
    nbytes: int
    def __init__(self, fd: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class CudaIpcSource(_message.Message):
    __slots__ = ("layers", "device_uuid")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[CudaIpcStorage]
    device_uuid: str
    def __init__(self, layers: _Optional[_Iterable[_Union[CudaIpcStorage, _Mapping]]] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class CudaIpcStorage(_message.Message):
    __slots__ = ("device", "handle", "storage_bytes", "offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    device: int
    handle: bytes
    storage_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, device: _Optional[int] = ..., handle: _Optional[bytes] = ..., storage_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("lease_id", "seq", "layer", "first_block", "num_blocks", "data", "crc32", "last", "src_block_ids", "source", "lane", "num_lanes", "encoding", "total_blocks", "fletcher")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SRC_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    NUM_LANES_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FLETCHER_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    seq: int
    layer: int
    first_block: int
    num_blocks: int
    data: bytes
    crc32: int
    last: bool
    src_block_ids: _containers.RepeatedScalarFieldContainer[int]
    source: KVSource
    lane: int
    num_lanes: int
    encoding: str
    total_blocks: int
    fletcher: int
    def __init__(self, lease_id: _Optional[str] = ..., seq: _Optional[int] = ..., layer: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., last: _Optional[bool] = ..., src_block_ids: _Optional[_Iterable[int]] = ..., source: _Optional[_Union[KVSource, _Mapping]] = ..., lane: _Optional[int] = ..., num_lanes: _Optional[int] = ..., encoding: _Optional[str] = ..., total_blocks: _Optional[int] = ..., fletcher: _Optional[int] = ...) -> None: ...

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
