#!/usr/bin/env bash
# The GPU checks of the speed work in one call: the CUDA-only tests, then the 7B-shape benchmark on the fast path
# (static cache, varlen vision attention). Writes to $OUT (default ./gpu-out). Prepare the pinned wheels first:
#   ../shared/tools/device-wheels.sh pytest pluggy iniconfig packaging
# then run this script on the GPU machine from the repository root (about 10 minutes on an H100; pass
# EXTRA="--caches dynamic,static --vision-attention sdpa,varlen" for the full grid, which takes longer; pass
# SHAPES="qwen2.5-vl-7b qwen3-vl-8b qwen3.5-9b" for every family's real shape, each about as long again).
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"
slug=$(python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
for shape in ${SHAPES:-qwen2.5-vl-7b}; do
  python3 benchmarks/two_stage_speed.py --shape "$shape" --sizes 2246x1582,3840x2160,7680x4320 --batch-sizes 1,8 \
    --output "$OUT/$shape-$slug.json" ${EXTRA:-} 2>&1 | tee "$OUT/benchmark-$shape.txt"
done
