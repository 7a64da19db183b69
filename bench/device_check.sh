#!/usr/bin/env bash
# Issue 32's device check, one call on a lent GPU (about 6 minutes; its limits leave time to rerun):
#   bench/device_wheels.sh                      # here, once
#   device run: command "bash bench/device_check.sh", carry [".whl"], timeout_s 540
# Then copy the figures it returns (gpu.json, gpu_zimage.json, the logs) into README with the GPU's
# name and the date. Each part has its own time limit, so one slow part still returns the others.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/out/device}
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, transformers, peft, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'torchao', torchao.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# Z-Image at the published shape: bf16 against int8 / fp8 (peak against the estimate, steps/s).
timeout 210 python3 -m bench.gpu_zimage --levels none,int8,fp8 --steps 4 --rounds 2 --work /tmp/bench \
  > "$OUT/zimage.log" 2>&1; echo "bench.gpu_zimage exit $?" | tee -a "$OUT/machine.txt"
tail -40 "$OUT/zimage.log"
# SDXL: the issue-15 goals (memory, speed, MFU, compile, latents).
timeout 270 python3 -m bench.gpu --steps 4 --rounds 2 --images 256 --latents-rounds 1 --work /tmp/bench \
  > "$OUT/sdxl.log" 2>&1; echo "bench.gpu exit $?" | tee -a "$OUT/machine.txt"
tail -60 "$OUT/sdxl.log"
cp /tmp/bench/zimage/gpu_zimage.json /tmp/bench/sdxl/gpu.json "$OUT/" 2>/dev/null
ls -la "$OUT"
