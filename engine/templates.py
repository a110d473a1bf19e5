"""Prompt templates for prompt recovery: what the model reads and what it learns to answer.

Two output types:
- `prompt`: the response is `PROMPT_PREFIX` followed by the recovered prompt.
- `cot`: the response is a one-sentence analysis of what changed, then the prompt as JSON
  (`{"rewrite_prompt": "..."}`), which `parse_response` reads back forgivingly.

Two formats for the turn around the instruction:
- `mistral`: `<s>[INST] {instruction} [/INST]` and the response after it, `</s>` (EOS) at the end;
  the format of Mistral-7B-Instruct and Mixtral-8x7B-Instruct.
- `chat_template`: the model's own chat template (one user turn, generation prompt added).
`format="auto"` takes the chat template when the tokenizer has one, else the Mistral format.

The response starts right where the template hands the turn to the assistant (after `[/INST]` or
the template's generation prompt), so its tokenization is the model's natural one and the
boundary is the same for every tokenizer. The fixed prefix is therefore part of the response and
learned with it (a few easy tokens); generation may also force it (`prime_ids`), since the
tokens of the prefix alone are a prefix of the tokens of every response.
"""
from __future__ import annotations

import json
import re

from engine.errors import EngineError

OUTPUT_TYPES = ("prompt", "cot")
FORMATS = ("mistral", "chat_template", "auto")

# The fixed opening of every `prompt` response (the study's template ended its instruction with a
# similar sentence; here it belongs to the answer).
PROMPT_PREFIX = "The most likely prompt given to rewrite the text was:"

INSTRUCTION = (
    "An LLM rewrote the original text below following a prompt. Compare the original and the "
    "rewritten text and recover the prompt that was given.\n\n"
    "## Original text\n\n{original_text}\n\n"
    "## Rewritten text\n\n{rewritten_text}\n\n"
    "{task}"
)
TASKS = {
    "prompt": "Answer with the most likely prompt, a short instruction; do not add comments.",
    "cot": (
        "First say in one sentence what changed, then give the most likely prompt as JSON: "
        '{"rewrite_prompt": "..."}'
    ),
}


def check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise EngineError(
            f"unknown output_type {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}."
        )
    return output_type


def resolve_format(tokenizer, fmt: str = "auto") -> str:
    """'auto' -> 'chat_template' when the tokenizer has one, else 'mistral'."""
    if fmt not in FORMATS:
        raise EngineError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if fmt == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "mistral"
    if fmt == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise EngineError(
            "format='chat_template' but this tokenizer has no chat_template "
            "(tokenizer_config.json); use format='mistral' or format='auto'."
        )
    return fmt


def instruction(original_text: str, rewritten_text: str, output_type: str = "prompt") -> str:
    """The user turn: both texts and the question."""
    check_output_type(output_type)
    return INSTRUCTION.format(original_text=original_text.strip(),
                              rewritten_text=rewritten_text.strip(), task=TASKS[output_type])


def prompt_text(tokenizer, original_text: str, rewritten_text: str, output_type: str = "prompt",
                fmt: str = "auto") -> str:
    """Everything the model reads before its answer, as text (BOS included where it belongs).

    For showing and logging; token ids come from `prompt_ids` (in the Mistral format a
    SentencePiece tokenizer would split this text's `<s>[INST]` differently from Mistral's own
    encoder).
    """
    fmt = resolve_format(tokenizer, fmt)
    inst = instruction(original_text, rewritten_text, output_type)
    if fmt == "mistral":
        return f"{tokenizer.bos_token or ''}[INST] {inst} [/INST]"
    return tokenizer.apply_chat_template([{"role": "user", "content": inst}],
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, original_text: str, rewritten_text: str, output_type: str = "prompt",
               fmt: str = "auto") -> list[int]:
    """Token ids of the prompt part; training and generation both call this, so they agree.

    Mistral: BOS id, then `[INST] ... [/INST]` encoded without specials (a SentencePiece
    tokenizer then starts with its usual word-start `▁[INST]`, as Mistral's own encoder does).
    Chat template: the rendered text already holds any BOS, so no specials are added.
    """
    fmt = resolve_format(tokenizer, fmt)
    if fmt == "mistral":
        inst = instruction(original_text, rewritten_text, output_type)
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + tokenizer.encode(f"[INST] {inst} [/INST]", add_special_tokens=False)
    text = prompt_text(tokenizer, original_text, rewritten_text, output_type, fmt)
    return tokenizer.encode(text, add_special_tokens=False)


