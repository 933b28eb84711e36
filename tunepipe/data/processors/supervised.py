"""sft: LLaMA-Factory's SupervisedDatasetProcessor (one example per row, labels -100 over prompts) and
PackedSupervisedDatasetProcessor (`packing` / `neat_packing`: examples knapsacked into rows of cutoff_len + 1)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator
from typing import Any

from tunepipe.data.converters import Example
from tunepipe.data.processors.driver import DatasetProcessor
from tunepipe.data.processors.processor_utils import IGNORE_INDEX, greedy_knapsack, infer_seqlen


class SupervisedDatasetProcessor(DatasetProcessor):
    stage = "sft"

    def encode(self, batch: list[Example]
                           ) -> Generator[Any, Any, list[tuple[Example, list[int], list[int]]]]:
        """LF's SupervisedDatasetProcessor._encode_data_example for every valid row of the batch."""
        valid = self._usable(batch)
        discard_cot = self.opts.mask_history and not self.template.preserve_thinking
        rendered = self._render(valid, lambda e: self.template.render_multiturn(
            self.tokenizer, e.prompt + e.response, e.system, e.tools, discard_cot))
        flat = yield [elems for pairs in rendered for pair in pairs for elems in pair]
        eos_id = self.tokenizer.eos_token_id
        efficient_eos = self.template.efficient_eos
        o = self.opts
        results = []
        position = 0
        for example, pairs in zip(valid, rendered):
            encoded = [(flat[position + 2 * i], flat[position + 2 * i + 1]) for i in range(len(pairs))]
            position += 2 * len(pairs)
            full_length = sum(len(s) + len(t) for s, t in encoded) + (1 if efficient_eos else 0)
            if o.overlength == "drop" and full_length > o.cutoff_len:
                self._drop(example, "overlength")
                continue
            input_ids: list[int] = []
            labels: list[int] = []
            total = 1 if efficient_eos else 0
            if o.mask_history:
                encoded = encoded[::-1]  # the last turn gets the budget first
            lost_eos = False
            for turn, (source, target) in enumerate(encoded):
                if total >= o.cutoff_len:
                    break
                s_len, t_len = infer_seqlen(len(source), len(target), o.cutoff_len - total)
                lost_eos |= t_len < len(target) and (turn == 0 or not o.mask_history)
                source, target = source[:s_len], target[:t_len]
                total += s_len + t_len
                if o.train_on_prompt:
                    source_label = source
                elif efficient_eos and turn != 0:
                    source_label = [eos_id] + [IGNORE_INDEX] * (s_len - 1)
                else:
                    source_label = [IGNORE_INDEX] * s_len
                target_label = [IGNORE_INDEX] * t_len if (o.mask_history and turn != 0) else target
                if o.mask_history:
                    input_ids = source + target + input_ids
                    labels = source_label + target_label + labels
                else:
                    input_ids += source + target
                    labels += source_label + target_label
            if efficient_eos:
                input_ids += [eos_id]
                labels += [eos_id]
            self._account(full_length, input_ids, labels, lost_eos)
            results.append((example, input_ids, labels))
        return results

    def process_batch(self, batch: list[Example]) -> Generator[Any, Any, dict[str, list]]:
        encoded = yield from self.encode(batch)
        if not self.opts.packing:
            return {
                "input_ids": [ids for _, ids, _ in encoded],
                "attention_mask": [[1] * len(ids) for _, ids, _ in encoded],
                "labels": [labels for _, _, labels in encoded],
            }
        return self._pack(encoded)

    def _pack(self, encoded: list[tuple[Example, list[int], list[int]]]) -> dict[str, list]:
        """LF's PackedSupervisedDatasetProcessor: knapsack within the batch, pad every pack to cutoff_len + 1."""
        cutoff = self.opts.cutoff_len  # already cutoff_len - 1 (LF)
        neat = self.opts.neat_packing
        pad_id = self.tokenizer.pad_token_id
        lengths, by_length = [], defaultdict(list)
        for index, (_, ids, _) in enumerate(encoded):
            lengths.append(len(ids))  # never > cutoff: encoding already truncated (LF's "lengthy" branch is dead)
            by_length[len(ids)].append(index)
        out: dict[str, list] = defaultdict(list)
        for knapsack in greedy_knapsack(lengths, cutoff):
            input_ids, attention, positions, labels = [], [], [], []
            boundaries = [0]
            for i, length in enumerate(knapsack):
                index = by_length[length].pop()  # LF pops the last-seen example of that length
                _, ids, lab = encoded[index]
                input_ids += ids
                labels += lab
                positions += range(len(ids))
                attention += [i + 1 if neat else 1] * len(ids)
                boundaries.append(boundaries[-1] + len(ids))
            pad = cutoff - len(input_ids) + 1  # at least one pad (LF: keeps flash-attn from dropping the mask)
            input_ids += [pad_id] * pad
            positions += [0] * pad
            labels += [IGNORE_INDEX] * pad
            attention += [0 if neat else 1] * pad
            boundaries.append(boundaries[-1] + pad)
            self.health.pad_tokens += pad
            out["input_ids"].append(input_ids)
            out["attention_mask"].append(attention)
            out["position_ids"].append(positions)
            out["labels"].append(labels)
            if neat:
                out["packing_params"].append({
                    "sequence_boundaries": boundaries, "image_subseq_ids": [2**32], "video_subseq_ids": [2**32],
                    "audio_subseq_ids": [2**32], "right_padding_length": pad,
                })
        if neat:  # LF's column order
            order = ("input_ids", "packing_params", "attention_mask", "position_ids", "labels")
            return {key: out[key] for key in order}
        return dict(out)
