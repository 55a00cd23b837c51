"""Dependencies point one way: kernels → nothing; engine → kernels; workers → engine, kvtransfer, protos;
router → protos and the torch-free hashing module only. Checked on the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "kernels", "router", "prefill_worker", "decode_worker", "kvtransfer", "protos", "index",
            "cluster", "experiments", "simulator", "worker")

ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "engine": {"kernels"},
    "kvtransfer": {"engine", "kernels", "protos", "index"},  # its transport module is the workers' toolkit
    "prefill_worker": {"engine", "kernels", "kvtransfer", "protos", "index", "worker"},
    "decode_worker": {"engine", "kernels", "kvtransfer", "protos", "index", "worker"},
    # A worker process's setup (engine options, server, publisher), shared by both kinds.
    "worker": {"engine", "kernels", "kvtransfer", "protos", "index"},
    "router": {"protos", "index", "engine.block_hash", "engine.errors", "engine.sampling_params",
               "engine.model_config"},
    "protos": set(),
    # The publisher is a BlockPool listener, so it names BlockEvent (block_pool is torch-free too).
    "index": {"engine.block_hash", "engine.block_pool"},
    # Orchestration: it starts the entry points as processes (never imports the workers) and asks the
    # router through the client SDK whether every worker registered.
    "cluster": {"router", "index", "client", "worker.options"},
    # Experiments drive a cluster from outside: through the client SDK, with the router's policy and
    # decision-log records, plain processes started like the supervisor starts them, an embedded Redis.
    "experiments": {"client", "router", "cluster.supervisor", "cluster.child", "index.redis_server"},
    # The simulator runs the router's policies over the experiments' traces and reports; its workers
    # report their step time as the engine loop does (engine.config's torch-free average).
    "simulator": {"router", "experiments.trace", "experiments.sessions", "experiments.results",
                  "experiments.workloads", "experiments.report", "experiments.metrics", "engine.config"},
}
TORCH_FREE = {"router", "protos", "index", "cluster", "experiments", "simulator", "splitserve/client.py",
              "engine/block_hash.py", "engine/block_pool.py", "engine/config.py", "engine/errors.py",
              "engine/sampling_params.py", "engine/model_config.py", "worker/options.py"}
HEAVY = ("torch", "triton", "transformers", "numpy", "safetensors")


def imports_of(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_internal_imports_follow_the_layering(package):
    allowed = ALLOWED[package]
    for path in sources(package):
        for name in imports_of(path):
            if not name.startswith("splitserve."):
                continue
            target = name.removeprefix("splitserve.")
            top = target.split(".")[0]
            if top == package:
                continue
            ok = top in allowed or any(target == a or target.startswith(a + ".") for a in allowed)
            assert ok, f"{path.relative_to(ROOT)} imports {name}; {package} may import only {sorted(allowed)}"


def test_torch_free_modules_import_no_heavy_libraries():
    checked = 0
    for entry in TORCH_FREE:
        paths = sources(entry) if (ROOT / entry).is_dir() else [ROOT / entry]
        for path in paths:
            checked += 1
            for name in imports_of(path):
                root = name.split(".")[0]
                assert root not in HEAVY, f"{path.relative_to(ROOT)} imports {name}"
                if name.startswith("splitserve.engine."):
                    assert f"engine/{name.split('.')[2]}.py" in TORCH_FREE, f"{path} imports {name}"
    assert checked >= 5


def test_the_layering_check_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom splitserve.engine.model import DecoderLM\n")
    assert imports_of(bad) == ["torch", "splitserve.engine.model"]


def test_the_router_process_and_the_orchestration_never_load_torch():
    """At run time too: everything `python -m splitserve.router` and `splitserve up` import."""
    import subprocess
    import sys

    code = (
        "import sys, splitserve.router.__main__, splitserve.cluster.launcher, splitserve.cli.up; "
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
