"""`python -m splitserve.cluster.child PARENT_PID MODULE ARGS...`: run `python -m MODULE ARGS...` so that it
dies with its supervisor; `... PARENT_PID --exec PROGRAM ARGS...` does the same for a program (it replaces
this process, and the kernel keeps the parent-death signal across the exec).

On Linux the child asks the kernel for SIGTERM when its parent goes (PR_SET_PDEATHSIG), so a supervisor
killed outright (a Ray actor's process lost, `kill -9`) leaves no orphaned worker holding a GPU or a
port. Elsewhere it runs the module unchanged. Nothing else happens here.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent went before the signal was armed
        sys.exit(1)


def tied_command(*args: str) -> list[str]:
    """The command that runs `args` (MODULE ARGS... or --exec PROGRAM ARGS...) tied to this process.

    `-P`: the child's working directory is not put on its import path. Run from a checkout, the
    repository's top-level folders (`kernels/`, `router/`, ...) would otherwise shadow installed
    distributions of the same name (transformers imports the Hugging Face `kernels` package)."""
    return [sys.executable, "-P", "-m", "splitserve.cluster.child", str(os.getpid()), *args]


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python -m splitserve.cluster.child PARENT_PID MODULE [ARGS...]")
    _die_with_parent(int(sys.argv[1]))
    if sys.argv[2] == "--exec":
        os.execv(sys.argv[3], sys.argv[3:])
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
