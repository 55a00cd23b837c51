"""Callers → tenants: the router's API keys, and the tenant salt of every request's block hashes.

A request's prefix-cache identity includes its tenant (`HashContext.tenant_salt`), set here from the
caller's API key and never from anything the caller sends, so one tenant's prompts never hit another's
cached blocks: no cross-tenant cache-timing side channel. Without a tenants file every caller is the one
anonymous tenant (no salt) and keys are not checked.

The file is JSON, tenant name → SHA-256 hex of that tenant's API key (the router never stores keys):
    {"acme": "9f86d081884c7d65...", "globex": "60303ae22b998861..."}
Make a digest with `printf %s "$KEY" | sha256sum`. A key is compared by digest against every entry with
`hmac.compare_digest`, so the time taken says nothing about which entry, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path


class Unauthenticated(Exception):
    """The request carries no API key, or one no tenant holds."""


@dataclass(frozen=True)
class Tenants:
    digests: tuple[tuple[str, bytes], ...]  # (tenant name, SHA-256 of its API key)

    def __post_init__(self) -> None:
        names = [name for name, _ in self.digests]
        if not names:
            raise ValueError("a tenants file names at least one tenant")
        if len(set(names)) != len(names) or len({d for _, d in self.digests}) != len(names):
            raise ValueError("tenant names and API key digests must be unique")
        for name, digest in self.digests:
            if not name or len(digest) != 32:
                raise ValueError(f"tenant {name!r}: a non-empty name and a 64-hex-digit SHA-256 digest")

    @classmethod
    def from_file(cls, path: str | Path) -> Tenants:
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError(f"{path}: expected an object of tenant name → SHA-256 hex of its API key")
        try:
            return cls(tuple((name, bytes.fromhex(digest)) for name, digest in raw.items()))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant of an `Authorization: Bearer KEY` value (HTTP header or gRPC metadata). Raises
        `Unauthenticated`."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("an API key is required: Authorization: Bearer <key>")
        digest = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for name, expected in self.digests:  # every entry, whatever matched: constant time per file
            if hmac.compare_digest(digest, expected):
                found = name
        if found is None:
            raise Unauthenticated("unknown API key")
        return found
