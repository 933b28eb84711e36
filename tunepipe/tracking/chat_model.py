"""The registered model as an MLflow pyfunc: a merged Hugging Face causal-LM directory that answers chat messages or
plain prompts by greedy generation, as the evaluate stage does.

This file is MLflow "models-from-code": the register stage hands its *path* to `mlflow.pyfunc.log_model`, which copies
it into every registered model, and `mlflow.pyfunc.load_model` / `mlflow models serve` execute it there. So it
imports only mlflow, pandas, torch and transformers - never tunepipe - and nothing imports it (the `set_model` call at
the bottom runs on import).

Input rows (a DataFrame, a list of dicts or one dict): `messages` ([{"role", "content"}, ...], rendered with the
model's saved chat template, generation prompt added) or `prompt` (plain text, tokenized with the tokenizer's
defaults); one kind per request unless a DataFrame holds None in the other column (MLflow's schema check rejects
the NaN a list of mixed dicts becomes). Output: a `text` column, the generated continuation without special tokens.
Param `max_new_tokens`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULT_MAX_NEW_TOKENS = 64
MODEL_DIR = "model_dir"  # the artifact (store: copy) or model_config key (store: reference) naming the directory


def load_tokenizer(path: str):
    """The tokenizer as tunepipe trained with it: a directory declaring the generic fast class is loaded as exactly
    that (transformers 5 would otherwise pick Qwen2Tokenizer from config.json, which tokenizes differently)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    declared = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") if config.is_file() else None
    if declared in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        return PreTrainedTokenizerFast.from_pretrained(path, split_special_tokens=False)
    return AutoTokenizer.from_pretrained(path, split_special_tokens=False)


class ChatModel(PythonModel):
    def load_context(self, context):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        path = (context.artifacts or {}).get(MODEL_DIR) or (context.model_config or {}).get(MODEL_DIR)
        if not path or not Path(path, "config.json").is_file():
            raise FileNotFoundError(f"no model directory at {path!r} (a `store: reference` version needs the "
                                    "working tree it was registered from: git checkout + dvc checkout)")
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per load, in every server log
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()

    def _encode(self, row: dict):
        messages = row.get("messages")
        if messages is not None and not isinstance(messages, float) and len(messages):  # NaN: a missing cell
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("each input row needs `messages` (a list of {role, content}) or `prompt` (text)")
        return self.tokenizer(prompt, return_tensors="pt")

    def generate(self, row: dict, max_new_tokens: int) -> str:
        import torch

        encoded = self._encode(row).to(self.model.device)
        config = copy.deepcopy(self.model.generation_config)  # eos/pad ids as saved by the merge stage
        config.do_sample, config.max_new_tokens = False, max_new_tokens
        for key in ("temperature", "top_p", "top_k"):  # sampling settings would only warn under greedy decoding
            setattr(config, key, None)
        with torch.no_grad():
            output = self.model.generate(**encoded, generation_config=config)
        return self.tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            rows = model_input.to_dict(orient="records")
        elif isinstance(model_input, dict):
            rows = [model_input]
        else:
            rows = [row if isinstance(row, dict) else {"prompt": row} for row in model_input]
        max_new_tokens = int((params or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        return pd.DataFrame({"text": [self.generate(row, max_new_tokens) for row in rows]})


mlflow.models.set_model(ChatModel())
