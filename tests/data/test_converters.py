"""Converters: alpaca / sharegpt / openai rows to unified examples (contract checks 1, 2, 4 and the LF fixes)."""

import json

import pytest

from tests.conftest import write_dataset
from tunepipe.data.converters import AlpacaConverter, SharegptConverter, convert
from tunepipe.data.loading import RawDataset
from tunepipe.data.processors import row_issue
from tunepipe.data.registry import parse_entry
from tunepipe.errors import DataError, RowError


def alpaca(entry=None, **row):
    attr = parse_entry("a", {"file_name": "a.json", **(entry or {})})
    return AlpacaConverter(attr, None)(row)


def sharegpt(entry, row, openai=False):
    attr = parse_entry("s", {"file_name": "s.json", "formatting": "openai" if openai else "sharegpt", **entry})
    return SharegptConverter(attr, None, openai=openai)(row)


def msgs(example):
    return [(m["role"], m["content"]) for m in example.prompt], [(m["role"], m["content"]) for m in example.response]


def test_alpaca_join_rules():
    # contract check 1
    e = alpaca(instruction="I", input="X", output="O")
    assert msgs(e) == ([("user", "I\nX")], [("assistant", "O")])
    assert (e.system, e.tools) == ("", "")
    assert msgs(alpaca(instruction="I", input="", output="O"))[0] == [("user", "I")]
    e = alpaca(instruction="", input="", output="O")
    assert msgs(e)[0] == [("user", "")] and row_issue(e, "sft") is None  # kept


def test_alpaca_history_is_prompt_with_trained_responses():
    e = alpaca({"columns": {"prompt": "instruction", "query": "input", "response": "output",
                            "history": "history"}},
               instruction="I", input="X", output="O", history=[["h1", "r1"], ["h2", "r2"]])
    assert msgs(e)[0] == [("user", "h1"), ("assistant", "r1"), ("user", "h2"), ("assistant", "r2"),
                          ("user", "I\nX")]


def test_alpaca_response_precedence_kto_then_ranking_then_normal():
    kto = {"columns": {"prompt": "instruction", "response": "output", "kto_tag": "label"}}
    assert msgs(alpaca(kto, instruction="q", output="good", label=True))[1] == [("assistant", "good"),
                                                                               ("assistant", "")]
    assert msgs(alpaca(kto, instruction="q", output="bad", label=False))[1] == [("assistant", ""),
                                                                               ("assistant", "bad")]
    e = alpaca(kto, instruction="q", output="x", label="true")  # a string is not a bool: falls through
    assert msgs(e)[1] == [("assistant", "x")]
    assert row_issue(e, "kto") == "kto_tag_not_bool" and row_issue(e, "sft") is None
    rank = {"ranking": True, "columns": {"prompt": "instruction", "chosen": "c", "rejected": "r"}}
    assert msgs(alpaca(rank, instruction="q", c="yes", r="no"))[1] == [("assistant", "yes"), ("assistant", "no")]
    e = alpaca(rank, instruction="q", c=["not", "str"], r="no")
    assert e.response == [] and row_issue(e, "dpo") == "not_a_preference_pair"


def test_alpaca_null_output_is_unsupervised_and_dropped_for_sft():
    e = alpaca(instruction="q", input="", output=None)
    assert e.response == [] and row_issue(e, "sft") == "no_response" and row_issue(e, "unsupervised") is None


SHAREGPT = {"columns": {"messages": "conversations", "system": "system"}}


def turn(role, value):
    return {"from": role, "value": value}


def test_sharegpt_system_tag_overrides_system_column():
    e = sharegpt(SHAREGPT, {"conversations": [turn("system", "TAGSYS"), turn("human", "q"), turn("gpt", "a")],
                            "system": "COLSYS"})
    assert e.system == "TAGSYS" and msgs(e) == ([("user", "q")], [("assistant", "a")])


@pytest.mark.parametrize("conversation, reason", [
    ([turn("gpt", "a"), turn("human", "q")], "invalid_role_order"),
    ([turn("human", "q"), turn("human", "q2")], "invalid_role_order"),
    ([turn("human", "q"), turn("gpt", "a"), turn("system", "late")], "invalid_role_order"),
    ([turn("human", "q"), turn("gpt", "a"), turn("human", "q2")], "invalid_message_count"),
    ([turn("human", "q"), turn("wizard", "a")], "invalid_role_order"),
    ([], "empty_messages"),
])
def test_sharegpt_validation_drops_with_reason(conversation, reason):
    # contract check 4
    e = sharegpt(SHAREGPT, {"conversations": conversation, "system": ""})
    assert e.drop == reason and e.prompt == [] and e.response == []
    assert row_issue(e, "sft") == reason


def test_sharegpt_tools_and_function_roles():
    entry = {"columns": {"messages": "conversations", "tools": "tools"}}
    e = sharegpt(entry, {"conversations": [turn("human", "q"), turn("function_call", '{"name": "f", "arguments": {}}'),
                                           turn("observation", "42"), turn("gpt", "done")], "tools": "[]"})
    assert [m["role"] for m in e.prompt] == ["user", "function", "observation"] and e.tools == "[]"


def test_partial_tags_reject_leading_system_message():
    # contract check 2, second half
    entry = {"columns": {"messages": "messages"}, "tags": {"role_tag": "role", "content_tag": "content",
                                                           "user_tag": "user", "assistant_tag": "assistant"}}
    e = sharegpt(entry, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}]})
    assert e.drop == "invalid_role_order"


