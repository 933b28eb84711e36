"""Collators that turn OUR pre-tokenized features (never re-tokenized text) into the batches each trainer expects.

The prepare stage writes LLaMA-Factory's exact columns; the tokens and label masks there are the contract, so the
collators consume them as they are:

- `PackedRowsCollator` (sft, `packing: true`): rows of several examples (packed by best-fit decreasing,
  tunepipe.train.packing) laid out by `PaddingFreeCollator`: the position ids restart at 0 for every example, and
  no attention mask is passed. transformers (>= 4.54, here 5.23) then detects the packed rows from the position
  ids and builds a block-diagonal causal mask for sdpa/eager (FlashAttention gets the boundaries as cu_seqlens), so
  an example never attends to its neighbour: the loss and the gradient are those of the same examples padded,
  without computing the padding. Checked in tests/test_training.py (`test_packing_is_contamination_free`) and
  tests/test_packing.py.
- `PreferenceCollator` (DPO): DPOTrainer 1.16 tokenizes `prompt/chosen/rejected` text and its collator rebuilds
  `prompt_ids + chosen_ids`; we collate `chosen_input_ids` / `rejected_input_ids` directly into its batch layout
  (`input_ids` = [chosen..., rejected...], `attention_mask`, `completion_mask`), with `completion_mask = labels !=
  -100`: the scored tokens are exactly LF's labels.
- `KTOCollator`: the same for KTOTrainer, including LF's KL completions (`kl_input_ids`: the same prompt with
  another example's response) as TRL's `KL_input_ids`, and `kto_tags` as `label`.
- `PairedCollator` (ORPO / SimPO): their batch format already is `chosen_*` / `rejected_*`.

Every collator attaches the batch's real token counts under COUNTS_KEY (tokens/s and padding in the progress log).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tunepipe.data.processors import IGNORE_INDEX  # the label of every token that carries no loss

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Token accounting: every collator attaches the real (non-pad) token counts of its batch.
# ---------------------------------------------------------------------------------------------------------------
COUNTS_KEY = "tunepipe_token_counts"  # [real tokens, label tokens, computed positions] of a collated batch


@dataclass
class TokenCounter:
    """Tokens trained on so far by this process (not eval, not prefetched): the collators put each batch's counts
    under COUNTS_KEY and `CountTokensMixin.compute_loss` moves them here when the model is in training mode."""

    tokens: int = 0
    label_tokens: int = 0
    slots: int = 0  # tokens actually computed (real + padding)

    def add(self, tokens: int, label_tokens: int, slots: int) -> None:
        self.tokens += int(tokens)
        self.label_tokens += int(label_tokens)
        self.slots += int(slots)


def _counts(tokens: int, label_tokens: int, slots: int) -> torch.Tensor:
    return torch.tensor([tokens, label_tokens, slots], dtype=torch.long)


def _pad(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length if length is not None else max(len(r) for r in rows)
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def _count_labels(labels: list[int]) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------------------
# cpt / sft
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PaddedCollator:
    """Right-pad input_ids (pad id), attention_mask (0) and labels (-100) to the longest example of the batch
    (DataCollatorForSeq2Seq's behaviour, plus token accounting)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        length = max(len(r) for r in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        masks = [list(f.get("attention_mask") or [1] * len(r)) for f, r in zip(features, ids)]
        return {
            "input_ids": _pad(ids, self.pad_token_id, length),
            "attention_mask": _pad(masks, 0, length),
            "labels": _pad(labels, IGNORE_INDEX, length),
            COUNTS_KEY: _counts(sum(sum(m) for m in masks), sum(_count_labels(lab) for lab in labels),
                                length * len(ids)),
        }


@dataclass
class PaddingFreeCollator:
    """Padding-free packing of a batch of examples: laid side by side, position ids restarting at 0 per example, no
    attention mask (transformers derives the block-diagonal causal mask from the position ids).

    The tensors are those of transformers' `DataCollatorWithFlattening`: the first label of every example becomes
    -100, so no example learns to predict the next one's first token (the unpacked example never uses that label
    either: the loss is shifted). Two additions:

    - `max_row_tokens`: with sdpa/eager the packed mask is dense, so one row of B*L tokens costs (B*L)^2 attention.
      The batch is therefore packed into rows of at most `max(max_row_tokens, longest example)` tokens by
      best-fit decreasing; rows are topped up with a pad block that has its own positions (so it is a separate
      sequence) and label -100. None = one row (the FlashAttention layout).
    - token accounting (COUNTS_KEY) and, for FlashAttention, the cu_seqlens kwargs.
    """

    pad_token_id: int = 0
    max_row_tokens: int | None = None
    return_flash_attn_kwargs: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from tunepipe.train.packing import best_fit_decreasing

        lengths = [len(f["input_ids"]) for f in features]
        if self.max_row_tokens is None:
            rows = [list(range(len(features)))]
        else:
            rows = [sorted(r) for r in best_fit_decreasing(lengths, max(self.max_row_tokens, max(lengths)))]
        return self.layout(features, rows)

    def layout(self, features: list[dict[str, Any]], rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """The batch tensors for `features` laid out in `rows` (lists of indices into features)."""
        lengths = [len(f["input_ids"]) for f in features]
        ids, labels, positions = [], [], []
        cu_seqlens = [0]
        label_tokens = 0
        for row in rows:
            row_ids: list[int] = []
            row_labels: list[int] = []
            row_positions: list[int] = []
            for i in row:
                x = list(features[i]["input_ids"])
                y = list(features[i]["labels"])
                row_ids += x
                row_labels += [IGNORE_INDEX] + y[1:]
                row_positions += range(len(x))
                cu_seqlens.append(cu_seqlens[-1] + len(x))
                label_tokens += _count_labels(y)
            ids.append(row_ids)
            labels.append(row_labels)
            positions.append(row_positions)
        width = max(len(r) for r in ids)
        for row_ids, row_labels, row_positions in zip(ids, labels, positions):
            extra = width - len(row_ids)  # the pad block: its own sequence (positions restart), never a label
            row_ids += [self.pad_token_id] * extra
            row_labels += [IGNORE_INDEX] * extra
            row_positions += range(extra)
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            COUNTS_KEY: _counts(sum(lengths), label_tokens, width * len(ids)),
        }
        if self.return_flash_attn_kwargs and len(ids) == 1:
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(cu_seqlens, dtype=torch.int32)
            batch["max_length_q"] = batch["max_length_k"] = max(lengths)
        return batch


@dataclass
class PackedRowsCollator:
    """Batches of rows packed by best-fit decreasing (tunepipe.train.packing.PackedRows: each feature is the list
    of one row's examples) -> padding-free tensors.

    - sdpa / eager: one tensor row per packed row, padded to the batch's fullest row (rows are ~99% full);
    - `varlen` (FlashAttention): every example of the batch in a single row with cu_seqlens: no padding at all;
    - `padded`: the same examples as ordinary right-padded rows, one per example. Not a training layout: it shows
      that packing changes the layout, not the math (tests/test_packing.py compares the two runs).

    A batch of plain examples (the held-out split, evaluated unpacked so its loss compares with an unpacked run)
    is packed within the batch, in rows of at most `max_row_tokens`."""

    pad_token_id: int = 0
    varlen: bool = False
    max_row_tokens: int | None = None
    padded: bool = False

    def __call__(self, features: list) -> dict[str, torch.Tensor]:
        flat = PaddingFreeCollator(pad_token_id=self.pad_token_id, return_flash_attn_kwargs=self.varlen,
                                   max_row_tokens=None if self.varlen else self.max_row_tokens)
        if features and isinstance(features[0], dict):  # examples, not rows
            return PaddedCollator(pad_token_id=self.pad_token_id)(features) if self.padded else flat(features)
        examples = [example for row in features for example in row]
        if self.padded:
            return PaddedCollator(pad_token_id=self.pad_token_id)(examples)
        if self.varlen:
            return flat.layout(examples, [list(range(len(examples)))])
        rows, start = [], 0
        for row in features:
            rows.append(list(range(start, start + len(row))))
            start += len(row)
        return flat.layout(examples, rows)


@dataclass
class PrepackedCollator:
    """Rows packed by the prepare stage (LF `neat_packing: true`: several examples per cutoff_len row, `position_ids`
    restarting per example, `attention_mask` = 1, 2, 3... per example and 0 on the padding). The attention mask is
    dropped so that transformers builds the block-diagonal mask from the position ids, as for PaddingFreeCollator
    (LF does the same with its own 4D mask). Each padding token has position 0: a sequence of its own, label -100."""

    pad_token_id: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        positions = [list(f["position_ids"]) for f in features]
        width = max(len(r) for r in ids)
        for i in range(len(ids)):
            extra = width - len(ids[i])
            ids[i] += [self.pad_token_id] * extra
            labels[i] += [IGNORE_INDEX] * extra
            positions[i] += [0] * extra
        real = sum(sum(1 for m in f["attention_mask"] if m) for f in features)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            COUNTS_KEY: _counts(real, sum(_count_labels(lab) for lab in labels), width * len(ids)),
        }


