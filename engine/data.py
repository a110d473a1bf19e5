"""Data: load prompt-recovery rows, turn them into labelled token sequences, batch them.

Rows are dicts with the competition's columns (`original_text`, `rewritten_text`,
`rewrite_prompt`, optionally `id`, `analysis`, `split`, ...). Files are CSV or JSONL; other
datasets' column names map onto ours with `columns={"rewrite_prompt": "gpt4_prompt"}`.
Problems the user must fix raise EngineError; rows with an empty required field are dropped and
counted in a `DataReport`, never fatal.

Labels follow DESIGN.md: the prompt part and the response are tokenized separately and
concatenated, so the completion mask comes from positions, not from searching the token stream.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import templates
from engine.errors import EngineError

REQUIRED = ("original_text", "rewritten_text", "rewrite_prompt")
IGNORE_INDEX = -100
LOSSES = ("completion", "full")
BUNDLED_PATH = Path(__file__).resolve().parent.parent / "data" / "prompt_recovery.csv"
BUNDLED_SOURCES = ("everyday", "creative", "curated")
DEFAULT_MODEL = "smollm2-135m-instruct"

# The original study's datasets (not shipped): the column mapping each needs, and the bundled
# subset that stands in for it (data/README.md says why).
STUDY_DATASETS = {
    "mooney_test_with_gpt4": {"columns": {"rewrite_prompt": "gpt4_prompt"}, "stand_in": "bundled:creative"},
    "high_quality_dataset_v1": {"columns": {}, "stand_in": "bundled:curated"},
    "gemma_suppl_rewrite_curated_with_gpt4": {"columns": {"rewrite_prompt": "gpt4_prompt"},
                                              "stand_in": "bundled:everyday"},
}


@dataclass
class DataReport:
    """What happened to the rows: how many were read, dropped (and why), kept."""

    source: str
    total: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.total - sum(self.dropped.values())

    def drop(self, reason: str, n: int = 1):
        self.dropped[reason] += n

    def merge(self, other: "DataReport") -> "DataReport":
        return DataReport(f"{self.source} + {other.source}", self.total + other.total,
                          self.dropped + other.dropped, self.notes + other.notes)

    def summary(self) -> str:
        n_drop = sum(self.dropped.values())
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        line = f"{self.source}: {self.total} rows, {n_drop} dropped"
        line += f" ({why})" if why else ""
        line += f", {self.kept} kept"
        return line + "".join(f"; {note}" for note in self.notes)

    def __str__(self) -> str:
        return self.summary()


# ---- reading files ----

def parse_columns(columns) -> dict:
    """A column mapping {ours: theirs} from a dict, a dict literal, or 'ours=theirs,...'."""
    if columns is None or columns == "":
        return {}
    if isinstance(columns, str):
        text = columns.strip()
        try:
            columns = (ast.literal_eval(text) if text.startswith("{")
                       else dict(part.split("=", 1) for part in text.split(",") if part.strip()))
        except (ValueError, SyntaxError):
            raise EngineError(
                f"cannot read the column mapping {text!r}; write it as "
                "--columns=\"{'rewrite_prompt': 'gpt4_prompt'}\" or rewrite_prompt=gpt4_prompt."
            ) from None
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in columns.items()):
        raise EngineError(f"the column mapping must map our column names to yours, got {columns!r}.")
    return {k.strip(): v.strip() for k, v in columns.items()}


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EngineError(
            f"{path} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} cannot be "
            f"decoded. Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > "
            f"fixed{path.suffix}`)."
        ) from None


def _read_records(path: Path) -> tuple[list[dict], list[str]]:
    """Raw records and the column names found, from CSV or JSONL/JSON."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise EngineError(f"{path}: unknown data file type {suffix!r}; use .csv, .jsonl or .json.")
    text = _read_text(path)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        records = list(reader)
        return records, list(reader.fieldnames or [])
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise EngineError(f"{path} is not valid JSON ({e}).") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EngineError(f"{path}, line {lineno}: not valid JSON ({e}).") from None
    if not all(isinstance(r, dict) for r in records):
        raise EngineError(f"{path}: every record must be a JSON object with named fields.")
    found = list(dict.fromkeys(k for r in records for k in r))
    return records, found


