"""The chat template engine: messages -> prompt/response token ids, exactly as LLaMA-Factory 0.9.5 builds them.

Behaviour and option handling reimplement LLaMA-Factory 0.9.5 `data/template.py` (Apache-2.0,
https://github.com/hiyouga/LLaMA-Factory); the code is our own. The templates themselves are registered in
`catalog.py`; this module holds what renders them: the `Template` classes, slot resolution and encoding, the
jinja export and the registry (`_register`, `template_names`, `get_template`, `parse_template`).

How a conversation is encoded (LF semantics):
- message 0 gets the prefix slots and, when `system or tools` is truthy, the system slots filled with
  `system + tool_prompt` (no separator; `system=""` falls back to `default_system`; tools "[]" is truthy);
- every message is rendered by its role's formatter; each string piece is tokenized ON ITS OWN
  (`tokenizer.encode(piece, add_special_tokens=False)`) and the ids are concatenated; no BOS is added unless a
  template slot asks for it;
- `encode_multiturn` pairs message 2k with message 2k+1; `encode_oneturn` returns (all but the last, the last).

`render_*` stop one step earlier: they return the per-message *elements* (str pieces still to tokenize, ints
already resolved: BOS/EOS/vocabulary tokens) so a batch encoder can tokenize the strings of many rows in one call;
`encode_*` = render + tokenize each piece + concatenate.

Templates are registry prototypes; `get_template` always returns a fresh copy (LF mutates its global registry when
options are applied, we never do).

Adding a template: a template that only differs in its strings, tokens and options is one `_register(...)` call
in `catalog.py`, nothing here. Only a template that renders differently (LF's `Llama2Template` and
`ReasoningTemplate` are such cases) needs a `Template` subclass here, overriding the step that differs
(`_message_slots`, `render_*`, and the matching `_jinja_*` hook so the exported chat_template agrees); the
catalog then passes it as `cls=`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunepipe.data.formatters import (
    EOS,
    EmptyFormatter,
    FunctionFormatter,
    Slot,
    SpecialToken,
    StringFormatter,
    Token,
    ToolFormatter,
)
from tunepipe.data.tool_formats import jinja_literal, jinja_tool_support
from tunepipe.errors import ConfigError, RowError

# the name it had before the package split, so log lines and logging config stay as they were
logger = logging.getLogger("tunepipe.data.templates")

Element = str | int
Message = dict[str, Any]
ROLES = ("user", "assistant", "system", "function", "observation")


# ---------------------------------------------------------------------------------------------------------------
# Base template


@dataclass
class Template:
    """A chat template: LF's `Template` fields, plus `name`.

    format_*: the formatter of each role, of the system block, of the tools prompt and of the conversation prefix;
    default_system: used when a row's system is empty; stop_words: generation stops (the first becomes EOS with
    replace_eos); thought_words / tool_call_words: the tags around thoughts and tool calls; efficient_eos: the
    assistant slot has no EOS (the processors append it); replace_jinja_template: `fix_tokenizer` always writes
    our chat_template; enable_thinking / preserve_thinking: reasoning templates only.
    """

    name: str
    format_user: StringFormatter
    format_assistant: StringFormatter
    format_system: StringFormatter
    format_function: FunctionFormatter
    format_observation: StringFormatter
    format_tools: ToolFormatter | StringFormatter
    format_prefix: EmptyFormatter
    default_system: str = ""
    stop_words: list[str] = field(default_factory=list)
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")
    efficient_eos: bool = False
    replace_eos: bool = False
    replace_jinja_template: bool = False
    enable_thinking: bool | None = True
    preserve_thinking: bool = False

    # -- rendering and encoding ----------------------------------------------------------------------------------

    def render_multiturn(
        self,
        tokenizer: Any,
        messages: list[Message],
        system: str | None,
        tools: str | None,
        discarding_history_cot: bool = False,  # only reasoning templates use it
    ) -> list[tuple[list[Element], list[Element]]]:
        """Per turn (user-side message, assistant-side message) elements; turn 0 carries prefix and system."""
        return _pairs(self._render(tokenizer, messages, system, tools))

    def render_oneturn(
        self, tokenizer: Any, messages: list[Message], system: str | None, tools: str | None
    ) -> tuple[list[Element], list[Element]]:
        """(elements of every message but the last, elements of the last message)."""
        rendered = self._render(tokenizer, _non_empty(messages), system, tools)
        return [element for elements in rendered[:-1] for element in elements], rendered[-1]

    def encode_multiturn(
        self,
        tokenizer: Any,
        messages: list[Message],
        system: str | None,
        tools: str | None,
        discarding_history_cot: bool = False,
    ) -> list[tuple[list[int], list[int]]]:
        pairs = self.render_multiturn(tokenizer, messages, system, tools, discarding_history_cot)
        return [(encode_elements(tokenizer, prompt), encode_elements(tokenizer, answer)) for prompt, answer in pairs]

    def encode_oneturn(
        self, tokenizer: Any, messages: list[Message], system: str | None, tools: str | None
    ) -> tuple[list[int], list[int]]:
        prompt, response = self.render_oneturn(tokenizer, messages, system, tools)
        return encode_elements(tokenizer, prompt), encode_elements(tokenizer, response)

    def _render(
        self, tokenizer: Any, messages: list[Message], system: str | None, tools: str | None
    ) -> list[list[Element]]:
        return [resolve_slots(tokenizer, slots) for slots in self._message_slots(messages, system, tools)]

    def _message_slots(self, messages: list[Message], system: str | None, tools: str | None) -> list[list[Slot]]:
        """LF `Template._encode` before tokenization: the slots of every message."""
        system = system or self._default_system(messages)
        rendered = []
        for i, message in enumerate(messages):
            slots: list[Slot] = []
            if i == 0:
                slots += self.format_prefix.apply()
                if system or tools:
                    slots += self.format_system.apply(content=_text(system, "system") + self._tool_prompt(tools))

            role, content = _role(message), message.get("content")
            if role == "user":
                slots += self._user_slots(i, message)
            elif role == "assistant":
                slots += self.format_assistant.apply(content=content)
            elif role == "observation":
                slots += self.format_observation.apply(content=content)
            else:  # function
                slots += self.format_function.apply(
                    content=content, thought_words=self.thought_words, tool_call_words=self.tool_call_words
                )
            rendered.append(slots)
        return rendered

    def _user_slots(self, i: int, message: Message) -> list[Slot]:
        return self.format_user.apply(content=message.get("content"), idx=str(i // 2))

    def _default_system(self, messages: list[Message]) -> str:
        return self.default_system

    def _tool_prompt(self, tools: str | None) -> str:
        if not tools:
            return ""
        text = self.format_tools.apply(content=tools)[0]
        assert isinstance(text, str), "tool formatters produce text"
        return text

    # -- tokenizer -----------------------------------------------------------------------------------------------

    def fix_tokenizer(self, tokenizer: Any) -> None:
        """LF `fix_special_tokens` + `fix_jinja_template`: EOS/pad/stop words, and a chat_template if needed.

        - `replace_eos`: EOS becomes `stop_words[0]` (added if new); the other stop words become extra special
          tokens (never replacing the existing ones);
        - no EOS -> `<|endoftext|>`; no pad -> pad = EOS;
        - no chat_template, or `replace_jinja_template`: the tokenizer gets `self.jinja_template(tokenizer)`
          (LF writes a simpler template under the same conditions; ours renders identically and more, see there).
        """
        stop_words = list(self.stop_words)
        if self.replace_eos:
            if not stop_words:
                raise ConfigError(f"template {self.name}: stop words are required to replace the EOS token",
                                  key="template")
            _add_or_replace_eos(tokenizer, stop_words[0])
            stop_words = stop_words[1:]

        if tokenizer.eos_token_id is None:
            _add_or_replace_eos(tokenizer, "<|endoftext|>")

        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("Add pad token: %s", tokenizer.pad_token)

        if stop_words:
            added = tokenizer.add_special_tokens(
                {"extra_special_tokens": stop_words}, replace_extra_special_tokens=False
            )
            logger.info("Add %s to stop words.", ",".join(stop_words))
            if added > 0:
                logger.warning("New tokens have been added: training grows the model's embedding to match (logged).")

        if tokenizer.chat_template is None or self.replace_jinja_template:
            tokenizer.chat_template = self.jinja_template(tokenizer)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """EOS and the stop words' ids, without duplicates (LF `get_stop_token_ids`)."""
        ids = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(word) for word in self.stop_words]
        return list(dict.fromkeys(ids))

    # -- jinja export --------------------------------------------------------------------------------------------

    def jinja_template(self, tokenizer: Any) -> str:
        """A chat_template rendering what this template encodes, for `tokenizer.apply_chat_template`.

        Rendered and then tokenized as one string it gives our ids wherever whole-string tokenization equals LF's
        per-piece tokenization (docs/templates.md lists where it does not). Beyond LF's export it handles
        `add_generation_prompt`, observation/"tool" turns, assistant `tool_calls` and a `tools` argument (tool
        formats default, qwen, llama3, mistral), Llama-2 system fusion, the reasoning templates' empty thought
        and `enable_thinking`. BOS/EOS are baked in as the tokenizer's current token strings.
        """
        content = [("content", "content")]
        answer = _out(_jinja_slots(self.format_assistant.slots, tokenizer, content))
        observation = _out(_jinja_slots(self.format_observation.slots, tokenizer, content))
        function = _out(_jinja_slots(self.format_function.slots, tokenizer, [("content", "(content ~ calls_text)")]))
        has_calls = "message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls']"
        return "".join([
            f"{{#- tunepipe chat template '{self.name}' (LLaMA-Factory 0.9.5 compatible, generated) -#}}",
            self._jinja_defaults(),
            _set("system_message = ''"), _set("loop_messages = messages"),
            _if("messages and messages[0]['role'] == 'system'"),
            _set("system_message = messages[0]['content']"), _set("loop_messages = messages[1:]"), _end(),
            _if("not system_message"), _set("system_message = default_system"), _end(),
            _set("has_tools = tools is defined and tools is not none"),  # LF: tools "[]" is truthy
            _set("tool_text = ''"),
            _if("has_tools and tools | length > 0"), self._jinja_tools(tokenizer), _end(),
            "{%- for message in loop_messages -%}",
            _if("message['content'] is defined and message['content'] is not none and message['content'] is not "
                "string"), _raise("message content must be a string"), _end(),
            _set("content = message['content'] if message['content'] is string else ''"),
            _set("idx = (loop.index0 // 2) | string"),
            _if("loop.first"), _out(_jinja_slots(self.format_prefix.slots, tokenizer)), self._jinja_system(tokenizer),
            _end(),
            _if("message['role'] == 'user'"), self._jinja_user(tokenizer),
            _elif(has_calls), self._jinja_before_answer(), self._jinja_calls(), function,
            _elif("message['role'] == 'assistant'"), self._jinja_before_answer(), answer,
            _elif("message['role'] in ['tool', 'observation']"), observation,
            "{%- else -%}", _raise_expr("'Unexpected role: ' ~ message['role']"), _end(),
            "{%- endfor -%}",
            self._jinja_generation_prompt(tokenizer),
        ])

    def _jinja_tools(self, tokenizer: Any) -> str:
        """Statements setting `tool_text` from a non-empty `tools` list."""
        if isinstance(self.format_tools, StringFormatter):  # phi4_mini: the tools JSON inside fixed text
            wrapped = _jinja_slots(self.format_tools.slots[:1], tokenizer,
                                   [("content", "(tools if tools is string else tools | tojson)")])
            return _set("tool_text = " + wrapped)
        support = jinja_tool_support(self.format_tools.tool_format)
        if support is None:
            return _raise(f"template {self.name}: tools are not supported by this exported chat template")
        return support.tools_block

    def _jinja_calls(self) -> str:
        """Statements setting `calls_text` from `message['tool_calls']`."""
        support = jinja_tool_support(self.format_function.tool_format)
        if support is None:
            return _raise(f"template {self.name}: tool calls are not supported by this exported chat template")
        return support.calls_block

    def _jinja_defaults(self) -> str:
        return _set("default_system = " + jinja_literal(self.default_system))

    def _jinja_system(self, tokenizer: Any) -> str:
        """Statements run at the first message: emit the system block."""
        system = _jinja_slots(self.format_system.slots, tokenizer, [("content", "(system_message ~ tool_text)")])
        return _if("system_message or has_tools") + _out(system) + _end()

    def _jinja_user(self, tokenizer: Any) -> str:
        return _out(_jinja_slots(self.format_user.slots, tokenizer, [("content", "content"), ("idx", "idx")]))

    def _jinja_before_answer(self) -> str:
        """Statements run before an assistant answer or tool call (reasoning templates: the empty thought)."""
        return ""

    def _jinja_generation_prompt(self, tokenizer: Any) -> str:
        prompt = self._generation_prefix(tokenizer)
        return _if("add_generation_prompt") + _out(jinja_literal(prompt)) + _end() if prompt else ""

    def _generation_prefix(self, tokenizer: Any) -> str:
        """What `add_generation_prompt` adds: the assistant slot's text before `{{content}}`.

        Every LF template puts the assistant header at the end of the *user* slot, so this is usually empty: the
        prompt already ends where the answer starts. A whitespace-only lead (mistral's " ", glm4's "\\n") is left
        to the model because BPE/SentencePiece tokenizers merge it into the answer's first token.
        """
        text = ""
        for slot in self.format_assistant.slots:
            if isinstance(slot, str):
                head, found, _ = slot.partition("{{content}}")
                text += head
                if found:
                    break
            else:
                text += _token_text(slot, tokenizer)
        return text if text.strip() else ""


