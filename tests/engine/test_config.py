"""Recipes and --key=value overrides: parsing, type checks, clear errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import TrainConfig, apply_overrides, load_recipe
from engine.errors import EngineError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.py"))


def test_every_recipe_loads_and_validates():
    names = {p.stem for p in RECIPES}
    assert {"v1", "v2", "v3", "v4", "v5", "v6", "quickstart"} <= names
    for p in RECIPES:
        cfg = load_recipe(p).validate()
        assert cfg.lora_r == 16 and cfg.lora_alpha == 64 and cfg.lora_dropout == 0.1
        assert cfg.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert p.read_text().startswith('"""')  # the header says what it reproduces


def test_study_recipes_match_the_table():
    want = {"v1": ("full", "cot", 512), "v2": ("full", "cot", 512), "v3": ("completions", "cot", 512),
            "v4": ("completions", "prompt", 640), "v5": ("completions", "prompt", 640),
            "v6": ("completions", "prompt", 640)}
    for name, (loss, out, msl) in want.items():
        cfg = load_recipe(f"recipes/{name}.py")
        assert (cfg.loss, cfg.output_type, cfg.max_seq_length) == (loss, out, msl)
        assert cfg.quantize == "nf4" and cfg.lr == 2e-5 and cfg.batch_size == 8 and cfg.grad_accum == 2
        assert cfg.warmup_steps == 30 and cfg.valid_fraction == 0.1
    assert load_recipe("recipes/v1.py").data_fraction == 0.5
    assert load_recipe("recipes/v6.py").data[-1] == "gemma_suppl_rewrite_curated_with_gpt4"


def test_overrides_are_parsed_and_typed():
    cfg = apply_overrides(TrainConfig(), ["--lr=1e-4", "--max_steps=5", "--model=mistral-7b", "--resume=True",
                                         "--lora_targets=['q_proj','w1']", "--data=bundled", "--lora_alpha=32"])
    assert cfg.lr == 1e-4 and cfg.max_steps == 5 and cfg.model == "mistral-7b" and cfg.resume is True
    assert cfg.lora_targets == ["q_proj", "w1"] and cfg.data == ["bundled"]
    assert isinstance(cfg.lora_alpha, float) and cfg.lora_alpha == 32.0


def test_unknown_key_lists_valid_keys():
    with pytest.raises(EngineError, match=r"unknown config key 'learning_rate'.*Valid keys:.*\blr\b"):
        apply_overrides(TrainConfig(), ["--learning_rate=1e-4"])


def test_wrong_type_is_refused():
    with pytest.raises(EngineError, match=r"--max_steps=ten: expected a int"):
        apply_overrides(TrainConfig(), ["--max_steps=ten"])
    with pytest.raises(EngineError, match=r"--resume=1: expected a bool"):
        apply_overrides(TrainConfig(), ["--resume=1"])


def test_bad_values_and_forms():
    with pytest.raises(EngineError, match="loss must be"):
        apply_overrides(TrainConfig(), ["--loss=everything"])
    with pytest.raises(EngineError, match="--key=value"):
        apply_overrides(TrainConfig(), ["lr=1"])


def test_missing_recipe():
    with pytest.raises(EngineError, match="recipe 'recipes/v9.py' not found"):
        load_recipe("recipes/v9.py")


def test_missing_study_dataset_names_files_and_bundled_fallback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine.train", "recipes/v5.py", f"--data_dir={tmp_path}",
                           "--model=smollm2-135m-instruct", "--quantize=None"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err
    assert "high_quality_dataset_v1" in err and "--data=bundled" in err and "rewrite_prompt" in err
