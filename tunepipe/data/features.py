"""From dataset names to training features: resolve, load, convert, mix, split, tokenize — LF's `get_dataset`.

`prepare(stage, names, args, tokenizer)` is what the CLI's `data export` and the pipeline's `prepare` stage call.
The tokenizer is fixed by the template first (EOS replacement, pad = EOS, stop words), exactly as LLaMA-Factory's
`get_template_and_fix_tokenizer` does, because those changes decide token ids.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tunepipe.data.converters import Example, convert
from tunepipe.data.loading import RawDataset, load_raw
from tunepipe.data.processors import Health, Processor, ProcessorOptions
from tunepipe.data.registry import DatasetAttr, get_dataset_attrs, split_names
from tunepipe.errors import DataError

log = logging.getLogger(__name__)


def _help(text: str, default: Any = None, **kwargs) -> Any:
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class DataArgs:
    """Data arguments. Names and defaults are LLaMA-Factory's; the last three are tunepipe's (opt-in)."""

    dataset_dir: str = _help("Folder holding dataset_info.json; relative paths resolve against the current directory.",
                             "data")
    template: str | None = _help("Chat template name (`tunepipe data templates`); None parses the tokenizer's.")
    cutoff_len: int = _help("Maximum tokens per example (pt: block size when packing).", 2048)
    packing: bool | None = _help("Pack examples into cutoff_len blocks; None = on for pt, off otherwise.")
    neat_packing: bool = _help("SFT packing without cross-example attention (implies packing).", False)
    train_on_prompt: bool = _help("Compute the loss on prompt tokens too (sft).", False)
    mask_history: bool = _help("Train only on the last turn of multi-turn examples (sft).", False)
    max_samples: int | None = _help("Keep only the first N rows of each dataset (debugging).")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = _help(
        "How to mix several datasets.", "concat")
    interleave_probs: str | list[float] | None = _help("Sampling probabilities for interleave_* (comma-separated).")
    val_size: float = _help("Held-out split: a fraction in (0,1) or a row count (>1).", 0.0)
    seed: int = _help("Seed for num_samples, interleaving and the validation split (LF's training seed).", 42)
    preprocessing_batch_size: int = _help("Rows per processing batch (LF: packing and KTO pairing are per batch).",
                                          1000)
    preprocessing_num_workers: int | None = _help("Worker processes; the rows are cut into that many contiguous "
                                                  "shards, batched within each (LF's datasets.map(num_proc)).")
    streaming: bool = _help("pt: read and tokenize the corpus batch by batch and hand the blocks over as they are "
                            "made (memory flat in the corpus size); same tokens as without.", False)
    tool_format: str | None = _help("Override the template's tool/function-call format (default, qwen, ...).")
    default_system: str | None = _help("Override the template's default system prompt ('' = none).")
    enable_thinking: bool | None = _help("Reasoning templates: True trains the empty <think> block, False strips "
                                         "thoughts, None keeps them out of the loss.", True)
    preserve_thinking: bool = _help("Reasoning templates: keep thoughts of earlier turns.", False)
    media_dir: str | None = _help("Folder for images/videos/audios; defaults to dataset_dir.")
    allow_scripts: bool = _help("Allow dataset entries with script_url to run their Python script (executes code "
                                "from the dataset folder).", False)
    skip_bad_rows: bool = _help("Drop and count malformed rows (non-text content, bad tool JSON) instead of "
                                "failing with an error that names the row.", False)
    overlength: Literal["truncate", "drop"] = _help("Examples longer than cutoff_len: truncate (LF) or drop.",
                                                    "truncate")

    def processor_options(self) -> ProcessorOptions:
        return ProcessorOptions(cutoff_len=self.cutoff_len, packing=self.packing, neat_packing=self.neat_packing,
                                train_on_prompt=self.train_on_prompt, mask_history=self.mask_history,
                                preprocessing_batch_size=self.preprocessing_batch_size, overlength=self.overlength)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


@dataclass
class Prepared:
    """Processed features of one stage plus the accounting that goes into the data health report."""

    stage: str
    train: dict[str, list]
    eval: dict[str, list] | None
    health: Health
    eval_health: Health | None
    datasets: list[str]
    notes: list[str]
    template: Any = None
    tokenizer: Any = None


def check_stage(attrs: list[DatasetAttr], stage: str) -> None:
    """LF: preference stages need `ranking: true` datasets, every other stage `ranking: false`."""
    for attr in attrs:
        wants_ranking = stage == "dpo"
        if attr.ranking != wants_ranking:
            need = "a ranking (chosen/rejected) dataset" if wants_ranking else "a non-ranking dataset"
            raise DataError(f"stage {stage} needs {need}, but this entry has ranking: {str(attr.ranking).lower()}",
                            dataset=attr.name, field="ranking")


# The DataArgs fields load_examples and load_template read (tunepipe.plan gives a step that calls only these two
# functions exactly these values): keep each list next to its function.
EXAMPLE_FIELDS = ("dataset_dir", "media_dir", "max_samples", "allow_scripts", "skip_bad_rows", "mix_strategy",
                  "interleave_probs", "seed")
TEMPLATE_FIELDS = ("template", "tool_format", "default_system", "enable_thinking", "preserve_thinking",
                   "train_on_prompt")


def load_examples(names: list[str], args: DataArgs, stage: str, rng, notes: list[str],
                  raws: dict[str, RawDataset]) -> list[Example]:
    """Load, sample and convert each named dataset, then mix them (LF's `_get_merged_dataset`)."""
    unique = list(dict.fromkeys(names))  # LF collapses repeated names (`a,a` loads a once)
    if len(unique) < len(names):
        notes.append("repeated dataset names are loaded once (LLaMA-Factory semantics); use num_samples to upsample")
    attrs = get_dataset_attrs(unique, args.dataset_dir)
    check_stage(attrs, stage)
    media_dir = Path(args.media_dir or args.dataset_dir)
    parts = []
    for attr in attrs:
        raw = load_raw(attr, dataset_dir=args.dataset_dir, rng=rng, max_samples=args.max_samples,
                       allow_scripts=args.allow_scripts)
        raws[attr.name] = raw
        parts.append(convert(raw, media_dir=media_dir, skip_bad_rows=args.skip_bad_rows))
    return _mix(parts, args)


def _interleave_probs(args: DataArgs, count: int) -> list[float] | None:
    probs = args.interleave_probs
    if probs is None:
        return None
    if args.mix_strategy == "concat":
        raise DataError("interleave_probs only applies to interleave_* mix strategies")
    if isinstance(probs, str):
        try:
            probs = [float(p) for p in split_names(probs)]
        except ValueError:
            raise DataError(f"interleave_probs must be comma-separated numbers, got {args.interleave_probs!r}") \
                from None
    if len(probs) != count:
        raise DataError(f"interleave_probs has {len(probs)} values for {count} datasets")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise DataError(f"interleave_probs must be non-negative and sum to 1, got {probs}")
    return probs


def _mix(parts: list[list[Example]], args: DataArgs) -> list[Example]:
    if len(parts) == 1:
        return parts[0]
    if args.mix_strategy == "concat":
        _interleave_probs(args, len(parts))
        return [example for part in parts for example in part]
    strategies = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
                  "interleave_once": "all_exhausted_without_replacement"}
    if args.mix_strategy not in strategies:
        raise DataError(f"unknown mix_strategy {args.mix_strategy!r}; expected concat or one of "
                        f"{', '.join(strategies)}")
    from datasets import Dataset, interleave_datasets

    # Interleave row indices with the very function LF uses, so the order (and its seeded sampling) is identical.
    index_sets = [Dataset.from_dict({"part": [p] * len(part), "row": list(range(len(part)))})
                  for p, part in enumerate(parts)]
    mixed = interleave_datasets(index_sets, probabilities=_interleave_probs(args, len(parts)), seed=args.seed,
                                stopping_strategy=strategies[args.mix_strategy])
    return [parts[p][r] for p, r in zip(mixed["part"], mixed["row"])]


