#!/usr/bin/env bash
# Session 3 device calls (one H100). Part "a": GPU tests of the changed code (bf16 included), the
# MoE block with the transformers block, the NF4 decode rows with bitsandbytes, the 32-layer decode
# profile. Part "b": the peer (transformers 4.57.1 + bitsandbytes 0.50.2, 2 and 4 layers) and ours
# (2, 4, 32 layers) on the multiprompt workload in the same call. Needs .whl/ (bitsandbytes; for
# "b" also transformers 4.57.1, tokenizers 0.22.1, huggingface_hub 0.36.0). Writes under $OUT.
set -u; export PYTHONUNBUFFERED=1
part=${1:-a}
pip_t() { python3 -m pip install -q --no-index --no-deps --no-compile --target "$@" 2>&1 | tail -1; }
pip_t /tmp/site .whl/bitsandbytes-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
if [ "$part" = a ]; then
  ( export PYTHONPATH=/tmp/site:$PWD; timeout 200 python3 -m pytest -q tests/kernels/test_moe.py \
    tests/kernels/test_norm.py tests/kernels/test_rope.py tests/kernels/test_attention.py tests/models/test_fused_decode.py \
    tests/engine/test_sampling.py tests/engine/test_sampling_graph.py \
    "tests/kernels/test_nf4.py::test_gemv_fma_every_token_count" "tests/kernels/test_nf4.py::test_gemv_fma_word_layouts_and_split_k" \
    2>&1 | tail -3 ) | tee $OUT/gpu_tests.log
  [ -f runs/ab3.py ] && ( timeout 100 python3 runs/ab3.py 2>&1 | grep -v -i warn ) > $OUT/ab3.log
  ( cd benchmarks; export PYTHONPATH=/tmp/site:$PWD/..; timeout 120 python3 moe.py --no-sweep --out $OUT/moe.json 2>&1 \
    | grep -v -i warn ) > $OUT/moe.log; grep "32 layers" $OUT/moe.log
  ( cd benchmarks; export PYTHONPATH=/tmp/site:$PWD/..; timeout 90 python3 nf4.py --parts correctness,decode --out $OUT/nf4.json 2>&1 \
    | grep -v -i warn ) > $OUT/nf4.log; tail -3 $OUT/nf4.log
  ( cd benchmarks; timeout 100 python3 decode_profile.py --layers 32 --top 30 --out $OUT/decode_profile32.json 2>&1 \
    | tail -36 ) > $OUT/decode_profile32.log; tail -2 $OUT/decode_profile32.log
else
  ( export PYTHONPATH=/tmp/site:$PWD; timeout 120 python3 -m pytest -q tests/engine/test_sampling_graph.py \
    "tests/kernels/test_nf4.py::test_gemv_fma_every_token_count" "tests/kernels/test_nf4.py::test_gemv_fma_word_layouts_and_split_k" \
    2>&1 | tail -2 ) | tee $OUT/gpu_tests_b.log
  pip_t /tmp/site457 .whl/transformers-4.57*.whl .whl/tokenizers-0.22*.whl .whl/huggingface_hub-0.36*.whl
  ( cd benchmarks; export PYTHONPATH=/tmp/site457:/tmp/site; timeout 230 python3 peer_seed_stack.py --skip_train \
    --out $OUT/peer.json 2>&1 | grep -v -i warn | tail -3 ) | tee $OUT/peer.log
  ( cd benchmarks; export PYTHONPATH=/tmp/site:$PWD/..; timeout 300 python3 generate.py --out $OUT/generate.json \
    --peer $OUT/peer.json 2>&1 | tail -10 ) | tee $OUT/generate.log
fi
