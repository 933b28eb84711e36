"""dataset_info.json parsing (contract checks 2 and 3) and loading (num_samples, max_samples, paths, errors)."""

import json

import numpy as np
import pytest

from tests.conftest import write_dataset
from tunepipe.data.loading import load_raw
from tunepipe.data.registry import get_dataset_attrs, parse_entry, split_names
from tunepipe.errors import DataError


def test_defaults_without_columns_block():
    attr = parse_entry("a", {"file_name": "a.json"})
    assert (attr.load_from, attr.formatting, attr.ranking, attr.split) == ("file", "alpaca", False, "train")
    assert (attr.prompt, attr.query, attr.response, attr.messages) == ("instruction", "input", "output",
                                                                       "conversations")
    assert (attr.role_tag, attr.content_tag, attr.user_tag, attr.assistant_tag) == ("from", "value", "human", "gpt")
    assert (attr.observation_tag, attr.function_tag, attr.system_tag) == ("observation", "function_call", "system")


def test_present_columns_block_resets_every_unlisted_column():
    # contract check 2: {"columns": {"prompt": "text"}} => query, response, messages, history all None
    attr = parse_entry("pt", {"file_name": "c4.jsonl", "columns": {"prompt": "text"}})
    assert attr.prompt == "text"
    assert (attr.query, attr.response, attr.messages, attr.history) == (None, None, None, None)


