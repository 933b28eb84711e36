"""`tunepipe data ...`: malformed input fails with one clean line; check / preview / export do what they say."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli, write_dataset

TOKENIZER = str(ROOT / "bench" / "_tokenizers" / "bpe_plain")
ALPACA = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]
CHAT = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
PAIRS = [{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
          "rejected": {"from": "gpt", "value": "bad"}}]
SHAREGPT = {"formatting": "sharegpt"}
RANKING = {"formatting": "sharegpt", "ranking": True,
           "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
TOOLS = {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}
IMAGES = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


def export(tmp_path, name, stage="sft", *extra):
    return ["data", "export", "--stage", stage, "--dataset", name, "--dataset-dir", str(tmp_path), "--template",
            "qwen", "--tokenizer", TOKENIZER, "--cutoff-len", "64", "--out", str(tmp_path / "out.jsonl"), *extra]


# (id, dataset_info entries, files, CLI args builder, fragments the one-line error must contain)
CASES = [
    ("broken_dataset_info", None, {"dataset_info.json": "{not json"}, lambda t: export(t, "a"),
     ["dataset_info.json", "invalid JSON at line 1"]),
    ("unknown_dataset", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA}, lambda t: export(t, "zzz"),
     ["dataset 'zzz'", "undefined dataset"]),
    ("path_instead_of_name", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA}, lambda t: export(t, "data/a.json"),
     ["not a file path"]),
    ("missing_file", {"a": {"file_name": "nope.json"}}, {}, lambda t: export(t, "a"),
     ["dataset 'a'", "nope.json not found"]),
    ("broken_data_json", {"a": {"file_name": "a.json"}}, {"a.json": '[{"instruction": "q", "output": }]'},
     lambda t: export(t, "a"), ["dataset 'a'", "a.json", "invalid JSON"]),
    ("broken_jsonl_line", {"a": {"file_name": "a.jsonl"}},
     {"a.jsonl": json.dumps(ALPACA[0]) + "\n{oops\n"}, lambda t: export(t, "a"), ["a.jsonl", "line 2"]),
    ("empty_file", {"a": {"file_name": "a.json"}}, {"a.json": ""}, lambda t: export(t, "a"), ["file is empty"]),
    ("empty_array", {"a": {"file_name": "a.json"}}, {"a.json": []}, lambda t: export(t, "a"), ["dataset 'a'"]),
    ("unsupported_extension", {"a": {"file_name": "a.xml"}}, {"a.xml": "<x/>"}, lambda t: export(t, "a"),
     ["unsupported file type"]),
    ("missing_column", {"a": {"file_name": "a.json", "columns": {"prompt": "question", "response": "answer"}}},
     {"a.json": ALPACA}, lambda t: export(t, "a"), ["column 'question' not found", "field 'question'"]),
    ("missing_messages_column", {"a": SHAREGPT | {"file_name": "a.json"}}, {"a.json": ALPACA},
     lambda t: export(t, "a"), ["column 'conversations' not found"]),
    ("no_source_key", {"a": {"formatting": "alpaca"}}, {}, lambda t: export(t, "a"), ["names no source"]),
    ("unknown_formatting", {"a": {"file_name": "a.json", "formatting": "markdown"}}, {"a.json": ALPACA},
     lambda t: export(t, "a"), ["field 'formatting'", "unknown formatting"]),
    ("ranking_not_bool", {"a": {"file_name": "a.json", "ranking": "yes"}}, {"a.json": ALPACA},
     lambda t: export(t, "a"), ["field 'ranking'"]),
    ("bad_num_samples", {"a": {"file_name": "a.json", "num_samples": 0}}, {"a.json": ALPACA},
     lambda t: export(t, "a"), ["field 'num_samples'", "positive integer"]),
    ("bad_tags_type", {"a": SHAREGPT | {"file_name": "a.json", "tags": ["from"]}}, {"a.json": CHAT},
     lambda t: export(t, "a"), ["field 'tags'"]),
    ("tags_missing_role", {"a": SHAREGPT | {"file_name": "a.json", "tags": {"content_tag": "value"}}},
     {"a.json": CHAT}, lambda t: export(t, "a"), ["role_tag"]),
    ("message_key_missing", {"a": SHAREGPT | {"file_name": "a.json"}},
     {"a.json": [{"conversations": [{"role": "human", "value": "hi"}]}]}, lambda t: export(t, "a"),
     ["row 0", "conversations[0]", "no 'from' key"]),
    ("messages_not_a_list", {"a": SHAREGPT | {"file_name": "a.json"}}, {"a.json": [{"conversations": "hi"}]},
     lambda t: export(t, "a"), ["row 0", "field 'conversations'", "must be a list"]),
    ("null_content", {"a": SHAREGPT | {"file_name": "a.json"}},
     {"a.json": CHAT + [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]}]},
     lambda t: export(t, "a"), ["row 1", "conversations[1].value", "must be a string"]),
    ("all_rows_invalid_roles", {"a": SHAREGPT | {"file_name": "a.json"}},
     {"a.json": [{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]},
     lambda t: export(t, "a"), ["no usable sft examples", "invalid_role_order"]),
    ("ranking_dataset_in_sft", {"p": RANKING | {"file_name": "p.json"}}, {"p.json": PAIRS},
     lambda t: export(t, "p"), ["dataset 'p'", "field 'ranking'", "stage sft needs a non-ranking"]),
    ("plain_dataset_in_dpo", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA}, lambda t: export(t, "a", "dpo"),
     ["stage dpo needs a ranking"]),
    ("bad_tools_json", {"t": TOOLS | {"file_name": "t.json"}},
     {"t.json": [CHAT[0] | {"tools": "[{not json"}]}, lambda t: export(t, "t"), ["row 0", "field 'tools'"]),
    ("bad_function_call_json", {"t": TOOLS | {"file_name": "t.json"}},
     {"t.json": [{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{x"}],
                  "tools": "[]"}]}, lambda t: export(t, "t"), ["row 0", "function"]),
    ("media_count_mismatch_everywhere", {"m": IMAGES | {"file_name": "m.json"}},
     {"m.json": [{"messages": [{"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "a"}],
                  "images": ["1.jpg"]}]}, lambda t: export(t, "m"), ["media_count_mismatch"]),
    ("images_with_text_template", {"m": IMAGES | {"file_name": "m.json"}},
     {"m.json": [{"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "a"}],
                  "images": ["1.jpg"]}]}, lambda t: export(t, "m"), ["row 0", "text-only"]),
    ("path_escape", {"a": {"file_name": "../outside.json"}}, {}, lambda t: export(t, "a"),
     ["escapes the dataset directory"]),
    ("script_without_opt_in", {"s": {"script_url": "s.py"}}, {"s.py": "raise SystemExit('ran!')"},
     lambda t: export(t, "s"), ["refusing to run dataset script", "--allow-scripts"]),
    ("local_split_not_train", {"a": {"file_name": "a.json", "split": "test"}}, {"a.json": ALPACA},
     lambda t: export(t, "a"), ["field 'split'"]),
    ("unknown_template", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA},
     lambda t: [*export(t, "a")[:8], "--template", "nosuch", *export(t, "a")[10:]], ["Template nosuch does not exist"]),
    ("bad_cutoff_len", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA},
     lambda t: [*export(t, "a")[:-4], "--cutoff-len", "0", "--out", str(t / "o.jsonl")], ["--cutoff-len"]),
    ("bad_max_samples", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA},
     lambda t: [*export(t, "a"), "--max-samples", "-1"], ["--max-samples"]),
    ("bad_interleave_probs", {"a": {"file_name": "a.json"}, "b": {"file_name": "a.json"}}, {"a.json": ALPACA},
     lambda t: [*export(t, "a,b"), "--mix-strategy", "interleave_under", "--interleave-probs", "0.5,x"],
     ["interleave_probs must be comma-separated numbers"]),
    ("interleave_probs_count", {"a": {"file_name": "a.json"}, "b": {"file_name": "a.json"}}, {"a.json": ALPACA},
     lambda t: [*export(t, "a,b"), "--mix-strategy", "interleave_under", "--interleave-probs", "1.0"],
     ["has 1 values for 2 datasets"]),
    ("mask_history_with_train_on_prompt", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA},
     lambda t: [*export(t, "a"), "--mask-history", "--train-on-prompt"], ["cannot be used together"]),
    ("unknown_stage", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA}, lambda t: export(t, "a", "rm"),
     ["unknown stage 'rm'"]),
    ("missing_tokenizer", {"a": {"file_name": "a.json"}}, {"a.json": ALPACA},
     lambda t: [*export(t, "a")[:10], "--tokenizer", str(t / "no-tokenizer"), *export(t, "a")[12:]],
     ["tokenizer"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_clean_line(tmp_path, monkeypatch, capsys, case):
    _, entries, files, args, fragments = case
    if entries is not None:
        write_dataset(tmp_path, entries, files)
    else:
        for name, text in files.items():
            (tmp_path / name).write_text(text)
    (tmp_path.parent / "outside.json").write_text(json.dumps(ALPACA))
    code, out, err = cli(monkeypatch, capsys, *args(tmp_path))
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0, err
    assert "Traceback" not in err and len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "out.jsonl").exists()  # nothing half-written


def test_error_in_a_real_process_has_no_traceback(tmp_path):
    write_dataset(tmp_path, {"a": {"file_name": "a.json"}}, {"a.json": "[{broken"})
    proc = subprocess.run([sys.executable, "-m", "tunepipe.cli", *export(tmp_path, "a")], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset 'a', file ") and "Traceback" not in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "tunepipe.cli", "--debug", *export(tmp_path, "a")],
                           capture_output=True, text=True, cwd=ROOT)
    assert "Traceback" in debug.stderr and debug.returncode != 0


def test_check_reports_rows_ok_and_dropped_by_reason(tmp_path, monkeypatch, capsys):
    good = CHAT[0]
    bad_order = {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}
    odd = {"conversations": [{"from": "human", "value": "x"}]}
    write_dataset(tmp_path, {"chat": SHAREGPT | {"file_name": "c.json"}, "a": {"file_name": "a.json"},
                             "gone": {"file_name": "gone.json"}, "hub": {"hf_hub_url": "org/x"}},
                  {"c.json": [good, bad_order, good, odd], "a.json": ALPACA})
    code, out, _ = cli(monkeypatch, capsys, "data", "check", "--dataset-dir", str(tmp_path), "--json")
    results = {r["dataset"]: r for r in json.loads(out)}
    assert results["chat"]["rows"] == 4 and results["chat"]["ok"] == 2
    assert results["chat"]["dropped"] == {"invalid_role_order": 1, "invalid_message_count": 1}
    assert results["a"]["status"] == "ok" and results["a"]["ok"] == 4
    assert results["gone"]["status"] == "unusable" and "not found" in results["gone"]["error"]
    assert results["hub"]["status"] == "skipped"
    assert code == 1  # one entry is unusable
    code, out, _ = cli(monkeypatch, capsys, "data", "check", "chat", "a", "--dataset-dir", str(tmp_path))
    assert code == 0
    assert "invalid_role_order: roles do not alternate" in out and out.splitlines()[0].split() == [
        "dataset", "stage", "rows", "ok", "dropped", "status"]


def test_check_lf_demo_folder(lf_demo, monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "data", "check", "--dataset-dir", str(lf_demo), "--json")
    results = {r["dataset"]: r for r in json.loads(out)}
    for name, rows in {"alpaca_en_demo": 999, "glaive_toolcall_en_demo": 300, "dpo_en_demo": 300,
                       "kto_en_demo": 300, "identity": 91, "wiki_demo": 30}.items():
        assert (results[name]["rows"], results[name]["ok"], results[name]["status"]) == (rows, rows, "ok"), name
    assert results["alpaca_en"]["status"] == "skipped"  # hub entries are not fetched unless asked
    # upstream entries that cannot work: ranking without chosen/rejected columns (LF: KeyError), a missing file,
    # media rows (every template is text-only: training and preview refuse them)
    unusable = sorted(name for name, r in results.items() if r["status"] == "unusable")
    assert unusable == ["mllm_audio_demo", "mllm_demo", "mllm_video_audio_demo", "mllm_video_demo", "nectar_rm",
                        "orca_dpo_de"]
    assert "needs columns.chosen and columns.rejected" in results["nectar_rm"]["error"]
    assert code == 1


def test_check_shows_dropped_rows_with_their_row_numbers(tmp_path, monkeypatch, capsys):
    good = CHAT[0]
    bad_order = {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}
    odd = {"conversations": [{"from": "human", "value": "x"}]}
    write_dataset(tmp_path, {"chat": SHAREGPT | {"file_name": "c.json"}},
                  {"c.json": [good, bad_order, good, odd, bad_order]})
    code, out, _ = cli(monkeypatch, capsys, "data", "check", "chat", "--dataset-dir", str(tmp_path), "--json")
    (result,) = json.loads(out)
    file = str(tmp_path / "c.json")
    assert code == 0 and result["dropped_rows"] == {
        "invalid_role_order": [{"file": file, "row": 1}, {"file": file, "row": 4}],
        "invalid_message_count": [{"file": file, "row": 3}]}
    code, out, _ = cli(monkeypatch, capsys, "data", "check", "chat", "--dataset-dir", str(tmp_path), "--show-dropped")
    lines = [line.strip() for line in out.splitlines()]
    assert code == 0 and lines[2:] == [
        "2  invalid_role_order: roles do not alternate user/observation then assistant/function",
        "rows c.json:1, c.json:4",
        "1  invalid_message_count: wrong number of messages (even for SFT, odd before a chosen/rejected pair)",
        "rows c.json:3"]


def test_check_and_preview_refuse_the_same_media_row(tmp_path, monkeypatch, capsys):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "a cat"}],
             "images": ["cat.jpg"]}]
    write_dataset(tmp_path, {"pics": IMAGES | {"file_name": "p.json"}}, {"p.json": rows, "cat.jpg": "jpg"})
    code, out, _ = cli(monkeypatch, capsys, "data", "check", "pics", "--dataset-dir", str(tmp_path),
                       "--template", "qwen", "--json")
    (result,) = json.loads(out)
    expected = (f"dataset 'pics', file {tmp_path / 'p.json'}, row 1, field 'images': row has images but template "
                "'qwen' is text-only (tunepipe trains text models)")
    assert code == 1 and result["status"] == "unusable" and result["error"] == expected
    code, _, err = cli(monkeypatch, capsys, "data", "preview", "pics", "--template", "qwen", "--tokenizer",
                       TOKENIZER, "--dataset-dir", str(tmp_path))
    assert code == 2 and err == f"error: {expected}\n"


def test_export_writes_lf_columns_and_health_report(tmp_path, monkeypatch, capsys):
    write_dataset(tmp_path, {"a": {"file_name": "a.json"}}, {"a.json": ALPACA})
    report = tmp_path / "health.json"
    code, _, err = cli(monkeypatch, capsys, *export(tmp_path, "a"), "--report", str(report))
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and list(rows[0]) == ["input_ids", "attention_mask", "labels"]
    assert all(len(r["input_ids"]) == len(r["labels"]) <= 64 for r in rows)
    health = json.loads(report.read_text())
    assert (health["rows_in"], health["examples_out"], health["rows_dropped"]) == (4, 4, 0)
    assert "wrote 4 examples" in err


def test_preview_marks_trained_tokens(tmp_path, monkeypatch, capsys):
    write_dataset(tmp_path, {"a": {"file_name": "a.json"}}, {"a.json": ALPACA})
    code, out, _ = cli(monkeypatch, capsys, "data", "preview", "a", "--template", "qwen", "--tokenizer", TOKENIZER,
                       "-n", "2", "--dataset-dir", str(tmp_path))
    assert code == 0
    assert "<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\n⟦a0<|im_end|>\n⟧" in out
    assert "--- example 1 ---" in out and "--- example 2 ---" not in out