_HINTS = {"rewrite_prompt": "prompt", "original_text": "orig", "rewritten_text": "rewrit",
          "analysis": "analy", "id": "id"}


def _missing_columns_error(path: Path, missing: list[str], found: list[str], columns: dict):
    guesses = {}
    for col in missing:
        hint = _HINTS.get(col, col)
        guesses[col] = next((f for f in found if hint in f.lower()), "YOUR_COLUMN")
    return EngineError(
        f"{path} has no column "
        + ", ".join(f"{c!r}" + (f" (mapped to {columns[c]!r})" if c in columns else "") for c in missing)
        + f" (columns found: "
        f"{', '.join(found) or 'none'}"
        + (f"; mapping used: {columns}" if columns else "")
        + "). If the file names it differently, map our name to yours with --columns, e.g. "
        f"--columns=\"{guesses}\"."
    )


def load_rows(path, columns=None, split: str | None = None,
              required: tuple[str, ...] = REQUIRED,
              where: dict | None = None) -> tuple[list[dict], DataReport]:
    """Read a CSV/JSONL file into rows with our column names; drop (and count) incomplete rows.

    columns: {our name: the file's name} for files that name columns differently.
    split: keep only rows whose `split` column equals it (short for where={"split": split}).
    where: keep only rows whose columns equal these values; the others are not counted.
    Every row gets a string `id` (the file's, or `<file stem>-<row number>`); ids must be unique.
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"data file {path} not found.")
    columns = parse_columns(columns)
    records, found = _read_records(path)
    absent = [theirs for theirs in columns.values() if theirs not in found]
    where = {**(where or {}), **({"split": split} if split is not None else {})}
    needed = list(required) + [c for c in where if c not in required]
    missing = [c for c in needed if columns.get(c, c) not in found]
    if absent or missing:
        raise _missing_columns_error(path, missing or [k for k, v in columns.items() if v in absent],
                                     found, columns)

    report = DataReport(str(path) + "".join(f" [{c}={v}]" for c, v in where.items()))
    rows, seen = [], Counter()
    for i, rec in enumerate(records):
        row = dict(rec)
        for ours, theirs in columns.items():
            row[ours] = rec.get(theirs)
        if any(str(row.get(c, "")).strip() != v for c, v in where.items()):
            continue
        report.total += 1
        row["id"] = str(row["id"]).strip() if row.get("id") not in (None, "") else f"{path.stem}-{i}"
        seen[row["id"]] += 1
        empty = [c for c in required if row.get(c) is None or not str(row[c]).strip()]
        if empty:
            report.drop(f"empty {empty[0]}")
            continue
        for c in required:
            row[c] = str(row[c])
        rows.append(row)
    dups = [i for i, n in seen.items() if n > 1]
    if dups:
        raise EngineError(
            f"{path}: duplicate ids {', '.join(dups[:5])}{' ...' if len(dups) > 5 else ''} "
            f"({len(dups)} in all). Make the id column unique, or remove it and ids are numbered."
        )
    if where and report.total == 0:
        have = "; ".join(f"{c}: " + ", ".join(sorted({str(r.get(columns.get(c, c), "")) for r in records}))
                         for c in where)
        raise EngineError(f"{path}: no rows with "
                          + ", ".join(f"{c}={v!r}" for c, v in where.items()) + f" (values found: {have}).")
    return rows, report


# ---- datasets by name ----

def _find_data_file(name: str, data_dir: Path) -> Path | None:
    as_path = Path(name)
    if as_path.suffix.lower() in (".csv", ".jsonl", ".json") and as_path.is_file():
        return as_path
    for ext in (".csv", ".jsonl", ".json"):
        if (data_dir / f"{name}{ext}").is_file():
            return data_dir / f"{name}{ext}"
    return None


def _missing_dataset_error(name: str, data_dir: Path, columns: dict, recipe: str | None):
    study = STUDY_DATASETS.get(name)
    cols = ", ".join(f"{c} (yours: {columns[c]})" if c in columns else c for c in REQUIRED)
    run = f"python -m engine.train {recipe or 'RECIPE'} --model={DEFAULT_MODEL} --data=bundled"
    stand_in = f" (or only its stand-in subset: --data={study['stand_in']})" if study else ""
    return EngineError(
        f"dataset {name!r} not found: expected {data_dir / (name + '.csv')} or "
        f"{data_dir / (name + '.jsonl')}, with columns {cols}, optionally id, analysis "
        f"(for output_type='cot') and split."
        + (" It is one of the original study's datasets, which are not shipped with the project."
           if study else "")
        + f" Put the file there (or point data_dir at its folder), or run the same recipe on the "
        f"bundled data: `{run}`{stand_in}."
    )


def subsample(rows: list, fraction: float | None, seed: int = 0) -> list:
    """A deterministic fraction of rows (the study's v1 trained on half a dataset), in order."""
    if fraction is None or fraction >= 1:
        return rows
    if not 0 < fraction < 1:
        raise EngineError(f"fraction must be in (0, 1], got {fraction}.")
    keep = sorted(random.Random(seed).sample(range(len(rows)), max(1, round(len(rows) * fraction))))
    return [rows[i] for i in keep]


def load_dataset(name, data_dir="data", *, split: str | None = None, columns=None,
                 fraction: float | None = None, seed: int = 0,
                 required: tuple[str, ...] = REQUIRED,
                 recipe: str | None = None) -> tuple[list[dict], DataReport]:
    """Rows of a dataset by name.

    `bundled`: the bundled CSV (all sources); `bundled:everyday` (or creative, curated): one
    source. Another name: `data_dir/NAME.csv` (or .jsonl/.json), or a path to such a file. A
    list (or comma-separated names) concatenates datasets; ids then become `NAME/id`.
    The study's dataset names get their column mapping unless `columns` is given.
    fraction keeps that share of each dataset (deterministic by seed).
    """
    names = [n.strip() for n in name.split(",")] if isinstance(name, str) else list(name)
    if not names or not all(names):
        raise EngineError(f"no dataset named in {name!r}; try --data=bundled.")
    out, report = [], None
    for n in names:
        rows, rep = _load_one(n, Path(data_dir), split, columns, required, recipe)
        rows = subsample(rows, fraction, seed)
        if fraction is not None and fraction < 1:
            rep.notes.append(f"fraction {fraction} -> {len(rows)} rows")
        if len(names) > 1:
            rows = [{**r, "id": f"{n}/{r['id']}"} for r in rows]
        out += rows
        report = rep if report is None else report.merge(rep)
    return out, report


def _load_one(name: str, data_dir: Path, split, columns, required, recipe):
    if name == "bundled" or name.startswith("bundled:"):
        if not BUNDLED_PATH.is_file():
            raise EngineError(
                f"the bundled dataset {BUNDLED_PATH} is missing; it ships with the project's "
                "source tree (rebuild it with `python data/assemble.py`)."
            )
        where = {}
        if name.startswith("bundled:"):
            where["source"] = name.split(":", 1)[1]
            if where["source"] not in BUNDLED_SOURCES:
                raise EngineError(
                    f"unknown bundled subset {where['source']!r}; use one of "
                    f"{', '.join('bundled:' + s for s in BUNDLED_SOURCES)}, or bundled for all."
                )
        return load_rows(BUNDLED_PATH, None, split, required, where)
    study = STUDY_DATASETS.get(name, {})
    cols = parse_columns(columns) if columns else dict(study.get("columns", {}))
    path = _find_data_file(name, data_dir)
    if path is None:
        raise _missing_dataset_error(name, data_dir, cols, recipe)
    return load_rows(path, cols, split, required)


# ---- tokens and labels ----

def encode_example(tokenizer, row: dict, output_type: str = "prompt", fmt: str = "auto",
                   loss: str = "completion") -> dict:
    """{"input_ids", "labels"} for one row.

    completion: only the response tokens and the EOS after them carry labels (the rest -100).
    full: every token is labelled (padding, added later by collate_train, never is).
    The prompt part equals `templates.prompt_ids`, which generation uses as well.
    """
    if loss not in LOSSES:
        raise EngineError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}.")
    prompt = templates.prompt_ids(tokenizer, row["original_text"], row["rewritten_text"],
                                  output_type, fmt)
    response = templates.response_ids(tokenizer, row["rewrite_prompt"], output_type,
                                      row.get("analysis"))
    ids = prompt + response
    labels = list(ids) if loss == "full" else [IGNORE_INDEX] * len(prompt) + response
    return {"input_ids": ids, "labels": labels}


