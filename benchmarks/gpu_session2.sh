set -u; export PYTHONUNBUFFERED=1
pip_t() { python3 -m pip install -q --no-index --no-deps --no-compile --target "$@" 2>&1 | tail -1; }
pip_t /tmp/site .whl/bitsandbytes-*.whl
pip_t /tmp/site457 .whl/transformers-4.57*.whl .whl/tokenizers-0.22*.whl .whl/huggingface_hub-0.36*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
( cd benchmarks; export PYTHONPATH=/tmp/site457:/tmp/site; timeout 190 python3 peer_seed_stack.py --skip_train --out $OUT/peer.json 2>&1 | grep -v -i warn | tail -4 ) | tee $OUT/peer.log
export PYTHONPATH=/tmp/site:$PWD
timeout 85 python3 -m pytest -q tests/kernels/test_norm.py tests/kernels/test_rope.py tests/kernels/test_attention.py tests/models/test_fused_decode.py tests/engine/test_sampling_graph.py tests/kernels/test_moe.py -k "not compile" 2>&1 | tail -4 | tee $OUT/gpu_tests.log
( cd benchmarks; timeout 160 python3 generate.py --out $OUT/generate.json --peer $OUT/peer.json 2>&1 | tail -8 ) | tee $OUT/generate.log
( cd benchmarks; timeout 110 python3 lora.py --no-sweep --parts correctness,timing,breakdown --out $OUT/lora.json 2>&1 | tail -60 ) > $OUT/lora.log; tail -30 $OUT/lora.log
