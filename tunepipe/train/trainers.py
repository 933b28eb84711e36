"""Thin subclasses of transformers' Trainer and TRL's trainers that train on the prepared features as they are.

- `PretokenizedDPOTrainer` / `PretokenizedKTOTrainer`: skip TRL's text tokenization (`_prepare_dataset`) and take
  the batches of tunepipe.train.collators.
- `PretokenizedORPOTrainer` / `PretokenizedCPOTrainer` (trl.experimental): their batch format already is LF's
  (LF copied it from old TRL), so only their text tokenization (`tokenize_row`) becomes the identity.
- Every trainer moves the collator's token counts into a TokenCounter (training batches only).
"""

from __future__ import annotations

import logging

from tunepipe.train.collators import COUNTS_KEY, TokenCounter
from tunepipe.train.objectives import OBJECTIVES

log = logging.getLogger(__name__)


class CountTokensMixin:
    """Takes the collator's token counts out of the batch before the model sees it; counts training batches only."""

    token_counter: TokenCounter | None = None
    takes_peft_config = True  # TRL's trainers wrap the model in the adapter themselves; transformers' Trainer does not

    def compute_loss(self, model, inputs, *args, **kwargs):
        counts = inputs.pop(COUNTS_KEY, None)
        if counts is not None and model.training and self.token_counter is not None:
            self.token_counter.add(*counts.tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)


def _make_trainers():
    """Import TRL lazily (it is heavy) and define the subclasses once."""
    from transformers import Trainer
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    class TokenCountingTrainer(CountTokensMixin, Trainer):
        """transformers Trainer (cpt, sft) + token accounting; packed sft rows get the length-grouped sampler."""

        takes_peft_config = False

        def _get_train_sampler(self, train_dataset=None):
            from tunepipe.train.packing import PackedRows, PackedRowsSampler

            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if isinstance(dataset, PackedRows):
                args = self.args
                global_batch = args.per_device_train_batch_size * max(1, args.world_size) * \
                    args.gradient_accumulation_steps
                return PackedRowsSampler(dataset.row_lengths(), global_batch,
                                         seed=args.data_seed if args.data_seed is not None else args.seed)
            return super()._get_train_sampler(train_dataset)

    class PretokenizedDPOTrainer(CountTokensMixin, DPOTrainer):
        """DPOTrainer on LF pairwise features (see PreferenceCollator); everything else is TRL's."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # its columns were checked before the model loaded (recipe.load_datasets)

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = [*OBJECTIVES["dpo"].columns, "ref_chosen_logps", "ref_rejected_logps"]

    class PretokenizedKTOTrainer(CountTokensMixin, KTOTrainer):
        """KTOTrainer on LF feedback features (see KTOCollator).

        TRL builds each example's KL completion from its batch neighbour, so it insists on sequential sampling.
        LF's KL completion is stored with every example (`kl_input_ids`), independent of the batch, so shuffling is
        safe and we restore the usual random sampler (LF's behaviour) after TRL's constructor checks.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.args.train_sampling_strategy = "random"

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if dataset_name == "train":
                tags = dataset["kto_tags"]
                desirable = sum(bool(t) for t in tags)
                log.info("kto: %d desirable / %d undesirable examples", desirable, len(tags) - desirable)
            return dataset

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = [*OBJECTIVES["kto"].columns, "ref_logps", "ref_KL_logps"]

    class PretokenizedORPOTrainer(CountTokensMixin, ORPOTrainer):
        """ORPOTrainer (trl.experimental) on LF pairwise features: the text tokenization step is the identity."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_dpo_data_collator = True  # PairedCollator produces that collator's format

        def tokenize_row(self, feature, model=None):
            return feature

    class PretokenizedCPOTrainer(CountTokensMixin, CPOTrainer):
        """CPOTrainer (trl.experimental; SimPO = loss_type "simpo") on LF pairwise features."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_dpo_data_collator = True

        def tokenize_row(self, feature, model=None):
            return feature

    return {"trainer": TokenCountingTrainer, "dpo": PretokenizedDPOTrainer, "kto": PretokenizedKTOTrainer,
            "orpo": PretokenizedORPOTrainer, "cpo": PretokenizedCPOTrainer}


_TRAINERS: dict[str, type] | None = None


def trainer_class(kind: str) -> type:
    """An objective's `trainer` (tunepipe.train.objectives): `trainer` (cpt/sft), `dpo`, `kto`, `orpo` or `cpo` ->
    the subclass."""
    global _TRAINERS
    if _TRAINERS is None:
        _TRAINERS = _make_trainers()
    return _TRAINERS[kind]
