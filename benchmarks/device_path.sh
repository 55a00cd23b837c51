#!/usr/bin/env bash
# Makes `splitserve` importable without pip (for the lent GPU machine, whose image cannot install this
# package): builds /tmp/splitserve-path/splitserve from splitserve/ plus links to the top-level folders,
# mirroring pyproject's package-dir mapping. Usage: export PYTHONPATH=$(benchmarks/device_path.sh)
# and run Python with -P so the checkout's own splitserve/ folder does not shadow it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=/tmp/splitserve-path
rm -rf "$dest"
mkdir -p "$dest/splitserve"
cp -r "$root"/splitserve/* "$dest/splitserve/"
# The folders pyproject maps to splitserve.<name> (read from it, so a new package cannot be missed here).
for d in $(sed -n 's/^"splitserve\.[a-z_]*" = "\([a-z_]*\)"$/\1/p' "$root/pyproject.toml"); do
    ln -s "$root/$d" "$dest/splitserve/$d"
done
echo "$dest"
