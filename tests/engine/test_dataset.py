"""The bundled dataset data/prompt_recovery.csv (built by data/assemble.py) meets its card."""
import csv
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSV = ROOT / "data" / "prompt_recovery.csv"
COLUMNS = ["id", "original_text", "rewrite_prompt", "rewritten_text", "analysis", "split", "source",
           "kind", "generic", "lead_in"]


def _assemble():
    spec = importlib.util.spec_from_file_location("assemble", ROOT / "data" / "assemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rows():
    with open(CSV, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def _share(rows, pred):
    return sum(1 for r in rows if pred(r)) / len(rows)


def test_size_and_variety(rows):
    assert len(rows) >= 400
    assert len({_assemble().normalize_prompt(r["rewrite_prompt"]) for r in rows}) >= 200
    assert len({r["kind"] for r in rows}) >= 20


def test_fields(rows):
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert all(r[c].strip() for c in COLUMNS), r["id"]
        assert 40 <= len(r["original_text"].split()) <= 200, r["id"]
        assert len(r["analysis"].split()) <= 30, r["id"]
        assert r["generic"] in ("true", "false") and r["lead_in"] in ("true", "false"), r["id"]


def test_mix(rows):
    assert 0.15 <= _share(rows, lambda r: r["generic"] == "true") <= 0.35
    assert 0.05 <= _share(rows, lambda r: r["lead_in"] == "true") <= 0.20
    sources = Counter(r["source"] for r in rows)
    assert set(sources) == {"everyday", "creative", "curated"}
    for s, n in sources.items():
        assert 0.25 <= n / len(rows) <= 0.42, s


def test_split(rows):
    shares = Counter(r["split"] for r in rows)
    assert set(shares) == {"train", "valid", "test"}
    assert 0.75 <= shares["train"] / len(rows) <= 0.85
    for s in ("valid", "test"):
        assert 0.07 <= shares[s] / len(rows) <= 0.13, s
    norm = _assemble().normalize_prompt
    by_split = {s: {norm(r["rewrite_prompt"]) for r in rows if r["split"] == s} for s in shares}
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["valid"]
    assert not by_split["valid"] & by_split["test"]


def test_csv_and_card_are_what_assemble_writes(tmp_path, rows):
    """The committed CSV and the card's counts are up to date with data/parts (deterministic)."""
    mod = _assemble()
    parts, errors = mod.read_parts()
    assert not errors
    mod.assign_splits(parts)
    mod.write_csv(parts, tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_bytes() == CSV.read_bytes()
    card = (ROOT / "data" / "README.md").read_text(encoding="utf-8")
    assert f"{mod.COUNTS_START}\n{mod.counts_markdown(parts)}\n{mod.COUNTS_END}" in card
