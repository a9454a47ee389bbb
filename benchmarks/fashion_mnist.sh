#!/usr/bin/env bash
# One 32-bit run per deep method on Fashion-MNIST (data.source=fashion-mnist, or FASHION_SOURCE), each
# timed whole: LabNet (DSEH only), the image network, encoding every item and the evaluation.
# Prints a Markdown table (method, settings, wall seconds, mAP@ALL, mAP@1000, distinct database codes,
# collapsed). Extra arguments are -S overrides applied to every run. Outputs under outputs-fashion/.
#   bash benchmarks/fashion_mnist.sh                 # the settings of docs/results.md#fashion-mnist-real-images
set -euo pipefail
(( BASH_VERSINFO[0] >= 5 )) || { echo "fashion_mnist.sh needs bash 5 or later (EPOCHREALTIME)" >&2; exit 1; }
if [[ " $* " == *" -h "* || " $* " == *" --help "* ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  echo "Environment: FASHION_SOURCE (fashion-mnist | fashion-mosaic), FASHION_ROOT (outputs-fashion), DSEH, PYTHON."
  exit 0
fi
cd "$(dirname "$0")/.."
DSEH=${DSEH:-.venv/bin/dseh}
PY=${PYTHON:-.venv/bin/python}
SOURCE=${FASHION_SOURCE:-fashion-mnist}
case $SOURCE in
  fashion-mnist | fashion-mosaic) ;;
  *) echo "fashion_mnist.sh: FASHION_SOURCE must be fashion-mnist or fashion-mosaic, got '$SOURCE'" >&2; exit 2 ;;
esac
ROOT=${FASHION_ROOT:-outputs-fashion}/$SOURCE
COMMON=(-S "data.source=$SOURCE" -S tracking.enabled=false)
# each method's settings within the same budget, at most 5 minutes a run on 2 cores (docs/results.md),
# all without the backbone's dropout (each of the three ranks better so): DSEH's release recipe with
# softer code targets, 20 epochs; DPSH its own plain SGD at 4x its code's learning rate for 35 epochs,
# then 10 epochs at a tenth of it; HashNet with DSEH's optimiser, 20 epochs. Extra -S arguments come
# last and override these.
declare -A RUNS=(
  [dseh]="-S method=dseh -S imgnet.epochs=[20] -S imgnet.dropout=0 -S imgnet.code_target=0.9 -S imgnet.code_scale=5"
  [dpsh]="-S method=dpsh -S imgnet.epochs=[45] -S imgnet.dropout=0 -S dpsh.lr_exp=0.7 -S dpsh.step_exp=1.0 -S train.step_epochs=35"
  [hashnet]="-S method=hashnet -S imgnet.epochs=[20] -S imgnet.dropout=0 -S hashnet.optimizer=adam -S hashnet.lr_exp=3.5 -S hashnet.momentum=0 -S hashnet.weight_decay=0"
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
  secs=$("$PY" -c "print($EPOCHREALTIME - $start)")
  "$PY" - "$out/eval/metrics.json" "$m" "${set_m[*]}" "$secs" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
settings = " ".join(s for s in sys.argv[3].split() if s != "-S")
name = {"dseh": "DSEH", "dpsh": "DPSH", "hashnet": "HashNet"}[sys.argv[2]]
print(f"| {name} | `{settings}` | {float(sys.argv[4]):.0f} | {m['map_all']:.4f} | {m['map_at_1000']:.4f} "
      f"| {m['distinct_codes_database']:,} | {'yes' if m['collapsed'] else 'no'} |")
PY
done
