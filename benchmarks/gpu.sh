#!/usr/bin/env bash
# The GPU checks and timings behind the README's GPU numbers, on a CUDA machine with torch and triton:
# the Triton tests on the real device, the W4A8 kernel against torch._int_mm, and the latency presets.
#     OUT=runs/gpu bash benchmarks/gpu.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_runtime.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
timeout 150 python3 benchmarks/w4a8_kernel.py --out "$OUT/w4a8_kernel.json" 2>&1 | tail -14
for preset in qwen2-vl-7b qwen2-vl-2b; do
  timeout 200 python3 -m mquant bench latency --preset "$preset" --device cuda --out "$OUT/latency-$preset-cuda.json" 2>&1 \
    | grep -v Warning | tail -24
done
