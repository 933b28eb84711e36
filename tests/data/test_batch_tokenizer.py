"""BatchTokenizer's fast path (the backend's public `encode_batch_fast`) gives exactly the ids of the public
`tokenizer(pieces, add_special_tokens=False)` call, and falls back to that call when they ever differ."""

from pathlib import Path

import pytest

from tunepipe.data.processors import BatchTokenizer
from tunepipe.models.loading import load_tokenizer

TOKENIZERS = Path(__file__).resolve().parents[2] / "bench" / "_tokenizers"
PIECES = ["Hello world", " leading space", "trailing space ", "  two  spaces ", "\n\nnewlines\n",
          "tab\there", "<|im_start|>user\n", "<|endoftext|>", "</s>", "<s>", "café naïve Ωmega", "中文分词测试",
          "emoji 🙂🚀",
          "x" * 300, "a", "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", "1234567890 3.14"]


@pytest.mark.parametrize("name", ["bpe_plain", "bpe_bos"])
def test_fast_path_equals_the_public_call(name):
    tokenizer = load_tokenizer(str(TOKENIZERS / name))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    batch = BatchTokenizer(tokenizer)
    assert batch.fast
    public = tokenizer(PIECES, add_special_tokens=False)["input_ids"]
    assert batch._encode_pieces(PIECES) == public
    assert batch.fast and batch.verified  # checked against the public call on the first batch, kept
    assert batch._encode_pieces(PIECES[::-1]) == public[::-1]
    assert BatchTokenizer(tokenizer, fast=False)._encode_pieces(PIECES) == public


def test_a_tokenizer_whose_python_side_differs_turns_the_fast_path_off():
    real = load_tokenizer(str(TOKENIZERS / "bpe_plain"))

    class Lowercasing:  # a tokenizer class that processes text in Python before its backend sees it
        is_fast = True
        backend_tokenizer = real.backend_tokenizer

        def __call__(self, texts, add_special_tokens=False):
            return real([t.lower() for t in texts], add_special_tokens=add_special_tokens)

    batch = BatchTokenizer(Lowercasing())
    assert batch._encode_pieces(["Hello World"]) == real(["hello world"], add_special_tokens=False)["input_ids"]
    assert not batch.fast
    assert batch._encode_pieces(["ABC"]) == real(["abc"], add_special_tokens=False)["input_ids"]
