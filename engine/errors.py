"""Typed errors raised at the engine's boundaries. Torch-free.

All are `ValueError` subclasses so callers that only know "bad input" can catch them as such; the
service layers map them to gRPC / HTTP status codes.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the engine will not run: empty or over-long prompt, bad sampling values."""


class UnsupportedModel(ValueError):
    """A checkpoint whose architecture or options the engine does not implement."""


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or holds tensors of the wrong names or shapes."""
