"""`splitserve down`: stop the cluster `splitserve up` started (members, embedded Redis, its Ray head)."""

from __future__ import annotations

import argparse
from pathlib import Path

from splitserve.cluster.state import default_state_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("down", help="stop the cluster started by `splitserve up`", description=__doc__)
    p.add_argument("--state-file", type=Path, default=default_state_file())
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from splitserve.cluster import launcher

    launcher.down(args.state_file)
    print("cluster down")
    return 0
