"""quickstart: v5's recipe shape on the embedded default model and the bundled data, on a CPU.

What it keeps from v5: completion-only loss, the plain prompt output, LoRA r=16 / alpha=64 /
dropout 0.1 on q/k/v/o, a linear schedule with warmup, gradient accumulation 2, and both v5
datasets' stand-ins (the bundled curated and creative subsets) plus the everyday subset.
What it changes so that it finishes on a 2-core CPU in under 10 minutes with a visible drop in
validation loss: SmolLM2-135M-Instruct (fp32, no quantization, its own chat template) instead of
Mixtral, a short run (max_steps) with a larger learning rate, batch 4, and a shorter maximum
length.

Run: python -m engine.train recipes/quickstart.py
"""
from engine.config import TrainConfig

config = TrainConfig(
    model="smollm2-135m-instruct",
    quantize=None,
    data=["bundled"],
    loss="completions",
    output_type="prompt",
    prompt_format="auto",
    max_seq_length=448,
    lora_r=16,
    lora_alpha=64,
    lora_dropout=0.1,
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
    lr=3e-4,
    batch_size=4,
    grad_accum=2,
    warmup_steps=3,
    max_steps=20,
    eval_every=10,
    eval_metric_rows=8,
    output_dir="runs/quickstart",
)
