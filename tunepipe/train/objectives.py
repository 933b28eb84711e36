"""The objectives a stage can train, one row each: what adding an objective means is adding a row (and its trainer).

    objective  stage  selected by pref_loss   config              trainer (trainers.py)   collator (collators.py)
    clm        cpt    -                       TrainingArguments   TokenCountingTrainer    PaddedCollator
    sft        sft    -                       TrainingArguments   TokenCountingTrainer    PaddedCollator / packed
    dpo        dpo    sigmoid, ipo, hinge     DPOConfig           PretokenizedDPOTrainer  PreferenceCollator
    orpo       dpo    orpo                    ORPOConfig          PretokenizedORPOTrainer PairedCollator
    simpo      dpo    simpo                   CPOConfig           PretokenizedCPOTrainer  PairedCollator
    kto        kto    -                       KTOConfig           PretokenizedKTOTrainer  KTOCollator

The table is plain data (names, column tuples, small functions of the stage's values; classes by name), so
tunepipe.config reads its vocabulary from here without loading the training stack (an import-linter contract).
tunepipe.train.recipe builds a stage's trainer from its row; tunepipe.train.trainers takes the columns from here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunepipe.plan import TrainInputs

log = logging.getLogger("tunepipe.train")

# The columns the prepare stage writes (LLaMA-Factory's), by the shape of the data.
SUPERVISED = ("input_ids", "attention_mask", "labels")
PAIRWISE = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
            "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
FEEDBACK = ("input_ids", "attention_mask", "labels", "kl_input_ids", "kl_attention_mask", "kl_labels", "kto_tags")

# TRL's eval metric (after `eval_`) -> the name in metrics/train_<stage>.json.
PREFERENCE_METRICS = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
                      "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected", "kl": "kl"}


# ---------------------------------------------------------------------------------------------------------------
# Each objective's own config fields, beside the TrainingArguments every objective shares (recipe.training_arguments)
# ---------------------------------------------------------------------------------------------------------------
def _no_fields(inputs: TrainInputs) -> dict[str, Any]:
    return {}


def _dpo_fields(inputs: TrainInputs) -> dict[str, Any]:
    sp = inputs.preference
    losses, weights = [sp.pref_loss], [1.0]
    if sp.pref_ftx > 0:
        losses, weights = [sp.pref_loss, "sft"], [1.0, sp.pref_ftx]
    return dict(beta=sp.pref_beta, loss_type=losses, loss_weights=weights, max_length=None,
                precompute_ref_log_probs=False)


def _orpo_fields(inputs: TrainInputs) -> dict[str, Any]:
    return dict(beta=inputs.preference.pref_beta, max_length=inputs.cutoff_len)


def _simpo_fields(inputs: TrainInputs) -> dict[str, Any]:
    sp = inputs.preference
    return dict(loss_type="simpo", beta=sp.pref_beta, cpo_alpha=sp.pref_ftx, simpo_gamma=sp.simpo_gamma,
                max_length=inputs.cutoff_len)


def _kto_fields(inputs: TrainInputs) -> dict[str, Any]:
    sp = inputs.preference
    return dict(beta=sp.pref_beta, desirable_weight=sp.kto_chosen_weight, undesirable_weight=sp.kto_rejected_weight,
                loss_type="kto", max_length=None)


def _kto_check(inputs: TrainInputs) -> None:
    from tunepipe.errors import ConfigError

    if inputs.train.per_device_train_batch_size < 2:
        raise ConfigError("KTO estimates its KL term across the examples of a batch: use a batch size of 2 or more",
                          key=f"stages.{inputs.stage}.per_device_train_batch_size")
    if inputs.preference.pref_ftx > 0:
        log.warning("pref_ftx=%s is ignored for kto (TRL's KTOTrainer has no SFT term)", inputs.preference.pref_ftx)


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    name: str  # what the plan's train section says (TrainInputs.objective)
    stage: str  # the params.yaml stage that trains it
    columns: tuple[str, ...]  # the prepared columns it trains on (checked before the model loads)
    config: str  # its TrainingArguments class, module.Name (imported only when a stage trains)
    fields: Callable[[TrainInputs], dict[str, Any]]  # that config's own fields, from the stage's values
    trainer: str  # the trainer subclass, tunepipe.train.trainers.trainer_class(name)
    collator: str  # the collator class in tunepipe.train.collators (sft may pack instead: recipe.make_collator)
    losses: tuple[str, ...] = ()  # the stage's pref_loss values that select it (empty: the stage's only objective)
    preference: bool = False  # reads the stage's preference keys (pref_beta, pref_loss, ...)
    reference: bool = False  # scored against a reference = the stage's input model (adapter disabled / a copy)
    packs: bool = False  # its examples may be packed into rows at train time (`packing`)
    perplexity: bool = False  # eval_perplexity = exp(eval_loss) in its metrics
    metrics: Mapping[str, str] = field(default_factory=dict)  # TRL eval metric -> name in its metrics file
    check: Callable[[TrainInputs], None] | None = None  # refuses (or warns about) values it cannot train with


OBJECTIVES: dict[str, Objective] = {row.name: row for row in (
    Objective("clm", "cpt", SUPERVISED, "transformers.TrainingArguments", _no_fields, "trainer", "PaddedCollator",
              perplexity=True),
    Objective("sft", "sft", SUPERVISED, "transformers.TrainingArguments", _no_fields, "trainer", "PaddedCollator",
              packs=True),
    Objective("dpo", "dpo", PAIRWISE, "trl.DPOConfig", _dpo_fields, "dpo", "PreferenceCollator",
              losses=("sigmoid", "ipo", "hinge"), preference=True, reference=True, metrics=PREFERENCE_METRICS),
    Objective("orpo", "dpo", PAIRWISE, "trl.experimental.orpo.ORPOConfig", _orpo_fields, "orpo", "PairedCollator",
              losses=("orpo",), preference=True, metrics=PREFERENCE_METRICS),
    Objective("simpo", "dpo", PAIRWISE, "trl.experimental.cpo.CPOConfig", _simpo_fields, "cpo", "PairedCollator",
              losses=("simpo",), preference=True, metrics=PREFERENCE_METRICS),
    Objective("kto", "kto", FEEDBACK, "trl.KTOConfig", _kto_fields, "kto", "KTOCollator", preference=True,
              reference=True, metrics=PREFERENCE_METRICS, check=_kto_check),
)}

# The vocabulary tunepipe.config reads (stages in pipeline order; dpo and kto are alternatives).
STAGES = tuple(dict.fromkeys(row.stage for row in OBJECTIVES.values()))
PREFERENCE_STAGES = tuple(dict.fromkeys(row.stage for row in OBJECTIVES.values() if row.preference))
PREF_LOSSES = tuple(loss for row in OBJECTIVES.values() for loss in row.losses)
REFERENCE_LOSSES = tuple(loss for row in OBJECTIVES.values() if row.reference for loss in row.losses)


def select(stage: str, pref_loss: str = "sigmoid") -> Objective | None:
    """The row a stage trains with `pref_loss` (ignored by a stage with one objective); None for an unknown stage."""
    rows = [row for row in OBJECTIVES.values() if row.stage == stage]
    return next((row for row in rows if not row.losses or pref_loss in row.losses), None)


def stage_columns(stage: str) -> tuple[str, ...]:
    """The columns the prepare stage writes for `stage` (every objective of a stage reads the same data)."""
    return next(row.columns for row in OBJECTIVES.values() if row.stage == stage)
