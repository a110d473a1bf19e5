#!/usr/bin/env bash
# One device call: kernel tests on the GPU (bf16 included), then the kernel benchmarks.
# Needs the bitsandbytes wheel carried in .whl/ (see benchmarks/RESULTS.md). Writes to $OUT.
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bitsandbytes-*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -m pytest -q -x tests/kernels tests/models/test_nf4_linear.py 2>&1 | tail -15 | tee $OUT/gpu_tests.log
for b in nf4 lora moe nf4_memory; do
  [ -f benchmarks/$b.py ] || continue
  echo "=== $b"; timeout 300 python3 benchmarks/$b.py --out $OUT/$b.json 2>&1 | tail -40 | tee $OUT/$b.log
done
