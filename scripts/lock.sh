#!/usr/bin/env bash
# Re-resolve constraints.txt from pyproject.toml (and its dev extra) in a fresh virtual environment:
# the newest versions the package index offers that satisfy pyproject.toml. Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q ".[dev]"
{
  head -2 constraints.txt
  "$tmp/venv/bin/python" -m pip freeze --all | grep -v -i -E '^(dseh|pip|setuptools|wheel)( @|==)' | LC_ALL=C sort -f
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" constraints.txt
echo "wrote constraints.txt ($(($(wc -l < constraints.txt) - 2)) pins); run bash scripts/test.sh before committing it"