# ---------------------------------------------------------------------------------------------------------------
# Template variants (LF's subclasses, plus our alpaca-with-input and tokenizer-chat-template ones)


@dataclass
class Llama2Template(Template):
    """The system text (first system slot only) is fused into the first user message; no turn index, and
    function calls are parsed without thought/tool-call words (LF `Llama2Template`)."""

    def _message_slots(self, messages: list[Message], system: str | None, tools: str | None) -> list[list[Slot]]:
        system = system or self._default_system(messages)
        rendered = []
        for i, message in enumerate(messages):
            slots: list[Slot] = []
            system_text = ""
            if i == 0:
                slots += self.format_prefix.apply()
                if system or tools:
                    first = self.format_system.apply(content=_text(system, "system") + self._tool_prompt(tools))[0]
                    assert isinstance(first, str), "Llama2-style system slots start with text"
                    system_text = first

            role, content = _role(message), message.get("content")
            if role == "user":
                slots += self.format_user.apply(content=system_text + _text(content))
            elif role == "assistant":
                slots += self.format_assistant.apply(content=content)
            elif role == "observation":
                slots += self.format_observation.apply(content=content)
            else:  # function
                slots += self.format_function.apply(content=content)
            rendered.append(slots)
        return rendered

    def _jinja_system(self, tokenizer: Any) -> str:
        first = _jinja_slots(self.format_system.slots[:1], tokenizer, [("content", "(system_message ~ tool_text)")])
        return _set("system_text = ''") + _if("system_message or has_tools") + _set("system_text = " + first) + _end()

    def _jinja_user(self, tokenizer: Any) -> str:
        user = _jinja_slots(self.format_user.slots, tokenizer, [("content", "content")])
        return _if("loop.first") + _set("content = system_text ~ content") + _end() + _out(user)


