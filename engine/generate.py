"""Multiprompt generation: N recovered prompts per row, joined into one submission string.

Usage:
    python -m engine.generate --samples 3
    python -m engine.generate [--recipe R | --model M [--adapter DIR]] [--input CSV]
        [--output CSV] [--samples N] [--temperature 0.7] [--top_p 0.95] [--max_new_tokens 64]
        [--mean_prompt TEXT] [--batch_size B] [--seed S] [--merge] [--quantize nf4]
        [--compile] [--device D]
    python -m engine.generate --prompt "Write a haiku about the sea." --samples 2

With no model given, it uses the embedded default model with the newest quickstart adapter
(runs/quickstart*/adapter) if one exists, and the base model otherwise; with no input, the
bundled test split. The output CSV has columns id,rewrite_prompt, where rewrite_prompt is the N
samples joined by SEPARATOR, followed by --mean_prompt if given (the study scored higher with
several samples plus a fixed "mean" prompt than with one). Rows are written as they finish, so
an error or Ctrl-C loses nothing already generated. If the input has a rewrite_prompt column,
the task metric is printed for each single sample and for the joined string.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from engine import templates
from engine.errors import EngineError, run_cli

SEPARATOR = " "  # between samples (and before the mean prompt) in the submission string
DEFAULT_MODEL = "smollm2-135m-instruct"


def join_samples(samples: list[str], mean_prompt: str | None = None) -> str:
    parts = [s.strip() for s in samples if s.strip()]
    if mean_prompt:
        parts.append(mean_prompt.strip())
    return SEPARATOR.join(parts)


def newest_quickstart_adapter(runs_dir: Path = Path("runs")) -> Path | None:
    found = [p for p in runs_dir.glob("quickstart*/adapter") if (p / "adapter_config.json").is_file()]
    return max(found, key=lambda p: (p / "adapter_model.safetensors").stat().st_mtime) if found else None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", help="a training recipe: its model, quantization, format and adapter")
    src.add_argument("--model", help=f"a model directory, embedded name or Hub id (default {DEFAULT_MODEL})")
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT format)")
    p.add_argument("--input", help="CSV/JSONL with original_text, rewritten_text (default: bundled test split)")
    p.add_argument("--output", default="submission.csv")
    p.add_argument("--columns", default=None, help='column mapping, e.g. "rewrite_prompt=gpt4_prompt"')
    p.add_argument("--prompt", help="generate for one free-form prompt and print to stdout")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--mean_prompt", default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_type", choices=templates.OUTPUT_TYPES, default=None)
    p.add_argument("--format", dest="fmt", choices=templates.FORMATS, default=None)
    p.add_argument("--quantize", choices=["nf4"], default=None)
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (decode steps)")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    if a.samples < 1 or a.batch_size < 1 or a.max_new_tokens < 1:
        raise EngineError("--samples, --batch_size and --max_new_tokens must be >= 1.")
    if not 0 < a.top_p <= 1:
        raise EngineError(f"--top_p must be in (0, 1] (1 keeps every token), got {a.top_p}.")
    return a


def resolve_setup(a):
    """(model name, adapter dir or None, quantize, output_type, format) from the arguments."""
    output_type, fmt, quantize, adapter = "prompt", "auto", a.quantize, a.adapter
    if a.recipe:
        from engine.config import load_recipe

        cfg = load_recipe(a.recipe)
        model, quantize = cfg.model, a.quantize or cfg.quantize
        output_type, fmt = cfg.output_type, cfg.prompt_format
        if adapter is None:
            for sub in ("best", "adapter"):
                if (Path(cfg.output_dir) / sub / "adapter_config.json").is_file():
                    adapter = str(Path(cfg.output_dir) / sub)
                    break
            else:
                raise EngineError(f"no trained adapter in {cfg.output_dir} (best/ or adapter/); train it "
                                  f"first (`python -m engine.train {a.recipe}`) or pass --adapter.")
    elif a.model:
        model = a.model
    else:
        model = DEFAULT_MODEL
        if adapter is None:
            found = newest_quickstart_adapter()
            adapter = str(found) if found else None
    return model, adapter, quantize, a.output_type or output_type, a.fmt or fmt


def load_input(a):
    from engine import data as data_lib

    if a.input:
        rows, report = data_lib.load_rows(a.input, a.columns, required=("original_text", "rewritten_text"))
    else:
        rows, report = data_lib.load_dataset("bundled", split="test")
    if not rows:
        raise EngineError(f"no usable rows in the input ({report.summary()}).")
    return rows, report


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    rows = None
    if a.prompt is None:
        rows, report = load_input(a)  # bad input fails before the model is loaded
        print(f"[generate] input: {report.summary()}", file=sys.stderr)
        out_path = Path(a.output)
        if not out_path.parent.is_dir():
            raise EngineError(f"the output folder {out_path.parent} does not exist; create it or change --output.")
    model_name, adapter, quantize, output_type, fmt = resolve_setup(a)

    import engine
    from engine.adapters import load_adapter

    model, tok = engine.load(model_name, quantize=quantize, device=a.device)
    if adapter:
        load_adapter(model, adapter, merge=a.merge)
    print(f"[generate] model {model_name}" + (f" + adapter {adapter}" + (" (merged)" if a.merge else "")
                                              if adapter else " (no adapter)"), file=sys.stderr)
    model.eval()
    if a.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

    if a.prompt is not None:
        fmt = templates.resolve_format(tok, fmt)
        if fmt == "mistral":
            ids = [tok.bos_token_id] + tok.encode(f"[INST] {a.prompt} [/INST]", add_special_tokens=False)
        else:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": a.prompt}]),
                             add_special_tokens=False)
        from engine.sampling import generate

        outs = generate(model, [ids], max_new_tokens=a.max_new_tokens, samples=a.samples,
                        temperature=a.temperature, top_p=a.top_p, seed=a.seed, eos_ids=eos,
                        pad_id=tok.pad_token_id)
        for j, o in enumerate(outs[0]):
            print(f"--- sample {j + 1}\n{tok.decode(o).strip()}")
        return

    results = generate_rows(model, tok, rows, a, output_type, fmt, eos)
    if all(r.get("rewrite_prompt") for r in rows):
        report_metric(rows, results, a.mean_prompt)


def generate_rows(model, tok, rows, a, output_type, fmt, eos) -> list[list[str]]:
    """Generate for every row in batches, appending each finished batch to the output CSV."""
    from tqdm import tqdm

    from engine.sampling import generate, release_decode_graph

    fmt = templates.resolve_format(tok, fmt)
    prime = templates.prime_ids(tok, output_type)
    prompts = [templates.prompt_ids(tok, r["original_text"], r["rewritten_text"], output_type, fmt) + prime
               for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    results: dict[int, list[str]] = {}
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(rows), desc="generate", unit="row", file=sys.stderr, dynamic_ncols=True)
    with open(a.output, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "rewrite_prompt"])
        f.flush()
        for s in range(0, len(order), a.batch_size):
            idx = order[s:s + a.batch_size]

            def count(n_active):
                nonlocal tokens
                tokens += n_active

            try:
                outs = generate(model, [prompts[i] for i in idx], max_new_tokens=a.max_new_tokens,
                                samples=a.samples, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                                eos_ids=eos, pad_id=tok.pad_token_id, stream_ids=idx, on_step=count,
                                reuse_graph=True)  # batches of one cache bucket share one captured step
            except KeyboardInterrupt:
                bar.close()
                print(f"\n[generate] interrupted: the {len(results)} rows done so far are in {a.output}",
                      file=sys.stderr)
                raise SystemExit(130)
            for i, samples in zip(idx, outs):
                texts = [templates.parse_response(tok.decode(prime + o), output_type) for o in samples]
                results[i] = texts
                writer.writerow([rows[i]["id"], join_samples(texts, a.mean_prompt)])
            f.flush()
            elapsed = time.perf_counter() - t0
            bar.update(len(idx))
            bar.set_postfix(rows_s=f"{len(results) / elapsed:.2f}", tok_s=f"{tokens / elapsed:.1f}")
    bar.close()
    release_decode_graph(model)
    # Rows were appended as batches finished (by length); put them back in input order.
    tmp = Path(a.output).with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "rewrite_prompt"])
        writer.writerows([r["id"], join_samples(results[i], a.mean_prompt)] for i, r in enumerate(rows))
    tmp.replace(a.output)
    print(f"[generate] wrote {len(results)} rows to {a.output}", file=sys.stderr)
    return [results[i] for i in range(len(rows))]


def report_metric(rows, results, mean_prompt):
    from engine.metrics import score

    refs = [r["rewrite_prompt"] for r in rows]
    n = len(results[0])
    lines = []
    for j in range(n):
        s = score([res[j] for res in results], refs)
        lines.append(f"  sample {j + 1}: {s['scs']:.4f}")
    joined = score([join_samples(res, mean_prompt) for res in results], refs)
    lines.append(f"  joined ({n} samples{' + mean prompt' if mean_prompt else ''}): {joined['scs']:.4f}")
    print(f"[generate] sharpened cosine similarity ({joined['model']}, {len(rows)} rows):\n" + "\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
