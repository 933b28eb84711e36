"""Slot formatters: the building blocks of chat templates.

A template renders each message as a list of *slots*:
- a `str`, tokenized on its own (`{{content}}`-style placeholders already substituted);
- `BOS` / `EOS`: the tokenizer's current BOS / EOS id at encoding time (skipped when the tokenizer has none);
- `Token("<x>")`: the id of vocabulary token `<x>`.

Behaviour reimplements LLaMA-Factory 0.9.5 `data/formatter.py` (Apache-2.0, https://github.com/hiyouga/LLaMA-Factory)
token for token, quirks included; the code is our own:
- a placeholder is replaced only at its FIRST occurrence in each string slot, and placeholders are substituted in
  keyword order, so a user message containing the text "{{idx}}" gets the turn index put into it (LF does that);
- every keyword value must be a `str` (LF: RuntimeError; here `RowError(reason="non_string_content")`);
- function-call messages are JSON (`{"name", "arguments"}` or a list of them), optionally preceded by a thought
  block (`<think>...</think>`) or embedded in `<tool_call>...</tool_call>`; they are rendered by a tool format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tunepipe.data.tool_formats import FunctionCall, get_tool_format
from tunepipe.errors import RowError

_PLACEHOLDER = re.compile(r"\{\{[a-zA-Z_][a-zA-Z0-9_]*\}\}")

# Exceptions a tool format raises on malformed (but JSON-valid) input; LF lets them escape as tracebacks.
_TOOL_ERRORS = (AttributeError, KeyError, TypeError, ValueError, IndexError)


@dataclass(frozen=True)
class SpecialToken:
    """The tokenizer's BOS or EOS, looked up when the slot is encoded (after the tokenizer is fixed)."""

    kind: Literal["bos", "eos"]


@dataclass(frozen=True)
class Token:
    """A vocabulary token given by its text, encoded with `convert_tokens_to_ids`."""

    text: str


BOS = SpecialToken("bos")
EOS = SpecialToken("eos")
Slot = str | SpecialToken | Token


def _has_placeholder(slots: list[Slot]) -> bool:
    return any(isinstance(slot, str) and _PLACEHOLDER.search(slot) for slot in slots)


@dataclass
class EmptyFormatter:
    """Fixed slots (prefixes); a placeholder is a template-definition bug."""

    slots: list[Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        if _has_placeholder(self.slots):
            raise ValueError("Empty formatter should not contain any placeholder.")

    def apply(self) -> list[Slot]:
        return list(self.slots)


@dataclass
class StringFormatter:
    """Slots with `{{name}}` placeholders, filled by `apply(name=value, ...)`."""

    slots: list[Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _has_placeholder(self.slots):
            raise ValueError("A placeholder is required in the string formatter.")

    def apply(self, **values: Any) -> list[Slot]:
        rendered: list[Slot] = []
        for slot in self.slots:
            if isinstance(slot, str):
                for name, value in values.items():
                    if not isinstance(value, str):
                        raise RowError(f"Expected a string, got {value!r}", field="content",
                                       reason="non_string_content")
                    slot = slot.replace("{{" + name + "}}", value, 1)  # first occurrence only, like LF
            rendered.append(slot)
        return rendered


@dataclass
class FunctionFormatter(StringFormatter):
    """An assistant function-call message: JSON calls rendered by `tool_format`, then put into the slots."""

    tool_format: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        get_tool_format(self.tool_format)  # fail at configuration time on an unknown format

    def apply(self, *, content: Any, thought_words: tuple[str, str] | None = None,
              tool_call_words: tuple[str, str] | None = None) -> list[Slot]:
        if not isinstance(content, str):
            raise RowError(f"Expected a string, got {content!r}", field="content", reason="non_string_content")

        call_match = _search_between(content, tool_call_words)
        if call_match is not None:
            # "<text><tool_call>{json}</tool_call>": the text outside the block stays in front of the calls
            lead = content.replace(call_match.group(0), "")
            calls_text = self._format_calls(call_match.group(1), content)
        else:
            thought_match = _search_between(content, thought_words)
            lead = thought_match.group(0) if thought_match else ""
            calls_json = content.replace(thought_match.group(0), "") if thought_match else content
            calls_text = self._format_calls(calls_json, content)

        return super().apply(content=lead + calls_text)

    def _format_calls(self, calls_json: str, content: str) -> str:
        try:
            parsed = json.loads(calls_json)
        except json.JSONDecodeError:
            raise RowError(f"Invalid JSON format in function message: {[content]}.", field="content",
                           reason="bad_function_json") from None

        try:
            calls = [FunctionCall(call["name"], json.dumps(call["arguments"], ensure_ascii=False))
                     for call in (parsed if isinstance(parsed, list) else [parsed])]
            return get_tool_format(self.tool_format).format_calls(calls)
        except _TOOL_ERRORS as err:  # LF: an uncaught KeyError/TypeError/ValueError
            raise RowError(f"Invalid function call in function message ({type(err).__name__}: {err}): {[content]}.",
                           field="content", reason="bad_function_json") from None


@dataclass
class ToolFormatter:
    """The `tools` JSON of a row -> the tool prompt appended to the system text ("" for an empty list)."""

    tool_format: str = "default"

    def __post_init__(self) -> None:
        get_tool_format(self.tool_format)

    def apply(self, *, content: Any) -> list[Slot]:
        try:
            tools = json.loads(content)
        except (json.JSONDecodeError, TypeError):
            raise RowError(f"Invalid JSON format in tool description: {[content]}.", field="tools",
                           reason="bad_tools_json") from None

        try:
            return [get_tool_format(self.tool_format).format_tools(tools) if len(tools) != 0 else ""]
        except _TOOL_ERRORS as err:  # LF: an uncaught KeyError/TypeError/AttributeError
            raise RowError(f"Invalid tool description ({type(err).__name__}: {err}): {[content]}.", field="tools",
                           reason="bad_tools_json") from None


def _search_between(text: str, words: tuple[str, str] | None) -> re.Match[str] | None:
    """The first `words[0] ... words[1]` span of `text` (non-greedy, across lines), or None."""
    if not words or len(words) != 2:
        return None
    return re.search(rf"{re.escape(words[0])}(.*?){re.escape(words[1])}", text, re.DOTALL)
