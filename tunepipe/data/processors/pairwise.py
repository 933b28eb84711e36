"""dpo (LF: the pairwise processor of dpo/orpo/simpo and rm): LLaMA-Factory's PairwiseDatasetProcessor, the prompt
with the chosen and with the rejected response, both truncated to the longer one's budget."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator
from typing import Any

from tunepipe.data.converters import Example
from tunepipe.data.processors.driver import DatasetProcessor
from tunepipe.data.processors.processor_utils import IGNORE_INDEX, infer_seqlen


class PairwiseDatasetProcessor(DatasetProcessor):
    stage = "dpo"
    count_column = "chosen_input_ids"

    def process_batch(self, batch: list[Example]) -> Generator[Any, Any, dict[str, list]]:
        valid = self._usable(batch)

        def render(e: Example):
            prompt, chosen = self.template.render_oneturn(self.tokenizer, e.prompt + [e.response[0]], e.system,
                                                          e.tools)
            _, rejected = self.template.render_oneturn(self.tokenizer, e.prompt + [e.response[1]], e.system, e.tools)
            return [prompt, chosen, rejected]

        rendered = self._render(valid, render)
        flat = yield [elems for triple in rendered for elems in triple]
        eos = [self.tokenizer.eos_token_id] if self.template.efficient_eos else []
        out: dict[str, list] = defaultdict(list)
        for i, example in enumerate(valid):
            prompt, chosen, rejected = flat[3 * i], flat[3 * i + 1] + eos, flat[3 * i + 2] + eos
            full = len(prompt) + max(len(chosen), len(rejected))
            if self.opts.overlength == "drop" and full > self.opts.cutoff_len:
                self._drop(example, "overlength")
                continue
            s_len, t_len = infer_seqlen(len(prompt), max(len(chosen), len(rejected)), self.opts.cutoff_len)
            prompt, chosen, rejected = prompt[:s_len], chosen[:t_len], rejected[:t_len]
            for side, target in (("chosen", chosen), ("rejected", rejected)):
                out[f"{side}_input_ids"].append(prompt + target)
                out[f"{side}_attention_mask"].append([1] * (s_len + len(target)))
                out[f"{side}_labels"].append([IGNORE_INDEX] * s_len + target)
            self._account(full, prompt + chosen, [IGNORE_INDEX] * s_len + chosen, lost_eos=full > s_len + t_len)
        return dict(out)