def encode_rows(tokenizer, rows: list[dict], output_type: str = "prompt", fmt: str = "auto",
                loss: str = "completion", max_seq_length: int | None = None,
                report: DataReport | None = None) -> list[dict]:
    """Encode rows; drop (and count in report) those longer than max_seq_length.

    A too-long example is dropped, never truncated: cutting the response would teach the model
    a prompt without its end. Each example keeps `index`, its position in rows.
    """
    fmt = templates.resolve_format(tokenizer, fmt)
    out = []
    for i, row in enumerate(rows):
        ex = encode_example(tokenizer, row, output_type, fmt, loss)
        if max_seq_length is not None and len(ex["input_ids"]) > max_seq_length:
            if report is not None:
                report.drop(f"longer than max_seq_length={max_seq_length}")
            continue
        ex["index"] = i
        out.append(ex)
    return out


# ---- batching ----

def collate_train(batch: list[dict], pad_id: int, pad_to_multiple_of: int | None = None):
    """Right-padded (input_ids, labels, attention_mask), each a LongTensor (B, T)."""
    T = max(len(ex["input_ids"]) for ex in batch)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
    for b, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        mask[b, :n] = 1
    return input_ids, labels, mask


def collate_generate(prompts: list[list[int]], pad_id: int):
    """Left-padded (input_ids, attention_mask), LongTensors (B, T): every prompt ends at T-1."""
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)  # (B, T)
    for b, p in enumerate(prompts):
        if p:
            input_ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, T - len(p):] = 1
    return input_ids, mask


