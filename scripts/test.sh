#!/usr/bin/env bash
# Set up .venv (pinned) and run lint and the default test suite (CPU only, a few minutes).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k resume` or `-m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One test renders the HTML report in Debian's headless Chromium: install it where it is missing.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the report test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/tmp/dseh-chromium-install.log 2>&1 || echo "warning: chromium did not install; the report test will be skipped" >&2
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