def stream_examples(names: list[str], args: DataArgs, stage: str, rng, raws: dict[str, RawDataset]
                    ) -> Iterator[Example]:
    """The examples of the named datasets, concatenated, converted chunk by chunk from their memory-mapped Arrow
    tables (`streaming`): the same examples as load_examples with mix_strategy concat, never all in memory. The
    datasets are opened now (LF's order of num_samples draws); their rows are read as the iterator is consumed."""
    from tunepipe.data.loading import iter_rows

    unique = list(dict.fromkeys(names))
    attrs = get_dataset_attrs(unique, args.dataset_dir)
    check_stage(attrs, stage)
    media_dir = Path(args.media_dir or args.dataset_dir)
    lazy = [load_raw(attr, dataset_dir=args.dataset_dir, rng=rng, max_samples=args.max_samples,
                     allow_scripts=args.allow_scripts, lazy=True) for attr in attrs]
    for raw in lazy:
        raws[raw.attr.name] = raw

    def examples() -> Iterator[Example]:
        for raw in lazy:
            offset = 0
            for part in iter_rows(raw, max(1, args.preprocessing_batch_size)):
                for example in convert(part, media_dir=media_dir, skip_bad_rows=args.skip_bad_rows):
                    example.position += offset  # index into the whole dataset, for `locate`
                    yield example
                offset += len(part.rows)

    return examples()


