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
log=.venv/pip-install.log
if ! .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]' >"$log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -40 >&2
  echo "pip install failed; full log in $log" >&2
  exit 1
fi
# `.venv/bin/dvc repro` runs each stage's `dseh ...` command through the shell: put .venv/bin first
# on PATH for any process this environment's Python starts, so that works without activating.
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import os, sys; os.environ['PATH'] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')" > "$site/dseh_venv_path.pth"
.venv/bin/python -c "import dseh, torch, faiss, mlflow, kfp"
echo "$want" > "$stamp"
