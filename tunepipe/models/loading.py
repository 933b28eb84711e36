"""Loading tokenizers and causal LMs: the one place every stage, the CLI and the tests load them.

torch / transformers are imported inside the functions: the CLI imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunepipe.errors import ConfigError


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """AutoTokenizer as LLaMA-Factory loads it: fast, special tokens not split, right padding.

    A directory whose tokenizer_config.json declares the generic fast class (`PreTrainedTokenizerFast`, the tiny
    model, or its transformers-5 name `TokenizersBackend`) is loaded as exactly that: transformers >= 5.2x would
    otherwise pick a model-specific class from config.json (Qwen2Tokenizer), which swaps the pre-tokenizer and
    changes ids — and LLaMA-Factory's transformers (5.6) does not.
    `trust_remote_code` stays off unless the user opts in (params.yaml), since it runs code from the model dir.
    """
    kwargs = dict(split_special_tokens=False, padding_side="right", trust_remote_code=trust_remote_code)
    config = Path(path) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") in \
            ("PreTrainedTokenizerFast", "TokenizersBackend"):
        from transformers import PreTrainedTokenizerFast  # not via the Auto classes: those import torch (~1.5 s)

        kwargs.pop("trust_remote_code")
        return PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True, **kwargs)


def load_causal_lm(path: str | Path, *, dtype: Any = None, trust_remote_code: bool = False) -> Any:
    """A causal LM from a local directory or hub id, in eval mode, without transformers' loading bars.

    `dtype=None` means fp32 on CPU (exact, and small models gain nothing from 16 bits there) and the checkpoint's
    own dtype on a GPU. A local path that holds no model is a one-line error naming it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    local = Path(path)
    if (local.is_absolute() or local.exists()) and not (local / "config.json").is_file():
        raise ConfigError(f"no model in {path} (config.json missing: did the stage that writes it run?)")
    if dtype is None:
        dtype = "auto" if torch.cuda.is_available() else torch.float32
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every load; callers log one line instead
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()
