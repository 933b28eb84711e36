"""Replay: earlier-stage data mixed into a later stage's training set, so that the stage adds without erasing.

`stages.sft.replay_dataset: demo_cpt` with `replay_ratio: 0.5` processes the CPT text exactly as prepare@cpt does
(LF `stage: pt`: documents joined with EOS, cut into `cutoff_len` blocks, every token a label) and adds
round(0.5 x the stage's own training examples) of those blocks to the SFT training features; the SFT trainer then
learns the answers and keeps predicting the CPT text. A replay dataset that is not one of the CPT stage's datasets
is processed as SFT rows (labels on the answers). Selection is seeded (`data.seed`): blocks are drawn without
replacement, cycling through the whole replay set when more are asked for than it has. This is LF's
`mix_strategy: concat` over two differently processed datasets (LF itself cannot mix pt text into sft).

Only stages whose features are (input_ids, attention_mask, labels) take replay (sft); preference stages keep the
SFT skill with `pref_ftx` (the SFT loss on the chosen answers) instead.
"""

from __future__ import annotations

from typing import Any

COLUMNS = ("input_ids", "attention_mask", "labels")


def replay_count(n_train: int, ratio: float, available: int) -> int:
    """How many replay examples: round(ratio x the stage's own examples); 0 without replay data."""
    return 0 if available == 0 else int(round(ratio * n_train))


def select(n_available: int, count: int, seed: int) -> list[int]:
    """`count` indices into the replay set: seeded permutations, concatenated until long enough."""
    import numpy as np

    rng = np.random.RandomState(seed)
    out: list[int] = []
    while len(out) < count:
        out += rng.permutation(n_available).tolist()
    return out[:count]


def mix(train: dict[str, list], replay: dict[str, list], ratio: float, seed: int) -> tuple[dict[str, list], int]:
    """The stage's features plus the selected replay rows (appended: the trainer shuffles). Returns (features, n)."""
    missing = [c for c in COLUMNS if c not in train or c not in replay]
    extra = sorted(set(train) - set(COLUMNS))
    if missing or extra:
        raise ValueError(f"replay needs (input_ids, attention_mask, labels) features on both sides; missing "
                         f"{missing}, extra {extra} (neat_packing cannot be combined with replay)")
    n = replay_count(len(train["input_ids"]), ratio, len(replay["input_ids"]))
    picks = select(len(replay["input_ids"]), n, seed)
    mixed = {c: list(train[c]) + [replay[c][i] for i in picks] for c in COLUMNS}
    return mixed, n


def replay_stage(params: Any, names: str) -> str:
    """pt when the replay datasets are CPT data (one of stages.cpt.dataset / eval_dataset), else sft."""
    from tunepipe.data.registry import split_names

    cpt = params.stage("cpt")
    cpt_names = set(split_names(cpt.dataset)) | set(split_names(cpt.eval_dataset))
    wanted = split_names(names)
    return "pt" if wanted and set(wanted) <= cpt_names else "sft"
