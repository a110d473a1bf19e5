#!/usr/bin/env bash
# Session 2, last device call: the decode ops' GPU tests (bf16 included), the 2-layer kernel
# profile, then ours (2, 4 and 32 layers) and the peer (2 and 4 layers) on the multiprompt
# workload in the same run. Needs .whl/ (bitsandbytes 0.50.2; transformers 4.57.1, tokenizers
# 0.22.1, huggingface_hub 0.36.0 for the peer). Writes logs and JSON under $OUT.
set -u; export PYTHONUNBUFFERED=1
pip_t() { python3 -m pip install -q --no-index --no-deps --no-compile --target "$@" 2>&1 | tail -1; }
pip_t /tmp/site .whl/bitsandbytes-*.whl
pip_t /tmp/site457 .whl/transformers-4.57*.whl .whl/tokenizers-0.22*.whl .whl/huggingface_hub-0.36*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
( export PYTHONPATH=/tmp/site:$PWD; timeout 110 python3 -m pytest -q tests/kernels/test_norm.py tests/kernels/test_rope.py \
  tests/kernels/test_attention.py tests/models/test_fused_decode.py tests/engine/test_sampling_graph.py \
  tests/kernels/test_moe.py -k "row" 2>&1 | tail -4 ) | tee $OUT/gpu_tests.log
( cd benchmarks; export PYTHONPATH=/tmp/site:$PWD/..; timeout 80 python3 decode_profile.py --layers 2 --compare \
  --out $OUT/decode_profile.json 2>&1 | grep -E "^total|graph" ) | tee $OUT/decode_profile.log
( cd benchmarks; export PYTHONPATH=/tmp/site457:/tmp/site; timeout 200 python3 peer_seed_stack.py --skip_train \
  --out $OUT/peer.json 2>&1 | grep -v -i warn | tail -3 ) | tee $OUT/peer.log
( cd benchmarks; export PYTHONPATH=/tmp/site:$PWD/..; timeout 170 python3 generate.py --out $OUT/generate.json \
  --peer $OUT/peer.json 2>&1 | tail -9 ) | tee $OUT/generate.log
