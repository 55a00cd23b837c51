"""Chained block hashes: the prefix-cache contract shared by workers and the router. Torch-free.

A block's hash covers its parent's hash, its token ids and — through the root of the chain — the extra
keys (model identity and tenant salt). Two token sequences share a block hash only if they share every
token up to the end of that block under the same model and tenant, so a hash names a reusable KV block
anywhere in the cluster. This module is imported by the router process: stdlib only.

Encoding (version 1), fixed because other processes must agree byte for byte:
    root  = SHA-256(b"splitserve-block-hash-v1\\0" + utf8(model_id) + b"\\0" + utf8(tenant_salt or ""))
    block = SHA-256(parent + token_ids as little-endian uint32)
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NewType

BlockHash = NewType("BlockHash", bytes)  # 32 bytes of SHA-256

_DOMAIN = b"splitserve-block-hash-v1\0"
_MAX_TOKEN_ID = 2**32 - 1


@dataclass(frozen=True)
class HashContext:
    """The extra keys of a hash chain. `tenant_salt` is set server-side, never by the client."""

    model_id: str
    tenant_salt: str | None = None

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("HashContext.model_id must be a non-empty string")

    @cached_property
    def root(self) -> BlockHash:
        salt = (self.tenant_salt or "").encode()
        return BlockHash(hashlib.sha256(_DOMAIN + self.model_id.encode() + b"\0" + salt).digest())


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    packed = array("I", token_ids)  # raises OverflowError on negative or > 2**32-1 ids
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The hash of one block of tokens whose preceding chain ends in `parent`."""
    return BlockHash(hashlib.sha256(parent + _token_bytes(token_ids)).digest())


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    ctx: HashContext,
    *,
    parent: BlockHash | None = None,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids`, from block `start_block` on.

    `parent` is the hash of block `start_block - 1` (the chain root when `start_block` is 0), so a caller
    can extend a chain it already holds without rehashing it. A trailing partial block is not hashed.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if start_block > 0 and parent is None:
        raise ValueError("hash_blocks needs the parent hash when start_block > 0")
    prev = ctx.root if parent is None else parent
    num_full = len(token_ids) // block_size
    if num_full <= start_block:
        return []
    data = _token_bytes(token_ids[start_block * block_size : num_full * block_size])
    step = block_size * 4
    blocks = [data[offset : offset + step] for offset in range(0, len(data), step)]
    # The router hashes every prompt on its decision path: a tight loop (no per-block NewType call)
    # halves the cost of a 4k-token chain.
    hashes: list[BlockHash] = []
    append, sha256 = hashes.append, hashlib.sha256
    for block in blocks:
        prev = sha256(prev + block).digest()  # type: ignore[assignment]  (a BlockHash)
        append(prev)
    return hashes
