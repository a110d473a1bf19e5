"""The generate command: submission schema, joined samples, metric report, bad input, no loss on error."""
import csv

import pytest

from engine import generate as gen
from engine.errors import EngineError
from tests.tiny import make_tiny_model_dir, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinygen")
    return make_tiny_model_dir(root / "model", std=0.3), write_tiny_dataset(root / "data.csv", n=6)


def _run(tiny, out, *extra):
    model, data = tiny
    gen.main(["--model", str(model), "--input", str(data), "--output", str(out), "--samples", "3",
              "--max_new_tokens", "6", "--batch_size", "4", "--device", "cpu", *extra])


def test_submission_schema_and_metric(tiny, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    _run(tiny, out, "--mean_prompt", "Rewrite the text.")
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "rewrite_prompt"]
    assert [r[0] for r in rows[1:]] == [f"r{i}" for i in range(6)]
    assert all(r[1].endswith("Rewrite the text.") for r in rows[1:])
    printed = capsys.readouterr().out
    for label in ("sample 1:", "sample 2:", "sample 3:", "joined (3 samples + mean prompt)"):
        assert label in printed


def test_same_seed_same_file(tiny, tmp_path):
    _run(tiny, tmp_path / "a.csv", "--seed", "5")
    _run(tiny, tmp_path / "b.csv", "--seed", "5")
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_join_samples():
    assert gen.join_samples([" a ", "", "b"], "mean") == "a b mean"


def test_missing_input_file(tiny, tmp_path):
    with pytest.raises(EngineError, match="not found"):
        gen.main(["--model", str(tiny[0]), "--input", str(tmp_path / "absent.csv")])


def test_top_p_outside_0_1_is_a_clear_error(tiny):
    with pytest.raises(EngineError, match="--top_p must be in"):
        gen.main(["--model", str(tiny[0]), "--top_p", "0"])


def test_missing_column(tiny, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,original_text\n1,hello\n")
    with pytest.raises(EngineError, match="rewritten_text"):
        gen.main(["--model", str(tiny[0]), "--input", str(bad), "--output", str(tmp_path / "o.csv")])


def test_adapter_for_another_model(tiny, tmp_path):
    import engine
    from engine.adapters import save_adapter
    from models.lora import inject_lora
    from tests.tiny import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", preset="tiny-moe")
    m, _ = engine.load(other, device="cpu")
    inject_lora(m, r=4, alpha=8, targets=["q_proj", "w1"])
    save_adapter(m, tmp_path / "adapter")
    with pytest.raises(EngineError, match="matches no LoRA layer|another"):
        _run(tiny, tmp_path / "o.csv", "--adapter", str(tmp_path / "adapter"))


def test_rows_written_before_an_error_are_kept(tiny, tmp_path, monkeypatch):
    import engine.sampling

    real = engine.sampling.generate
    calls = {"n": 0}

    def fail_second(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure")
        return real(*args, **kw)

    monkeypatch.setattr(engine.sampling, "generate", fail_second)
    out = tmp_path / "sub.csv"
    with pytest.raises(RuntimeError):
        _run(tiny, out)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + 4  # header + the first batch of 4


def test_free_form_prompt(tiny, capsys):
    gen.main(["--model", str(tiny[0]), "--prompt", "Say hi.", "--samples", "2", "--max_new_tokens", "4",
              "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "--- sample 1" in printed and "--- sample 2" in printed
