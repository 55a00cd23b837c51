"""splitserve: an LLM serving cluster that splits prefill from decode and routes by prefix-cache state.

The public names are imported lazily so that torch-free parts (the router, the client SDK) can import
`splitserve.*` without pulling in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "splitserve.llm",
    "SamplingParams": "splitserve.engine.sampling_params",
    "RequestOutput": "splitserve.engine.outputs",
    "CompletionOutput": "splitserve.engine.outputs",
    "Client": "splitserve.client",
    "AsyncClient": "splitserve.client",
}

if TYPE_CHECKING:
    from splitserve.client import AsyncClient, Client
    from splitserve.engine.outputs import CompletionOutput, RequestOutput
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.llm import LLM

__all__ = [
    "LLM", "AsyncClient", "Client", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
