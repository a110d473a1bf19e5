"""The peer: the study's stack (transformers 4.57 + PEFT + bitsandbytes NF4) on Mixtral-8x7B shapes.

Measures, at 2 and 4 layers (a 32-layer bf16 checkpoint would not fit the disk budget of a
lent machine), the multiprompt workload (3 samples x 32 new tokens after a 400-token prompt)
and a QLoRA step at v5 settings (batch 8 x 640, LoRA r16 q/k/v/o, gradient checkpointing,
paged AdamW 8-bit), then extrapolates to 32 layers from the per-layer difference. Run it in a
process whose PYTHONPATH holds transformers 4.57 (carried as a wheel); it prints and writes JSON.

Usage: python benchmarks/peer_seed_stack.py --out peer.json [--skip_train] [--skip_generate]
"""
import argparse
import json
import os
import torch
from common import wall_median_ms as median_ms


def build(layers):
    from transformers import BitsAndBytesConfig, MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                        vocab_size=32000, rope_theta=1e6, max_position_embeddings=32768)
    path = f"/tmp/peer_mixtral_l{layers}"
    if not os.path.exists(path):
        torch.manual_seed(0)
        with torch.device("cuda"):  # random init on the GPU: minutes faster than on the host's CPU
            model = MixtralForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(path, safe_serialization=True)
        del model
        torch.cuda.empty_cache()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["gate", "lm_head"])
    return MixtralForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": 0},
                                              torch_dtype=torch.bfloat16)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="peer_seed_stack.json")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_generate", action="store_true")
    a = p.parse_args()
    import bitsandbytes as bnb
    import peft
    import transformers

    r = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "bitsandbytes": bnb.__version__,
                      "gpu": torch.cuda.get_device_name()}}
    print(r["versions"], flush=True)
    for layers in (2, 4):
        m = build(layers).eval()
        prompt = torch.randint(0, 32000, (1, 400), device="cuda")

        def gen(n):
            with torch.no_grad():
                m.generate(prompt, do_sample=True, temperature=0.7, top_p=0.95, num_return_sequences=3,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

        if not a.skip_generate:
            r[f"L{layers}_gen_ms"] = median_ms(lambda: gen(32))
            r[f"L{layers}_prefill_ms"] = median_ms(lambda: gen(1))
        if not a.skip_train:
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

            m.train()
            m = prepare_model_for_kbit_training(m)  # enables gradient checkpointing
            m = get_peft_model(m, LoraConfig(r=16, lora_alpha=64, lora_dropout=0.1, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            opt = bnb.optim.PagedAdamW8bit([q for q in m.parameters() if q.requires_grad], lr=2e-5)
            ids = torch.randint(0, 32000, (8, 640), device="cuda")
            labels = ids.clone()
            labels[:, :320] = -100

            def step():
                m(input_ids=ids, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            torch.cuda.reset_peak_memory_stats()
            r[f"L{layers}_step_ms"] = median_ms(step, warm=2, rep=5)
            r[f"L{layers}_step_peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
            del opt
        del m
        torch.cuda.empty_cache()
        print(r, flush=True)
    r.update(extrapolate(r))
    json.dump(r, open(a.out, "w"), indent=1)
    print(json.dumps(r, indent=1))


def extrapolate(r, layers=32):
    """Per-layer cost from the 2- and 4-layer runs, extended to `layers`."""
    out = {}
    for key in ("gen_ms", "prefill_ms", "step_ms"):
        if f"L2_{key}" in r and f"L4_{key}" in r:
            per = (r[f"L4_{key}"] - r[f"L2_{key}"]) / 2
            out[f"L{layers}_{key}_extrapolated"] = r[f"L2_{key}"] + (layers - 2) * per
    if "L32_gen_ms_extrapolated" in out:
        out["L32_decode_step_ms_extrapolated"] = (out["L32_gen_ms_extrapolated"] - out["L32_prefill_ms_extrapolated"]) / 31
    return out


if __name__ == "__main__":
    main()
