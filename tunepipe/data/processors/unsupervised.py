"""unsupervised: LLaMA-Factory's UnsupervisedDatasetProcessor: prompts (and references) for generation-based
evaluation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator
from typing import Any

from tunepipe.data.converters import Example
from tunepipe.data.processors.driver import DatasetProcessor
from tunepipe.data.processors.processor_utils import infer_seqlen


class UnsupervisedDatasetProcessor(DatasetProcessor):
    stage = "unsupervised"

    def process_batch(self, batch: list[Example]) -> Generator[Any, Any, dict[str, list]]:
        valid = self._usable(batch)

        def render(e: Example):
            messages = e.prompt + (e.response if len(e.response) == 1 else [{"role": "assistant", "content": ""}])
            return list(self.template.render_oneturn(self.tokenizer, messages, e.system, e.tools))

        rendered = self._render(valid, render)
        flat = yield [elems for pair in rendered for elems in pair]
        eos = [self.tokenizer.eos_token_id] if self.template.efficient_eos else []
        out: dict[str, list] = defaultdict(list)
        for i, _ in enumerate(valid):
            prompt, target = flat[2 * i], flat[2 * i + 1] + eos
            s_len, t_len = infer_seqlen(len(prompt), len(target), self.opts.cutoff_len)
            out["input_ids"].append(prompt[:s_len])
            out["attention_mask"].append([1] * s_len)
            out["labels"].append(target[:t_len])
        return dict(out)