def prepare_to_disk(stage: str, names: str | list[str], args: DataArgs, tokenizer, out: Path, *,
                    eval_names: str | list[str] | None = None,
                    amend: Callable[[Prepared], None] | None = None) -> Prepared:
    """`prepare`, with train/ and eval/ written under `out` (datasets.save_to_disk). With `streaming` the training
    features go to an Arrow file batch by batch as they are made, so memory stays flat in the corpus size.
    `amend` changes the in-memory features before they are written (replay mixing); it needs `streaming` off."""
    from datasets import Dataset

    if not args.streaming:
        prepared = prepare(stage, names, args, tokenizer, eval_names=eval_names)
        if amend is not None:
            amend(prepared)
        Dataset.from_dict(prepared.train).save_to_disk(str(out / "train"))
    else:
        if amend is not None:
            raise ValueError("features written while streaming cannot be amended")
        from datasets.arrow_writer import ArrowWriter

        staging = out / ".train.arrow"
        with ArrowWriter(path=str(staging)) as writer:
            prepared = prepare(stage, names, args, tokenizer, eval_names=eval_names,
                               on_train_batch=lambda batch: writer.write_batch(batch) if batch else None)
            writer.finalize()
        train = Dataset.from_file(str(staging))  # memory-mapped: save_to_disk copies it in shards
        # datasets derives a mapped file's fingerprint from its path; the output must not depend on where it was
        # made (DVC hashes it), so the fingerprint is the file's content hash
        train._fingerprint = _file_digest(staging)[:16]
        train.save_to_disk(str(out / "train"))
        del train
        staging.unlink()
    if prepared.eval is not None:
        Dataset.from_dict(prepared.eval).save_to_disk(str(out / "eval"))
    return prepared


def _file_digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _batched(examples: Iterable[Example], size: int) -> Iterator[list[Example]]:
    batch: list[Example] = []
    for example in examples:
        batch.append(example)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _columns(batches: Iterable[dict[str, list]]) -> dict[str, list]:
    columns: dict[str, list] = {}
    for out in batches:
        for key, values in out.items():
            columns.setdefault(key, []).extend(values)
    return columns


def _split(examples: list[Example], args: DataArgs) -> tuple[list[Example], list[Example] | None]:
    """LF's split_dataset: `Dataset.train_test_split(test_size, seed)` on the converted rows."""
    if args.val_size <= 1e-6:
        return examples, None
    from datasets import Dataset

    test_size = int(args.val_size) if args.val_size > 1 else args.val_size
    try:
        split = Dataset.from_dict({"i": list(range(len(examples)))}).train_test_split(test_size=test_size,
                                                                                      seed=args.seed)
    except ValueError as err:
        raise DataError(f"val_size {args.val_size}: {err}") from None
    return [examples[i] for i in split["train"]["i"]], [examples[i] for i in split["test"]["i"]]


