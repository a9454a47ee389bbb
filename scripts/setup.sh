#!/usr/bin/env bash
# Create (or refresh) the project environment in .venv/ from the pinned constraints.
# Idempotent: reinstalls only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.dseh-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (pinned by constraints.txt; a few minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
set +o pipefail
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]' 2>&1 | grep -v -e "is ignored: it is neither a file nor a directory" -e BuildBackendWarning
status=${PIPESTATUS[0]}
set -o pipefail
[ "$status" -eq 0 ] || { echo "pip install failed (exit $status)" >&2; exit "$status"; }
# `.venv/bin/dvc repro` runs each stage's `dseh ...` command through the shell: put .venv/bin first
# on PATH for any process this environment's Python starts, so that works without activating.
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import os, sys; os.environ['PATH'] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')" > "$site/dseh_venv_path.pth"
.venv/bin/python -c "import dseh, torch, faiss, mlflow, kfp"
echo "$want" > "$stamp"