def test_present_tags_block_resets_unlisted_tags():
    attr = parse_entry("m", {"file_name": "m.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                      "assistant_tag": "assistant"}})
    assert (attr.observation_tag, attr.function_tag, attr.system_tag) == (None, None, None)


@pytest.mark.parametrize("entry, env, expected", [
    ({"hf_hub_url": "h/x", "ms_hub_url": "m/x", "file_name": "f.json"}, {}, ("hf_hub", "h/x")),
    ({"hf_hub_url": "h/x", "ms_hub_url": "m/x"}, {"USE_MODELSCOPE_HUB": "1"}, ("ms_hub", "m/x")),
    ({"ms_hub_url": "m/x"}, {}, ("ms_hub", "m/x")),
    ({"ms_hub_url": "m/x", "om_hub_url": "o/x"}, {}, ("ms_hub", "m/x")),
    ({"script_url": "s", "file_name": "f.json"}, {}, ("script", "s")),
    ({"cloud_file_name": "s3://b/f.json", "file_name": "f.json"}, {}, ("cloud_file", "s3://b/f.json")),
    ({"file_name": "f.json"}, {}, ("file", "f.json")),
])
def test_load_source_priority(monkeypatch, entry, env, expected):
    # contract check 3
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    attr = parse_entry("x", entry)
    assert (attr.load_from, attr.dataset_name) == expected


@pytest.mark.parametrize("entry, field, fragment", [
    ({"formatting": "alpaca"}, None, "names no source"),
    ({"file_name": "a.json", "formatting": "chatml"}, "formatting", "unknown formatting 'chatml'"),
    ({"file_name": "a.json", "ranking": "yes"}, "ranking", "true or false"),
    ({"file_name": "a.json", "num_samples": -3}, "num_samples", "positive integer"),
    ({"file_name": "a.json", "columns": ["prompt"]}, "columns", "JSON object"),
    ({"file_name": "a.json", "formatting": "sharegpt", "columns": {"system": "s"}}, "columns.messages",
     "needs columns.messages"),
    ({"file_name": "a.json", "ranking": True}, "columns", "chosen"),
    ({"file_name": 3}, "file_name", "non-empty string"),
])
def test_bad_entries_name_dataset_and_field(entry, field, fragment):
    with pytest.raises(DataError) as info:
        parse_entry("bad", entry, file="data/dataset_info.json")
    err = info.value
    assert err.dataset == "bad" and err.field == field and err.file == "data/dataset_info.json"
    assert fragment in str(err) and "\n" not in str(err)


def test_unknown_name_and_path_hint(tmp_path):
    write_dataset(tmp_path, {"a": {"file_name": "a.json"}}, {"a.json": [{"instruction": "i", "output": "o"}]})
    with pytest.raises(DataError, match="undefined dataset; known: a"):
        get_dataset_attrs(["b"], tmp_path)
    with pytest.raises(DataError, match="not a file path"):
        get_dataset_attrs(["data/a.json"], tmp_path)


def test_broken_dataset_info_json(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{"a": {"file_name": "a.json",}}')
    with pytest.raises(DataError, match=r"invalid JSON at line 1 column 30: Expecting property name"):
        get_dataset_attrs(["a"], tmp_path)


def test_split_names():
    assert split_names(" a, b ,,c") == ["a", "b", "c"]
    assert split_names(None) == []


ROWS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]


def _raw(tmp_path, entry, files, **kwargs):
    write_dataset(tmp_path, {"d": entry}, files)
    attr = get_dataset_attrs(["d"], tmp_path)[0]
    return load_raw(attr, dataset_dir=tmp_path, rng=np.random.RandomState(42), **kwargs)


def test_num_samples_oversampling_matches_lf_numpy_draw(tmp_path):
    raw = _raw(tmp_path, {"file_name": "d.json", "num_samples": 8}, {"d.json": ROWS})
    rng = np.random.RandomState(42)  # LF: np.random after transformers.set_seed(42)
    expected = list(rng.permutation(5)[:8]) + list(rng.choice(5, 3))
    assert raw.row_ids == expected
    assert sorted(set(raw.row_ids)) == [0, 1, 2, 3, 4]  # every row at least once
    assert [r["instruction"] for r in raw.rows] == [f"q{i}" for i in expected]


def test_num_samples_subset_then_max_samples_keeps_first(tmp_path):
    raw = _raw(tmp_path, {"file_name": "d.json", "num_samples": 4}, {"d.json": ROWS}, max_samples=2)
    expected = list(np.random.RandomState(42).permutation(5)[:4])[:2]
    assert raw.row_ids == expected


def test_max_samples_keeps_first_rows(tmp_path):
    raw = _raw(tmp_path, {"file_name": "d.json"}, {"d.json": ROWS}, max_samples=3)
    assert [r["output"] for r in raw.rows] == ["a0", "a1", "a2"]


def test_folder_is_read_sorted_and_skips_readme_and_hidden(tmp_path):
    files = {"dir/b.jsonl": "\n".join(json.dumps(r) for r in ROWS[2:]), "dir/a.jsonl": json.dumps(ROWS[0]),
             "dir/README.md": "# docs", "dir/.hidden.jsonl": "garbage"}
    raw = _raw(tmp_path, {"file_name": "dir"}, files)
    assert [r["output"] for r in raw.rows] == ["a0", "a2", "a3", "a4"]
    assert raw.locate(2) == (str(tmp_path / "dir" / "b.jsonl"), 1)


@pytest.mark.parametrize("name", ["../outside.json", "/etc/passwd"])
def test_path_escaping_dataset_dir_is_refused(tmp_path, name):
    (tmp_path / "outside.json").write_text(json.dumps(ROWS))
    inner = tmp_path / "inner"
    inner.mkdir()
    with pytest.raises(DataError, match="escapes the dataset directory") as info:
        _raw(inner, {"file_name": name}, {})
    assert info.value.field == "file_name"


def test_symlink_escape_is_refused(tmp_path):
    (tmp_path / "secret.json").write_text(json.dumps(ROWS))
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "link.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(DataError, match="escapes"):
        _raw(inner, {"file_name": "link.json"}, {})


def test_broken_json_names_file_and_line(tmp_path):
    text = json.dumps(ROWS[0]) + "\n" + '{"instruction": "x", "output": }\n'
    with pytest.raises(DataError) as info:
        _raw(tmp_path, {"file_name": "d.jsonl"}, {"d.jsonl": text})
    assert "line 2: invalid JSON" in str(info.value) and str(tmp_path / "d.jsonl") in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        _raw(tmp_path, {"file_name": "nope.json"}, {})
    with pytest.raises(DataError, match="file is empty"):
        _raw(tmp_path, {"file_name": "e.json"}, {"e.json": ""})
    with pytest.raises(DataError, match="unsupported file type"):
        _raw(tmp_path, {"file_name": "d.xml"}, {"d.xml": "<a/>"})


def test_uppercase_extension_and_text_files(tmp_path):
    raw = _raw(tmp_path, {"file_name": "d.JSON"}, {"d.JSON": ROWS})
    assert len(raw.rows) == 5
    raw = _raw(tmp_path, {"file_name": "t.txt", "columns": {"prompt": "text"}}, {"t.txt": "one doc\ntwo doc\n"})
    assert [r["text"] for r in raw.rows] == ["one doc", "two doc"]


def test_local_split_other_than_train_is_an_error(tmp_path):
    with pytest.raises(DataError, match="only have a 'train' split") as info:
        _raw(tmp_path, {"file_name": "d.json", "split": "test"}, {"d.json": ROWS})
    assert info.value.field == "split"


def test_script_refused_without_opt_in_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    script = f"open({str(marker)!r}, 'w').write('x')\n"
    with pytest.raises(DataError, match="refusing to run dataset script"):
        _raw(tmp_path, {"script_url": "s.py"}, {"s.py": script})
    assert not marker.exists()


def test_script_runs_with_opt_in(tmp_path):
    script = '''
import datasets

class Tiny(datasets.GeneratorBasedBuilder):
    def _info(self):
        return datasets.DatasetInfo(features=datasets.Features({"instruction": datasets.Value("string"),
                                                                "output": datasets.Value("string")}))

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN)]

    def _generate_examples(self):
        for i in range(3):
            yield i, {"instruction": f"q{i}", "output": f"a{i}"}
'''
    raw = _raw(tmp_path, {"script_url": "s.py"}, {"s.py": script}, allow_scripts=True,
               cache_dir=str(tmp_path / "cache"))
    assert [r["output"] for r in raw.rows] == ["a0", "a1", "a2"]


def test_hub_source_through_datasets_with_local_stand_in(tmp_path):
    # On a machine with network hf_hub_url is a hub id; here a local folder stands in for the hub repo.
    hub = tmp_path / "hub_repo"
    hub.mkdir()
    (hub / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    raw = _raw(tmp_path, {"hf_hub_url": str(hub)}, {})
    assert len(raw.rows) == 5 and raw.files == []


def test_modelscope_without_package_is_a_clear_error(tmp_path):
    pytest.importorskip("tunepipe")
    try:
        import modelscope  # noqa: F401
        pytest.skip("modelscope is installed")
    except ImportError:
        pass
    with pytest.raises(DataError, match="pip install modelscope"):
        _raw(tmp_path, {"ms_hub_url": "a/b"}, {})
