"""Processors: LF's label layouts, truncation, packing, pairwise and KTO rules (contract checks 5-8, 11-14)."""

import pytest

from tests.data.char_tokenizer import char_tokenizer, show
from tunepipe.data.converters import Example
from tunepipe.data.processors import Processor, ProcessorOptions, greedy_knapsack, infer_seqlen
from tunepipe.data.templates import get_template
from tunepipe.errors import DataError


def run(stage, examples, template="default", tokenizer=None, **options):
    tok = tokenizer or char_tokenizer()
    tmpl = get_template(template)
    tmpl.fix_tokenizer(tok)
    processor = Processor(stage, tmpl, tok, ProcessorOptions(**options))
    return processor.process(examples), processor.health, tok


def conv(*texts, system="", tools=""):
    """user/assistant alternating; the last text is the response."""
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]
    return Example(prompt=messages[:-1], response=messages[-1:], system=system, tools=tools)


@pytest.mark.parametrize("args, expected", [
    ((3000, 2000, 1000), (600, 400)), ((2000, 3000, 1000), (400, 600)), ((1000, 100, 1000), (900, 100)),
    ((100, 1000, 1000), (100, 900)), ((100, 500, 1000), (100, 500)), ((500, 100, 1000), (500, 100)),
    ((10, 10, 1000), (10, 10)),
])
def test_infer_seqlen_official_vectors(args, expected):
    assert infer_seqlen(*args) == expected  # contract check 5


def test_default_template_multiturn_layout():
    # contract check 6: each slot tokenized separately, no BOS, every assistant turn trained
    out, health, tok = run("sft", [conv("Q1", "A1", "Q2", "A2")])
    assert show(tok, out["input_ids"][0]) == "Human: Q1</s>\nAssistant:A1</s>\nHuman: Q2</s>\nAssistant:A2</s>\n"
    assert show(tok, out["labels"][0]) == "_" * 21 + "A1</s>\n" + "_" * 21 + "A2</s>\n"
    assert out["attention_mask"][0] == [1] * len(out["input_ids"][0])
    assert health.label_tokens == 8 and health.zero_label == 0


def test_train_on_prompt_and_mask_history():
    # contract check 7
    out, _, _ = run("sft", [conv("Q1", "A1", "Q2", "A2")], train_on_prompt=True)
    assert out["labels"][0] == out["input_ids"][0]
    out, _, tok = run("sft", [conv("Q1", "A1", "Q2", "A2")], mask_history=True)
    assert show(tok, out["labels"][0]) == "_" * 46 + "A2</s>\n"


def test_multiturn_truncation_budget():
    # contract check 8: empty template, cutoff 12, 5-char turns
    example = conv("11111", "aaaaa", "22222", "bbbbb")
    out, health, tok = run("sft", [example], template="empty", cutoff_len=12)
    assert show(tok, out["input_ids"][0]) == "11111aaaaa2b"
    assert show(tok, out["labels"][0]) == "_____aaaaa_b"
    assert health.truncated == 1
    out, _, tok = run("sft", [example], template="empty", cutoff_len=12, mask_history=True)
    assert show(tok, out["input_ids"][0]) == "1a22222bbbbb"
    assert show(tok, out["labels"][0]) == "_______bbbbb"


def test_later_turns_dropped_and_truncated_response_loses_eos():
    out, health, tok = run("sft", [conv("Q" * 30, "A" * 15)], template="default", cutoff_len=20)
    ids = show(tok, out["input_ids"][0])
    assert len(out["input_ids"][0]) == 20 and not ids.endswith("</s>\n")
    assert health.lost_eos == 1


def test_overlength_drop_is_opt_in_and_counted():
    out, health, _ = run("sft", [conv("Q" * 30, "A" * 15), conv("q", "a")], template="empty", cutoff_len=20,
                         overlength="drop")
    assert len(out["input_ids"]) == 1 and health.dropped == {"overlength": 1}


def test_greedy_knapsack():
    assert greedy_knapsack([10, 14, 5, 29, 12], 29) == [[29], [14, 12], [10, 5]]


