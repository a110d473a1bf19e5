"""engine.data: loading with clear errors, completion masks on real tokenizers, batching."""
import json

import pytest
import torch

from engine import data, templates
from engine.errors import EngineError
from engine.tokenizer import Tokenizer

ROWS = [
    {"id": "a", "original_text": "Dear team,\nthe meeting moves to Friday at 10:00 in room 4B.",
     "rewritten_text": "Ahoy, crew! The meetin' be movin' to Friday at ten bells, room 4B.",
     "rewrite_prompt": "Rewrite this memo as a pirate would say it.",
     "analysis": "Same facts, but pirate slang and exclamations replace the plain memo tone."},
    {"id": "b", "original_text": "Mix the flour and water; knead for 8 minutes, then rest 1 hour.",
     "rewritten_text": "Flour meets water,\nkneaded eight minutes through,\nan hour of rest.",
     "rewrite_prompt": 'Turn the recipe into a haiku titled "Dough".',
     "analysis": "The steps become three short lines with a 5-7-5 rhythm, so a haiku was asked."},
    {"id": "c", "original_text": "Café Olé opens on Main St. — 50% off lattés until June 3rd!",
     "rewritten_text": "We are pleased to announce that Café Olé opens on Main Street.",
     "rewrite_prompt": "Make it sound formal and drop the discount.",
     "analysis": "The tone turns formal and the discount sentence is gone."},
]

