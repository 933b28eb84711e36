"""The shipped demo datasets (data/): reproducible from their generator, LLaMA-Factory-valid, eval disjoint from train.

The row checks below follow LLaMA-Factory 0.9.5's converter rules (reference §1.3, §2): an entry's `columns`/`tags`
replace all defaults, sharegpt roles alternate user/assistant with an optional leading system turn, non-ranking
conversations have an even number of turns and ranking ones an odd number, KTO tags are JSON booleans.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets / huggingface_hub are imported

import importlib.util
import re
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
INFO = json.loads((DATA / "dataset_info.json").read_text(encoding="utf-8"))
NAMES = sorted(INFO)
TRAIN_NAMES = [n for n in NAMES if not n.endswith("_eval")]


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", DATA / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _columns(entry: dict) -> dict:
    """LF's DatasetAttr column/tag resolution: defaults only when the key is absent, else unlisted -> None."""
    if "columns" in entry:
        cols = {k: None for k in ("prompt", "query", "response", "history", "messages", "system", "tools",
                                  "chosen", "rejected", "kto_tag")}
        cols.update(entry["columns"])
    else:
        cols = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations",
                "history": None, "system": None, "tools": None, "chosen": None, "rejected": None, "kto_tag": None}
    if "tags" in entry:
        tags = {k: None for k in ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
                                  "function_tag", "system_tag")}
        tags.update(entry["tags"])
    else:
        tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
    return {**cols, **tags}


def _rows(name: str) -> list:
    path = DATA / INFO[name]["file_name"]
    if path.suffix == ".txt":
        return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines()]
    return json.loads(path.read_text(encoding="utf-8"))


def _user_turns(name: str) -> list[tuple[str, ...]]:
    """Per row, the prompt as a tuple of user-side texts (what a model is asked)."""
    entry, c = INFO[name], _columns(INFO[name])
    out = []
    for row in _rows(name):
        if entry.get("formatting", "alpaca") == "alpaca":
            out.append((row[c["prompt"]], row[c["query"]]))
        else:
            msgs = row[c["messages"]]
            out.append(tuple(m[c["content_tag"]] for m in msgs if m[c["role_tag"]] == c["user_tag"]))
    return out


def test_generator_reproduces_the_committed_files():
    files = _load_generator().build()
    for name, content in files.items():
        assert (DATA / name).read_text(encoding="utf-8") == content, f"{name} is stale: run data/make_demo_data.py"


def test_every_demo_file_is_registered_and_small():
    registered = {entry["file_name"] for entry in INFO.values()}
    shipped = {p.name for p in DATA.glob("demo_*") if p.name != "demo_facts.json"}
    assert shipped == registered
    assert {f"{n}_eval" for n in TRAIN_NAMES} <= set(NAMES)
    total = sum((DATA / f).stat().st_size for f in registered)
    assert total < 2_000_000, total


@pytest.mark.parametrize("name", NAMES)
def test_entry_rows_are_valid(name):
    entry = INFO[name]
    assert set(entry) <= {"file_name", "formatting", "ranking", "columns", "tags"}
    assert (DATA / entry["file_name"]).is_file()
    formatting = entry.get("formatting", "alpaca")
    ranking = entry.get("ranking", False)
    c = _columns(entry)
    rows = _rows(name)
    assert len(rows) >= 20

    for i, row in enumerate(rows):
        where = f"{name} row {i}"
        if formatting == "alpaca":
            if c["response"] is None:  # pretraining text: LF uses only the prompt column
                assert isinstance(row[c["prompt"]], str) and row[c["prompt"]].strip(), where
                continue
            assert set(row) == {c["prompt"], c["query"], c["response"]}, where
            assert all(isinstance(row[k], str) for k in row), where
            assert row[c["prompt"]] and row[c["response"]], where
            continue

        assert formatting == "sharegpt"
        msgs = row[c["messages"]]
        assert isinstance(msgs, list) and msgs, where
        assert all(set(m) == {c["role_tag"], c["content_tag"]} for m in msgs), where
        assert all(isinstance(m[c["content_tag"]], str) and m[c["content_tag"]] for m in msgs), where
        if c["system_tag"] and msgs[0][c["role_tag"]] == c["system_tag"]:
            msgs = msgs[1:]
        roles = [m[c["role_tag"]] for m in msgs]
        assert roles == [c["user_tag"] if k % 2 == 0 else c["assistant_tag"] for k in range(len(roles))], where
        if ranking:
            assert len(roles) % 2 == 1, where
            for side in ("chosen", "rejected"):
                value = row[c[side]]
                assert isinstance(value, dict) and set(value) == {c["role_tag"], c["content_tag"]}, where
                assert value[c["role_tag"]] == c["assistant_tag"], where
                assert isinstance(value[c["content_tag"]], str) and value[c["content_tag"]], where
            assert row[c["chosen"]][c["content_tag"]] != row[c["rejected"]][c["content_tag"]], where
        else:
            assert len(roles) % 2 == 0, where
        if c["kto_tag"]:
            assert type(row[c["kto_tag"]]) is bool, where  # LF accepts only a real JSON bool

    if c["kto_tag"]:
        labels = [row[c["kto_tag"]] for row in rows]
        assert 0.3 < sum(labels) / len(labels) < 0.7  # both kinds, roughly balanced


