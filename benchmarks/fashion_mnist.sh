#!/usr/bin/env bash
# One 32-bit run per deep method on Fashion-MNIST (data.source=fashion-mnist, or FASHION_SOURCE), each
# timed whole: LabNet (DSEH only), the image network, encoding all 70,000 images and the evaluation.
# Prints a Markdown table (method, settings, wall seconds, mAP@ALL, mAP@1000, distinct database codes,
# collapsed). Extra arguments are -S overrides applied to every run. Outputs under outputs-fashion/.
#   bash benchmarks/fashion_mnist.sh                 # the settings of docs/results.md#fashion-mnist-real-images
set -euo pipefail
cd "$(dirname "$0")/.."
DSEH=${DSEH:-.venv/bin/dseh}
SOURCE=${FASHION_SOURCE:-fashion-mnist}
ROOT=${FASHION_ROOT:-outputs-fashion}/$SOURCE
COMMON=(-S "data.source=$SOURCE" -S tracking.enabled=false)
# each method's settings within the same budget, at most 5 minutes a run on 2 cores (docs/results.md):
# DSEH's release recipe, 20 epochs; DPSH its own plain SGD at 4x its code's learning rate for 35
# epochs, then 10 epochs at a tenth of it; HashNet with DSEH's optimiser, 20 epochs. Extra -S
# arguments come last and override these.
declare -A RUNS=(
  [dseh]="-S method=dseh -S imgnet.epochs=[20]"
  [dpsh]="-S method=dpsh -S dpsh.lr_exp=0.7 -S imgnet.epochs=[45] -S dpsh.step_exp=1.0 -S train.step_epochs=35"
  [hashnet]="-S method=hashnet -S imgnet.epochs=[20] -S hashnet.optimizer=adam -S hashnet.lr_exp=3.5 -S hashnet.momentum=0 -S hashnet.weight_decay=0"
)
"$DSEH" prepare -q "${COMMON[@]}" "$@" --root "$ROOT" >/dev/null
echo "| method | settings | seconds | mAP@ALL | mAP@1000 | distinct database codes | collapsed |"
echo "|---|---|---|---|---|---|---|"
for m in dseh dpsh hashnet; do
  read -ra set_m <<<"${RUNS[$m]}"
  set_m+=("$@")
  out=$ROOT/$m
  start=$EPOCHREALTIME
  "$DSEH" train-labnet -q "${COMMON[@]}" "${set_m[@]}" --root "$out" --data "$ROOT/data" >/dev/null
  "$DSEH" train-imgnet -q "${COMMON[@]}" "${set_m[@]}" --root "$out" --data "$ROOT/data" >/dev/null
  "$DSEH" evaluate -q "${COMMON[@]}" "${set_m[@]}" --root "$out" --data "$ROOT/data" >/dev/null
  secs=$(.venv/bin/python -c "print($EPOCHREALTIME - $start)")
  .venv/bin/python - "$out/eval/metrics.json" "$m" "${set_m[*]}" "$secs" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
settings = " ".join(s for s in sys.argv[3].split() if s != "-S")
print(f"| {sys.argv[2]} | `{settings}` | {float(sys.argv[4]):.0f} | {m['map_all']:.4f} | {m['map_at_1000']:.4f} "
      f"| {m['distinct_codes_database']} | {m['collapsed']} |")
PY
done
