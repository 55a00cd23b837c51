"""The same-host path of a KV transfer: the receiver reads the sender's blocks straight from its memory.

A sender exports its whole per-layer caches once (`export_source`): on CPU the engine keeps them in a
memfd (`CacheConfig.shared_memory`) that the receiver maps read-only through /proc/<pid>/fd/<fd>; on
CUDA, one IPC memory handle per layer's cache tensor. Chunks then carry block ids instead of bytes and
the receiver copies those blocks into the ones it reserved (`SourceMaps`). The receiver is the only
writer of its own memory, and the sender keeps the blocks a transfer names pinned until the Push RPC
has returned, so neither side can see the other's recycled blocks.

Both processes must be on one host (same boot id and pid namespace: `host_id`) and, on CPU, run as the
same user. Mapping a source gives read access to the sender's whole cache: workers of one deployment
trust each other on a host (as with any shared-memory transport).
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings

import torch

from splitserve.kvtransfer.chunks import block_bytes
from splitserve.kvtransfer.errors import MalformedChunk
from splitserve.protos import common_pb2, kvtransfer_pb2

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# This process's exported caches: a receiver in the same process (one-process deployments, tests) uses
# them as they are (CUDA cannot open its own IPC handles).
_EXPORTED: dict[bytes, list[torch.Tensor]] = {}


def host_id() -> str:
    """This host and pid namespace: equal ids mean the other process's /proc/<pid> is ours to open."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"


def readable_devices() -> list[str]:
    """The cache devices a receiver here can read a same-host source from."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def export_source(kv_caches: list[torch.Tensor], kv_memfd: int | None) -> kvtransfer_pb2.KVSource | None:
    """The source describing these caches, or None when they cannot be shared (CPU caches outside a
    memfd). Call once per engine: CUDA handles stay valid while the caches live."""
    source = kvtransfer_pb2.KVSource(host_id=host_id(), num_blocks=kv_caches[0].shape[1], pid=os.getpid())
    if kv_caches[0].device.type == "cuda":
        for cache in kv_caches:
            (device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = (
                cache.untyped_storage()._share_cuda_()
            )
            source.cuda.layers.add(
                device=device, handle=handle, storage_bytes=size, offset_bytes=offset,
                ref_counter_handle=rc_handle, ref_counter_offset=rc_offset,
                event_handle=ev_handle or b"", event_sync_required=ev_sync,
            )  # fmt: skip
        source.cuda.device_uuid = str(torch.cuda.get_device_properties(kv_caches[0].device).uuid)
    elif kv_memfd is None:
        return None
    else:
        nbytes = sum(cache.numel() * cache.element_size() for cache in kv_caches)
        source.shm.CopyFrom(kvtransfer_pb2.SharedMemorySource(fd=kv_memfd, nbytes=nbytes))
    _EXPORTED[source_key(source)] = kv_caches
    return source


def source_key(source: kvtransfer_pb2.KVSource) -> bytes:
    return source.SerializeToString(deterministic=True)


class SourceMaps:
    """The receiver's mappings of senders' caches, opened on first use and kept (a sender's caches live
    as long as it does; a restarted sender exports a new source). Thread-safe."""

    def __init__(self, layout: common_pb2.KVLayout, device: torch.device, max_sources: int = 64) -> None:
        self.layout = layout
        self.device = device
        self.max_sources = max_sources
        self._maps: dict[bytes, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def caches(self, source: kvtransfer_pb2.KVSource) -> list[torch.Tensor]:
        """The sender's per-layer caches [2, num_blocks, block_size, kv_heads, head_dim] (read them
        only). Raises `MalformedChunk` for a source this receiver cannot map."""
        key = source_key(source)
        with self._lock:
            if key not in self._maps:
                if len(self._maps) >= self.max_sources:  # senders restarted many times: drop the oldest
                    self._maps.pop(next(iter(self._maps)))
                self._maps[key] = self._open(source)
            return self._maps[key]

    def _open(self, source: kvtransfer_pb2.KVSource) -> list[torch.Tensor]:
        if source.host_id != host_id():
            raise MalformedChunk("a same-host source from another host")
        if source.pid == os.getpid() and source_key(source) in _EXPORTED:
            return _EXPORTED[source_key(source)]
        layout, num_blocks = self.layout, source.num_blocks
        shape = (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        layer_bytes = num_blocks * block_bytes(layout)
        dtype = _DTYPES[layout.dtype]
        kind = source.WhichOneof("memory")
        if kind == "shm" and self.device.type == "cpu":
            return _map_shm(source.pid, source.shm, shape, dtype, layer_bytes, layout.num_layers)
        if kind == "cuda" and self.device.type == "cuda":
            return _open_cuda(source.cuda, shape, dtype, layer_bytes, layout.num_layers)
        raise MalformedChunk(f"a same-host source in {kind!r} memory for a receiver on {self.device.type}")


def _map_shm(pid: int, shm, shape, dtype, layer_bytes: int, num_layers: int) -> list[torch.Tensor]:
    if shm.nbytes != layer_bytes * num_layers:
        need = layer_bytes * num_layers
        raise MalformedChunk(f"a shared KV source of {shm.nbytes} bytes; the layout needs {need}")
    try:
        fd = os.open(f"/proc/{pid}/fd/{shm.fd}", os.O_RDONLY)
    except OSError as exc:
        raise MalformedChunk(f"cannot open the sender's KV memory: {exc}") from exc
    try:
        memory = mmap.mmap(fd, shm.nbytes, prot=mmap.PROT_READ)  # read-only: a stray write faults
    finally:
        os.close(fd)  # the mapping keeps the memory
    with warnings.catch_warnings():  # torch warns about read-only buffers; these are only read
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(memory, dtype=torch.uint8)
    layers = [flat[i * layer_bytes : (i + 1) * layer_bytes] for i in range(num_layers)]
    return [layer.view(dtype).view(shape) for layer in layers]


def _open_cuda(cuda, shape, dtype, layer_bytes: int, num_layers: int) -> list[torch.Tensor]:
    if len(cuda.layers) != num_layers:
        raise MalformedChunk(f"a CUDA KV source of {len(cuda.layers)} layers; the layout has {num_layers}")
    caches = []
    for layer in cuda.layers:
        if layer.storage_bytes < layer_bytes:
            raise MalformedChunk(f"a CUDA source layer of {layer.storage_bytes} bytes; needs {layer_bytes}")
        storage = torch.UntypedStorage._new_shared_cuda(
            layer.device, layer.handle, layer.storage_bytes, layer.offset_bytes, layer.ref_counter_handle,
            layer.ref_counter_offset, layer.event_handle or None, layer.event_sync_required,
        )  # fmt: skip
        tensor = torch.empty(0, dtype=dtype, device=torch.device("cuda", layer.device))
        caches.append(tensor.set_(storage, 0, shape, torch.empty(shape, device="meta").stride()))
    return caches


def copy_blocks(
    dst: torch.Tensor, dst_ids: list[int], src: torch.Tensor, src_ids: list[int]
) -> None:
    """dst[:, dst_ids] = src[:, src_ids], across processes' memory (synchronous: done on return)."""
    index = torch.tensor(src_ids, dtype=torch.int64, device=src.device)
    blocks = src.index_select(1, index).to(dst.device)
    dst.index_copy_(1, torch.tensor(dst_ids, dtype=torch.int64, device=dst.device), blocks)
    if dst.device.type == "cuda":
        torch.cuda.current_stream(dst.device).synchronize()
