#!/usr/bin/env bash
# The GPU check, one short script (README "GPU throughput"): the data path alone (pinned batches
# from the memmap, 1 to WORKERS threads), training throughput of CNN-F and
# ResNet-50 at 224x224 (step alone, then the whole loop over a memory-mapped file with GPU
# utilisation; bf16, float32, torch.compile; 1 process and DDP over NPROC processes under torchrun),
# same-seed determinism of the pipeline's training steps on CUDA, and the retrieval report on the GPU
# (dseh.evaluation_torch) against numpy and faiss at the NUS-WIDE scale, and prepare's resize on the
# GPU against Pillow's on the CPU (benchmarks/bench_prepare.py --mode resize).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (env: N_TRAIN, EPOCHS, WORKERS, NPROC, BACKBONES, PY)
set -uo pipefail
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
py=${PY:-python3}
n=${N_TRAIN:-8192}
ep=${EPOCHS:-3}
w=${WORKERS:-8}
np_=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}; [ "$np_" -ge 1 ] || np_=1
bb=${BACKBONES:-cnnf,resnet50}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
shm=$( [ -d /dev/shm ] && echo /dev/shm || echo /tmp )
b=benchmarks/bench_train.py
loop="--mode loop --n-train $n --epochs $ep --workers $w --tmp $shm"
run() { echo "== $*" | tee -a "$out/gpu_check.txt"; "$@" 2>&1 | grep -v "^W[0-9]\{4\}" | tee -a "$out/gpu_check.txt"; }
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
run $py -c "
import numpy as np, torch
from dseh.train import gather_images, mirror
x = np.random.default_rng(0).integers(0, 255, (64, 224, 224, 3), dtype=np.uint8)
items, flip = np.random.default_rng(1).permutation(64)[:32], np.random.default_rng(2).random(32) < 0.5
t = gather_images(x, items, pin=True)
g = mirror(t.to('cuda', non_blocking=True), torch.from_numpy(flip).cuda()).cpu().numpy()
ref = x[items].copy(); ref[flip] = ref[flip, :, ::-1]
print('pinned gather + mirror on CUDA:', t.is_pinned(), 'equal' if np.array_equal(g, ref) else 'DIFFER')"
run $py -m pytest -q tests/test_evaluation_torch.py
run $py benchmarks/bench_retrieval.py --nus-only --device cuda
run $py benchmarks/bench_prepare.py --mode resize --n 2000 --device cuda
run $py -m pytest -q tests/test_prepare_device.py
run $py $b --mode feed --backbones "${bb%%,*}" --n-train $n --workers $w --tmp $shm
run $py $b --mode step --backbones $bb --steps 20
run $py $b $loop --backbones $bb
run $py $b $loop --backbones "${bb%%,*}" --no-amp
run $py -m torch.distributed.run --nproc-per-node "$np_" $b $loop --backbones $bb
# same seed, same device: the same codes (two runs of prepare + both training steps on CUDA)
cfg=(-q -S tracking.enabled=false -S data.n_database=2000 -S data.n_train=1000 -S data.n_query=200 -S imgnet.epochs=[3])
for r in a b; do
  for s in prepare train-labnet train-imgnet; do $py -m dseh $s --root "$shm/det-$r" "${cfg[@]}" || echo "FAILED: $s"; done
done
run $py -c "
import numpy as np, json, sys
a, b = (np.load(f'$shm/det-{r}/imgnet/round0/codes.npy') for r in 'ab')
s = json.load(open('$shm/det-a/imgnet/round0/summary.json'))
print('same seed twice:', 'identical codes' if np.array_equal(a, b) else 'CODES DIFFER', a.shape, s.get('precision'))"
run timeout 240 $py $b $loop --backbones $bb --compile
