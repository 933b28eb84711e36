"""Convert raw rows (alpaca, sharegpt, openai) to one unified example schema, with LLaMA-Factory 0.9.5's rules.

The unified `Example` carries what LF calls the aligned row (`_prompt`, `_response`, `_system`, `_tools`, media).
Rows LF would turn into empty, later-dropped examples are kept in place with a `drop` reason instead: the position of
every row matters downstream (LF's processors work in batches of 1000 rows, counted before invalid rows are
filtered), and every dropped row is reported by reason. Where LF is wrong we fix it and say so in docs/compat.md:
- a sharegpt/openai preference pair whose chosen/rejected role is not an assistant role is dropped (LF keeps it and
  trains a user-formatted completion);
- an openai row with an unknown role is dropped (LF crashes with KeyError);
- `<image>`/`<video>`/`<audio>` placeholder counts that disagree with the media list drop the row (LF aborts);
- a media path that escapes the media directory is refused.
Non-string content (e.g. null) aborts the run in LF; here it is a one-line error naming dataset, file, row and field,
or a counted drop with `skip_bad_rows`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunepipe.data.loading import RawDataset, resolve_inside
from tunepipe.data.registry import DatasetAttr
from tunepipe.errors import DataError, RowError

USER, ASSISTANT, SYSTEM, FUNCTION, OBSERVATION = "user", "assistant", "system", "function", "observation"

# Stable keys for dropped rows; shown in the health report and `tunepipe data check`.
DROP_REASONS = {
    "invalid_role_order": "roles do not alternate user/observation then assistant/function",
    "invalid_message_count": "wrong number of messages (even for SFT, odd before a chosen/rejected pair)",
    "unknown_role": "a message role is not mapped by the dataset's tags",
    "invalid_preference_role": "chosen/rejected is not an assistant or function message",
    "media_count_mismatch": "number of <image>/<video>/<audio> placeholders differs from the media list",
    "no_response": "no response to train on (response missing or not a string)",
    "not_a_preference_pair": "no chosen/rejected pair (chosen/rejected missing or of the wrong type)",
    "kto_tag_not_bool": "kto_tag is not a JSON boolean",
    "no_prompt": "no prompt text",
    "empty_messages": "the message list is empty",
}


@dataclass(slots=True)
class Example:
    """One converted row. `prompt` has odd length (user ... user); `response` has 1 (SFT), 2 (chosen, rejected or
    KTO desirable/undesirable), or 0 (unsupervised) messages."""

    prompt: list[dict[str, Any]]
    response: list[dict[str, Any]]
    system: str | None = ""
    tools: str | None = ""
    images: list | None = None
    videos: list | None = None
    audios: list | None = None
    drop: str | None = None  # a DROP_REASONS key when the converter already knows the row is unusable
    position: int = 0  # index into RawDataset.rows, to locate the row in its file
    dataset: str = ""
    extra: dict = field(default_factory=dict)


def _media(values: Any, attr: DatasetAttr, media_dir: Path | None, column: str) -> list | None:
    """LF's `_find_medias`: wrap in a list, join local str paths with media_dir when that file exists."""
    if values is None:
        return None
    if not isinstance(values, list):
        values = [values]
    elif len(values) == 0:
        return None
    else:
        values = list(values)
    if attr.is_local and media_dir is not None and isinstance(values[0], (str, list)):
        def resolve(item: str) -> str:
            path = resolve_inside(media_dir, item, what=f"columns.{column}", dataset=attr.name)
            return str(media_dir / item) if path.is_file() else item  # LF keeps the original string if missing

        values = [[resolve(v) for v in item] if isinstance(item, list) else resolve(item) for item in values]
    return values


def _placeholders() -> dict[str, str]:
    return {
        "images": os.getenv("IMAGE_PLACEHOLDER", "<image>"),
        "videos": os.getenv("VIDEO_PLACEHOLDER", "<video>"),
        "audios": os.getenv("AUDIO_PLACEHOLDER", "<audio>"),
    }


