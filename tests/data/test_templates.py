"""Tests of tunepipe.data.templates / formatters / tool_formats.

Expected strings are LLaMA-Factory 0.9.5's real output as quoted in ../shared/reference/
llamafactory-data-semantics.md (§3.4-3.6, §8 checks 6, 9, 10), rendered with a character-level tokenizer so
token ids decode back to the exact text. The opt-in `lf_parity` test (`pytest -m lf_parity`) compares token ids
with LF itself, run in its side virtualenv (bench/lf_venv.sh; $LF_VENV, default /work/lf-venv).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tunepipe.data.formatters import FunctionFormatter, StringFormatter, ToolFormatter
from tunepipe.data.templates import ReasoningTemplate, get_template, template_names
from tunepipe.data.tool_formats import TOOL_DATE_ENV
from tunepipe.errors import ConfigError, RowError

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
LF_PYTHON = Path(os.environ.get("LF_VENV", "/work/lf-venv")) / "bin" / "python"

# Tokens the templates use as single vocabulary tokens ({"token": ...} slots) or that real models have as
# special tokens; the remaining template markers are plain text to these tokenizers (LF-equivalent either way).
SPECIAL_TOKENS = [
    "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "[gMASK]", "sop", "<sep>",
    "<|Human|>", "<|YaYi|>", "<|System|>",
]
CJK = "你好世界今天天气很不错答案问题搜索这是一个测试中文"
CORPUS = [
    "Hello there! How can I help you today? The weather in Paris is 21 degrees.",
    "Human: what is 2 + 2?\nAssistant: It is 4.\n\n### Instruction:\nWrite a poem.\n\n### Response:\n",
    "USER: tell me a joke ASSISTANT: Why did the chicken cross the road?",
    "Action: get_weather\nAction Input: {\"city\": \"Paris\", \"unit\": \"c\"}",
    "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"llama\"}}\n</tool_call>",
    "<think>\nLet me think about it step by step.\n</think>\n\nThe answer is 42.",
    f"{CJK} 12345 67890 {CJK}",
    "  leading spaces, trailing spaces   and\ttabs\n\n\nnewlines  ",
] * 3
ASCII = [chr(i) for i in range(32, 127)] + ["\n", "\t"]


# The pre-tokenizer split of Qwen2 / Llama-3 tokenizer.json files (newline runs are pieces of their own).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bpe_backend() -> Tokenizer:
    """Byte-level BPE configured like Qwen2 / Llama-3 (regex split, then byte-level); merges cross words."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return backend


