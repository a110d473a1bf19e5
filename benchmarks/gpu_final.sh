#!/usr/bin/env bash
# The final device call: GPU tests (bf16 included), then ours and the peer on Mixtral-8x7B shapes
# in the same run. Needs the wheels in .whl/ (bitsandbytes 0.50.2; transformers 4.57.1,
# tokenizers 0.22.1, huggingface_hub 0.36.0 for the peer). Writes logs and JSON under $OUT.
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
pip_t() { python3 -m pip install -q --no-index --no-deps --no-compile --target "$@" 2>&1 | tail -1; }
pip_t /tmp/site .whl/bitsandbytes-*.whl
pip_t /tmp/site457 .whl/transformers-4.57*.whl .whl/tokenizers-0.22*.whl .whl/huggingface_hub-0.36*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
( export PYTHONPATH=/tmp/site457:/tmp/site
  timeout 230 python3 benchmarks/peer_seed_stack.py --out $OUT/peer.json 2>&1 | grep -v -i warn | tail -4 ) | tee $OUT/peer.log
export PYTHONPATH=/tmp/site:$PWD
timeout 90 python3 -m pytest -q tests/kernels/test_moe.py tests/engine/test_sampling.py \
  tests/engine/test_sampling_graph.py 2>&1 | tail -6 | tee $OUT/gpu_tests.log
timeout 120 python3 benchmarks/generate.py --out $OUT/generate.json --peer $OUT/peer.json 2>&1 | tail -8 | tee $OUT/generate.log
timeout 100 python3 benchmarks/train_step.py --out $OUT/train_step.json --peer $OUT/peer.json 2>&1 | tail -6 | tee $OUT/train_step.log
timeout 90 python3 benchmarks/lora.py --no-sweep --out $OUT/lora.json 2>&1 | grep -A12 "^shape  *engine_ms" | tee $OUT/lora.log