CHAT_TEMPLATE_MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def _sp_tokenizer(tmp_path, chat_template=None) -> Tokenizer:
    """A SentencePiece-style Llama tokenizer: Metaspace + BPE, <s>/</s>, BOS post-processor."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [templates.INSTRUCTION, templates.PROMPT_PREFIX, *templates.TASKS.values(),
              "[INST] [/INST] {} \"rewrite_prompt\": \\ \n"]
    for r in ROWS:
        corpus += [r["original_text"], r["rewritten_text"], r["rewrite_prompt"], r["analysis"]]
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    out = tmp_path / ("sp_chat" if chat_template else "sp")
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(out)


@pytest.fixture(scope="module")
def default_tokenizer():
    from engine import default_model

    return Tokenizer.from_dir(default_model.ensure_embedded_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tokenizers_and_formats(tmp_path_factory, default_tokenizer):
    tmp = tmp_path_factory.mktemp("tok")
    sp = _sp_tokenizer(tmp)
    sp_chat = _sp_tokenizer(tmp, CHAT_TEMPLATE_MISTRAL)
    assert sp.encode("Make it formal.")[0] == sp.bos_token_id  # Llama-like post-processor
    assert default_tokenizer.chat_template
    return [("smollm2", default_tokenizer, "chat_template"), ("smollm2", default_tokenizer, "mistral"),
            ("sp", sp, "mistral"), ("sp", sp, "auto"), ("sp_chat", sp_chat, "chat_template")]


# ---- labels ----

@pytest.mark.parametrize("output_type", ["prompt", "cot"])
def test_only_response_and_eos_are_labelled(tokenizers_and_formats, output_type):
    for name, tok, fmt in tokenizers_and_formats:
        for row in ROWS:
            ex = data.encode_example(tok, row, output_type, fmt, loss="completion")
            ids, labels = ex["input_ids"], ex["labels"]
            prompt = templates.prompt_ids(tok, row["original_text"], row["rewritten_text"], output_type, fmt)
            assert ids[: len(prompt)] == prompt, name  # generation-time prompt tokens
            labelled = [i for i, l in enumerate(labels) if l != data.IGNORE_INDEX]
            assert labelled == list(range(len(prompt), len(ids))), name  # one span, to the end
            span = [labels[i] for i in labelled]
            assert span == ids[len(prompt):]
            assert span[-1] == tok.eos_token_id and tok.eos_token_id not in span[:-1]
            text = tok.decode(span[:-1])
            assert text.strip() == templates.response_text(row["rewrite_prompt"], output_type, row["analysis"]), name
            # round trip: tokens -> decoded response -> parsed prompt
            assert templates.parse_response(tok.decode(span), output_type) == row["rewrite_prompt"], name


def test_generation_prompt_matches_template_text(tokenizers_and_formats):
    for name, tok, fmt in tokenizers_and_formats:
        row = ROWS[0]
        ids = templates.prompt_ids(tok, row["original_text"], row["rewritten_text"], "prompt", fmt)
        text = templates.prompt_text(tok, row["original_text"], row["rewritten_text"], "prompt", fmt)
        shown = tok.decode(ids, skip_special_tokens=False)
        assert shown.replace(" ", "") == text.replace(" ", ""), name
        if templates.resolve_format(tok, fmt) == "chat_template":
            assert ids == tok.encode(text, add_special_tokens=False)
        else:
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
            assert shown.rstrip().endswith("[/INST]")


def test_prime_ids_start_every_prompt_response(tokenizers_and_formats):
    for name, tok, fmt in tokenizers_and_formats:
        prime = templates.prime_ids(tok, "prompt")
        for row in ROWS:
            resp = templates.response_ids(tok, row["rewrite_prompt"], "prompt")
            assert resp[: len(prime)] == prime, name
    assert templates.prime_ids(tok, "cot") == []


def test_full_loss_labels_every_token(tokenizers_and_formats):
    _, tok, fmt = tokenizers_and_formats[2]
    ex = data.encode_example(tok, ROWS[1], "prompt", fmt, loss="full")
    assert ex["labels"] == ex["input_ids"]
    ids, labels, mask = data.collate_train([ex, data.encode_example(tok, ROWS[0], "prompt", fmt, "full")],
                                           pad_id=tok.pad_token_id)
    assert ((labels == data.IGNORE_INDEX) == (mask == 0)).all()  # padding never labelled
    with pytest.raises(EngineError, match="unknown loss"):
        data.encode_example(tok, ROWS[0], loss="everything")


def test_cot_without_analysis_is_a_clear_error(tokenizers_and_formats):
    _, tok, fmt = tokenizers_and_formats[2]
    with pytest.raises(EngineError, match="analysis"):
        data.encode_example(tok, {**ROWS[0], "analysis": ""}, "cot", fmt)


def test_max_seq_length_drops_and_reports(tokenizers_and_formats):
    _, tok, fmt = tokenizers_and_formats[2]
    lengths = [len(data.encode_example(tok, r, "prompt", fmt)["input_ids"]) for r in ROWS]
    limit = sorted(lengths)[1]
    report = data.DataReport("rows", total=len(ROWS))
    kept = data.encode_rows(tok, ROWS, "prompt", fmt, max_seq_length=limit, report=report)
    assert [ex["index"] for ex in kept] == [i for i, n in enumerate(lengths) if n <= limit]
    assert report.dropped[f"longer than max_seq_length={limit}"] == len(ROWS) - len(kept)
    assert f"longer than max_seq_length={limit}" in report.summary()


# ---- collate ----

def test_collate_train_right_pads():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    ids, labels, mask = data.collate_train(batch, pad_id=0)
    assert ids.dtype == labels.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert data.collate_train(batch, pad_id=0, pad_to_multiple_of=8)[0].shape == (2, 8)


def test_collate_generate_left_pads():
    ids, mask = data.collate_generate([[5, 6, 7], [8]], pad_id=2)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ---- batching ----

def test_bucketed_batches_cover_once_and_waste_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 600, (1000,), generator=g).tolist()
    batches = data.bucketed_batches(lengths, 8, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    assert batches == data.bucketed_batches(lengths, 8, seed=1)  # deterministic
    assert batches != data.bucketed_batches(lengths, 8, seed=2)
    plain = data.bucketed_batches(lengths, 8, shuffle=False)
    assert plain[0] == list(range(8)) and plain[-1] == list(range(992, 1000))
    bucketed, unsorted = data.padding_fraction(batches, lengths), data.padding_fraction(plain, lengths)
    assert bucketed < 0.1 < unsorted
    assert data.padding_fraction([[0, 1]], [3, 3]) == 0.0


def test_bucketed_batches_drop_last():
    batches = data.bucketed_batches([10] * 10, 4, seed=0, drop_last=True)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)


def test_shards_are_disjoint_equal_and_deterministic():
    lengths = list(range(1, 104))
    full = data.bucketed_batches(lengths, 4, seed=3)
    shards = [data.bucketed_batches(lengths, 4, seed=3, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    seen = [tuple(b) for s in shards for b in s]
    assert len(seen) == len(set(seen)) == len(full) // 3 * 3
    assert set(seen) <= {tuple(b) for b in full}
    kept = data.shard_batches(full, 0, 3, even=False) + data.shard_batches(full, 1, 3, even=False) \
        + data.shard_batches(full, 2, 3, even=False)
    assert sorted(map(tuple, kept)) == sorted(map(tuple, full))
    with pytest.raises(EngineError, match="rank"):
        data.shard_batches(full, 3, 3)


# ---- loading ----

def _write_csv(path, header, rows, encoding="utf-8"):
    import csv

    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_load_csv_and_jsonl(tmp_path):
    cols = ["id", "original_text", "rewritten_text", "rewrite_prompt", "split"]
    csv_path = _write_csv(tmp_path / "d.csv", cols, [
        ["1", "line one,\nline two", "new", "Make it new.", "train"],
        ["2", "old", "newer", "Make it newer.", "test"],
    ])
    rows, report = data.load_rows(csv_path)
    assert [r["id"] for r in rows] == ["1", "2"] and rows[0]["original_text"] == "line one,\nline two"
    assert report.kept == 2 and "0 dropped" in report.summary()
    rows, _ = data.load_rows(csv_path, split="test")
    assert [r["id"] for r in rows] == ["2"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({k: r[k] for k in data.REQUIRED}) for r in ROWS) + "\n\n")
    rows, report = data.load_rows(jsonl)
    assert [r["rewrite_prompt"] for r in rows] == [r["rewrite_prompt"] for r in ROWS]
    assert [r["id"] for r in rows] == ["d-0", "d-1", "d-2"]  # numbered when the file has no ids
    as_json = tmp_path / "e.json"
    as_json.write_text(json.dumps(ROWS))
    assert len(data.load_rows(as_json)[0]) == 3


def test_column_mapping(tmp_path):
    path = _write_csv(tmp_path / "study.csv", ["original_text", "rewritten_text", "gpt4_prompt"],
                      [["a b", "c d", "Make it shorter."]])
    for columns in ({"rewrite_prompt": "gpt4_prompt"}, "{'rewrite_prompt': 'gpt4_prompt'}",
                    "rewrite_prompt=gpt4_prompt"):
        rows, _ = data.load_rows(path, columns=columns)
        assert rows[0]["rewrite_prompt"] == "Make it shorter."


def test_missing_file_error(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        data.load_rows(tmp_path / "nope.csv")


def test_missing_column_error_names_found_columns_and_fix(tmp_path):
    path = _write_csv(tmp_path / "study.csv", ["original_text", "rewritten_text", "gpt4_prompt"],
                      [["a", "b", "c"]])
    with pytest.raises(EngineError) as e:
        data.load_rows(path)
    msg = str(e.value)
    assert "'rewrite_prompt'" in msg and "original_text, rewritten_text, gpt4_prompt" in msg
    assert "--columns" in msg and "{'rewrite_prompt': 'gpt4_prompt'}" in msg
    with pytest.raises(EngineError, match="no column 'rewrite_prompt'.*mapping used"):
        data.load_rows(path, columns={"rewrite_prompt": "prompt"})
    with pytest.raises(EngineError, match="cannot read the column mapping"):
        data.load_rows(path, columns="{'rewrite_prompt': ")


def test_bad_encoding_error_names_file_and_offset(tmp_path):
    path = tmp_path / "latin.csv"
    text = "original_text,rewritten_text,rewrite_prompt\nCaf\xe9,b,c\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(EngineError, match=r"latin\.csv is not UTF-8: byte 0xe9 at byte offset 47"):
        data.load_rows(path)


def test_duplicate_ids_error(tmp_path):
    path = _write_csv(tmp_path / "dup.csv", ["id", "original_text", "rewritten_text", "rewrite_prompt"],
                      [["x", "a", "b", "c"], ["y", "a", "b", "c"], ["x", "d", "e", "f"]])
    with pytest.raises(EngineError, match="duplicate ids x"):
        data.load_rows(path)


def test_bad_json_line_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"original_text": "a", "rewritten_text": "b", "rewrite_prompt": "c"}\n{oops\n')
    with pytest.raises(EngineError, match="bad.jsonl, line 2"):
        data.load_rows(path)


def test_empty_fields_are_dropped_and_reported(tmp_path):
    path = _write_csv(tmp_path / "holes.csv", ["id", "original_text", "rewritten_text", "rewrite_prompt"],
                      [["1", "a", "b", "c"], ["2", "a", "b", "  "], ["3", "", "b", "c"], ["4", "a", "b", ""]])
    rows, report = data.load_rows(path)
    assert [r["id"] for r in rows] == ["1"]
    assert report.total == 4 and report.kept == 1
    assert report.dropped == {"empty rewrite_prompt": 2, "empty original_text": 1}
    summary = report.summary()
    assert "3 dropped" in summary and "2 empty rewrite_prompt" in summary and "1 empty original_text" in summary


# ---- datasets by name ----

def test_bundled_dataset_and_subsets():
    rows, report = data.load_dataset("bundled")
    assert len(rows) == report.kept > 0
    by_source = {s: data.load_dataset(f"bundled:{s}")[0] for s in data.BUNDLED_SOURCES}
    assert sum(len(v) for v in by_source.values()) == len(rows)
    assert all(r["source"] == s for s, v in by_source.items() for r in v)
    train, _ = data.load_dataset("bundled", split="train")
    assert 0 < len(train) < len(rows) and {r["split"] for r in train} == {"train"}
    with pytest.raises(EngineError, match="bundled:everyday"):
        data.load_dataset("bundled:poetry")
    with pytest.raises(EngineError, match="no rows with split='dev'.*test, train, valid"):
        data.load_dataset("bundled", split="dev")
    sub, report = data.load_dataset("bundled:curated", split="valid")
    assert report.total == report.kept == len(sub) > 0  # the report counts only the subset


def test_fraction_is_deterministic():
    rows, _ = data.load_dataset("bundled")
    half, report = data.load_dataset("bundled", fraction=0.5, seed=7)
    assert len(half) == round(len(rows) * 0.5) and "fraction 0.5" in report.summary()
    assert half == data.load_dataset("bundled", fraction=0.5, seed=7)[0]
    assert half != data.load_dataset("bundled", fraction=0.5, seed=8)[0]
    ids = [r["id"] for r in rows]
    assert [ids.index(r["id"]) for r in half] == sorted(ids.index(r["id"]) for r in half)


def test_missing_named_dataset_error_explains_files_columns_and_bundled_run(tmp_path):
    with pytest.raises(EngineError) as e:
        data.load_dataset("mooney_test_with_gpt4", tmp_path, recipe="recipes/v1.py")
    msg = str(e.value)
    assert str(tmp_path / "mooney_test_with_gpt4.csv") in msg
    assert str(tmp_path / "mooney_test_with_gpt4.jsonl") in msg
    assert "original_text" in msg and "rewritten_text" in msg and "rewrite_prompt (yours: gpt4_prompt)" in msg
    assert "python -m engine.train recipes/v1.py --model=smollm2-135m-instruct --data=bundled" in msg
    assert "--data=bundled:creative" in msg
    with pytest.raises(EngineError, match="my_data.csv"):
        data.load_dataset("my_data", tmp_path)


def test_study_dataset_gets_its_mapping_and_names_combine(tmp_path):
    _write_csv(tmp_path / "mooney_test_with_gpt4.csv", ["original_text", "rewritten_text", "gpt4_prompt"],
               [["a b", "c d", "Make it shorter."], ["e f", "g h", "Make it longer."]])
    (tmp_path / "high_quality_dataset_v1.jsonl").write_text(
        json.dumps({"id": "q1", "original_text": "x", "rewritten_text": "y", "rewrite_prompt": "Add dragons."}))
    rows, _ = data.load_dataset("mooney_test_with_gpt4", tmp_path)
    assert [r["rewrite_prompt"] for r in rows] == ["Make it shorter.", "Make it longer."]
    both, report = data.load_dataset("high_quality_dataset_v1,mooney_test_with_gpt4", tmp_path)
    assert [r["id"] for r in both] == ["high_quality_dataset_v1/q1", "mooney_test_with_gpt4/mooney_test_with_gpt4-0",
                                       "mooney_test_with_gpt4/mooney_test_with_gpt4-1"]
    assert report.total == 3
