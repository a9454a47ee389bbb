#!/usr/bin/env bash
# Set up .venv (pinned) and run the whole pipeline with DVC on the built-in data (or your params.yaml).
# Extra arguments go to `dvc repro`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# every step of this execution logs into one MLflow parent run
export DSEH_PIPELINE_RUN=${DSEH_PIPELINE_RUN:-repro-$(date +%Y%m%d-%H%M%S)-$$}
start=$(date +%s)
dvc repro "$@"
echo
echo "done in $(( $(date +%s) - start )) s. Results:"
python - <<'PY'
import json
m = json.load(open("outputs/eval/metrics.json"))
k = m["protocol_topk"]
print(f"  {m['bits']} bits: mAP@ALL {m['map_all']:.4f}, mAP@{k} {m[f'map_at_{k}']:.4f}, tie-aware mAP {m['map_tie_aware']:.4f}, "
      f"LabNet label mAP@ALL {m['labnet']['label_map_all']:.4f}")
PY
[ -f outputs/table/map_table.md ] && cat outputs/table/map_table.md
cat <<MSG

  metrics        outputs/eval/metrics.json   (dvc metrics show / dvc metrics diff)
  plot data      outputs/eval/pr_curve.csv, outputs/eval/precision_at_n.csv   (dvc plots show --json)
  figures        outputs/eval/figures/*.png
  HTML report    outputs/eval/report.html   (open it in a browser)
  MAP table      dvc repro sweep/dvc.yaml, then outputs/table/map_table.md (.csv): mAP by code length
  promotion      outputs/promote/decision.json
  models, codes  outputs/labnet/round*/, outputs/imgnet/round*/
  MLflow UI      .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   (then http://127.0.0.1:5000)
MSG
