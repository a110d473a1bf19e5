#!/usr/bin/env bash
# Issue 9 on a 2-GPU machine (nvidia-h100-x2): the v5 QLoRA step benchmark with 1 and 2 ranks
# through torchrun (NCCL), adapter gradients all-reduced as engine.train does; scaling efficiency.
# NVLink multicast stays off (KINDS.md). Writes under $OUT.
set -u; export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
cd benchmarks
for n in 1 2; do
  timeout 200 torchrun --standalone --nproc_per_node $n train_step.py --layers ${LAYERS:-8,16} --rep 7 --out $OUT/train_step_n$n.json 2>&1 \
    | grep -v -i warn | tail -4 | tee $OUT/train_step_n$n.log
done
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
r1, r2 = (json.load(open(f"{o}/train_step_n{n}.json")) for n in (1, 2))
eff = r2["L32_tokens_per_s"] / (2 * r1["L32_tokens_per_s"])
print(f"tokens/s 1 rank {r1['L32_tokens_per_s']:.0f}, 2 ranks {r2['L32_tokens_per_s']:.0f}: scaling efficiency {eff:.3f}")
for L in [k for k in r1 if k.startswith("L") and k[1:].isdigit()]:
    print(L, "step ms 1 rank", round(r1[L]["step_ms"], 1), "2 ranks", round(r2[L]["step_ms"], 1))
json.dump({"n1": r1, "n2": r2, "efficiency": eff}, open(f"{o}/ddp_scaling.json", "w"), indent=1)
PY
