"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before triton
# itself is first imported (its library functions are bound at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory `tiny_model(arch="llama", **spec_overrides) -> Path`: a random-weight checkpoint, built
    once per session for each distinct (arch, overrides)."""
    built: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def build(arch: str = "llama", **overrides: Any) -> Path:
        from splitserve.tiny_model import TinyModelSpec, make_tiny_model

        key = (arch, tuple(sorted(overrides.items())))
        if key not in built:
            spec = TinyModelSpec(arch=arch, **overrides)
            built[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), spec)
        return built[key]

    return build


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests on machines without CUDA (CI has none; the device machine runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
