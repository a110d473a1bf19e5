"""Assemble data/parts/*.jsonl into data/prompt_recovery.csv, with a fixed train/valid/test split.

Usage: python data/assemble.py [--strict]

Also rewrites the counts section of the data card, data/README.md, from the assembled rows.

Each row is validated (keys, types, 40-200 word originals, analyses of at most 30 words, unique
ids); an invalid row is reported and left out (--strict: exit with status 1 instead).
The split is by prompt: rows whose prompts are equal once normalized (case, punctuation,
spacing) form one group, and a group goes whole to one split, so no prompt is shared between
train, valid and test. Within each source, groups are ordered by a stable hash of their prompt
and the first ~80% of rows go to train, the next ~10% to valid, the rest to test. The output
depends only on the rows, never on file order or a random state; adding rows moves few others.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = HERE / "parts"
OUT = HERE / "prompt_recovery.csv"
README = HERE / "README.md"
COUNTS_START = "<!-- counts:start (written by data/assemble.py; do not edit by hand) -->"
COUNTS_END = "<!-- counts:end -->"
COLUMNS = ["id", "original_text", "rewrite_prompt", "rewritten_text", "analysis", "split",
           "source", "kind", "generic", "lead_in"]
TEXT_KEYS = ["id", "source", "kind", "original_text", "rewrite_prompt", "rewritten_text", "analysis"]
BOOL_KEYS = ["generic", "lead_in"]
SOURCES = ("everyday", "creative", "curated")
SPLITS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))


def words(text: str) -> int:
    return len(text.split())


def normalize_prompt(prompt: str) -> str:
    """The grouping key: lowercase letters and digits, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", prompt.lower()).split())


def problems(row: dict) -> list[str]:
    """What is wrong with a row (empty list: valid)."""
    out = [f"missing key {k!r}" for k in TEXT_KEYS + BOOL_KEYS if k not in row]
    if out:
        return out
    out += [f"{k} is empty or not a string" for k in TEXT_KEYS
            if not isinstance(row[k], str) or not row[k].strip()]
    out += [f"{k} is not true/false" for k in BOOL_KEYS if not isinstance(row[k], bool)]
    if out:
        return out
    if row["source"] not in SOURCES:
        out.append(f"source {row['source']!r} is not one of {', '.join(SOURCES)}")
    if not re.fullmatch(r"[a-z]+(-[a-z]+)*", row["kind"]):
        out.append(f"kind {row['kind']!r} is not a lowercase word or hyphenated phrase")
    if not 40 <= words(row["original_text"]) <= 200:
        out.append(f"original_text has {words(row['original_text'])} words (40-200)")
    if words(row["analysis"]) > 30:
        out.append(f"analysis has {words(row['analysis'])} words (at most 30)")
    if row["rewritten_text"].strip() == row["original_text"].strip():
        out.append("rewritten_text equals original_text")
    return out


def read_parts(parts_dir: Path = PARTS) -> tuple[list[dict], list[str]]:
    """Valid rows of every part file (sorted by id), and a message per invalid one."""
    rows, errors, seen = [], [], set()
    for path in sorted(parts_dir.glob("*.jsonl")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: not valid JSON ({e})")
                continue
            if not isinstance(row, dict):
                errors.append(f"{where}: not a JSON object")
                continue
            bad = problems(row)
            if not bad and row["id"] in seen:
                bad = [f"duplicate id {row['id']!r}"]
            if bad:
                errors.append(f"{where} ({row.get('id', '?')}): " + "; ".join(bad))
                continue
            seen.add(row["id"])
            rows.append({k: row[k].strip() if isinstance(row[k], str) else row[k]
                         for k in TEXT_KEYS + BOOL_KEYS})
    rows.sort(key=lambda r: r["id"])
    return rows, errors


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_splits(rows: list[dict]) -> None:
    """Set row['split'] in place: whole prompt groups, ~80/10/10 of rows within each source."""
    groups = defaultdict(list)
    for r in rows:
        groups[normalize_prompt(r["rewrite_prompt"])].append(r)
    by_source = defaultdict(list)  # a group counts toward the source of its first row (by id)
    for key, members in groups.items():
        by_source[members[0]["source"]].append(key)
    for source in sorted(by_source):
        keys = sorted(by_source[source], key=lambda k: (_stable_hash(k), k))
        total = sum(len(groups[k]) for k in keys)
        done = 0
        for k in keys:
            middle = (done + len(groups[k]) / 2) / total  # where the group's rows sit in the order
            cut, split = 0.0, SPLITS[-1][0]
            for name, share in SPLITS:
                cut += share
                if middle < cut:
                    split = name
                    break
            for r in groups[k]:
                r["split"] = split
            done += len(groups[k])


def write_csv(rows: list[dict], path: Path = OUT) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("true" if r[k] else "false") if k in BOOL_KEYS else r[k] for k in COLUMNS})


