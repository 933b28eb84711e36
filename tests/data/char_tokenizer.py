"""A character-level tokenizer: one token per character, so token sequences can be asserted as strings."""

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

CHARS = [chr(i) for i in range(32, 127)] + ["\n"] + list("你好世界今天天气很不错")


def char_tokenizer(*, add_bos: bool = False, pad: str | None = None) -> PreTrainedTokenizerFast:
    """bos `<s>`, eos `</s>`; no pad unless given (LF then sets pad = eos)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for char in CHARS:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    kwargs = {"pad_token": pad} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   add_bos_token=add_bos, **kwargs)


def show(tokenizer, ids: list[int]) -> str:
    """Ids as text; -100 (ignored label) shown as `_`."""
    return "".join("_" if i == -100 else tokenizer.convert_ids_to_tokens(i) for i in ids)
