"""v2: as v1 but on the whole of `mooney_test_with_gpt4`.

Shared settings of v1-v6 (engine.config.study_config): Mixtral-8x7B-Instruct-v0.1 in NF4 with
double quant (router and lm_head bf16); LoRA r=16, alpha=64, dropout 0.1 on q/k/v/o; lr 2e-5,
batch 8 with gradient accumulation 2, 30 warmup steps, linear schedule; 10% held out for
validation. The study's datasets are not shipped: put them in --data_dir as NAME.csv, or run on
the bundled stand-ins with --model=smollm2-135m-instruct --data=bundled.

Run: python -m engine.train recipes/v2.py
"""
from engine.config import study_config

config = study_config(
    data=["mooney_test_with_gpt4"],
    loss="full",
    output_type="cot",
    max_seq_length=512,
    output_dir="runs/v2",
)