def load_template(args: DataArgs, tokenizer, *, stage: str):
    """Pick the template and fix the tokenizer in place (LF's get_template_and_fix_tokenizer)."""
    from tunepipe.data.templates import get_template

    template = get_template(args.template, tokenizer=tokenizer, tool_format=args.tool_format,
                            default_system=args.default_system, enable_thinking=args.enable_thinking,
                            preserve_thinking=args.preserve_thinking,
                            train_on_prompt=args.train_on_prompt and stage == "sft")
    template.fix_tokenizer(tokenizer)
    return template


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Processing allocates millions of token lists; each of Python's full collections walks all of them (and the
    raw rows) looking for cycles that this code never makes: 15-30% of the run time. Reference counting still
    frees everything; collection resumes afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_no_cyclic_gc()
def prepare(stage: str, names: str | list[str], args: DataArgs, tokenizer, *,
            eval_names: str | list[str] | None = None, eval_stage: str | None = None,
            on_train_batch: Callable[[dict[str, list]], None] | None = None) -> Prepared:
    """Load and process the datasets of one stage. `eval_stage="unsupervised"` processes the eval set as
    generation prompts (LF's predict_with_generate). With `on_train_batch`, the training features are handed over
    batch by batch as they are ready (a writer can then overlap with tokenization) and `Prepared.train` is empty."""
    import numpy as np

    names, eval_list = split_names(names), split_names(eval_names)
    if not names:
        raise DataError("no dataset given")
    if eval_list and args.val_size > 1e-6:
        raise DataError("val_size cannot be used together with an eval dataset")
    if args.streaming and (args.val_size > 1e-6 or (len(names) > 1 and args.mix_strategy != "concat")):
        raise DataError("streaming reads the training data once, in order: use an eval dataset instead of "
                        "val_size, and mix_strategy concat")
    template = load_template(args, tokenizer, stage=stage)
    rng = np.random.RandomState(args.seed)  # = LF's global numpy RNG after transformers.set_seed(seed)
    notes: list[str] = []
    raws: dict[str, RawDataset] = {}
    if args.streaming:
        train_examples: Any = stream_examples(names, args, stage, rng, raws)
        split_eval = None
    else:
        examples = load_examples(names, args, stage, rng, notes, raws)
        train_examples, split_eval = _split(examples, args)
    eval_examples = load_examples(eval_list, args, stage, rng, notes, raws) if eval_list else None
    eval_examples = eval_examples if eval_examples is not None else split_eval

    def locate(example: Example) -> tuple[str | None, int]:
        return raws[example.dataset].locate(example.position)

    options = args.processor_options()
    processor = Processor(stage, template, tokenizer, options)
    workers = args.preprocessing_num_workers
    if args.streaming:
        batches = processor.stream(_batched(train_examples, options.preprocessing_batch_size), locate, workers)
    else:
        batches = processor.batches(train_examples, locate, workers)
    if on_train_batch is None:
        train = _columns(batches)
    else:
        train = {}
        for batch in batches:
            on_train_batch(batch)
    eval_columns, eval_health = None, None
    if eval_examples is not None:
        eval_processor = Processor(eval_stage or stage, template, tokenizer, options)
        eval_columns = eval_processor.process(eval_examples, locate, workers)
        eval_health = eval_processor.health
    if not processor.health.examples_out:
        reasons = ", ".join(f"{n} {r}" for r, n in processor.health.dropped.most_common()) or "no rows"
        hint = "not enough tokens for one block of cutoff_len" if stage == "pt" else f"dropped: {reasons}"
        raise DataError(f"no usable {stage} examples in {', '.join(names)} ({hint})")
    return Prepared(stage=stage, train=train, eval=eval_columns, health=processor.health, eval_health=eval_health,
                    datasets=names, notes=notes, template=template, tokenizer=tokenizer)