def _check_content(example: Example, fields: Callable[[str, int], str]) -> None:
    """Every message the templates will render must be text (LF: RuntimeError 'Expected a string')."""
    for part, messages in (("prompt", example.prompt), ("response", example.response)):
        for i, message in enumerate(messages):
            if not isinstance(message["content"], str):
                raise RowError(f"message content must be a string, got {json.dumps(message['content'])}",
                               field=fields(part, i), reason="non_string_content")
    for name in ("system", "tools"):
        value = getattr(example, name)
        if value is not None and not isinstance(value, str):
            raise RowError(f"must be a string, got {type(value).__name__}", field=name, reason=f"bad_{name}")
    placeholders = _placeholders()
    for media in ("images", "videos", "audios"):
        expected = len(getattr(example, media) or [])
        token = placeholders[media]
        found = sum(m["content"].count(token) for m in example.prompt + example.response)
        if found != expected and (expected or found):
            example.drop = "media_count_mismatch"
            return


class AlpacaConverter:
    def __init__(self, attr: DatasetAttr, media_dir: Path | None):
        self.attr, self.media_dir = attr, media_dir

    def __call__(self, row: dict[str, Any]) -> Example:
        a = self.attr
        prompt: list[dict[str, Any]] = []
        history = row.get(a.history) if a.history else None
        if isinstance(history, list):
            for turn, pair in enumerate(history):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise RowError("each history item must be a [prompt, response] pair", field=f"{a.history}[{turn}]",
                                   reason="bad_history")
                prompt += [{"role": USER, "content": pair[0]}, {"role": ASSISTANT, "content": pair[1]}]
        instruction = row.get(a.prompt) if a.prompt else None
        query = row.get(a.query) if a.query else None
        parts = [value for value in (instruction, query) if value]
        if any(not isinstance(value, str) for value in parts):
            bad = a.prompt if not isinstance(instruction, str) and instruction else a.query
            raise RowError("must be a string", field=bad, reason="non_string_content")
        # instruction/input are kept apart too, for templates that render them separately (alpaca_input)
        prompt.append({"role": USER, "content": "\n".join(parts), "instruction": instruction or "",
                       "input": query or ""})

        # Rows without a usable response are not dropped here: whether they are usable depends on the stage
        # (an unsupervised eval set takes them), so the processors decide and name the reason.
        kto = row.get(a.kto_tag) if a.kto_tag else None
        if a.kto_tag and isinstance(kto, bool):
            answer = {"role": ASSISTANT, "content": row.get(a.response) if a.response else None}
            empty = {"role": ASSISTANT, "content": ""}
            response = [answer, empty] if kto else [empty, answer]
        elif a.ranking and isinstance(row.get(a.chosen), str) and isinstance(row.get(a.rejected), str):
            response = [{"role": ASSISTANT, "content": row[a.chosen]}, {"role": ASSISTANT, "content": row[a.rejected]}]
        elif a.response and isinstance(row.get(a.response), str):
            response = [{"role": ASSISTANT, "content": row[a.response]}]
        else:
            response = []
        example = Example(
            prompt=prompt,
            response=response,
            system=row.get(a.system) if a.system else "",
            tools=row.get(a.tools) if a.tools else "",
            images=_media(row.get(a.images), a, self.media_dir, "images") if a.images else None,
            videos=_media(row.get(a.videos), a, self.media_dir, "videos") if a.videos else None,
            audios=_media(row.get(a.audios), a, self.media_dir, "audios") if a.audios else None,
        )

        def field_name(part: str, i: int) -> str:
            if part == "response":
                return a.response if not a.ranking else (a.chosen if i == 0 else a.rejected)
            return f"{a.history}[{i // 2}][{i % 2}]" if i < len(prompt) - 1 else (a.prompt or a.query)

        _check_content(example, field_name)
        return example