def _char_backend() -> Tokenizer:
    """One token per character, so ids decode to exactly the rendered text and lengths count characters."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    template_chars = {char for name in template_names() for char in repr(get_template(name)) if ord(char) > 127}
    for char in ASCII + sorted(set(CJK) | template_chars):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    return backend


def _sp_backend() -> Tokenizer:
    """SentencePiece-like (Metaspace, "▁" prepended to every encoded piece): LF's per-piece rule shows most."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=ASCII + list(CJK) + ["▁"],
                                  special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return backend


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bpe / char / sp tokenizers saved with save_pretrained: bos <s>, eos </s>, no pad, no chat_template."""
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for kind, build in (("bpe", _bpe_backend), ("char", _char_backend), ("sp", _sp_backend)):
        extra = {} if kind == "bpe" else {"unk_token": "<unk>"}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=build(), bos_token="<s>", eos_token="</s>",
                                            clean_up_tokenization_spaces=False, **extra)
        tokenizer.save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


@pytest.fixture
def load(tokenizer_dirs):
    """A fresh tokenizer of the given kind (fix_tokenizer mutates tokenizers)."""

    def _load(kind: str = "char", chat_template: str | None = None):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[kind])
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        return tokenizer

    return _load


def prepared(load, name: str, kind: str = "char", **options):
    tokenizer = load(kind)
    template = get_template(name, tokenizer=tokenizer, **options)
    template.fix_tokenizer(tokenizer)
    return template, tokenizer


def text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def turns(template, tokenizer, messages, system=None, tools=None, **kwargs) -> list[tuple[str, str]]:
    pairs = template.encode_multiturn(tokenizer, messages, system, tools, **kwargs)
    return [(text(tokenizer, prompt), text(tokenizer, response)) for prompt, response in pairs]


def conversation(*contents: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


QA = conversation("Q1", "A1", "Q2", "A2")
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the weather",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "description": "Unit", "enum": ["c", "f"]},
            "days": {"type": "array", "description": "Days", "items": {"type": "integer"}},
        },
        "required": ["city"],
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {"name": "search", "description": "搜索",
                 "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}
TOOLS = json.dumps([WEATHER_TOOL, SEARCH_TOOL], ensure_ascii=False)
CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
PARALLEL_CALLS = json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                             {"name": "search", "arguments": {"q": "天气"}}], ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------------
# §3.4: exact strings of the main templates ([Q1, A1, Q2, A2], char tokenizer, SRC | TGT per turn)

REFERENCE_TURNS = [
    ("default", None, [("Human: Q1</s>\nAssistant:", "A1</s>\n"), ("Human: Q2</s>\nAssistant:", "A2</s>\n")]),
    ("default", "SYS", [("System: SYS</s>\nHuman: Q1</s>\nAssistant:", "A1</s>\n"),
                        ("Human: Q2</s>\nAssistant:", "A2</s>\n")]),
    ("empty", "SYS", [("SYSQ1", "A1"), ("Q2", "A2")]),
    ("alpaca", None, [(ALPACA_SYSTEM + "### Instruction:\nQ1\n\n### Response:\n", "A1</s>\n\n"),
                      ("### Instruction:\nQ2\n\n### Response:\n", "A2</s>\n\n")]),
    ("alpaca", "SYS", [("SYS### Instruction:\nQ1\n\n### Response:\n", "A1</s>\n\n"),
                       ("### Instruction:\nQ2\n\n### Response:\n", "A2</s>\n\n")]),
    ("vicuna", None, [(VICUNA_SYSTEM + "USER: Q1 ASSISTANT:", "A1</s>"), ("USER: Q2 ASSISTANT:", "A2</s>")]),
    ("llama2", "SYS", [("<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nQ1 [/INST]", "A1</s>"),
                       ("<s>[INST] Q2 [/INST]", "A2</s>")]),
    ("llama2", None, [("<s>[INST] Q1 [/INST]", "A1</s>"), ("<s>[INST] Q2 [/INST]", "A2</s>")]),
    ("llama2_zh", None, [
        ("<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\nQ1 [/INST]", "A1</s>"),
        ("<s>[INST] Q2 [/INST]", "A2</s>")]),
    ("mistral", "SYS", [("<s>[INST] SYS\n\nQ1[/INST]", " A1</s>"), ("[INST] Q2[/INST]", " A2</s>")]),
    ("llama3", None, [
        ("<s><|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
         "A1<|eot_id|>"),
        ("<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
         "A2<|eot_id|>")]),
    ("llama3", "SYS", [
        ("<s><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
         "A1<|eot_id|>"),
        ("<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
         "A2<|eot_id|>")]),
    ("qwen", None, [
        (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n",
         "A1<|im_end|>\n"),
        ("<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "A2<|im_end|>\n")]),
    ("chatml", None, [("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", "A1<|im_end|>\n"),
                      ("<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "A2<|im_end|>\n")]),
    ("openchat", None, [("<s>GPT4 Correct User: Q1</s>GPT4 Correct Assistant:", "A1</s>"),
                        ("GPT4 Correct User: Q2</s>GPT4 Correct Assistant:", "A2</s>")]),
    ("zephyr", None, [("<|system|>\nYou are Zephyr, a helpful assistant.</s><|user|>\nQ1</s><|assistant|>\n", "A1</s>"),
                      ("<|user|>\nQ2</s><|assistant|>\n", "A2</s>")]),
]


@pytest.mark.parametrize(("name", "system", "expected"), REFERENCE_TURNS)
def test_reference_strings(load, name, system, expected):
    template, tokenizer = prepared(load, name)
    assert turns(template, tokenizer, QA, system) == expected


def test_default_template_tokenizes_each_slot_separately_without_bos(load):
    """§8 check 6 with a BPE tokenizer: ids are the per-slot encodings concatenated; nothing is added."""
    template, tokenizer = prepared(load, "default", "bpe")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    expected = []
    for q, a in (("Q1", "A1"), ("Q2", "A2")):
        expected.append((enc(f"Human: {q}") + [eos] + enc("\nAssistant:"), enc(a) + [eos] + enc("\n")))
    assert template.encode_multiturn(tokenizer, QA, None, None) == expected
    assert tokenizer.bos_token_id not in sum((p + r for p, r in expected), [])


def test_render_returns_elements_that_a_batch_encoder_can_tokenize(load):
    template, tokenizer = prepared(load, "default", "bpe")
    pairs = template.render_multiturn(tokenizer, QA, "SYS", None)
    eos = tokenizer.eos_token_id
    assert pairs[0] == (["System: SYS", eos, "\n", "Human: Q1", eos, "\nAssistant:"], ["A1", eos, "\n"])
    # one batched tokenizer call over every string element gives the same ids as encode_multiturn
    strings = [e for pair in pairs for side in pair for e in side if isinstance(e, str)]
    batched = iter(tokenizer(strings, add_special_tokens=False)["input_ids"])
    ids = [[i for e in side for i in (next(batched) if isinstance(e, str) else [e])] for pair in pairs for side in pair]
    assert ids == [side for pair in template.encode_multiturn(tokenizer, QA, "SYS", None) for side in pair]


# ---------------------------------------------------------------------------------------------------------------
# §8 checks 9 and 10: system fallback, tools, EOS replacement


def test_empty_system_falls_back_to_default_system(load):
    template, tokenizer = prepared(load, "qwen")
    (prompt, _), = turns(template, tokenizer, QA[:2], "")
    assert prompt.startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n")
    template, tokenizer = prepared(load, "alpaca")
    (prompt, _), = turns(template, tokenizer, QA[:2], "")
    assert prompt.startswith(ALPACA_SYSTEM + "### Instruction:")


def test_empty_tools_list_emits_an_empty_system_block(load):
    template, tokenizer = prepared(load, "default")
    assert turns(template, tokenizer, QA[:2], None, "[]")[0][0] == "System: </s>\nHuman: Q1</s>\nAssistant:"
    template, tokenizer = prepared(load, "llama3")
    assert turns(template, tokenizer, QA[:2], None, "[]")[0][0].startswith(
        "<s><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|><|start_header_id|>user")


DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n"
    "> Tool Name: get_weather\nTool Description: Get the weather\nTool Args:\n"
    "  - city (string, required): City name\n"
    "  - unit (string): Unit, should be one of [c, f]\n"
    "  - days (array): Days, where each item should be integer\n"
    "\n"
    "> Tool Name: search\nTool Description: 搜索\nTool Args:\n"
    "  - q (string): \n"
    "\n"
    "Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [get_weather, search])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
)
QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps({"type": "function", "function": WEATHER_TOOL}) + "\n"
    + json.dumps(SEARCH_TOOL, ensure_ascii=False) + "\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def test_tool_prompt_is_appended_to_the_system_text_without_separator(load):
    template, tokenizer = prepared(load, "default")
    (prompt, _), = turns(template, tokenizer, QA[:2], "SYS", TOOLS)
    assert prompt == f"System: SYS{DEFAULT_TOOL_PROMPT}</s>\nHuman: Q1</s>\nAssistant:"
    template, tokenizer = prepared(load, "qwen")
    (prompt, _), = turns(template, tokenizer, QA[:2], "SYS", TOOLS)
    assert prompt.startswith(f"<|im_start|>system\nSYS{QWEN_TOOL_PROMPT}<|im_end|>\n<|im_start|>user\nQ1")


@pytest.mark.parametrize(("name", "eos", "stops", "new_tokens"), [
    ("qwen", "<|im_end|>", ["<|im_end|>"], 0),
    ("chatml", "<|im_end|>", ["<|im_end|>", "<|im_start|>"], 0),
    ("llama3", "<|eot_id|>", ["<|eot_id|>", "<|eom_id|>"], 1),  # <|eom_id|> is new to the tokenizer
    ("phi", "<|end|>", ["<|end|>"], 1),
    ("default", "</s>", [], 0),
])
def test_fix_tokenizer_replaces_eos_sets_pad_and_adds_stop_words(load, name, eos, stops, new_tokens):
    tokenizer = load("bpe")
    size = len(tokenizer)
    template = get_template(name)
    template.fix_tokenizer(tokenizer)
    assert tokenizer.eos_token == eos and tokenizer.pad_token == eos
    assert len(tokenizer) == size + new_tokens
    for word in stops[1:]:
        assert word in tokenizer.all_special_tokens
        assert tokenizer.encode(word, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(word)]
    assert set(template.stop_token_ids(tokenizer)) == {tokenizer.eos_token_id} | {
        tokenizer.convert_tokens_to_ids(word) for word in stops}


def test_fix_tokenizer_keeps_an_existing_pad_and_adds_a_missing_eos(load):
    tokenizer = load("bpe")
    tokenizer.pad_token = "<unk>"
    get_template("default").fix_tokenizer(tokenizer)
    assert tokenizer.pad_token == "<unk>"

    backend = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    no_eos = PreTrainedTokenizerFast(tokenizer_object=backend)
    get_template("empty").fix_tokenizer(no_eos)
    assert no_eos.eos_token == "<|endoftext|>" and no_eos.pad_token == "<|endoftext|>"
    assert isinstance(no_eos.chat_template, str)  # it had none, so it gets ours


# ---------------------------------------------------------------------------------------------------------------
# Tools and function calls


def test_default_function_call_rendering(load):
    template, tokenizer = prepared(load, "default")
    messages = [{"role": "user", "content": "Q"}, {"role": "function", "content": CALL}]
    assert turns(template, tokenizer, messages)[0][1] == 'Action: get_weather\nAction Input: {"city": "Paris"}</s>\n'
    messages[1]["content"] = "<think>\nplan\n</think>\n\n" + PARALLEL_CALLS
    assert turns(template, tokenizer, messages)[0][1] == (
        '<think>\nplan\n</think>\n\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        'Action: search\nAction Input: {"q": "天气"}</s>\n')
    messages[1]["content"] = f"Let me check.<tool_call>{CALL}</tool_call>"
    assert turns(template, tokenizer, messages)[0][1] == (
        'Let me check.Action: get_weather\nAction Input: {"city": "Paris"}</s>\n')


def test_qwen_function_call_and_observation_rendering(load):
    template, tokenizer = prepared(load, "qwen")
    messages = [{"role": "user", "content": "Q"}, {"role": "function", "content": PARALLEL_CALLS},
                {"role": "observation", "content": '{"temp": 21}'}, {"role": "assistant", "content": "21C"}]
    (_, call), (observation, answer) = turns(template, tokenizer, messages, None, TOOLS)
    assert call == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                    '<tool_call>\n{"name": "search", "arguments": {"q": "天气"}}\n</tool_call><|im_end|>\n')
    assert observation == ('<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
                           "<|im_start|>assistant\n")
    assert answer == "21C<|im_end|>\n"


def test_other_tool_formats(load, monkeypatch):
    monkeypatch.setenv(TOOL_DATE_ENV, "26 Jul 2024")
    template, tokenizer = prepared(load, "llama3")
    messages = [{"role": "user", "content": "Q"}, {"role": "function", "content": CALL}]
    (prompt, call), = turns(template, tokenizer, messages, None, TOOLS)
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" in prompt
    assert call == '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'

    template, tokenizer = prepared(load, "mistral")
    (prompt, call), = turns(template, tokenizer, messages, None, json.dumps([WEATHER_TOOL]))
    assert prompt.startswith('<s>[INST] [AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather"')
    assert call == '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>'

    template, tokenizer = prepared(load, "glm4")
    messages[1]["content"] = PARALLEL_CALLS
    with pytest.raises(RowError) as err:
        template.encode_multiturn(tokenizer, messages, None, None)
    assert err.value.reason == "bad_function_json"


def test_tool_format_override_uses_plain_function_slots_like_lf(load):
    template, tokenizer = prepared(load, "qwen", tool_format="default")
    messages = [{"role": "user", "content": "Q"}, {"role": "function", "content": CALL}]
    (prompt, call), = turns(template, tokenizer, messages, None, TOOLS)
    assert f"<|im_start|>system\n{QWEN_SYSTEM}You have access to the following tools:\n" in prompt
    assert call == 'Action: get_weather\nAction Input: {"city": "Paris"}<|im_end|>'  # EOS, not "<|im_end|>\n"


@pytest.mark.parametrize(("messages", "tools", "field", "reason"), [
    ([{"role": "user", "content": "Q"}, {"role": "function", "content": "{not json"}], None, "content",
     "bad_function_json"),
    ([{"role": "user", "content": "Q"}, {"role": "function", "content": '{"arguments": {}}'}], None, "content",
     "bad_function_json"),
    (conversation("Q", "A"), "{bad", "tools", "bad_tools_json"),
    (conversation("Q", "A"), '[{"name": "no_parameters"}]', "tools", "bad_tools_json"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "A"}], None, "content", "non_string_content"),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": None}], None, "content",
     "non_string_content"),
    ([{"role": "robot", "content": "Q"}, {"role": "assistant", "content": "A"}], None, "role", "unknown_role"),
    (conversation("Q", "A", "Q2"), None, "messages", "odd_message_count"),
])
def test_bad_rows_raise_row_errors(load, messages, tools, field, reason):
    template, tokenizer = prepared(load, "default")
    with pytest.raises(RowError) as err:
        template.encode_multiturn(tokenizer, messages, None, tools)
    assert (err.value.field, err.value.reason) == (field, reason)


# ---------------------------------------------------------------------------------------------------------------
# Formatter semantics


def test_string_formatter_replaces_only_the_first_occurrence_in_keyword_order():
    formatter = StringFormatter(["<{{content}}|{{content}}|{{idx}}>"])
    assert formatter.apply(content="x", idx="0") == ["<x|{{content}}|0>"]
    assert formatter.apply(content="{{idx}}", idx="7") == ["<7|{{content}}|{{idx}}>"]  # content first, then idx
    with pytest.raises(RowError) as err:
        formatter.apply(content=["not", "a", "string"])
    assert (err.value.field, err.value.reason) == ("content", "non_string_content")
    with pytest.raises(ValueError, match="placeholder is required"):
        StringFormatter(["no placeholder"])


def test_turn_index_quirk_in_user_messages(load):
    """LF puts the turn index into a user message that contains "{{idx}}" (not for Llama-2-style templates)."""
    messages = conversation("Q1", "A1", "say {{idx}} and {{content}}", "A2")
    template, tokenizer = prepared(load, "default")
    assert turns(template, tokenizer, messages)[1][0] == "Human: say 1 and {{content}}</s>\nAssistant:"
    template, tokenizer = prepared(load, "llama2")
    assert turns(template, tokenizer, messages)[1][0] == "<s>[INST] say {{idx}} and {{content}} [/INST]"


def test_function_and_tool_formatters_reject_unknown_tool_formats():
    with pytest.raises(ConfigError) as err:
        FunctionFormatter(["{{content}}"], tool_format="gemma4")
    assert err.value.key == "tool_format"
    with pytest.raises(ConfigError):
        ToolFormatter("nope")


# ---------------------------------------------------------------------------------------------------------------
# §3.6 reasoning templates: [Q1, "<think>\nT1\n</think>\n\nA1", Q2, "A2"]

THINK = conversation("Q1", "<think>\nT1\n</think>\n\nA1", "Q2", "A2")
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(("enable_thinking", "expected"), [
    (True, [(USER.format("Q1"), "<think>\nT1\n</think>\n\nA1<|im_end|>\n"),
            (USER.format("Q2"), EMPTY_THOUGHT + "A2<|im_end|>\n")]),
    (False, [(USER.format("Q1") + EMPTY_THOUGHT, "A1<|im_end|>\n"),
             (USER.format("Q2") + EMPTY_THOUGHT, "A2<|im_end|>\n")]),
    (None, [(USER.format("Q1"), "<think>\nT1\n</think>\n\nA1<|im_end|>\n"),
            (USER.format("Q2") + EMPTY_THOUGHT, "A2<|im_end|>\n")]),
])
def test_reasoning_multiturn(load, enable_thinking, expected):
    template, tokenizer = prepared(load, "qwen3", enable_thinking=enable_thinking)
    assert isinstance(template, ReasoningTemplate)
    assert turns(template, tokenizer, THINK) == expected


def test_reasoning_empty_thought_is_its_own_element(load):
    template, tokenizer = prepared(load, "qwen3")
    (_, response), = template.render_multiturn(tokenizer, QA[:2], None, None)
    assert response == [EMPTY_THOUGHT, "A1<|im_end|>\n"]


def test_reasoning_discarding_history_cot_and_oneturn(load):
    template, tokenizer = prepared(load, "qwen3")
    assert turns(template, tokenizer, THINK, discarding_history_cot=True) == [
        (USER.format("Q1"), "A1<|im_end|>\n"), (USER.format("Q2"), EMPTY_THOUGHT + "A2<|im_end|>\n")]
    prompt, response = template.encode_oneturn(tokenizer, THINK, None, None)
    assert text(tokenizer, prompt) == USER.format("Q1") + "A1<|im_end|>\n" + USER.format("Q2")
    assert text(tokenizer, response) == EMPTY_THOUGHT + "A2<|im_end|>\n"

    template, tokenizer = prepared(load, "qwen3", enable_thinking=False)
    prompt, response = template.encode_oneturn(tokenizer, conversation("Q1", "<think>\nT\n</think>\n\nA1"), None, None)
    assert (text(tokenizer, prompt), text(tokenizer, response)) == (USER.format("Q1") + EMPTY_THOUGHT, "A1<|im_end|>\n")

    template, tokenizer = prepared(load, "qwen3", preserve_thinking=True)
    prompt, _ = template.encode_oneturn(tokenizer, THINK, None, None)
    assert "<think>\nT1\n</think>\n\nA1" in text(tokenizer, prompt)


def test_qwen3_nothink_is_a_plain_template(load):
    template, tokenizer = prepared(load, "qwen3_nothink")
    assert not isinstance(template, ReasoningTemplate)
    assert turns(template, tokenizer, QA[:2]) == [(USER.format("Q1"), "A1<|im_end|>\n")]


# ---------------------------------------------------------------------------------------------------------------
# get_template: names, options, fresh copies


def test_get_template_returns_fresh_copies():
    template = get_template("qwen", tool_format="default", default_system="X")
    template.stop_words.append("<mutated>")
    template.format_user.slots[0] = "mutated {{content}}"
    again = get_template("qwen")
    assert again.default_system == QWEN_SYSTEM
    assert again.format_tools.tool_format == "qwen" and again.format_function.tool_format == "qwen"
    assert again.stop_words == ["<|im_end|>"]
    assert again.format_user.slots[0].startswith("<|im_start|>user")


def test_get_template_options_and_errors(load):
    with pytest.raises(ConfigError) as err:
        get_template("nope")
    assert err.value.key == "template" and "Template nope does not exist. Known: " in str(err.value)
    with pytest.raises(ConfigError) as err:
        get_template("falcon", train_on_prompt=True)  # efficient_eos
    assert err.value.key == "train_on_prompt"
    with pytest.raises(ConfigError):
        get_template("qwen", tool_format="gemma4")  # not ported

    assert get_template("qwen3", enable_thinking=None).enable_thinking is None
    assert get_template("qwen", enable_thinking=None).enable_thinking is True  # only reasoning templates take it
    assert get_template("qwen", default_system="Be brief.").default_system == "Be brief."
    required = {"default", "empty", "alpaca", "vicuna", "llama2", "llama2_zh", "llama3", "mistral", "qwen", "chatml",
                "openchat", "zephyr", "qwen3", "qwen3_nothink", "gemma", "gemma2", "llama4", "phi", "phi4", "deepseek3",
                "cohere", "yi", "falcon", "intern2", "glm4", "solar", "starchat", "xuanyuan", "chatml_de", "fewshot",
                "sailor", "olmo", "smollm", "smollm2", "openchat-3.6", "mistral_small", "ministral", "linly", "belle",
                "yayi", "guanaco", "stablebeluga", "nous", "alpaca_input", "tokenizer"}
    assert required <= set(template_names())


def test_template_none_parses_the_tokenizer_chat_template_or_uses_empty(load):
    assert get_template(None, tokenizer=load()).name == "empty"
    parsed = get_template(None, tokenizer=load(chat_template=CHATML_WITH_DEFAULT_SYSTEM))
    assert parsed.name == "parsed" and parsed.default_system == "You are helpful."
    assert parsed.format_user.slots == ["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"]
    assert parsed.format_assistant.slots == ["{{content}}<|im_end|>\n"]
    assert parsed.format_system.slots == ["<|im_start|>system\n{{content}}<|im_end|>\n"]
    thinking = get_template(None, tokenizer=load(chat_template=CHATML_WITH_THINK))
    assert isinstance(thinking, ReasoningTemplate)


# ---------------------------------------------------------------------------------------------------------------
# Community templates (not in LF 0.9.5)


def test_alpaca_input_renders_a_separate_input_block(load):
    template, tokenizer = prepared(load, "alpaca_input")
    with_input = [{"role": "user", "content": "I\nX", "instruction": "I", "input": "X"},
                  {"role": "assistant", "content": "O"}]
    (prompt, response), = turns(template, tokenizer, with_input)
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nI\n\n### Input:\nX\n\n### Response:\n")
    assert response == "O</s>\n\n"
    without_input = [{"role": "user", "content": "I", "instruction": "I", "input": ""}, with_input[1]]
    assert turns(template, tokenizer, without_input)[0][0] == ALPACA_SYSTEM + "### Instruction:\nI\n\n### Response:\n"


@pytest.mark.parametrize(("name", "expected"), [
    ("linly", [("User: Q1\nBot: ", "A1</s>\n"), ("User: Q2\nBot: ", "A2</s>\n")]),
    ("belle", [("<s>Human: Q1\n\nBelle: ", "A1</s>\n\n"), ("Human: Q2\n\nBelle: ", "A2</s>\n\n")]),
    ("guanaco", [("### Human: Q1\n### Assistant:", " A1</s>\n"), ("### Human: Q2\n### Assistant:", " A2</s>\n")]),
    ("stablebeluga", [("### System:\nYou are Stable Beluga, an AI that follows instructions extremely well. Help as "
                       "much as you can. Remember, be safe, and don't do anything illegal.\n\n### User:\nQ1\n\n"
                       "### Assistant:\n", "A1</s>\n\n"), ("### User:\nQ2\n\n### Assistant:\n", "A2</s>\n\n")]),
    ("nous", [("### Instruction:\nQ1\n\n### Response:\n", "A1</s>\n\n"),
              ("### Instruction:\nQ2\n\n### Response:\n", "A2</s>\n\n")]),
])
def test_community_templates(load, name, expected):
    template, tokenizer = prepared(load, name)
    assert turns(template, tokenizer, QA) == expected


def test_yayi_uses_vocabulary_tokens_and_fails_cleanly_without_them(load):
    template, tokenizer = prepared(load, "yayi")
    (prompt, response), = turns(template, tokenizer, QA[:2], "SYS")
    assert prompt == "<|System|>:\nSYS\n\n<|Human|>:\nQ1\n\n<|YaYi|>:" and response == "A1\n\n"
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(ASCII)}, merges=[]))
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="\n")
    with pytest.raises(ConfigError, match="<\\|System\\|>. used by the template is not in"):
        template.encode_multiturn(bare, QA[:2], None, None)


# ---------------------------------------------------------------------------------------------------------------
# Template "tokenizer": the model's own chat_template

CHATML_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_WITH_THINK = CHATML_WITH_DEFAULT_SYSTEM.replace(
    "message['content'] + '<|im_end|>\n'",
    "(('<think>\n\n</think>\n\n' if message['role'] == 'assistant' else '') + message['content']) + '<|im_end|>\n'")


def test_tokenizer_template_splits_the_models_own_rendering(load):
    tokenizer = load("bpe", chat_template=CHATML_WITH_DEFAULT_SYSTEM)
    template = get_template("tokenizer", tokenizer=tokenizer)
    template.fix_tokenizer(tokenizer)
    assert tokenizer.chat_template == CHATML_WITH_DEFAULT_SYSTEM  # kept
    pairs = template.render_multiturn(tokenizer, QA, "SYS", None)
    assert pairs == [(["<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"],
                      ["A1<|im_end|>\n"]),
                     (["<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"], ["A2<|im_end|>\n"])]
    full = tokenizer.apply_chat_template([{"role": "system", "content": "SYS"}] + QA, tokenize=False)
    assert sum((p + r for p, r in template.encode_multiturn(tokenizer, QA, "SYS", None)), []) == tokenizer.encode(
        full, add_special_tokens=False)
    assert template.jinja_template(tokenizer) == CHATML_WITH_DEFAULT_SYSTEM


TOOL_AWARE = (
    "{% if tools %}<tools>{{ tools | map(attribute='name') | join(',') }}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_tokenizer_template_passes_tools_calls_and_observations(load):
    tokenizer = load(chat_template=TOOL_AWARE)
    template = get_template("tokenizer", tokenizer=tokenizer)
    messages = [{"role": "user", "content": "Q"}, {"role": "function", "content": CALL},
                {"role": "observation", "content": "R"}, {"role": "assistant", "content": "A"}]
    assert template.render_multiturn(tokenizer, messages, None, json.dumps([WEATHER_TOOL])) == [
        (["<tools>get_weather</tools><user>Q</user><assistant>"], ['[get_weather {"city": "Paris"}]</assistant>']),
        (["<tool>R</tool><assistant>"], ["A</assistant>"]),
    ]


def test_tokenizer_template_errors(load):
    with pytest.raises(ConfigError, match="needs a tokenizer that has a chat_template"):
        get_template("tokenizer", tokenizer=load())
    unstable = "{{ messages | length }}" + CHATML_WITH_DEFAULT_SYSTEM  # the message count changes the first line
    tokenizer = load(chat_template=unstable)
    with pytest.raises(ConfigError, match="not prefix-stable"):
        get_template("tokenizer", tokenizer=tokenizer).encode_multiturn(tokenizer, QA, None, None)


# ---------------------------------------------------------------------------------------------------------------
# Jinja export: apply_chat_template(messages) tokenized as one string == our ids

WORDS = ["Hello", "world", "42", "7", "你好", "世界", "天气", "the", "answer", "is", "Paris", "?", "!", ".", ","]
JINJA_TEMPLATES = [name for name in template_names() if name != "tokenizer"]
# With the Qwen2-style BPE, these templates put text (not a special token or a newline) on both sides of a piece
# boundary, e.g. a prompt ending in "Belle: " before the answer, or "<｜Assistant｜>" (plain text to our test
# tokenizer) before "<think>": one-string tokenization merges across it. Every other template round-trips exactly
# for messages without leading/trailing whitespace (measurements in docs/templates.md).
BPE_BOUNDARY_MERGES = ["aeva", "belle", "breeze", "deepseekcoder", "deepseekr1", "ernie_nothink", "glm4_7", "hy3",
                       "linly", "youtu"]
BPE_EXACT = [name for name in JINJA_TEMPLATES if name not in BPE_BOUNDARY_MERGES + ["index"]]


def random_conversation(rng: random.Random, ragged: bool = True) -> tuple[str | None, list[dict]]:
    """Random system + messages; `ragged` messages may start/end with spaces and newlines."""

    def sentence() -> str:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        return rng.choice(["", " ", "\n"]) + words + rng.choice(["", "\n", " ", "\n\n"]) if ragged else words

    system = rng.choice([None, "", "You are a bot.", "系统 prompt\n"])
    return system, conversation(*(sentence() for _ in range(2 * rng.randint(1, 3))))


def jinja_ids(tokenizer, chat_template: str, system: str | None, messages: list[dict], **kwargs) -> list[int]:
    chat = ([{"role": "system", "content": system}] if system is not None else []) + messages
    rendered = tokenizer.apply_chat_template(chat, chat_template=chat_template, tokenize=False, **kwargs)
    return tokenizer.encode(rendered, add_special_tokens=False)


def flat(pairs) -> list[int]:
    return [i for prompt, response in pairs for i in prompt + response]


def jinja_mismatches(load, name: str, kind: str, samples: int = 25, ragged: bool = True) -> int:
    """How many random conversations tokenize differently as one rendered string than with our encoder."""
    template, tokenizer = prepared(load, name, kind)
    chat_template = template.jinja_template(tokenizer)
    rng = random.Random(name)
    bad = 0
    for _ in range(samples):
        system, messages = random_conversation(rng, ragged)
        ours = flat(template.encode_multiturn(tokenizer, messages, system, None))
        bad += jinja_ids(tokenizer, chat_template, system, messages) != ours
    return bad


@pytest.mark.parametrize("name", JINJA_TEMPLATES)
def test_jinja_round_trip_char_tokenizer(load, name):
    assert jinja_mismatches(load, name, "char") == 0


@pytest.mark.parametrize("name", BPE_EXACT)
def test_jinja_round_trip_bpe_tokenizer(load, name):
    """Messages without leading/trailing whitespace (see docs/templates.md for the ragged case)."""
    assert jinja_mismatches(load, name, "bpe", ragged=False) == 0


@pytest.mark.parametrize("name", BPE_BOUNDARY_MERGES)
def test_jinja_round_trip_bpe_boundary_merges_are_real(load, name):
    """Keeps the list above (and the docs) honest: these do differ as one string."""
    assert jinja_mismatches(load, name, "bpe", ragged=False) > 0


@pytest.mark.parametrize("name", ["qwen", "qwen3", "llama3", "default", "mistral", "gemma", "alpaca_input"])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_jinja_generation_prompt_matches_the_trained_prompt(load, name, enable_thinking):
    template, tokenizer = prepared(load, name, enable_thinking=enable_thinking)
    chat_template = template.jinja_template(tokenizer)
    rng = random.Random(name)
    for _ in range(10):
        system, messages = random_conversation(rng)
        *history, (last_prompt, _) = template.encode_multiturn(tokenizer, messages, system, None)
        prompt = flat(history) + last_prompt  # what SFT put before the last answer
        assert jinja_ids(tokenizer, chat_template, system, messages[:-1], add_generation_prompt=True) == prompt


def test_jinja_enable_thinking_can_be_switched_at_render_time(load):
    template, tokenizer = prepared(load, "qwen3")
    rendered = tokenizer.apply_chat_template(QA[:1], chat_template=template.jinja_template(tokenizer), tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    assert rendered == USER.format("Q1") + EMPTY_THOUGHT


@pytest.mark.parametrize("name", ["default", "qwen", "qwen3", "llama3", "mistral", "llama2", "chatml"])
def test_jinja_round_trip_with_tools_calls_and_observations(load, monkeypatch, name):
    monkeypatch.setenv(TOOL_DATE_ENV, "26 Jul 2024")
    template, tokenizer = prepared(load, name)
    ours = [{"role": "user", "content": "Weather in Paris?"}, {"role": "function", "content": PARALLEL_CALLS},
            {"role": "observation", "content": '{"temp": 21}'}, {"role": "assistant", "content": "21C"}]
    calls = [{"type": "function", "function": call} for call in json.loads(PARALLEL_CALLS)]
    if name in ("llama2", "chatml"):  # default tool format, single call
        ours[1]["content"], calls = CALL, calls[:1]
    hf = [ours[0], {"role": "assistant", "content": "", "tool_calls": calls},
          {"role": "tool", "content": '{"temp": 21}'}, ours[3]]
    chat_template = template.jinja_template(tokenizer)
    expected = flat(template.encode_multiturn(tokenizer, ours, "SYS", TOOLS))
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": "SYS"}] + hf, tools=json.loads(TOOLS),
                                             chat_template=chat_template, tokenize=False)
    assert tokenizer.encode(rendered, add_special_tokens=False) == expected


def test_jinja_export_raises_for_tool_formats_it_does_not_render(load):
    template, tokenizer = prepared(load, "glm4")
    with pytest.raises(Exception, match="tools are not supported"):
        tokenizer.apply_chat_template(QA[:2], tools=[WEATHER_TOOL], chat_template=template.jinja_template(tokenizer),
                                      tokenize=False)


# ---------------------------------------------------------------------------------------------------------------
# LF parity: our ids == LLaMA-Factory 0.9.5's ids, for every ported template


PARITY_CASES = [
    {"messages": conversation("Hello there", "Hi! How can I help?"), "system": None, "tools": None},
    {"messages": conversation("Q1 今天天气", "A1 很不错", "Second {{idx}} question 你好", "答案 2"),
     "system": "You are terse.", "tools": None},
    {"messages": conversation(" leading space\n\n", "\nanswer with newline\n", "{{content}} x", "  "), "system": "",
     "tools": None},
    {"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "function", "content": CALL},
                  {"role": "observation", "content": '{"temp": 21}'}, {"role": "assistant", "content": "It is 21C."}],
     "system": "SYS", "tools": TOOLS},
    {"messages": conversation("Q", "A"), "system": None, "tools": "[]"},
    {"messages": [{"role": "user", "content": "Q"},
                  {"role": "function", "content": "<think>\nplan\n</think>\n\n" + PARALLEL_CALLS}],
     "system": None, "tools": TOOLS},
    {"messages": [{"role": "user", "content": "Q"}, {"role": "function", "content": f"Checking.<tool_call>{CALL}"
                                                                                     "</tool_call>"}],
     "system": None, "tools": None},
    {"messages": THINK, "system": None, "tools": None},
    {"messages": THINK, "system": None, "tools": None, "discard": True},
    {"messages": conversation("Q1", "<think>\nT1\n</think>\n\nA1", "Q2", "<think>\nT2\n</think>\n\nA2"),
     "system": None, "tools": None},
    {"messages": conversation("odd", "number", "of messages"), "system": None, "tools": None},
    {"messages": [{"role": "user", "content": "Q"}, {"role": "function", "content": "{not json"}], "system": None,
     "tools": None},
    {"messages": conversation("Q", "A"), "system": None, "tools": "{bad json"},
]
PARITY_OPTIONS = [
    {},
    {"default_system": "Custom system."},
]
REASONING_OPTIONS = [{"enable_thinking": False}, {"enable_thinking": None}, {"preserve_thinking": True}]
TOOL_FORMAT_OPTIONS = [{"tool_format": "qwen"}, {"tool_format": "default"}, {"tool_format": "llama3"},
                       {"tool_format": "mistral"}, {"tool_format": "glm4"}]
LF_TEMPLATE_NAMES = [name for name in template_names() if name not in
                     {"tokenizer", "alpaca_input", "linly", "belle", "yayi", "guanaco", "stablebeluga", "nous"}]


def parity_groups(tokenizer_dirs) -> list[dict]:
    groups = []
    for kind in ("bpe", "char", "sp"):
        for name in LF_TEMPLATE_NAMES:
            options = list(PARITY_OPTIONS)
            if isinstance(get_template(name), ReasoningTemplate):
                options += REASONING_OPTIONS
            if kind == "bpe":
                options += TOOL_FORMAT_OPTIONS + [{"train_on_prompt": True}]
            groups += [{"tokenizer": str(tokenizer_dirs[kind]), "template": name, "options": option,
                        "cases": PARITY_CASES} for option in options]
        for chat_template in (CHATML_WITH_DEFAULT_SYSTEM, CHATML_WITH_THINK):  # template=None: parse_template
            directory = tokenizer_dirs[kind].parent / f"{kind}-chat-{len(groups)}"
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs[kind])
            tokenizer.chat_template = chat_template
            tokenizer.save_pretrained(directory)
            groups.append({"tokenizer": str(directory), "template": None, "options": {}, "cases": PARITY_CASES})
    return groups


def ours(group: dict) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(group["tokenizer"])
    try:
        template = get_template(group["template"], tokenizer=tokenizer, **group["options"])
        template.fix_tokenizer(tokenizer)
    except ConfigError as err:
        return {"error": str(err)}
    result = {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "vocab": len(tokenizer),
              "stop": sorted(template.stop_token_ids(tokenizer)), "cases": []}
    for case in group["cases"]:
        outcome = {}
        for mode in ("multi", "one"):
            try:
                if mode == "multi":
                    ids = template.encode_multiturn(tokenizer, case["messages"], case["system"], case["tools"],
                                                    case.get("discard", False))
                    outcome[mode] = [list(pair) for pair in ids]
                else:
                    outcome[mode] = list(template.encode_oneturn(tokenizer, case["messages"], case["system"],
                                                                 case["tools"]))
            except RowError as err:
                outcome[mode] = {"error": f"RowError: {err}"}
        result["cases"].append(outcome)
    return result


def comparable(result: dict) -> dict:
    """Errors compare by their presence only: LF raises RuntimeError/KeyError/IndexError where we raise RowError."""
    if "error" in result:
        return {"error": True}
    return {**result, "cases": [{mode: ({"error": True} if isinstance(value, dict) else value)
                                 for mode, value in case.items()} for case in result["cases"]]}


@pytest.mark.lf_parity
def test_lf_parity_of_every_ported_template(tokenizer_dirs, request, monkeypatch):
    if "lf_parity" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: run with `pytest -m lf_parity`")
    if not LF_PYTHON.exists():
        pytest.skip(f"no LLaMA-Factory virtualenv at {LF_PYTHON.parent.parent} (bench/lf_venv.sh builds it)")
    groups = parity_groups(tokenizer_dirs)
    monkeypatch.delenv(TOOL_DATE_ENV, raising=False)  # both sides put today's date into llama3 tool prompts
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([str(LF_PYTHON), str(FIXTURES / "lf_oracle.py")], input=json.dumps({"groups": groups}),
                         capture_output=True, text=True, env=env, check=False, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(run.stdout)
    mismatches = []
    for group, lf_result in zip(groups, theirs, strict=True):
        mine = ours(group)
        if comparable(mine) != comparable(lf_result):
            label = f"{Path(group['tokenizer']).name}/{group['template']}/{group['options']}"
            if "error" in mine or "error" in lf_result:
                mismatches.append(f"{label}: ours {mine.get('error')} vs LF {lf_result.get('error')}")
                continue
            for key in ("eos", "pad", "vocab", "stop"):
                if mine[key] != lf_result[key]:
                    mismatches.append(f"{label}: {key} ours {mine[key]} vs LF {lf_result[key]}")
            for i, (a, b) in enumerate(zip(comparable(mine)["cases"], comparable(lf_result)["cases"], strict=True)):
                for mode in a:
                    if a[mode] != b[mode]:
                        mismatches.append(
                            f"{label}: case {i} {mode}: ours {str(a[mode])[:300]} vs LF {str(b[mode])[:300]}")
    encodings = [value for result in theirs for case in result.get("cases", []) for value in case.values()]
    raised = sum(isinstance(value, dict) for value in encodings)
    print(f"LF parity: {len(groups)} groups ({sum('error' in r for r in theirs)} refused by both), "
          f"{len(encodings)} encodings ({len(encodings) - raised} id lists, {raised} errors on both sides), "
          f"{len(mismatches)} mismatches", file=sys.stderr)
    assert not mismatches, "\n".join(mismatches[:20])