@dataclass
class ReasoningTemplate(Template):
    """Thought handling of LF `ReasoningTemplate` (qwen3 & co.).

    An assistant message without thought tags gets the empty thought (`thought_words` joined): appended to the
    prompt (not trained) when `enable_thinking` is False or None, prepended to the response (trained) when True.
    It is its own element, tokenized separately, as LF does (`get_thought_word_ids`).
    """

    def empty_thought(self) -> str:
        return self.thought_words[0] + self.thought_words[1]

    def remove_thought(self, content: Any) -> str:
        pattern = f"{re.escape(self.thought_words[0])}(.*?){re.escape(self.thought_words[1])}"
        return re.sub(pattern, "", _text(content), flags=re.DOTALL).lstrip("\n")

    def _has_thought(self, content: Any) -> bool:
        content = _text(content)
        return self.thought_words[0].strip() in content or self.thought_words[1].strip() in content

    def render_multiturn(
        self,
        tokenizer: Any,
        messages: list[Message],
        system: str | None,
        tools: str | None,
        discarding_history_cot: bool = False,
    ) -> list[tuple[list[Element], list[Element]]]:
        _check_pairable(len(messages))  # before indexing messages[i + 1] below
        messages = [dict(message) for message in messages]
        if self.enable_thinking is False:  # no thoughts at all
            for i in range(1, len(messages), 2):
                messages[i]["content"] = self.remove_thought(messages[i]["content"])
        if discarding_history_cot:  # keep only the last turn's thought
            for i in range(1, len(messages) - 2, 2):
                messages[i]["content"] = self.remove_thought(messages[i]["content"])

        rendered = self._render(tokenizer, messages, system, tools)
        turns = [len(messages) - 2] if discarding_history_cot else range(0, len(messages), 2)
        for i in turns:
            if not self._has_thought(messages[i + 1]["content"]):
                if not self.enable_thinking:
                    rendered[i].append(self.empty_thought())
                else:
                    rendered[i + 1].insert(0, self.empty_thought())
        return _pairs(rendered)

    def render_oneturn(
        self, tokenizer: Any, messages: list[Message], system: str | None, tools: str | None
    ) -> tuple[list[Element], list[Element]]:
        messages = [dict(message) for message in _non_empty(messages)]
        if not self.preserve_thinking:
            for i in range(1, len(messages) - 2, 2):
                messages[i]["content"] = self.remove_thought(messages[i]["content"])
        if self.enable_thinking is False:
            messages[-1]["content"] = self.remove_thought(messages[-1]["content"])

        prompt, response = super().render_oneturn(tokenizer, messages, system, tools)
        if not self._has_thought(messages[-1]["content"]):
            if not self.enable_thinking:
                prompt.append(self.empty_thought())
            else:
                response.insert(0, self.empty_thought())
        return prompt, response

    def _jinja_defaults(self) -> str:
        baked = {True: "true", False: "false", None: "none"}[self.enable_thinking]
        return super()._jinja_defaults() + _if("enable_thinking is not defined") + _set(
            "enable_thinking = " + baked) + _end()

    def _jinja_before_answer(self) -> str:
        # enable_thinking=False strips thoughts (the common one-block case: text before it + text after it)
        open_word, close_word = (jinja_literal(word) for word in self.thought_words)
        strip = (
            _if("enable_thinking is false")
            + _if(f"{open_word} in content and {close_word} in content")
            + _set(f"content = content.split({open_word})[0] ~ content.split({close_word})[-1]")
            + _end()
            + _set("content = content.lstrip('\\n')")
            + _end()
        )
        has_thought = " or ".join(f"{jinja_literal(word.strip())} in content" for word in self.thought_words)
        return strip + _if(f"not ({has_thought})") + _out(jinja_literal(self.empty_thought())) + _end()

    def _jinja_generation_prompt(self, tokenizer: Any) -> str:
        # the empty thought closes the prompt when thinking is off, as in training
        thought = _if("add_generation_prompt and not enable_thinking") + _out(jinja_literal(self.empty_thought()))
        return thought + _end() + super()._jinja_generation_prompt(tokenizer)


