"""The SDK's error and retry rules, without a cluster: a call is retried only while nothing has been
received and only on UNAVAILABLE; every failure surfaces as a typed error."""

from __future__ import annotations

import socket

import grpc
import pytest

from splitserve import Client
from splitserve.client import InvalidRequestError, UnavailableError, _retry_delay


class Failure(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"{self._code.name} for the test"


def test_retries_only_unavailable_before_anything_was_received():
    unavailable = Failure(grpc.StatusCode.UNAVAILABLE)
    assert _retry_delay(unavailable, received=False, attempt=0, retries=2) == 0.05
    assert _retry_delay(unavailable, received=False, attempt=1, retries=2) == 0.1
    with pytest.raises(UnavailableError):
        _retry_delay(unavailable, received=False, attempt=2, retries=2)  # no tries left
    with pytest.raises(UnavailableError):
        _retry_delay(unavailable, received=True, attempt=0, retries=2)  # after the first token: never
    with pytest.raises(InvalidRequestError, match="INVALID_ARGUMENT for the test"):
        _retry_delay(Failure(grpc.StatusCode.INVALID_ARGUMENT), received=False, attempt=0, retries=2)


def test_an_unreachable_router_is_a_typed_error_after_the_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=5, retries=1) as client, pytest.raises(UnavailableError):
        client.generate([1, 2, 3], max_tokens=2)