def response_text(rewrite_prompt: str, output_type: str = "prompt", analysis: str | None = None) -> str:
    """The answer the model learns (without EOS)."""
    check_output_type(output_type)
    prompt = rewrite_prompt.strip()
    if output_type == "prompt":
        return f"{PROMPT_PREFIX} {prompt}"
    if not analysis or not analysis.strip():
        raise EngineError(
            "output_type='cot' needs an 'analysis' for every row; the data has none for this "
            "row. Use a dataset with an analysis column (the bundled data has one) or "
            "output_type='prompt'."
        )
    payload = json.dumps({"rewrite_prompt": prompt}, ensure_ascii=False)
    return f"{analysis.strip()}\n{payload}"


def eos_id(tokenizer) -> int:
    i = tokenizer.eos_token_id
    if i is None:
        raise EngineError(
            "the tokenizer has no eos_token (tokenizer_config.json): training needs one to teach "
            "the model to stop. Set eos_token in tokenizer_config.json."
        )
    return i


def response_ids(tokenizer, rewrite_prompt: str, output_type: str = "prompt",
                 analysis: str | None = None) -> list[int]:
    """Response tokens, encoded on their own (no specials), then EOS."""
    text = response_text(rewrite_prompt, output_type, analysis)
    return tokenizer.encode(text, add_special_tokens=False) + [eos_id(tokenizer)]


def prime_ids(tokenizer, output_type: str = "prompt") -> list[int]:
    """Tokens generation may append to the prompt to force the fixed prefix ([] for cot)."""
    check_output_type(output_type)
    if output_type == "prompt":
        return tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False)
    return []


# ---- parsing answers back ----

_JSON_KEY = re.compile(r'"rewrite_prompt"\s*:\s*"((?:[^"\\]|\\.)*)', re.S)


def _strip_quotes(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s


def _after_prefix(text: str) -> str:
    """Text after the last occurrence of the fixed prefix (case-insensitive), if present."""
    at = text.lower().rfind(PROMPT_PREFIX.lower())
    return text[at + len(PROMPT_PREFIX):] if at >= 0 else text


def _json_prompt(text: str) -> str | None:
    """The rewrite_prompt of the last JSON object in text, or of a truncated one."""
    decoder = json.JSONDecoder()
    for start in reversed([m.start() for m in re.finditer(r"\{", text)]):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            value = obj.get("rewrite_prompt")
            if value is None and len(obj) == 1:  # another key name: take its only value
                value = next(iter(obj.values()))
            if isinstance(value, str):
                return value.strip()
    matches = list(_JSON_KEY.finditer(text))  # unterminated: generation stopped mid-JSON
    if matches:
        raw = matches[-1].group(1)
        try:
            return json.loads(f'"{raw.rstrip(chr(92))}"').strip()
        except json.JSONDecodeError:
            return raw.strip()
    return None


def parse_response(text: str, output_type: str = "prompt") -> str:
    """The recovered prompt from a generated answer; never fails.

    `prompt`: the text after the fixed prefix (when the answer has it), unquoted.
    `cot`: the rewrite_prompt of the last JSON object; of a cut-off object; else the raw text.
    """
    check_output_type(output_type)
    if output_type == "cot":
        found = _json_prompt(text)
        if found is not None:
            return found
    return _strip_quotes(_after_prefix(text))