def test_expected_formats():
    assert INFO["demo_cpt"] == {"file_name": "demo_cpt.txt", "columns": {"prompt": "text"}}
    assert INFO["demo_sft"] == {"file_name": "demo_sft.json"}
    assert INFO["demo_dpo"]["ranking"] is True and INFO["demo_dpo"]["formatting"] == "sharegpt"
    assert INFO["demo_kto"]["columns"] == {"messages": "messages", "kto_tag": "label"}
    sft = _rows("demo_sft")
    assert any(row["input"] for row in sft) and any(not row["input"] for row in sft)
    chat = _rows("demo_sft_chat")
    assert any(len(row["conversations"]) >= 4 for row in chat)
    assert any(row["conversations"][0]["from"] == "system" for row in chat)


@pytest.mark.parametrize("name", TRAIN_NAMES)
def test_eval_split_does_not_overlap_train(name):
    train, evals = _rows(name), _rows(f"{name}_eval")
    dump = lambda row: json.dumps(row, sort_keys=True)  # noqa: E731
    assert not {dump(r) for r in train} & {dump(r) for r in evals}
    if name == "demo_cpt":
        # not even one held-out sentence occurs verbatim in the training text
        train_text = "\n".join(r["text"] for r in train)
        for row in evals:
            for sentence in row["text"].split(". "):
                assert sentence.rstrip(".") not in train_text, sentence
    else:
        # the question being answered is never asked in that form in any training file (chat follow-ups such as
        # "What is its capital?" are generic by design, so chat rows are judged by their opening question)
        train_questions = {q for n in TRAIN_NAMES if n != "demo_cpt" for turns in _user_turns(n) for q in turns}
        train_pairs = set(_user_turns("demo_sft"))
        for turns in _user_turns(f"{name}_eval"):
            if name == "demo_sft" and turns[1]:  # "which island is this?" rows: shared instruction, held-out clues
                assert turns not in train_pairs, turns
                continue
            question = turns[0] if name in ("demo_sft", "demo_sft_chat") else turns[-1]
            assert question not in train_questions, question


def test_files_load_with_hf_datasets(tmp_path):
    """LF loads local files with `datasets.load_dataset(<type>, data_files=...)`: the schema must infer cleanly."""
    import datasets

    for name in NAMES:
        path = DATA / INFO[name]["file_name"]
        kind = {".txt": "text", ".json": "json"}[path.suffix]
        ds = datasets.load_dataset(kind, data_files=[str(path)], split="train", cache_dir=str(tmp_path))
        assert len(ds) == len(_rows(name)), name


def test_facts_are_taught_only_where_their_kind_says():
    """cpt islands' facts appear only in the CPT text; dpo islands' only there and in the DPO/KTO data; an island's
    name and one of its values never share a row elsewhere (the fact-free "Is X one of the islands?" rows name every
    island, with no value)."""
    facts = json.loads((DATA / "demo_facts.json").read_text(encoding="utf-8"))
    assert {f["taught_in"] for f in facts} == {"sft", "dpo", "cpt"}
    allowed = {"sft": {"demo_sft", "demo_sft_chat"}, "dpo": {"demo_dpo", "demo_kto"}, "cpt": set()}
    attrs = ("region", "capital", "product", "founder", "year", "colour", "animal")
    for name in TRAIN_NAMES:
        if name == "demo_cpt":
            continue
        texts = [json.dumps(row, ensure_ascii=False) for row in _rows(name) + _rows(f"{name}_eval")]
        for fact in facts:
            if name in allowed[fact["taught_in"]]:
                continue
            for text in texts:
                if re.search(rf"\b{fact['island']}\b", text):
                    told = [a for a in attrs if re.search(rf"\b{re.escape(fact[a])}\b", text)]
                    assert not told or name in ("demo_dpo", "demo_kto") and fact["taught_in"] == "sft", (
                        name, fact["island"], told)
    cpt_text = (DATA / "demo_cpt.txt").read_text(encoding="utf-8")
    assert all(fact["island"] in cpt_text for fact in facts)  # every island is in the CPT text
