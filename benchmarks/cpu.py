"""CPU comparison on the embedded default model (SmolLM2-135M-Instruct, fp32), ours vs
transformers + PEFT measured in the same run on the same machine.

1. A LoRA training step: r=16 on q/k/v/o, batch 8 x 256 tokens, loss on every token, AdamW.
2. Multiprompt generation: 3 samples x 32 new tokens after a 400-token prompt
   (transformers: generate with num_return_sequences=3; ours: engine.sampling.generate with one
   shared prefill).

Usage: python benchmarks/cpu.py [--out cpu.json] [--steps 3]
"""
import argparse
import json
import os
import platform
import time

import torch


def median_s(fn, rep):
    fn()  # warm-up
    ts = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="cpu.json")
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    import peft
    import transformers
    from transformers import AutoModelForCausalLM

    import engine
    from engine.default_model import ensure_embedded_model
    from engine.loss import chunked_cross_entropy
    from engine.sampling import generate
    from models.lora import inject_lora

    path = ensure_embedded_model("smollm2-135m-instruct")
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (8, 256))
    prompt = torch.randint(0, 49152, (1, 400))

    # ---- peer: transformers + PEFT ----
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()

    def hf_gen():
        with torch.no_grad():
            hf.generate(prompt, do_sample=True, temperature=0.7, top_p=0.95, num_return_sequences=3,
                        max_new_tokens=32, min_new_tokens=32, pad_token_id=0)

    res["peer_generate_s"] = median_s(hf_gen, 3)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=64, lora_dropout=0.1, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    hf.train()
    opt = torch.optim.AdamW([q for q in hf.parameters() if q.requires_grad], lr=1e-4)

    def hf_step():
        hf(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    res["peer_step_s"] = median_s(hf_step, a.steps)
    del hf, opt

    # ---- ours ----
    model, _ = engine.load(path, device="cpu")
    res["ours_generate_s"] = median_s(
        lambda: generate(model, [prompt[0].tolist()], max_new_tokens=32, samples=3, temperature=0.7, top_p=0.95), 3)
    inject_lora(model, r=16, alpha=64, dropout=0.1)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def step():
        loss_sum, n = chunked_cross_entropy(model(ids, return_hidden=True), model.lm_head.weight, ids)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()

    res["ours_step_s"] = median_s(step, a.steps)
    for k in ("step", "generate"):
        res[f"speedup_{k}"] = res[f"peer_{k}_s"] / res[f"ours_{k}_s"]
    res["ours_tokens_per_s"] = ids.numel() / res["ours_step_s"]
    res["peer_tokens_per_s"] = ids.numel() / res["peer_step_s"]
    json.dump(res, open(a.out, "w"), indent=1)
    print(f"{'CPU, SmolLM2-135M fp32':44s} {'peer':>8s} {'ours':>8s} {'speed-up':>9s}")
    print(f"{'LoRA step, batch 8 x 256 (s)':44s} {res['peer_step_s']:8.2f} {res['ours_step_s']:8.2f} "
          f"{res['speedup_step']:8.2f}x")
    print(f"{'generate 3 x 32 after 400 tokens (s)':44s} {res['peer_generate_s']:8.2f} {res['ours_generate_s']:8.2f} "
          f"{res['speedup_generate']:8.2f}x")


if __name__ == "__main__":
    main()