class SharegptConverter:
    """sharegpt (and, with `openai=True`, LF's `openai` formatting: tool_calls, merged tool responses)."""

    def __init__(self, attr: DatasetAttr, media_dir: Path | None, openai: bool = False):
        self.attr, self.media_dir, self.openai = attr, media_dir, openai
        a = attr
        self.tag_mapping = {a.user_tag: USER, a.assistant_tag: ASSISTANT, a.observation_tag: OBSERVATION,
                            a.function_tag: FUNCTION, a.system_tag: SYSTEM}
        self.even_tags = (a.user_tag, a.observation_tag)
        self.odd_tags = (a.assistant_tag, a.function_tag)

    def _message(self, message: Any, path: str) -> tuple[Any, Any]:
        a = self.attr
        if not isinstance(message, dict):
            raise RowError(f"each message must be an object, got {type(message).__name__}", field=path,
                           reason="bad_message")
        if a.role_tag not in message or a.content_tag not in message:
            missing = a.role_tag if a.role_tag not in message else a.content_tag
            raise RowError(f"message has no '{missing}' key (tags.role_tag/content_tag)", field=path,
                           reason="bad_message")
        return message[a.role_tag], message[a.content_tag]

    def __call__(self, row: dict[str, Any]) -> Example:
        a = self.attr
        messages = row.get(a.messages)
        if messages is None:
            messages = []
        if not isinstance(messages, list):
            raise RowError(f"must be a list of messages, got {type(messages).__name__}", field=a.messages,
                           reason="bad_messages")
        offset = 0
        if a.system_tag and messages and self._message(messages[0], f"{a.messages}[0]")[0] == a.system_tag:
            system = self._message(messages[0], f"{a.messages}[0]")[1]
            messages, offset = messages[1:], 1
        else:
            system = (row.get(a.system, "") if self.openai else row.get(a.system)) if a.system else ""

        drop = None
        aligned: list[dict[str, Any]] = []
        sources: list[int] = []  # message index in the row for each aligned message (for error fields)
        if self.openai:
            drop = self._align_openai(messages, offset, aligned, sources)
        else:
            for turn, message in enumerate(messages):
                role, content = self._message(message, f"{a.messages}[{turn + offset}]")
                if role not in (self.even_tags if turn % 2 == 0 else self.odd_tags):
                    drop = "invalid_role_order"
                    break
                aligned.append({"role": self.tag_mapping[role], "content": content})
                sources.append(turn + offset)
        if drop is None and not aligned:
            drop = "empty_messages"
        elif drop is None and (len(aligned) % 2 == 0) == a.ranking:
            drop = "invalid_message_count"

        prompt: list[dict[str, Any]] = []
        response: list[dict[str, Any]] = []
        kto = row.get(a.kto_tag) if a.kto_tag else None
        if drop is not None:
            pass
        elif a.kto_tag and isinstance(kto, bool):
            prompt, last = aligned[:-1], aligned[-1:]
            empty = {"role": ASSISTANT, "content": ""}
            response = last + [empty] if kto else [empty] + last
        elif a.ranking and isinstance(row.get(a.chosen), dict) and isinstance(row.get(a.rejected), dict):
            pair = []
            for column in (a.chosen, a.rejected):
                role, content = self._message(row[column], column)
                if role not in self.odd_tags:
                    drop = "invalid_preference_role"  # LF flags this too late and keeps the row
                pair.append({"role": self.tag_mapping.get(role, role), "content": content})
            prompt, response = aligned, pair
        else:
            prompt, response = aligned[:-1], aligned[-1:]

        tools = row.get(a.tools, "") if a.tools else ""
        if self.openai:
            if isinstance(tools, (dict, list)):
                tools = json.dumps(tools, ensure_ascii=False)
            system = self._openai_system(system, tools)
        example = Example(
            prompt=prompt if drop is None else [],
            response=response if drop is None else [],
            system=system,
            tools=tools,
            images=_media(row.get(a.images), a, self.media_dir, "images") if a.images else None,
            videos=_media(row.get(a.videos), a, self.media_dir, "videos") if a.videos else None,
            audios=_media(row.get(a.audios), a, self.media_dir, "audios") if a.audios else None,
            drop=drop,
        )
        if drop is None:
            def field_name(part: str, i: int) -> str:
                if part == "response" and len(response) == 2 and a.ranking:
                    return f"{a.chosen if i == 0 else a.rejected}.{a.content_tag}"
                index = i if part == "prompt" else len(prompt) + i
                if part == "response" and len(response) == 2:  # KTO: the real answer is the last message
                    index = len(prompt)
                source = sources[index] if index < len(sources) else index
                return f"{a.messages}[{source}].{a.content_tag}"

            _check_content(example, field_name)
        return example

    def _align_openai(self, messages: list, offset: int, aligned: list, sources: list) -> str | None:
        """LF's openai alignment: tool_calls become a function message, consecutive tool results are merged."""
        a = self.attr
        tool_responses: list = []
        for turn, message in enumerate(messages):
            role, content = self._message(message, f"{a.messages}[{turn + offset}]")
            if role in (a.assistant_tag, a.function_tag) and message.get("tool_calls"):
                calls = message["tool_calls"]
                try:
                    content = json.dumps([call["function"] for call in calls], ensure_ascii=False)
                except (TypeError, KeyError):
                    raise RowError("tool_calls must be a list of {\"function\": {...}} objects",
                                   field=f"{a.messages}[{turn + offset}].tool_calls", reason="bad_tool_calls") from None
                role = a.function_tag
            if role == a.observation_tag:
                tool_responses.append(content)
                continue
            if tool_responses:
                if any(not isinstance(r, str) for r in tool_responses):
                    raise RowError("tool message content must be a string",
                                   field=f"{a.messages}[{turn + offset - 1}].{a.content_tag}",
                                   reason="non_string_content")
                aligned.append({"role": OBSERVATION, "content": "\n</tool_response>\n<tool_response>\n".join(
                    tool_responses)})
                sources.append(turn + offset - 1)
                tool_responses = []
            if role not in self.tag_mapping:
                return "unknown_role"  # LF: KeyError crash
            aligned.append({"role": self.tag_mapping[role], "content": content})
            sources.append(turn + offset)
        # LF drops trailing tool messages (never flushed); kept for parity, documented in docs/compat.md.
        for turn, message in enumerate(aligned):
            if message["role"] not in ((USER, OBSERVATION) if turn % 2 == 0 else (ASSISTANT, FUNCTION)):
                return "invalid_role_order"
        return None

    @staticmethod
    def _openai_system(system: Any, tools: Any) -> Any:
        """LF 0.9.5 injects "detailed thinking off" into openai-formatted rows (from PR #9112); kept for parity."""
        marker = "detailed thinking off"
        if not system:
            return marker if not tools else system
        if not isinstance(system, str):
            return system
        if not tools:
            return system if ("detailed thinking on" in system or marker in system) else system + "\n" + marker
        return system + "\n"