@dataclass
class Glm47ReasoningTemplate(ReasoningTemplate):
    """GLM-4.7: the empty thought is only the closing tag."""

    def empty_thought(self) -> str:
        return self.thought_words[1]


@dataclass
class AlpacaInputTemplate(Template):
    """Stanford-Alpaca prompts with a separate "### Input:" block (not an LF template).

    A user message carrying a non-empty "input" (the alpaca converter adds "instruction" and "input" keys next to
    the joined content) is rendered with `format_input`; otherwise the plain alpaca user slot is used. The default
    system is Alpaca's with-input preamble when the first message has an input.
    """

    format_input: StringFormatter | None = None
    input_system: str = ""

    def _user_slots(self, i: int, message: Message) -> list[Slot]:
        if message.get("input") and self.format_input is not None:
            return self.format_input.apply(instruction=message.get("instruction", ""), input=message["input"])
        return super()._user_slots(i, message)

    def _default_system(self, messages: list[Message]) -> str:
        return self.input_system if messages and messages[0].get("input") else self.default_system

    def _jinja_defaults(self) -> str:
        first_has_input = "loop_messages_0 and loop_messages_0['input'] is defined and loop_messages_0['input']"
        return (
            _set("loop_messages_0 = (messages[1] if messages | length > 1 else none) if messages and "
                 "messages[0]['role'] == 'system' else (messages[0] if messages else none)")
            + _set(f"default_system = {jinja_literal(self.input_system)} if {first_has_input} else "
                   f"{jinja_literal(self.default_system)}")
        )

    def _jinja_user(self, tokenizer: Any) -> str:
        assert self.format_input is not None
        with_input = _jinja_slots(self.format_input.slots, tokenizer, [
            ("instruction", "(message['instruction'] if message['instruction'] is defined else '')"),
            ("input", "message['input']")])
        return (_if("message['input'] is defined and message['input']") + _out(with_input) + "{%- else -%}"
                + super()._jinja_user(tokenizer) + _end())


