"""Tool (function-calling) formats: how a tools list becomes system-prompt text and how function calls become
assistant text.

Behaviour and prompt strings reimplement LLaMA-Factory 0.9.5 `data/tool_utils.py` (Apache-2.0,
https://github.com/hiyouga/LLaMA-Factory) so that token ids match it exactly; the code is our own. Only the
"formatting" direction is ported (LF's `tool_extractor`, used to parse model output at inference, is not needed to
build training data).

Each format is a pair of pure functions:
- `format_tools(tools)`: the parsed `tools` JSON (a list of tool dicts) -> the text appended to the system prompt;
- `format_calls(calls)`: the parsed function calls -> the assistant's function-call text.
Some formats also carry a Jinja version of both (`jinja`), used when a template is exported as a tokenizer
chat_template (see `Template.jinja_template`).

Errors raised here are plain Python exceptions (KeyError, TypeError, ...) exactly where LF would raise; the
formatters turn them into `RowError`s that name the row field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from tunepipe.errors import ConfigError

# Set this to a fixed date (e.g. "26 Jul 2024") to make the llama3 tool prompt reproducible; LF (and we, by
# default) embed today's date, so the token ids of a llama3 tool row change every day.
TOOL_DATE_ENV = "TUNEPIPE_TOOL_PROMPT_DATE"


class FunctionCall(NamedTuple):
    """One parsed function call; `arguments` is the JSON text `json.dumps(args, ensure_ascii=False)`."""

    name: str
    arguments: str


@dataclass(frozen=True)
class JinjaToolSupport:
    """Jinja statements for a chat_template export.

    `tools_block` sets the variable `tool_text` from `tools` (a non-empty list);
    `calls_block` sets `calls_text` from `message['tool_calls']` (OpenAI/HF style:
    `{"type": "function", "function": {"name": ..., "arguments": {...}}}`, the wrapper being optional).
    """

    tools_block: str
    calls_block: str


@dataclass(frozen=True)
class ToolFormat:
    name: str
    format_tools: Callable[[list[dict[str, Any]]], str]
    format_calls: Callable[[list[FunctionCall]], str]
    jinja: JinjaToolSupport | None = None


def _unwrap(tool: dict[str, Any]) -> Any:
    """`{"type": "function", "function": {...}}` -> the inner dict; LF's "default" formats use "" if it is missing."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrap(tool: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI wrapper around a bare function description (kept as is when already wrapped)."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def jinja_literal(text: str) -> str:
    """A Jinja string literal for `text` (Jinja unescapes Python/JSON-style backslash escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, ensure_ascii=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Prompt texts, transcribed from LF 0.9.5 (they must stay byte-identical).

DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)

GLM4_TOOL_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)

GLM4_MOE_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, output the function name and arguments within the following XML format:"
    "\n<tool_call>{{function-name}}"
    "\n<arg_key>{{arg-key-1}}</arg_key>"
    "\n<arg_value>{{arg-value-1}}</arg_value>"
    "\n<arg_key>{{arg-key-2}}</arg_key>"
    "\n<arg_value>{{arg-value-2}}</arg_value>"
    "\n...\n</tool_call>\n"
)

LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    """Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. """
    "Do not use variables.\n\n{tool_text}"
)

MINIMAX_M1_TOOL_PROMPT = (
    "You are provided with these tools:\n<tools>\n{tool_text}</tools>\n\n"
    "If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name and "
    "json-object of arguments, following the format below:\n<tool_calls>\n"
    """{{"name": <tool-name-1>, "arguments": <args-json-object-1>}}\n...\n</tool_calls>"""
)

MINIMAX_M2_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:\n\n<tools>\n{tool_text}</tools>\n\n"
    "When making tool calls, use XML format to invoke tools and pass parameters:\n"
    """\n<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n"""
    """<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>"""
)

QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)

QWEN35_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>{tool_text}"
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: "
    "an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language "
    "BEFORE the function call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)

SEED_TOOL_PROMPT = (
    "system\nYou are Doubao, a helpful AI assistant. You may call one or more functions to assist with the user query."
    "Tool List:\nYou are authorized to use the following tools (described in JSON Schema format). Before performing "
    "any task, you must decide how to call them based on the descriptions and parameters of these tools.{tool_text}\n"
    "工具调用请遵循如下格式:\n<seed:tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>value_1"
    "</parameter>\n<parameter=example_parameter_2>This is the value for the second parameter\nthat can span\nmultiple "
    "lines</parameter>\n</function>\n</seed:tool_call>\n"
)

LING_TOOL_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)

LFM2_TOOL_PROMPT = "List of tools: <|tool_list_start|>{tool_text}<|tool_list_end|>"


# ---------------------------------------------------------------------------------------------------------------
# default: "Action: name\nAction Input: {...}" (ReAct style)


def _default_tools(tools: list[dict[str, Any]]) -> str:
    tool_text, tool_names = "", []
    for tool in tools:
        tool = _unwrap(tool)
        param_text = ""
        for name, param in tool["parameters"]["properties"].items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum", None) else ""
            items = (
                ", where each item should be {}".format(param["items"].get("type", ""))
                if param.get("items", None)
                else ""
            )
            kind, description = param.get("type", ""), param.get("description", "")
            param_text += f"  - {name} ({kind}{required}): {description}{enum}{items}\n"

        tool_text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n"
        tool_text += param_text + "\n"
        tool_names.append(tool["name"])

    return DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(tool_names))


def _default_calls(calls: list[FunctionCall]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)


# ---------------------------------------------------------------------------------------------------------------
# qwen (Qwen 2.5 / 3): <tools> JSON list in the system prompt, <tool_call> JSON blocks in the answer


def _qwen_tool_list(tools: list[dict[str, Any]]) -> str:
    return "".join("\n" + _dumps(_wrap(tool)) for tool in tools)


def _qwen_tools(tools: list[dict[str, Any]]) -> str:
    return QWEN_TOOL_PROMPT.format(tool_text=_qwen_tool_list(tools))


def _qwen_calls(calls: list[FunctionCall]) -> str:
    texts = [_dumps({"name": name, "arguments": json.loads(arguments)}) for name, arguments in calls]
    return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)


# ---------------------------------------------------------------------------------------------------------------
# llama3 (Llama 3.1 JSON tool calling, tools in the system message)


def _tool_date() -> str:
    return os.environ.get(TOOL_DATE_ENV) or datetime.now().strftime("%d %b %Y")


def _llama3_tools(tools: list[dict[str, Any]]) -> str:
    tool_text = "".join(_dumps(_wrap(tool), indent=4) + "\n\n" for tool in tools)
    return LLAMA3_TOOL_PROMPT.format(date=_tool_date(), tool_text=tool_text)


def _llama3_calls(calls: list[FunctionCall]) -> str:
    objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in calls]
    return _dumps(objects[0] if len(objects) == 1 else objects)


# ---------------------------------------------------------------------------------------------------------------
# mistral (v0.3 tokenizer): [AVAILABLE_TOOLS] JSON list, calls as one JSON list


def _mistral_tools(tools: list[dict[str, Any]]) -> str:
    return "[AVAILABLE_TOOLS] " + _dumps([_wrap(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"


def _mistral_calls(calls: list[FunctionCall]) -> str:
    return _dumps([{"name": name, "arguments": json.loads(arguments)} for name, arguments in calls])


# ---------------------------------------------------------------------------------------------------------------
# glm4 (ChatGLM3 / GLM-4): one call per message, "name\n{json}"


def _glm4_tools(tools: list[dict[str, Any]]) -> str:
    tool_text = ""
    for tool in tools:
        tool = _unwrap(tool)
        body = _dumps(tool, indent=4)
        tool_text += f"\n\n## {tool['name']}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"

    return GLM4_TOOL_PROMPT.format(tool_text=tool_text)


def _glm4_calls(calls: list[FunctionCall]) -> str:
    if len(calls) > 1:
        raise ValueError("GLM-4 does not support parallel functions.")

    return f"{calls[0].name}\n{calls[0].arguments}"


# ---------------------------------------------------------------------------------------------------------------
# glm4_moe (GLM-4.5+): qwen-style tool list, XML key/value calls


def _glm4_moe_tools(tools: list[dict[str, Any]]) -> str:
    return GLM4_MOE_TOOL_PROMPT.format(tool_text=_qwen_tool_list(tools))


def _value_text(value: Any) -> str:
    """Strings as they are, anything else as JSON (the XML-ish formats below)."""
    return value if isinstance(value, str) else _dumps(value)


def _glm4_moe_calls(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        text = "\n<tool_call>" + name
        for key, value in json.loads(arguments).items():
            text += "\n<arg_key>" + key + "</arg_key>" + "\n<arg_value>" + _value_text(value) + "</arg_value>"
        texts.append(text)

    return "\n".join(texts)


# ---------------------------------------------------------------------------------------------------------------
# qwen3_5 (Qwen 3.5): XML function/parameter blocks


def _qwen35_tools(tools: list[dict[str, Any]]) -> str:
    tool_text = "".join("\n" + _dumps(tool.get("function", tool) if tool.get("type") == "function" else tool)
                        for tool in tools)
    return QWEN35_TOOL_PROMPT.format(tool_text=tool_text)


def _qwen35_calls(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        text = f"<tool_call>\n<function={name}>"
        for key, value in json.loads(arguments).items():
            text += f"\n<parameter={key}>\n{_value_text(value)}\n</parameter>"
        texts.append(text + "\n</function>\n</tool_call>")

    return "\n".join(texts)


# ---------------------------------------------------------------------------------------------------------------
# minimax1 / minimax2 (MiniMax-M1 / M2)


def _minimax1_tools(tools: list[dict[str, Any]]) -> str:
    return MINIMAX_M1_TOOL_PROMPT.format(tool_text="".join(_dumps(_unwrap(tool)) + "\n" for tool in tools))


def _minimax1_calls(calls: list[FunctionCall]) -> str:
    texts = [_dumps({"name": name, "arguments": json.loads(arguments)}) for name, arguments in calls]
    return "<tool_calls>\n" + "\n".join(texts) + "\n</tool_calls>"


def _minimax2_tools(tools: list[dict[str, Any]]) -> str:
    tool_text = "".join("<tool>" + _dumps(_unwrap(tool)) + "</tool>\n" for tool in tools)
    return MINIMAX_M2_TOOL_PROMPT.format(tool_text=tool_text)


def _minimax2_calls(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        text = f'<invoke name="{name}">'
        for key, value in json.loads(arguments).items():
            text += f'\n<parameter name="{key}">' + _value_text(value) + "</parameter>"
        texts.append(text + "\n</invoke>")

    return "\n".join(texts)


# ---------------------------------------------------------------------------------------------------------------
# seed_oss (Seed-OSS), ling (Ling / Bailing v2), lfm2 (LFM2, pythonic calls)


def _seed_tools(tools: list[dict[str, Any]]) -> str:
    return SEED_TOOL_PROMPT.format(tool_text="\n" + _dumps(tools))


def _seed_calls(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        text = "\n<seed:tool_call>\n<function=" + name
        for key, value in json.loads(arguments).items():
            text += "\n<parameter=" + key + ">" + _value_text(value) + "</parameter>"
        texts.append(text + "\n</function>\n</seed:tool_call>")

    return "\n".join(texts)


def _ling_tools(tools: list[dict[str, Any]]) -> str:
    return LING_TOOL_PROMPT.format(tool_text=_qwen_tool_list(tools)) + "\n" + "detailed thinking off"


def _lfm2_tools(tools: list[dict[str, Any]]) -> str:
    functions = [tool.get("function", tool) if tool.get("type") == "function" else tool for tool in tools]
    return LFM2_TOOL_PROMPT.format(tool_text=_dumps(functions))


def _lfm2_calls(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        kwargs = [f'{key}="{value}"' if isinstance(value, str) else f"{key}={_dumps(value)}"
                  for key, value in json.loads(arguments).items()]
        texts.append(f"{name}({', '.join(kwargs)})")

    return f"<|tool_call_start|>[{', '.join(texts)}]<|tool_call_end|>"


# ---------------------------------------------------------------------------------------------------------------
# Jinja mirrors (chat_template export) of the default, qwen, llama3 and mistral formats. `~` stringifies like
# str.format does; optional dict keys are read with .get because `d['items']` would find the dict *method* `items`
# when the key is missing. Call arguments given as a dict are dumped with tojson (= json.dumps), arguments given
# as a string are spliced as they are (assumed to be JSON already).

_JINJA_CALL = (
    "{%- set fn = tc.get('function', tc) -%}"
    "{%- set args_json = fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson -%}"
)
_JINJA_WRAP = "{%- set wrapped = tool if tool.get('type') == 'function' else {'type': 'function', 'function': tool} -%}"


def _jinja_prompt(prompt: str, **values: str) -> str:
    """A str.format prompt with `{name}` fields -> a Jinja concatenation of its literal parts and `values`."""
    parts, rest = [], prompt.replace("{{", "\0").replace("}}", "\1")
    while "{" in rest:
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        parts += [jinja_literal(head.replace("\0", "{").replace("\1", "}")), values[name]]
    parts.append(jinja_literal(rest.replace("\0", "{").replace("\1", "}")))
    return " ~ ".join(parts)


def _jinja_calls(call_expression: str, separator: str, *, wrap: str = "calls_text = ns.text") -> str:
    """Statements joining `call_expression` (per tool call, may use `fn` and `args_json`) into `calls_text`."""
    return (
        "{%- set ns = namespace(text='') -%}{%- for tc in message['tool_calls'] -%}" + _JINJA_CALL
        + "{%- set ns.text = ns.text ~ (" + jinja_literal(separator) + " if not loop.first else '') ~ "
        + call_expression + " -%}{%- endfor -%}{%- set " + wrap + " -%}"
    )


def _jinja_tools(tool_expression: str, prompt_expression: str) -> str:
    """Statements joining `tool_expression` (per tool, may use `wrapped`) into `ns.text`, then setting `tool_text`
    to `prompt_expression` (which may use `ns.text`)."""
    return (
        "{%- set ns = namespace(text='') -%}{%- for tool in tools -%}" + _JINJA_WRAP
        + "{%- set ns.text = ns.text ~ " + tool_expression + " -%}{%- endfor -%}"
        + "{%- set tool_text = " + prompt_expression + " -%}"
    )


_DEFAULT_JINJA = JinjaToolSupport(
    tools_block=(
        "{%- set ns = namespace(text='', names='') -%}"
        "{%- for tool in tools -%}"
        "{%- set fn = tool.get('function', '') if tool.get('type') == 'function' else tool -%}"
        "{%- set ns.text = ns.text ~ '> Tool Name: ' ~ fn['name'] ~ '\\nTool Description: '"
        " ~ fn.get('description', '') ~ '\\nTool Args:\\n' -%}"
        "{%- for pname, param in fn['parameters']['properties'].items() -%}"
        "{%- set ns.text = ns.text ~ '  - ' ~ pname ~ ' (' ~ param.get('type', '')"
        " ~ (', required' if pname in fn['parameters'].get('required', []) else '') ~ '): '"
        " ~ param.get('description', '')"
        " ~ ((', should be one of [' ~ param['enum'] | join(', ') ~ ']') if param.get('enum') else '')"
        " ~ ((', where each item should be ' ~ param['items'].get('type', '')) if param.get('items') else '')"
        " ~ '\\n' -%}"
        "{%- endfor -%}"
        "{%- set ns.text = ns.text ~ '\\n' -%}"
        "{%- set ns.names = ns.names ~ (', ' if not loop.first else '') ~ fn['name'] -%}"
        "{%- endfor -%}"
        "{%- set tool_text = " + _jinja_prompt(DEFAULT_TOOL_PROMPT, tool_text="ns.text", tool_names="ns.names")
        + " -%}"
    ),
    calls_block=_jinja_calls("'Action: ' ~ fn['name'] ~ '\\nAction Input: ' ~ args_json", "\n"),
)

_QWEN_JINJA = JinjaToolSupport(
    tools_block=_jinja_tools("'\\n' ~ wrapped | tojson", _jinja_prompt(QWEN_TOOL_PROMPT, tool_text="ns.text")),
    calls_block=_jinja_calls(
        "'<tool_call>\\n{\"name\": ' ~ fn['name'] | tojson ~ ', \"arguments\": ' ~ args_json ~ '}\\n</tool_call>'", "\n"
    ),
)

_MISTRAL_JINJA = JinjaToolSupport(
    tools_block=_jinja_tools("(', ' if not loop.first else '') ~ wrapped | tojson",
                             "'[AVAILABLE_TOOLS] [' ~ ns.text ~ '][/AVAILABLE_TOOLS]'"),
    calls_block=_jinja_calls("'{\"name\": ' ~ fn['name'] | tojson ~ ', \"arguments\": ' ~ args_json ~ '}'", ", ",
                             wrap="calls_text = '[' ~ ns.text ~ ']'"),
)


def _llama3_jinja() -> JinjaToolSupport:
    # the date is taken when the template is rendered (strftime_now), unless TOOL_DATE_ENV pins it
    date = jinja_literal(os.environ[TOOL_DATE_ENV]) if os.environ.get(TOOL_DATE_ENV) else "strftime_now('%d %b %Y')"
    return JinjaToolSupport(
        tools_block=_jinja_tools("wrapped | tojson(indent=4) ~ '\\n\\n'",
                                 _jinja_prompt(LLAMA3_TOOL_PROMPT, date=date, tool_text="ns.text")),
        calls_block=_jinja_calls(
            "'{\"name\": ' ~ fn['name'] | tojson ~ ', \"parameters\": ' ~ args_json ~ '}'", ", ",
            wrap="calls_text = ns.text if message['tool_calls'] | length == 1 else '[' ~ ns.text ~ ']'",
        ),
    )


# ---------------------------------------------------------------------------------------------------------------
# Registry


def _build_formats() -> dict[str, ToolFormat]:
    formats = [
        ToolFormat("default", _default_tools, _default_calls, _DEFAULT_JINJA),
        ToolFormat("glm4", _glm4_tools, _glm4_calls),
        ToolFormat("glm4_moe", _glm4_moe_tools, _glm4_moe_calls),
        ToolFormat("lfm2", _lfm2_tools, _lfm2_calls),
        ToolFormat("ling", _ling_tools, _qwen_calls),
        ToolFormat("llama3", _llama3_tools, _llama3_calls),  # jinja built on demand: it reads TOOL_DATE_ENV
        ToolFormat("minimax1", _minimax1_tools, _minimax1_calls),
        ToolFormat("minimax2", _minimax2_tools, _minimax2_calls),
        ToolFormat("mistral", _mistral_tools, _mistral_calls, _MISTRAL_JINJA),
        ToolFormat("qwen", _qwen_tools, _qwen_calls, _QWEN_JINJA),
        ToolFormat("qwen3_5", _qwen35_tools, _qwen35_calls),
        ToolFormat("seed_oss", _seed_tools, _seed_calls),
    ]
    return {fmt.name: fmt for fmt in formats}


TOOL_FORMATS: dict[str, ToolFormat] = _build_formats()


def get_tool_format(name: str) -> ToolFormat:
    """The tool format called `name` (LF's `tool_format` values); ConfigError if unknown."""
    if name not in TOOL_FORMATS:
        known = ", ".join(sorted(TOOL_FORMATS))
        raise ConfigError(f"Tool format {name} does not exist. Known: {known}", key="tool_format")

    return TOOL_FORMATS[name]


def jinja_tool_support(name: str) -> JinjaToolSupport | None:
    """Jinja statements for the tool format `name`, or None where the export does not support its tools."""
    if name == "llama3":
        return _llama3_jinja()
    return get_tool_format(name).jinja
