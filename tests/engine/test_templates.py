"""engine.templates: instructions, responses, format choice and the forgiving parser."""
import json

import pytest

from engine import templates
from engine.errors import EngineError

PROMPT = 'Rewrite this as a "breaking news" bulletin, in French.'


class _Tok:
    """Just enough of a tokenizer for format choice and text rendering."""

    def __init__(self, chat_template=None):
        self.chat_template = chat_template
        self.bos_token = "<s>"

    def apply_chat_template(self, messages, add_generation_prompt=True):
        assert add_generation_prompt and [m["role"] for m in messages] == ["user"]
        return f"<|user|>{messages[0]['content']}<|assistant|>"


def test_instruction_presents_both_texts_and_the_task():
    for output_type in templates.OUTPUT_TYPES:
        text = templates.instruction("  The cat sat.\n", "The feline reclined.", output_type)
        assert "The cat sat." in text and "The feline reclined." in text
        assert text.index("The cat sat.") < text.index("The feline reclined.")
        assert text.endswith(templates.TASKS[output_type])
    assert "JSON" in templates.instruction("a", "b", "cot")


def test_format_choice():
    assert templates.resolve_format(_Tok("{{x}}"), "auto") == "chat_template"
    assert templates.resolve_format(_Tok(None), "auto") == "mistral"
    assert templates.resolve_format(_Tok("{{x}}"), "mistral") == "mistral"
    with pytest.raises(EngineError, match="no chat_template.*format='mistral'"):
        templates.resolve_format(_Tok(None), "chat_template")
    with pytest.raises(EngineError, match="unknown format 'llama'"):
        templates.resolve_format(_Tok(None), "llama")
    with pytest.raises(EngineError, match="unknown output_type 'json'"):
        templates.instruction("a", "b", "json")


def test_prompt_text_in_both_formats():
    mistral = templates.prompt_text(_Tok(None), "orig", "new", "prompt", "auto")
    assert mistral.startswith("<s>[INST] ") and mistral.endswith(" [/INST]") and "orig" in mistral
    chat = templates.prompt_text(_Tok("{{x}}"), "orig", "new", "prompt", "auto")
    assert chat.startswith("<|user|>") and chat.endswith("<|assistant|>") and "new" in chat


@pytest.mark.parametrize("output_type", templates.OUTPUT_TYPES)
def test_text_round_trip(output_type):
    analysis = 'Same story, but told as a news bulletin in French with "breaking" urgency.'
    response = templates.response_text(PROMPT, output_type, analysis)
    assert templates.parse_response(response, output_type) == PROMPT
    assert templates.parse_response(" " + response + "\n", output_type) == PROMPT


def test_prompt_responses_open_with_the_fixed_prefix():
    assert templates.response_text("Make it short.", "prompt") == f"{templates.PROMPT_PREFIX} Make it short."


def test_cot_response_is_analysis_then_json():
    text = templates.response_text("Make it short.", "cot", "It is shorter.")
    first, second = text.split("\n")
    assert first == "It is shorter." and json.loads(second) == {"rewrite_prompt": "Make it short."}
    with pytest.raises(EngineError, match="analysis"):
        templates.response_text("Make it short.", "cot", "  ")


@pytest.mark.parametrize("text, expected", [
    ("Make it formal.", "Make it formal."),  # primed generation: the prefix was in the prompt
    (f"{templates.PROMPT_PREFIX} Make it formal.", "Make it formal."),
    (f"{templates.PROMPT_PREFIX.upper()}  'Make it formal.'", "Make it formal."),
    ('"Make it formal."', "Make it formal."),
    ("", ""),
])
def test_parse_prompt_answers(text, expected):
    assert templates.parse_response(text, "prompt") == expected


@pytest.mark.parametrize("text, expected", [
    ('It got formal.\n{"rewrite_prompt": "Make it formal."}', "Make it formal."),
    ('{"rewrite_prompt": "first"} then {"rewrite_prompt": "second"} trailing', "second"),
    ('Analysis. {"rewrite_prompt": "Say \\"hi\\" twice."}', 'Say "hi" twice.'),
    ('Changed. {"prompt": "Other key."}', "Other key."),
    ('Changed. {"rewrite_prompt": "Cut off mid-sent', "Cut off mid-sent"),
    ('Changed. {"rewrite_prompt": "Cut after escape \\', "Cut after escape"),
    ('Changed. {"rewrite_prompt": "ok"} {not json', "ok"),
    ("No JSON at all, just a guess.", "No JSON at all, just a guess."),
    ('{"a": 1, "b": 2}', '{"a": 1, "b": 2}'),
])
def test_parse_cot_answers_forgivingly(text, expected):
    assert templates.parse_response(text, "cot") == expected