@dataclass
class TokenizerChatTemplate(Template):
    """Template "tokenizer": the model's own `tokenizer.chat_template`, rendered with `apply_chat_template`.

    The conversation is rendered incrementally (prompt-side prefixes with add_generation_prompt=True, answer-side
    prefixes without) and each message's elements are the string differences, so the ids equal the tokenized
    full render split at message boundaries. A chat template that rewrites earlier turns when later ones are added
    (e.g. Qwen3 dropping old thoughts) is not prefix-stable and raises ConfigError. Observation messages become
    role "tool"; function messages become assistant `tool_calls`; `tools` is passed as the parsed list;
    `enable_thinking` is passed to the template. Formatter fields and tool_format are unused.
    """

    def _render(
        self, tokenizer: Any, messages: list[Message], system: str | None, tools: str | None
    ) -> list[list[Element]]:
        _require_chat_template(tokenizer)
        conversation: list[Message] = []
        system = system or self.default_system
        if system:
            conversation.append({"role": "system", "content": system})
        tool_list = _parse_tools(tools)
        rendered, previous = [], ""
        for i, message in enumerate(messages):
            conversation.append(_chat_message(message))
            text = tokenizer.apply_chat_template(
                conversation, tools=tool_list, add_generation_prompt=i % 2 == 0, tokenize=False,
                enable_thinking=self.enable_thinking,
            )
            if not text.startswith(previous):
                raise ConfigError(
                    "template 'tokenizer': the tokenizer's chat_template is not prefix-stable (rendering message "
                    f"{i} changes the text of earlier messages), so per-message labels cannot be derived from it; "
                    "use a named template", key="template")
            rendered.append([text[len(previous):]] if len(text) > len(previous) else [])
            previous = text
        return rendered

    def jinja_template(self, tokenizer: Any) -> str:
        return _require_chat_template(tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Slots -> elements -> ids


def resolve_slots(tokenizer: Any, slots: Sequence[Slot]) -> list[Element]:
    """Slots -> elements: non-empty strings kept, BOS/EOS/vocabulary tokens turned into ids (None BOS/EOS skipped)."""
    elements: list[Element] = []
    for slot in slots:
        if isinstance(slot, str):
            if slot:
                elements.append(slot)
        elif isinstance(slot, Token):
            token_id = tokenizer.convert_tokens_to_ids(slot.text)
            if token_id is None:  # LF would put None into the ids and fail later
                raise ConfigError(f"token {slot.text!r} used by the template is not in the tokenizer's vocabulary",
                                  key="template")
            elements.append(token_id)
        else:
            token_id = tokenizer.bos_token_id if slot.kind == "bos" else tokenizer.eos_token_id
            if token_id is not None:
                elements.append(token_id)
    return elements


def encode_elements(tokenizer: Any, elements: Sequence[Element]) -> list[int]:
    """Tokenize each string element on its own and concatenate (LF `_convert_elements_to_ids`)."""
    ids: list[int] = []
    for element in elements:
        if isinstance(element, str):
            ids += tokenizer.encode(element, add_special_tokens=False)
        else:
            ids.append(element)
    return ids


def _role(message: Message) -> str:
    role = message.get("role")
    if role not in ROLES or role == "system":
        raise RowError(f"Unexpected role: {role}", field="role", reason="unknown_role")
    return role


def _text(content: Any, field: str = "content") -> str:
    if not isinstance(content, str):
        raise RowError(f"Expected a string, got {content!r}", field=field, reason="non_string_content")
    return content


def _non_empty(messages: list[Message]) -> list[Message]:
    if not messages:
        raise RowError("no messages to encode", field="messages", reason="empty_messages")
    return messages


def _check_pairable(count: int) -> None:
    if not count or count % 2:
        raise RowError(f"{count} messages cannot be paired into (prompt, response) turns", field="messages",
                       reason="odd_message_count")


def _pairs(rendered: list[list[Element]]) -> list[tuple[list[Element], list[Element]]]:
    _check_pairable(len(rendered))
    return [(rendered[i], rendered[i + 1]) for i in range(0, len(rendered), 2)]


def _add_or_replace_eos(tokenizer: Any, eos_token: str) -> None:
    if tokenizer.eos_token == eos_token:
        return
    is_added = tokenizer.eos_token_id is None
    added = tokenizer.add_special_tokens({"eos_token": eos_token})
    logger.info("%s eos token: %s", "Add" if is_added else "Replace", tokenizer.eos_token)
    if added > 0:
        logger.warning("New tokens have been added: training grows the model's embedding to match (logged).")


def _require_chat_template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not isinstance(template, str):
        raise ConfigError("template 'tokenizer' needs a tokenizer that has a chat_template", key="template")
    return template


def _parse_tools(tools: str | None) -> list[Any] | None:
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        raise RowError(f"Invalid JSON format in tool description: {[tools]}.", field="tools",
                       reason="bad_tools_json") from None
    if not isinstance(parsed, list):
        raise RowError(f"tools must be a JSON list: {[tools]}.", field="tools", reason="bad_tools_json")
    return parsed or None


def _chat_message(message: Message) -> Message:
    """Our message -> the OpenAI/HF message a chat_template expects."""
    role, content = _role(message), _text(message.get("content"))
    if role == "observation":
        return {"role": "tool", "content": content}
    if role != "function":
        return {"role": role, "content": content}
    try:
        calls = json.loads(content)
        calls = calls if isinstance(calls, list) else [calls]
        tool_calls = [{"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
                      for call in calls]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RowError(f"Invalid JSON format in function message: {[content]}.", field="content",
                       reason="bad_function_json") from None
    return {"role": "assistant", "content": "", "tool_calls": tool_calls}


# ---------------------------------------------------------------------------------------------------------------
# Jinja building blocks. The generated template keeps every literal inside {{ }} expressions and trims all
# whitespace around tags, so HF's trim_blocks/lstrip_blocks settings cannot change its output.


def _set(assignment: str) -> str:
    return "{%- set " + assignment + " -%}"


def _if(condition: str) -> str:
    return "{%- if " + condition + " -%}"


def _elif(condition: str) -> str:
    return "{%- elif " + condition + " -%}"


def _end() -> str:
    return "{%- endif -%}"


def _out(expression: str) -> str:
    return "{{- " + expression + " -}}" if expression != "''" else ""


def _raise_expr(message_expression: str) -> str:
    return "{{- raise_exception(" + message_expression + ") -}}"


def _raise(message: str) -> str:
    return _raise_expr(jinja_literal(message))


def _token_text(slot: SpecialToken | Token, tokenizer: Any) -> str:
    if isinstance(slot, Token):
        return slot.text
    if slot.kind == "bos":
        return tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
    return tokenizer.eos_token if tokenizer.eos_token_id is not None else ""


def _jinja_slots(slots: Sequence[Slot], tokenizer: Any, values: Sequence[tuple[str, str]] = ()) -> str:
    """A Jinja expression producing what `StringFormatter.apply(**values)` + token resolution produce.

    `values` are (placeholder, Jinja expression) in LF's keyword order: the first is substituted into the literal
    slot text, later ones with `replace(..., 1)` on the result, so text inserted earlier is searched too (LF's
    first-occurrence semantics, e.g. "{{idx}}" inside a user message).
    """
    parts = []
    for slot in slots:
        if not isinstance(slot, str):
            text = _token_text(slot, tokenizer)
            if text:
                parts.append(jinja_literal(text))
            continue
        if not values:
            if slot:
                parts.append(jinja_literal(slot))
            continue
        (first, first_expr), later = values[0], values[1:]
        head, found, tail = slot.partition("{{" + first + "}}")
        pieces = [jinja_literal(piece) for piece in (head,) if piece]
        if found:
            pieces.append(first_expr)
        if found and tail:
            pieces.append(jinja_literal(tail))
        expression = " ~ ".join(pieces) or "''"
        for name, value_expr in later:
            expression = f"({expression}) | replace({jinja_literal('{{' + name + '}}')}, {value_expr}, 1)"
        parts.append(expression)
    return " ~ ".join(parts) or "''"


# ---------------------------------------------------------------------------------------------------------------
# Registry


_REGISTRY: dict[str, Template] = {}


def _str(*slots: Slot) -> StringFormatter:
    return StringFormatter(list(slots))


def _fn(*slots: Slot, tool_format: str = "default") -> FunctionFormatter:
    return FunctionFormatter(list(slots), tool_format=tool_format)


def _fixed(*slots: Slot) -> EmptyFormatter:
    return EmptyFormatter(list(slots))


def _tools(tool_format: str) -> ToolFormatter:
    return ToolFormatter(tool_format)


def _register(
    name: str,
    *,
    user: StringFormatter | None = None,
    assistant: StringFormatter | None = None,
    system: StringFormatter | None = None,
    function: FunctionFormatter | None = None,
    observation: StringFormatter | None = None,
    tools: ToolFormatter | StringFormatter | None = None,
    prefix: EmptyFormatter | None = None,
    stop_words: Sequence[str] = (),
    thought_words: tuple[str, str] | None = None,
    tool_call_words: tuple[str, str] | None = None,
    efficient_eos: bool = False,
    cls: type[Template] = Template,
    **options: Any,
) -> None:
    """Register a template with LF `register_template`'s defaults for the formatters left out.

    assistant: "{{content}}" + EOS (no EOS with efficient_eos); function: the assistant's slots rendered with the
    "default" tool format; observation: the user formatter; user/system: plain "{{content}}"; tools: "default".
    """
    assert name not in _REGISTRY, f"template {name} registered twice"
    plain = _str("{{content}}")
    answer_slots: list[Slot] = ["{{content}}"] if efficient_eos else ["{{content}}", EOS]
    template = cls(
        name=name,
        format_user=user or plain,
        format_assistant=assistant or _str(*answer_slots),
        format_system=system or plain,
        format_function=function or _fn(*(assistant.slots if assistant else answer_slots)),
        format_observation=observation or user or plain,
        format_tools=tools or _tools("default"),
        format_prefix=prefix or _fixed(),
        stop_words=list(stop_words),
        thought_words=thought_words or ("<think>\n", "\n</think>\n\n"),
        tool_call_words=tool_call_words or ("<tool_call>", "</tool_call>"),
        efficient_eos=efficient_eos,
        **options,
    )
    _REGISTRY[name] = template


def template_names() -> list[str]:
    """Every template name `get_template` accepts."""
    return sorted(_REGISTRY)


def get_template(
    name: str | None,
    *,
    tokenizer: Any = None,
    tool_format: str | None = None,
    default_system: str | None = None,
    enable_thinking: bool | None = True,
    preserve_thinking: bool = False,
    train_on_prompt: bool = False,
) -> Template:
    """A fresh template with LF `get_template_and_fix_tokenizer`'s option logic applied (the tokenizer is not
    touched: call `template.fix_tokenizer(tokenizer)`).

    `name=None` parses `tokenizer.chat_template` when it has one (LF `parse_template`), else uses "empty".
    `tool_format` replaces the function and tools formatters — the function slots become plain
    "{{content}}" (+ EOS unless efficient_eos), dropping the template's own end-of-turn text, exactly as LF does.
    """
    if name is None:
        if tokenizer is not None and isinstance(getattr(tokenizer, "chat_template", None), str):
            logger.warning("`template` was not specified, try parsing the chat template from the tokenizer.")
            template = parse_template(tokenizer)
        else:
            logger.warning("`template` was not specified, use `empty` template.")
            template = copy.deepcopy(_REGISTRY["empty"])
    else:
        if name not in _REGISTRY:
            raise ConfigError(f"Template {name} does not exist. Known: {', '.join(template_names())}",
                              key="template")
        template = copy.deepcopy(_REGISTRY[name])
        if isinstance(template, TokenizerChatTemplate) and tokenizer is not None:
            _require_chat_template(tokenizer)

    if train_on_prompt and template.efficient_eos:
        raise ConfigError(f"Current template ({template.name}) does not support `train_on_prompt`.",
                          key="train_on_prompt")

    if tool_format is not None:
        slots: list[Slot] = ["{{content}}"] if template.efficient_eos else ["{{content}}", EOS]
        template.format_function = FunctionFormatter(slots, tool_format=tool_format)
        template.format_tools = ToolFormatter(tool_format)

    if default_system is not None:
        template.default_system = default_system
        if isinstance(template, AlpacaInputTemplate):
            template.input_system = default_system

    if isinstance(template, ReasoningTemplate | TokenizerChatTemplate):
        template.enable_thinking = enable_thinking
        template.preserve_thinking = preserve_thinking
    return template


def parse_template(tokenizer: Any) -> Template:
    """Reverse-engineer slots from `tokenizer.chat_template` (LF `parse_template`, same algorithm)."""

    def find_diff(short_str: str, long_str: str) -> str:
        # the characters of long_str that a greedy left-to-right alignment with short_str skips
        i = j = 0
        diff = ""
        while i < len(short_str) and j < len(long_str):
            if short_str[i] == long_str[j]:
                i += 1
            else:
                diff += long_str[j]
            j += 1
        return diff

    def render(messages: list[Message], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    try:
        prefix = tokenizer.decode(tokenizer.encode(""))
        system_slot = render([{"role": "system", "content": "{{content}}"}], False)[len(prefix):]
        user_slot_empty_system = render(
            [{"role": "system", "content": ""}, {"role": "user", "content": "{{content}}"}], True)[len(prefix):]
        user_slot = render([{"role": "user", "content": "{{content}}"}], True)[len(prefix):]
        assistant_slot = render([{"role": "user", "content": "{{content}}"},
                                 {"role": "assistant", "content": "{{content}}"}], False)
        assistant_slot = assistant_slot[len(prefix) + len(user_slot):]
        cls = ReasoningTemplate if "<think>" in assistant_slot else Template
        assistant_slot = assistant_slot.replace("<think>", "").replace("</think>", "").lstrip("\n")

        if len(user_slot) > len(user_slot_empty_system):
            default_system = find_diff(user_slot_empty_system, user_slot)
            sole_system = system_slot.replace("{{content}}", default_system, 1)
            user_slot = user_slot[len(sole_system):]
        else:  # an empty default system renders no system block, so the empty-system render is the longer one
            default_system = ""

        return cls(
            name="parsed",
            format_user=_str(user_slot),
            format_assistant=_str(assistant_slot),
            format_system=_str(system_slot),
            format_function=_fn(assistant_slot),
            format_observation=_str(user_slot),
            format_tools=_tools("default"),
            format_prefix=_fixed(prefix) if prefix else _fixed(),
            default_system=default_system,
        )
    except Exception as err:  # a chat_template this heuristic cannot take apart
        raise ConfigError(f"cannot derive a template from the tokenizer's chat_template ({err}); set `template`",
                          key="template") from err
