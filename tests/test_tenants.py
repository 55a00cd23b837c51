"""Tenants from API keys: the file's validation, Bearer parsing, unknown and missing keys."""

from __future__ import annotations

import hashlib
import json

import pytest

from splitserve.router.tenants import Tenants, Unauthenticated


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_key_names_its_tenant(tmp_path):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"acme": digest("key-a"), "globex": digest("key-g")}))
    tenants = Tenants.from_file(path)
    assert tenants.tenant_for("Bearer key-a") == "acme"
    assert tenants.tenant_for("bearer  key-g ") == "globex"
    for bad in (None, "", "Bearer ", "Basic key-a", "Bearer key-b", "key-a"):
        with pytest.raises(Unauthenticated):
            tenants.tenant_for(bad)


@pytest.mark.parametrize(
    "content",
    [
        "{}",
        "[]",
        "not json",
        '{"a": "abc"}',
        '{"a": 3}',
        json.dumps({"": "0" * 64}),
        json.dumps({"a": "0" * 64, "b": "0" * 64}),
    ],
)
def test_bad_tenant_files_are_refused(tmp_path, content):
    path = tmp_path / "tenants.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        Tenants.from_file(path)