def counts(rows: list[dict]) -> str:
    n = len(rows)
    pct = lambda c: f"{c} ({100 * c / n:.0f}%)" if n else "0"
    lines = [f"rows: {n}, distinct prompts: {len({normalize_prompt(r['rewrite_prompt']) for r in rows})}"]
    for col in ("split", "source"):
        c = Counter(r[col] for r in rows)
        lines.append(f"{col}: " + ", ".join(f"{k} {pct(v)}" for k, v in sorted(c.items())))
    for col in BOOL_KEYS:
        lines.append(f"{col}: {pct(sum(r[col] for r in rows))}")
    kinds = Counter(r["kind"] for r in rows)
    lines.append(f"kinds: {len(kinds)}: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return "\n".join(lines)


def counts_markdown(rows: list[dict]) -> str:
    """The data card's counts section, as Markdown tables."""
    n = len(rows)
    pct = lambda c: f"{c} ({100 * c / n:.0f}%)"
    sources = [s for s in SOURCES if any(r["source"] == s for r in rows)]
    out = [f"{n} rows, {len({normalize_prompt(r['rewrite_prompt']) for r in rows})} distinct "
           f"prompts, {len({r['kind'] for r in rows})} kinds of original text.", "",
           "| source | rows | train | valid | test | generic | lead-in |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for s in sources + ["all"]:
        sub = [r for r in rows if s in ("all", r["source"])]
        cells = [str(len(sub))] + [str(sum(r["split"] == sp for r in sub)) for sp, _ in SPLITS]
        cells += [str(sum(r[k] for r in sub)) for k in BOOL_KEYS]
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    out += ["", f"Shares of all rows: " + ", ".join(
        f"{sp} {pct(sum(r['split'] == sp for r in rows))}" for sp, _ in SPLITS)
        + f"; generic {pct(sum(r['generic'] for r in rows))}, specific "
        + f"{pct(sum(not r['generic'] for r in rows))}; lead-ins {pct(sum(r['lead_in'] for r in rows))}.",
        "", "| kind | rows | " + " | ".join(sources) + " |",
        "|---|---:|" + "---:|" * len(sources)]
    kinds = Counter(r["kind"] for r in rows)
    for kind in sorted(kinds, key=lambda k: (-kinds[k], k)):
        cells = [str(sum(r["kind"] == kind and r["source"] == s for r in rows)) for s in sources]
        out.append(f"| {kind} | {kinds[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def update_readme(rows: list[dict], path: Path = README) -> bool:
    """Rewrite the counts block of the data card; False when the card has no such block."""
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    start, end = text.find(COUNTS_START), text.find(COUNTS_END)
    if start < 0 or end < start:
        return False
    block = f"{COUNTS_START}\n{counts_markdown(rows)}\n{COUNTS_END}"
    path.write_text(text[:start] + block + text[end + len(COUNTS_END):], encoding="utf-8")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strict", action="store_true", help="exit 1 when any row is invalid")
    args = ap.parse_args(argv)
    rows, errors = read_parts()
    for e in errors:
        print(f"invalid row left out: {e}", file=sys.stderr)
    if not rows:
        print(f"no valid rows under {PARTS}", file=sys.stderr)
        return 1
    assign_splits(rows)
    write_csv(rows)
    print(f"wrote {OUT.relative_to(HERE.parent)}")
    if update_readme(rows):
        print(f"updated the counts in {README.relative_to(HERE.parent)}")
    else:
        print(f"warning: {README} has no counts block to update", file=sys.stderr)
    print(counts(rows))
    return 1 if errors and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
