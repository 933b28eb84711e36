"""kto: LLaMA-Factory's FeedbackDatasetProcessor: the example, its desirable/undesirable tag, and its KL completion
(the same prompt with another row's response)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator
from typing import Any

from tunepipe.data.converters import Example
from tunepipe.data.processors.driver import DatasetProcessor
from tunepipe.data.processors.processor_utils import IGNORE_INDEX, infer_seqlen, row_issue


class FeedbackDatasetProcessor(DatasetProcessor):
    stage = "kto"

    def process_batch(self, batch: list[Example]) -> Generator[Any, Any, dict[str, list]]:
        # KL completions rotate by one row within the batch, computed before invalid rows are filtered (LF).
        responses = [e.response for e in batch]
        valid, kl_responses = [], []
        for i, example in enumerate(batch):
            if reason := row_issue(example, self.stage):
                self.health.dropped[reason] += 1
                continue
            self._check_media(example)
            valid.append(example)
            kl_responses.append(_kl_response(responses, i))

        def render(item):
            e, kl = item
            response = e.response[0] if e.response[0]["content"] else e.response[1]
            kl_message = kl[0] if kl[0]["content"] else kl[1]
            prompt, target = self.template.render_oneturn(self.tokenizer, e.prompt + [response], e.system, e.tools)
            kl_prompt, kl_target = self.template.render_oneturn(self.tokenizer, e.prompt + [kl_message], e.system,
                                                                e.tools)
            return [prompt, target, kl_prompt, kl_target]

        rendered = self._render(list(zip(valid, kl_responses)), render) if valid else []
        flat = yield [elems for quad in rendered for elems in quad]
        eos = [self.tokenizer.eos_token_id] if self.template.efficient_eos else []
        out: dict[str, list] = defaultdict(list)
        for i, example in enumerate(valid):
            prompt, target, kl_prompt, kl_target = flat[4 * i], flat[4 * i + 1] + eos, flat[4 * i + 2], \
                flat[4 * i + 3] + eos
            if self.opts.overlength == "drop" and len(prompt) + len(target) > self.opts.cutoff_len:
                self._drop(example, "overlength")
                continue
            s_len, t_len = infer_seqlen(len(prompt), len(target), self.opts.cutoff_len)
            kl_s, kl_t = infer_seqlen(len(kl_prompt), len(kl_target), self.opts.cutoff_len)
            input_ids = prompt[:s_len] + target[:t_len]
            labels = [IGNORE_INDEX] * s_len + target[:t_len]
            out["input_ids"].append(input_ids)
            out["attention_mask"].append([1] * len(input_ids))
            out["labels"].append(labels)
            out["kl_input_ids"].append(kl_prompt[:kl_s] + kl_target[:kl_t])
            out["kl_attention_mask"].append([1] * (kl_s + kl_t))
            out["kl_labels"].append([IGNORE_INDEX] * kl_s + kl_target[:kl_t])
            out["kto_tags"].append(bool(example.response[0]["content"]))
            self._account(len(prompt) + len(target), input_ids, labels, lost_eos=t_len < len(target))
        return dict(out)


def _kl_response(responses: list[list[dict]], i: int) -> list[dict]:
    """The KL completion for row i: LF takes row i-1's response (row 0 takes the last row). LF crashes with an
    IndexError when that row has no usable response (a broken row); we walk further back instead."""
    n = len(responses)
    for step in range(1, n + 1):
        candidate = responses[(i - step) % n]
        if len(candidate) >= 2 or (len(candidate) == 1 and candidate[0]["content"]):
            return candidate
    return responses[i]
