"""The chained block hash is a cross-process contract: its bytes are pinned by fixed vectors."""

from __future__ import annotations

import hashlib
import struct

import pytest

from splitserve.engine.block_hash import HashContext, hash_block, hash_blocks

CTX = HashContext("tiny-llama@0123")


def test_fixed_vectors():
    assert CTX.root.hex() == "0ac99ed392fb84b82c8591b522920fa7ecb1f6c890aa3944b2b96e5c2f1de0b6"
    assert [h.hex() for h in hash_blocks(list(range(10)), 4, CTX)] == [
        "1ee4529b5de0c95b75cd95df357cab8718a6b7f79dc5b8aa40dfac56d6e3cbd1",
        "743ff5bd2eb78b0ad234af482a6703e2ddfb1f877bdc289136d2ba47b03af093",
    ]
    salted = HashContext("tiny-llama@0123", "tenant-a")
    assert salted.root.hex() == "cde72428fb7db262721822039cd3590bdc38bb8668d76fc3fe2cd5c40e093f87"


def test_matches_an_independent_encoding():
    # The documented encoding, written out with struct instead of array.
    root = hashlib.sha256(b"splitserve-block-hash-v1\0" + b"m" + b"\0" + b"s").digest()
    first = hashlib.sha256(root + struct.pack("<3I", 7, 8, 4_000_000_000)).digest()
    ctx = HashContext("m", "s")
    assert ctx.root == root
    assert hash_blocks([7, 8, 4_000_000_000, 1], 3, ctx) == [first]
    assert hash_block(root, [7, 8, 4_000_000_000]) == first


def test_chain_depends_on_every_earlier_token_and_the_extra_keys():
    base = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, CTX)
    assert hash_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4, CTX)[1] != base[1]  # parent changed
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, HashContext("other-model"))[0] != base[0]
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, HashContext(CTX.model_id, "t"))[0] != base[0]
    assert hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, CTX) == base  # partial tail not hashed


def test_extending_a_chain_equals_hashing_from_scratch():
    tokens = list(range(100, 150))
    full = hash_blocks(tokens, 8, CTX)
    head = hash_blocks(tokens[:24], 8, CTX)
    tail = hash_blocks(tokens, 8, CTX, parent=head[-1], start_block=3)
    assert head + tail == full
    assert len(full) == 6


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        hash_blocks([1, 2], 0, CTX)
    with pytest.raises(ValueError):
        hash_blocks([1, 2, 3, 4], 2, CTX, start_block=1)
    with pytest.raises(OverflowError):
        hash_blocks([-1, 2], 2, CTX)
    with pytest.raises(ValueError):
        HashContext("")