# ---------------------------------------------------------------------------------------------------------------
# Preference collators (DPO / KTO batch layouts of TRL 1.16, built from LF's features)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class PreferenceCollator:
    """LF pairwise features -> DPOTrainer 1.16's batch: rows [chosen_1..chosen_B, rejected_1..rejected_B], right
    padded to one length; `completion_mask` marks the scored tokens = positions whose LF label is not -100."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [list(f["chosen_input_ids"]) for f in features] + [list(f["rejected_input_ids"]) for f in features]
        labels = [list(f["chosen_labels"]) for f in features] + [list(f["rejected_labels"]) for f in features]
        length = max(len(r) for r in rows)
        completion = [[int(y != IGNORE_INDEX) for y in lab] for lab in labels]
        batch = {
            "input_ids": _pad(rows, self.pad_token_id, length),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, length),
            "completion_mask": _pad(completion, 0, length),
            COUNTS_KEY: _counts(sum(len(r) for r in rows), sum(map(sum, completion)), length * len(rows)),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):  # precompute_ref_log_probs passes these through
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features])
        return batch


@dataclass
class KTOCollator:
    """LF feedback features -> KTOTrainer 1.16's batch: `input_ids/attention_mask/completion_mask` for the example,
    `KL_*` for LF's KL sequence (same prompt, another example's response), `label` = kto_tags (True = desirable)."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for prefix, src in (("", ""), ("KL_", "kl_")):
            rows = [list(f[f"{src}input_ids"]) for f in features]
            completion = [[int(y != IGNORE_INDEX) for y in f[f"{src}labels"]] for f in features]
            length = max(len(r) for r in rows)
            batch[f"{prefix}input_ids"] = _pad(rows, self.pad_token_id, length)
            batch[f"{prefix}attention_mask"] = _pad([[1] * len(r) for r in rows], 0, length)
            batch[f"{prefix}completion_mask"] = _pad(completion, 0, length)
            if not prefix:  # the KL forward is gradient-free: count the trained sequences
                batch[COUNTS_KEY] = _counts(sum(len(r) for r in rows), sum(map(sum, completion)), length * len(rows))
        batch["label"] = torch.tensor([bool(f["kto_tags"]) for f in features])
        for key in ("ref_logps", "ref_KL_logps"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features])
        return batch


@dataclass
class PairedCollator:
    """LF pairwise features for ORPO/CPO (trl.experimental): they already are that trainer's batch format; pad them
    like its DPODataCollatorWithPadding and count tokens."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        tokens = labels = slots = 0
        for side in ("chosen", "rejected"):
            rows = [list(f[f"{side}_input_ids"]) for f in features]
            labs = [list(f[f"{side}_labels"]) for f in features]
            length = max(len(r) for r in rows)
            batch[f"{side}_input_ids"] = _pad(rows, self.pad_token_id, length)
            batch[f"{side}_attention_mask"] = _pad([list(f[f"{side}_attention_mask"]) for f in features], 0, length)
            batch[f"{side}_labels"] = _pad(labs, IGNORE_INDEX, length)
            tokens += sum(len(r) for r in rows)
            labels += sum(_count_labels(lab) for lab in labs)
            slots += length * len(rows)
        batch[COUNTS_KEY] = _counts(tokens, labels, slots)
        return batch
