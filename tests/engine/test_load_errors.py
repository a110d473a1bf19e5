"""Bad input to engine.load fails with an EngineError that names the file or key and the fix."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import engine
from engine.errors import EngineError
from models.config import ModelConfig
from models.transformer import Transformer


def _write_model(path, cfg=None, drop=None, reshape=None):
    cfg = cfg or ModelConfig.from_preset("tiny-dense")
    torch.manual_seed(0)
    sd = Transformer(cfg).state_dict()
    if drop:
        sd.pop(drop)
    if reshape:
        sd[reshape] = torch.zeros(3, 3)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_good_model_loads(tmp_path):
    model, tok = engine.load(_write_model(tmp_path / "m"), device="cpu")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 256)
    assert tok.encode("t5 t7", add_special_tokens=False) == [5, 7]


def test_missing_directory(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        engine.load(tmp_path / "nope")


def test_missing_config(tmp_path):
    path = _write_model(tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(EngineError, match=r"config\.json"):
        engine.load(path, device="cpu")


def test_unknown_model_type(tmp_path):
    path = _write_model(tmp_path / "m")
    d = json.loads((path / "config.json").read_text())
    d["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(EngineError, match="model_type 'gpt2' is not supported"):
        engine.load(path, device="cpu")


def test_missing_tensor(tmp_path):
    path = _write_model(tmp_path / "m", drop="model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(EngineError, match=r"missing tensors \['model\.layers\.1\.self_attn\.k_proj\.weight'\]"):
        engine.load(path, device="cpu")


def test_wrong_shaped_tensor(tmp_path):
    path = _write_model(tmp_path / "m", reshape="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(EngineError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \[3, 3\].*expects \[128, 64\]"):
        engine.load(path, device="cpu")


def test_missing_weights_file(tmp_path):
    path = _write_model(tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="no model.safetensors"):
        engine.load(path, device="cpu")


def test_unreachable_hub_repo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineError, match="could not find model 'someone/absent-model'.*Tried"):
        engine.load("someone/absent-model")


def test_cli_prints_message_not_traceback(tmp_path):
    """The command-line path shows the one-line message and exits 2."""
    code = ("import engine; from engine.errors import run_cli; "
            f"run_cli(lambda: engine.load({str(tmp_path / 'nope')!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model directory") and "Traceback" not in proc.stderr