def shard_batches(batches: list[list[int]], rank: int = 0, world_size: int = 1,
                  even: bool = True) -> list[list[int]]:
    """This rank's batches: every world_size-th one, starting at rank.

    even=True (training) drops the last few batches so every rank takes the same number of
    steps; even=False (generation) keeps them all.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise EngineError(f"rank {rank} is not within world_size {world_size}.")
    if even:
        batches = batches[: len(batches) // world_size * world_size]
    return batches[rank::world_size]


def bucketed_batches(lengths: list[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                     *, mega_batches: int = 32, drop_last: bool = False, rank: int = 0,
                     world_size: int = 1) -> list[list[int]]:
    """Batches of example indices.

    shuffle=True: shuffle (by seed), cut into mega-chunks of mega_batches * batch_size examples,
    sort each chunk by length and cut it into batches (little padding), then shuffle the batches.
    Pass seed + epoch for a new order each epoch. shuffle=False: the plain order 0, 1, 2, ...
    rank/world_size: keep this rank's share (see shard_batches).
    """
    if batch_size < 1:
        raise EngineError(f"batch_size must be >= 1, got {batch_size}.")
    order = list(range(len(lengths)))
    if shuffle:
        rng = random.Random(seed)
        rng.shuffle(order)
        chunk = batch_size * mega_batches
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        rng.shuffle(batches)
    if world_size > 1:
        batches = shard_batches(batches, rank, world_size)
    return batches


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the padded batch tensors that is padding (0 = none wasted)."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if padded == 0 else 1 - real / padded