def test_sharegpt_ranking_pair_and_wrong_role_is_dropped():
    entry = {"ranking": True, "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
    e = sharegpt(entry, {"conversations": [turn("human", "q")], "chosen": turn("gpt", "good"),
                         "rejected": turn("gpt", "bad")})
    assert msgs(e) == ([("user", "q")], [("assistant", "good"), ("assistant", "bad")])
    # LF keeps this row and trains a user-formatted completion; we drop it
    e = sharegpt(entry, {"conversations": [turn("human", "q")], "chosen": turn("human", "good"),
                         "rejected": turn("gpt", "bad")})
    assert e.drop == "invalid_preference_role"


def test_sharegpt_kto_rows():
    entry = {"columns": {"messages": "messages", "kto_tag": "label"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}], "label": False}
    assert msgs(sharegpt(entry, row))[1] == [("assistant", ""), ("assistant", "r")]


def test_non_string_content_is_a_row_error_naming_the_field():
    with pytest.raises(RowError) as info:
        sharegpt(SHAREGPT, {"conversations": [turn("human", "q"), turn("gpt", None)], "system": ""})
    assert info.value.field == "conversations[1].value" and info.value.reason == "non_string_content"


OPENAI = {"columns": {"messages": "messages", "tools": "tools"},
          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                   "observation_tag": "tool", "function_tag": "function", "system_tag": "system"}}


def test_openai_tool_calls_merged_tool_results_and_injected_system():
    row = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "content": "sun"}, {"role": "tool", "content": "wind"},
        {"role": "assistant", "content": "sunny"}], "tools": [{"name": "w"}]}
    e = sharegpt(OPENAI, row, openai=True)
    assert msgs(e)[0] == [("user", "weather?"), ("function", '[{"name": "w", "arguments": "{}"}]'),
                          ("observation", "sun\n</tool_response>\n<tool_response>\nwind")]
    assert e.tools == '[{"name": "w"}]' and e.system == ""  # tools present, no system: unchanged
    e = sharegpt(OPENAI, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          "tools": None}, openai=True)
    assert e.system == "detailed thinking off" and e.tools is None  # LF's injected system text, kept for parity


def test_openai_unknown_role_is_dropped_not_a_crash():
    e = sharegpt(OPENAI, {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}],
                          "tools": ""}, openai=True)
    assert e.drop == "unknown_role"


def test_media_placeholder_count_mismatch_is_dropped(tmp_path):
    entry = {"columns": {"messages": "messages", "images": "images"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    attr = parse_entry("m", {"file_name": "m.json", "formatting": "sharegpt", **entry})
    (tmp_path / "1.jpg").write_bytes(b"x")
    conv = SharegptConverter(attr, tmp_path)
    ok = conv({"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "a"}],
               "images": ["1.jpg"]})
    assert ok.drop is None and ok.images == [str(tmp_path / "1.jpg")]
    bad = conv({"messages": [{"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "a"}],
                "images": ["1.jpg"]})
    assert bad.drop == "media_count_mismatch"
    with pytest.raises(DataError, match="escapes"):
        conv({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}],
              "images": ["../../etc/passwd"]})


def test_convert_locates_bad_rows_or_counts_them(tmp_path):
    rows = [{"conversations": [turn("human", "q"), turn("gpt", "a")]},
            {"conversations": [turn("human", "q"), turn("gpt", 7)]}]
    write_dataset(tmp_path, {}, {"s.json": rows})
    attr = parse_entry("s", {"file_name": "s.json", "formatting": "sharegpt"})
    raw = RawDataset(attr=attr, rows=rows, row_ids=[0, 1], files=[(str(tmp_path / "s.json"), 0)],
                     columns=["conversations"])
    with pytest.raises(DataError) as info:
        convert(raw, media_dir=tmp_path)
    assert str(info.value) == (f"dataset 's', file {tmp_path / 's.json'}, row 1, field 'conversations[1].value': "
                               "message content must be a string, got 7")
    examples = convert(raw, media_dir=tmp_path, skip_bad_rows=True)
    assert [e.drop for e in examples] == [None, "non_string_content"]


def test_missing_declared_column_is_an_error(tmp_path):
    attr = parse_entry("s", {"file_name": "s.json", "formatting": "sharegpt", "columns": {"messages": "messages"}})
    raw = RawDataset(attr=attr, rows=[{"conversations": []}], row_ids=[0], files=[("s.json", 0)],
                     columns=["conversations"])
    with pytest.raises(DataError, match="column 'messages' not found"):
        convert(raw, media_dir=None)


def test_lf_demo_datasets_convert_without_broken_rows(lf_demo):
    import numpy as np

    from tunepipe.data.loading import load_raw
    from tunepipe.data.registry import get_dataset_attrs

    info = json.loads((lf_demo / "dataset_info.json").read_text())
    stages = {"dpo_en_demo": "dpo", "kto_en_demo": "kto", "glaive_toolcall_en_demo": "sft", "alpaca_en_demo": "sft",
              "identity": "sft", "c4_demo": "pt", "wiki_demo": "pt"}
    for name, stage in stages.items():
        assert name in info
        attr = get_dataset_attrs([name], lf_demo)[0]
        raw = load_raw(attr, dataset_dir=lf_demo, rng=np.random.RandomState(0), max_samples=200)
        examples = convert(raw, media_dir=lf_demo)
        assert [row_issue(e, stage) for e in examples] == [None] * len(examples), name
