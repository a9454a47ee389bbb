#!/usr/bin/env bash
# Set up .venv (pinned) and run the whole pipeline with DVC on the built-in data (or your params.yaml).
# Extra arguments go to `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
start=$(date +%s)
dvc repro "$@"
echo
echo "done in $(( $(date +%s) - start )) s. Results:"
dvc metrics show
cat <<MSG

  metrics        outputs/eval/metrics.json   (dvc metrics show / dvc metrics diff)
  plot data      outputs/eval/pr_curve.csv, outputs/eval/precision_at_n.csv   (dvc plots show --json)
  figures        outputs/eval/figures/*.png
  HTML report    outputs/eval/report.html   (open it in a browser)
  models, codes  outputs/labnet/round*/, outputs/imgnet/round*/
MSG
