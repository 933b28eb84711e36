"""Render processed examples as text with the trained spans marked (`tunepipe data preview`)."""

from __future__ import annotations

from typing import Iterator

from tunepipe.data.features import Prepared
from tunepipe.data.processors import IGNORE_INDEX

TRAINED_TTY = ("\x1b[1;32m", "\x1b[0m")  # bold green
TRAINED_PLAIN = ("⟦", "⟧")


def mark_trained(tokenizer, input_ids: list[int], labels: list[int], *, color: bool) -> str:
    """Decode `input_ids`, wrapping each run of tokens that carry a label (loss) in markers."""
    start, end = TRAINED_TTY if color else TRAINED_PLAIN
    out, run, trained = [], [], None
    for token, label in zip(input_ids, labels):
        is_trained = label != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{start}{text}{end}" if trained else text)
            run = []
        run.append(token)
        trained = is_trained
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"{start}{text}{end}" if trained else text)
    return "".join(out)


def render_example(prepared: Prepared, tokenizer, n: int, *, color: bool) -> Iterator[str]:
    columns = prepared.train
    if prepared.stage == "dpo":
        for i in range(min(n, len(columns["chosen_input_ids"]))):
            chosen = mark_trained(tokenizer, columns["chosen_input_ids"][i], columns["chosen_labels"][i], color=color)
            rejected = mark_trained(tokenizer, columns["rejected_input_ids"][i], columns["rejected_labels"][i],
                                    color=color)
            yield f"[chosen]\n{chosen}\n[rejected]\n{rejected}"
        return
    for i in range(min(n, len(columns["input_ids"]))):
        text = mark_trained(tokenizer, columns["input_ids"][i], columns["labels"][i], color=color)
        if prepared.stage == "kto":
            text = f"[{'desirable' if columns['kto_tags'][i] else 'undesirable'}]\n{text}"
        yield text
