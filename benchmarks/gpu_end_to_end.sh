#!/usr/bin/env bash
# One device call: the peer (transformers 4.57 + PEFT + bnb, carried wheels in .whl/) and ours,
# on Mixtral-8x7B shapes: multiprompt decoding and the v5 QLoRA step. Writes to $OUT.
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bitsandbytes-*.whl 2>&1 | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site457 \
  .whl/transformers-4.57*.whl .whl/tokenizers-0.22*.whl .whl/huggingface_hub-0.36*.whl 2>&1 | tail -1
PEER_TRAIN=${PEER_TRAIN:-1}
( export PYTHONPATH=/tmp/site457:/tmp/site; timeout 330 python3 benchmarks/peer_seed_stack.py --out $OUT/peer.json \
  $([ "$PEER_TRAIN" = 1 ] || echo --skip_train) 2>&1 | grep -v Warning | tail -25 ) | tee $OUT/peer.log
export PYTHONPATH=/tmp/site:$PWD
timeout 200 python3 benchmarks/generate.py --out $OUT/generate.json --peer $OUT/peer.json 2>&1 | tail -12 | tee $OUT/generate.log
timeout 150 python3 benchmarks/train_step.py --out $OUT/train_step.json --peer $OUT/peer.json 2>&1 | tail -8 | tee $OUT/train_step.log