def test_sft_packing_and_neat_packing():
    # contract check 11: lengths 10, 14, 5, 35 (-> 29), 12 with cutoff 30 (used as 29 internally)
    examples = [conv("q" * 5, "a" * 5), conv("q" * 7, "a" * 7), conv("q" * 2, "a" * 3), conv("q" * 20, "a" * 15),
                conv("q" * 6, "a" * 6)]
    out, health, tok = run("sft", examples, template="empty", cutoff_len=30, packing=True)
    assert [len(ids) for ids in out["input_ids"]] == [30, 30, 30]
    assert out["position_ids"][1] == list(range(14)) + list(range(12)) + [0] * 4
    assert out["attention_mask"][1] == [1] * 30  # plain packing attends pads
    assert out["labels"][0][-1] == -100 and out["input_ids"][0][-1] == tok.pad_token_id
    assert health.pad_tokens == 1 + 4 + 15
    out, _, _ = run("sft", examples, template="empty", cutoff_len=30, neat_packing=True)
    assert out["attention_mask"] == [[1] * 29 + [0], [1] * 14 + [2] * 12 + [0] * 4, [1] * 10 + [2] * 5 + [0] * 15]
    assert out["packing_params"][1]["sequence_boundaries"] == [0, 14, 26, 30]
    assert list(out) == ["input_ids", "packing_params", "attention_mask", "position_ids", "labels"]


def test_pretrain_packing_overwrites_bos_and_drops_remainder():
    # contract check 12
    docs = [Example(prompt=[{"role": "user", "content": d}], response=[]) for d in ("hello world", "abc", "xyz123")]
    out, _, tok = run("pt", docs, tokenizer=char_tokenizer(add_bos=True), cutoff_len=8)
    assert [show(tok, ids) for ids in out["input_ids"]] == ["<s>ello wo", "<s>ld</s>abc</s>"]
    # LF's pt collator masks pad ids; pad == eos here (LF sets it), so the separators carry no loss
    assert show(tok, out["labels"][1]) == "<s>ld_abc_"
    out, health, tok = run("pt", docs, tokenizer=char_tokenizer(add_bos=True), cutoff_len=12, packing=False)
    assert [show(tok, ids) for ids in out["input_ids"]] == ["<s>hello world", "<s>abc</s>", "<s>xyz123</s>"]
    assert health.truncated == 1


def test_pretrain_explicit_packing_uses_cutoff_minus_one():
    docs = [Example(prompt=[{"role": "user", "content": "abcdefghijklmnopqrstu"}], response=[])]
    out, _, _ = run("pt", docs, cutoff_len=8, packing=True)
    assert [len(ids) for ids in out["input_ids"]] == [7, 7, 7]  # 22 tokens with eos -> 3 blocks of 7


def test_pairwise_shares_truncated_prompt():
    # contract check 13
    example = Example(prompt=[{"role": "user", "content": "p" * 8}],
                      response=[{"role": "assistant", "content": "c" * 3}, {"role": "assistant", "content": "r" * 12}])
    out, _, tok = run("dpo", [example], template="empty", cutoff_len=10)
    assert show(tok, out["chosen_input_ids"][0]) == "ppppccc"
    assert show(tok, out["rejected_input_ids"][0]) == "pppprrrrrr"
    assert show(tok, out["chosen_labels"][0]) == "____ccc"
    assert list(out) == ["chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
                         "rejected_attention_mask", "rejected_labels"]


def kto(q, r, desirable):
    empty = {"role": "assistant", "content": ""}
    answer = {"role": "assistant", "content": r}
    return Example(prompt=[{"role": "user", "content": q}], response=[answer, empty] if desirable else [empty, answer])


def test_kto_kl_pairs_rotate_within_batch():
    # contract check 14
    rows = [kto("Q1", "R1", True), kto("Q2", "R2", False), kto("Q3", "R3", True)]
    out, _, tok = run("kto", rows, template="empty")
    assert [show(tok, ids) for ids in out["kl_input_ids"]] == ["Q1R3", "Q2R1", "Q3R2"]
    assert out["kto_tags"] == [True, False, True]
    assert [show(tok, ids) for ids in out["kl_labels"]] == ["__R3", "__R1", "__R2"]