def make_converter(attr: DatasetAttr, media_dir: Path | None) -> Callable[[dict[str, Any]], Example]:
    if attr.formatting == "alpaca":
        return AlpacaConverter(attr, media_dir)
    return SharegptConverter(attr, media_dir, openai=attr.formatting == "openai")


REQUIRED_COLUMNS = {"alpaca": ("response",), "sharegpt": ("messages",), "openai": ("messages",)}


def check_columns(raw: RawDataset) -> None:
    """A column the entry names must exist in the data. Default (implicit) optional columns may be absent."""
    attr = raw.attr
    required = set(REQUIRED_COLUMNS[attr.formatting]) | set(attr.explicit_columns)
    if attr.ranking:
        required |= {"chosen", "rejected"}
    for key in sorted(required):
        column = attr.column(key)
        if column and column not in raw.columns:
            where = f"columns.{key}" if key in attr.explicit_columns else f"columns.{key} (default {column!r})"
            raise DataError(f"column {column!r} not found in the data ({where}); the data has: "
                            f"{', '.join(raw.columns)}", dataset=attr.name,
                            file=raw.files[0][0] if raw.files else None, field=column)


def arrow_unified(values: list) -> list:
    """Values as llamafactory's `datasets` 4 JSON loader returns them: objects in a column share one Arrow struct
    type, so a key present in any row appears in every row (null where missing), in first-seen order. `datasets` 5
    keeps raw JSON objects instead; the openai converter JSON-dumps tools and tool calls, so this is visible."""
    import pyarrow as pa

    try:
        return pa.array(values).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return values


def convert(raw: RawDataset, *, media_dir: Path | None, skip_bad_rows: bool = False) -> list[Example]:
    """Convert every row; a malformed row is a located `DataError` unless `skip_bad_rows` (then a counted drop)."""
    check_columns(raw)
    attr = raw.attr
    if attr.formatting == "openai":
        for column in (attr.tools, attr.messages):
            if column and column in raw.columns and any(isinstance(r.get(column), (list, dict)) for r in raw.rows):
                for row, value in zip(raw.rows, arrow_unified([r.get(column) for r in raw.rows])):
                    row[column] = value
    converter = make_converter(raw.attr, media_dir)
    examples = []
    for position, row in enumerate(raw.rows):
        try:
            example = converter(row)
        except RowError as err:
            if not skip_bad_rows:
                file, row_in_file = raw.locate(position)
                raise err.located(dataset=raw.attr.name, file=file, row=row_in_file) from None
            example = Example(prompt=[], response=[], drop=err.reason)
        except DataError as err:
            file, row_in_file = raw.locate(position)
            err.file, err.row = err.file or file, row_in_file
            raise DataError(err.message, dataset=err.dataset, file=err.file, row=err.row, field=err.field) from None
        example.position, example.dataset = position, raw.attr.name
        examples.append(example)
    return examples
