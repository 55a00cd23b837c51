"""Generates the Python stubs (messages, .pyi, gRPC services) from the .proto files in this folder.

`python -m splitserve.protos.generate` rewrites them; `--check` exits 1 when the committed stubs differ
from freshly generated ones (CI runs the same comparison as a test). The .proto files import each other
as "splitserve/protos/NAME.proto", so the generated modules import `splitserve.protos.NAME_pb2`. Needs
grpcio-tools (pinned in the dev extra so that every machine generates identical stubs that import under
the oldest grpcio we run on).
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("common.proto", "kvtransfer.proto", "workers.proto", "router.proto")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_names() -> list[str]:
    return [Path(p).stem + s for p in PROTOS for s in SUFFIXES]


def generate(out_dir: Path) -> None:
    """Write every stub into `out_dir`."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "out")
        (src / "splitserve").mkdir(parents=True)
        (src / "splitserve" / "protos").symlink_to(PROTO_DIR)
        dst.mkdir()
        include = importlib.resources.files("grpc_tools") / "_proto"
        args = [
            "grpc_tools.protoc", f"-I{src}", f"-I{include}",
            f"--python_out={dst}", f"--pyi_out={dst}", f"--grpc_python_out={dst}",
            *(f"splitserve/protos/{name}" for name in PROTOS),
        ]  # fmt: skip
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for name in generated_names():
            shutil.copyfile(dst / "splitserve" / "protos" / name, out_dir / name)


def stale_stubs() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones (or are missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = {name: Path(tmp, name) for name in generated_names()}
        return [
            name for name, path in fresh.items()
            if not (PROTO_DIR / name).exists() or not filecmp.cmp(path, PROTO_DIR / name, shallow=False)
        ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale protobuf stubs: {', '.join(stale)}; run python -m splitserve.protos.generate")
        return 1 if stale else 0
    generate(PROTO_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