def test_kto_broken_previous_row_does_not_crash():
    broken = Example(prompt=[], response=[], drop="invalid_role_order")
    rows = [kto("Q1", "R1", True), broken, kto("Q3", "R3", False)]
    out, health, tok = run("kto", rows, template="empty")
    # LF raises IndexError here; we take the nearest usable earlier response (R1) for row 3's KL pair
    assert [show(tok, ids) for ids in out["kl_input_ids"]] == ["Q1R3", "Q3R1"]
    assert health.dropped == {"invalid_role_order": 1}


def test_batches_bound_kto_rotation():
    rows = [kto(f"Q{i}", f"R{i}", i % 2 == 0) for i in range(4)]
    out, _, tok = run("kto", rows, template="empty", preprocessing_batch_size=2)
    assert [show(tok, ids) for ids in out["kl_input_ids"]] == ["Q0R1", "Q1R0", "Q2R3", "Q3R2"]


def test_option_conflicts_are_errors():
    with pytest.raises(DataError, match="cannot be used together"):
        run("sft", [conv("q", "a")], train_on_prompt=True, mask_history=True)
    with pytest.raises(DataError, match="only apply to the sft stage"):
        run("dpo", [], neat_packing=True)


def test_batches_tokenize_in_a_worker_thread_with_the_same_ids(monkeypatch):
    """After the first (checked, synchronous) batch, the Rust tokenizer call runs in the worker thread while the
    next batch is rendered; the features equal those of one big batch, batch by batch in order."""
    import threading

    from tunepipe.data.processors import BatchTokenizer

    threads = []
    original = BatchTokenizer._encode_pieces

    def spy(self, pieces):
        threads.append(threading.current_thread().name)
        return original(self, pieces)

    rows = [conv(f"question {i}", f"answer number {i}") for i in range(7)]
    whole, _, tok = run("sft", rows)
    monkeypatch.setattr(BatchTokenizer, "_encode_pieces", spy)
    processor = Processor("sft", get_template("default"), tok, ProcessorOptions(preprocessing_batch_size=2))
    batches = list(processor.batches(rows))
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 2, 1]
    assert [ids for b in batches for ids in b["input_ids"]] == whole["input_ids"]
    assert [ids for b in batches for ids in b["labels"]] == whole["labels"]
    assert threads[0] == "MainThread" and len(threads) == 4
    assert all(name.startswith("tokenize") for name in threads[1:])
    assert processor.health.examples_out == 7 and processor.health.rows_in == 7


def test_row_error_in_a_later_batch_names_its_row():
    rows = [conv(f"q{i}", f"a{i}") for i in range(5)]
    for position, row in enumerate(rows):
        row.position, row.dataset = position, "demo"
    rows[3].images = ["cat.png"]
    tok = char_tokenizer()
    processor = Processor("sft", get_template("default"), tok, ProcessorOptions(preprocessing_batch_size=2))
    with pytest.raises(DataError) as err:
        processor.process(rows, locate=lambda e: ("demo.json", e.position))
    assert "demo.json" in str(err.value) and "row 3" in str(err.value) and "images" in str(err.value)


def test_prepare_streams_batches_with_cyclic_gc_paused(tiny):
    """`on_train_batch` gets the same features as `Prepared.train`, batch by batch; the cyclic GC is paused while
    preparing and back on afterwards, also after an error."""
    import gc
    from pathlib import Path

    from tunepipe.data.features import DataArgs, prepare
    from tunepipe.models.loading import load_tokenizer

    data = Path(__file__).resolve().parents[2] / "data"
    args = DataArgs(dataset_dir=str(data), template="qwen", cutoff_len=64, preprocessing_batch_size=16)
    whole = prepare("sft", "demo_sft", args, load_tokenizer(tiny))
    streamed, gc_states = [], []

    def collect(batch):
        gc_states.append(gc.isenabled())
        streamed.append(batch)

    prepared = prepare("sft", "demo_sft", args, load_tokenizer(tiny), on_train_batch=collect)
    assert prepared.train == {} and len(streamed) > 2 and gc_states == [False] * len(streamed)
    assert [ids for b in streamed for ids in b["input_ids"]] == whole.train["input_ids"]
    assert [ids for b in streamed for ids in b["labels"]] == whole.train["labels"]
    assert prepared.health.examples_out == len(whole.train["input_ids"])
    assert gc.isenabled()
    with pytest.raises(DataError, match="no_such_dataset"):
        prepare("sft", "no_such_dataset", args, load_tokenizer(tiny))
    assert gc.isenabled()
