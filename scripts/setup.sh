#!/usr/bin/env bash
# Create (or refresh) the project environment in .venv/ from the pinned constraints.
# Idempotent: reinstalls only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Real images for data.source=fashion-mnist / fashion-mosaic: Debian's dataset-fashion-mnist (the four idx
# files in /usr/share/datasets/fashion-mnist). Installed where it is missing and this runs as root with
# apt-get; otherwise a warning, never a failure: the default digits-mosaic data needs nothing installed.
fashion=/usr/share/datasets/fashion-mnist flog=/tmp/dseh-fashion-mnist-install.log
if [ ! -d "$fashion" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist; } >"$flog" 2>&1 ||
      echo "warning: dataset-fashion-mnist did not install (log: $flog); data.source=fashion-* will not find $fashion" >&2
  else
    echo "warning: $fashion is missing (as root: apt-get install dataset-fashion-mnist); data.source=fashion-* needs it" >&2
  fi
fi
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
