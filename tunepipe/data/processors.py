"""Tokenize converted examples into training features, token for token as LLaMA-Factory 0.9.5 does.

Stages and their LF processors (llamafactory-data-semantics.md §4):
  pt           -> PretrainDatasetProcessor (packing into blocks, or truncation per document)
  sft          -> SupervisedDatasetProcessor / PackedSupervisedDatasetProcessor (packing, neat_packing)
  dpo (LF: rm) -> PairwiseDatasetProcessor
  kto          -> FeedbackDatasetProcessor
  unsupervised -> UnsupervisedDatasetProcessor (prompts for generation-based evaluation)

LF works on `datasets.map` batches of `preprocessing_batch_size` rows and that is observable (pt packing drops the
remainder of each batch, sft packing packs within a batch, the KTO KL pairing rotates within a batch), so we keep the
same batches. Inside a batch we are faster: every message is rendered first, then all distinct text pieces of the
batch are tokenized in one call to the (Rust) tokenizer instead of one Python call per piece. Each piece is still
tokenized on its own, as LF does, so the ids are identical. Across batches we overlap: the Rust call releases the
GIL, so it runs in a background thread while the next batch is rendered and the previous one assembled in Python.

Each `_batch_<stage>` is written as one readable function: it renders, hands the element lists to the driver with
`flat = yield element_lists`, and assembles the columns from the token ids it gets back (`return columns`).
"""

from __future__ import annotations

import bisect
from array import array
import inspect
from collections import Counter, defaultdict, deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tunepipe.data.converters import Example
from tunepipe.errors import DataError, RowError

if TYPE_CHECKING:
    from tunepipe.data.templates import Element, Template

IGNORE_INDEX = -100
Stage = Literal["pt", "sft", "dpo", "kto", "unsupervised"]
STAGES: tuple[str, ...] = ("pt", "sft", "dpo", "kto", "unsupervised")


@dataclass
class ProcessorOptions:
    """The data arguments that change tokens. Names and defaults are LLaMA-Factory's."""

    cutoff_len: int = 2048
    packing: bool | None = None  # None: on for pt, off otherwise (LF)
    neat_packing: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False
    preprocessing_batch_size: int = 1000
    overlength: Literal["truncate", "drop"] = "truncate"  # tunepipe: drop instead of truncating (opt-in)

    def resolved(self, stage: str) -> ProcessorOptions:
        """Apply LF's argument post-processing: neat_packing forces packing; packing set explicitly (not the pt
        default) makes LF use cutoff_len - 1 internally (DataArguments.__post_init__)."""
        opts = ProcessorOptions(**vars(self))
        if opts.neat_packing:
            opts.packing = True
        explicit_packing = opts.packing is True
        if opts.packing is None:
            opts.packing = stage == "pt"
        if explicit_packing:
            opts.cutoff_len -= 1
        return opts


@dataclass
class Health:
    """Counts for the data health report (filled while processing)."""

    rows_in: int = 0
    examples_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    lost_eos: int = 0  # truncated responses that lost their final (EOS) token
    zero_label: int = 0  # examples whose labels are all IGNORE_INDEX (nothing to learn from)
    # token length per example before packing; 4 bytes each (a corpus of millions of documents streams through)
    lengths: array = field(default_factory=lambda: array("I"))
    label_tokens: int = 0
    tokens: int = 0
    pad_tokens: int = 0  # padding added by packing

    def merge(self, other: Health) -> None:
        """Add another part's counts (a worker's shard, a streamed batch)."""
        self.rows_in += other.rows_in
        self.examples_out += other.examples_out
        self.dropped.update(other.dropped)
        for name in ("truncated", "lost_eos", "zero_label", "label_tokens", "tokens", "pad_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lengths += other.lengths

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in, "examples_out": self.examples_out, "dropped": dict(self.dropped),
            "rows_dropped": sum(self.dropped.values()), "truncated": self.truncated, "lost_eos": self.lost_eos,
            "zero_label": self.zero_label, "tokens": self.tokens, "label_tokens": self.label_tokens,
            "pad_tokens": self.pad_tokens,
        }


def row_issue(example: Example, stage: str) -> str | None:
    """Why LF's processor for `stage` would drop this example (None = usable). Same rules as LF's processors."""
    if example.drop:
        return example.drop
    if stage == "pt":
        return None if example.prompt else "no_prompt"
    if len(example.prompt) % 2 != 1:
        return "invalid_message_count"
    if stage == "sft" and len(example.response) != 1:
        return "no_response" if not example.response else "invalid_message_count"
    if stage == "dpo" and len(example.response) < 2:
        return "not_a_preference_pair"
    if stage == "kto" and len(example.response) < 2:
        return "kto_tag_not_bool" if len(example.response) == 1 else "not_a_kto_example"
    return None


def media_error(example: Example, template: str | None) -> RowError | None:
    """A row with images/videos/audios cannot be trained with a text template (every tunepipe template is one):
    the processors refuse it, and `tunepipe data check` says the same for the same row."""
    if not (example.images or example.videos or example.audios):
        return None
    kind = "images" if example.images else "videos" if example.videos else "audios"
    which = f"template {template!r}" if template else "the template"
    return RowError(f"row has {kind} but {which} is text-only (tunepipe trains text models)", field=kind,
                    reason="media")


class BatchTokenizer:
    """Tokenize many text pieces in one call; each piece on its own (`add_special_tokens=False`), as LF's
    `tokenizer.encode(piece)` does. Pieces that repeat (system prompts, template constants) are tokenized once.

    For fast tokenizers the Rust backend's `encode_batch_fast` is used directly: it skips offset tracking and the
    per-encoding Python conversion, which is most of the cost besides the tokenization itself. The first batch is
    also encoded through the regular `tokenizer(...)` call and compared piece by piece; any difference (a tokenizer
    class that adds Python-side processing) switches the fast path off for good.

    `start()` may hand the Rust call to a worker thread and `finish()` collects it: between the two the caller is
    free to do Python work. Only `start`/`finish` touch the piece cache, and both run on the caller's thread.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.keep: dict[str, list[int]] = {}
        backend = getattr(tokenizer, "_tokenizer", None)
        self.fast = getattr(tokenizer, "is_fast", False) and hasattr(backend, "encode_batch_fast")
        self.verified = False

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        if not self.fast:
            return self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
        fast = [e.ids for e in self.tokenizer._tokenizer.encode_batch_fast(pieces, add_special_tokens=False)]
        if not self.verified:
            self.verified = True
            if fast != self.tokenizer(pieces, add_special_tokens=False)["input_ids"]:
                self.fast = False
                return self._encode_pieces(pieces)
        return fast

    def start(self, element_lists: list[list[Element]], pool: ThreadPoolExecutor | None = None) -> _Pending:
        counts = Counter(e for elems in element_lists for e in elems if isinstance(e, str) and e)
        pending = [piece for piece in counts if piece not in self.keep]
        ids: Future = Future()
        # The slow path calls `tokenizer(...)`, which may reconfigure the backend (truncation/padding): never
        # from two threads at once, so it (and the one-time check of the fast path) stays on this thread.
        if pool is not None and pending and self.fast and self.verified:
            ids = pool.submit(self._encode_pieces, pending)
        else:
            ids.set_result(self._encode_pieces(pending) if pending else [])
        return _Pending(element_lists, counts, pending, ids)

    def finish(self, job: _Pending) -> list[list[int]]:
        ids = dict(self.keep)
        ids.update(zip(job.pieces, job.ids.result()))
        if len(self.keep) < 4096:
            self.keep.update((piece, ids[piece]) for piece in job.pieces if job.counts[piece] > 1)
        out = []
        for elems in job.element_lists:
            tokens: list[int] = []
            for e in elems:
                if isinstance(e, str):
                    if e:
                        tokens += ids[e]
                else:
                    tokens.append(e)
            out.append(tokens)
        return out

    def encode(self, element_lists: list[list[Element]]) -> list[list[int]]:
        return self.finish(self.start(element_lists))


@dataclass
class _Pending:
    element_lists: list[list[Element]]
    counts: Counter
    pieces: list[str]  # the pieces sent to the tokenizer, in order
    ids: Future  # their token ids


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LF's truncation budget: keep the target when it is short, else the source when it is short, else split
    proportionally. Both sides keep their prefixes."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def greedy_knapsack(lengths: list[int], capacity: int) -> list[list[int]]:
    """LF's packing: sort ascending, fill each bin with the largest length that still fits (binary search)."""
    numbers = sorted(lengths)
    bins = []
    while numbers:
        current, remaining = [], capacity
        while True:
            index = bisect.bisect(numbers, remaining) - 1
            if index < 0:
                break
            remaining -= numbers[index]
            current.append(numbers.pop(index))
        bins.append(current)
    return bins


def shards(n: int, count: int) -> list[tuple[int, int]]:
    """(start, end) of `count` contiguous shards of n rows, as `datasets.Dataset.shard(contiguous=True)` cuts them
    for `map(num_proc=count)`: the first n % count shards get one row more."""
    div, mod = divmod(n, count)
    bounds, start = [], 0
    for index in range(count):
        end = start + div + (1 if index < mod else 0)
        bounds.append((start, end))
        start = end
    return bounds


# Worker processes come from a fork server, never from a fork of the caller: the caller has threads (the tokenize
# thread, pyarrow's and tokenizers' pools, a test runner's), and a child forked while one of them holds a lock can
# hang forever. Each worker gets the processor once (pickled: tokenizer, template, options) and its examples per task.
_WORKER: Any = None  # this worker process's Processor
_IN_WORKER = object()  # `locate` inside a worker: row errors go back to the caller, which knows the files


def _start_worker(processor: Processor) -> None:
    global _WORKER
    _WORKER = processor


def _process_shard(examples: list[Example]) -> tuple[dict[str, list], Health]:
    """One shard in a worker: a fresh copy of the processor's state, the shard's batches, its health."""
    _WORKER.health = Health()
    return _WORKER.process(examples, _IN_WORKER), _WORKER.health


def _process_batch(batch: list[Example]) -> tuple[dict[str, list], Health]:
    _WORKER.health = Health()
    out = _columns_of(_WORKER.stream([batch], _IN_WORKER))
    return out, _WORKER.health


def _worker_pool(processor: Processor, workers: int):
    import multiprocessing

    return multiprocessing.get_context("forkserver").Pool(workers, initializer=_start_worker, initargs=(processor,))


def _columns_of(outs: Iterable[dict[str, list]]) -> dict[str, list]:
    columns: dict[str, list] = defaultdict(list)
    for out in outs:
        for key, values in out.items():
            columns[key] += values
    return dict(columns)


def _bounded(batches: Iterable[list[Example]], slots) -> Iterator[list[Example]]:
    """The batches, handed to imap no faster than the consumer takes results (imap itself would read the whole
    stream into its task queue at once): `slots` is released once per result."""
    for batch in batches:
        slots.acquire()
        yield batch


class Processor:
    """Turns converted examples into feature columns for one stage."""

    def __init__(self, stage: Stage, template: Template, tokenizer, options: ProcessorOptions):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage}")
        if options.mask_history and options.train_on_prompt:
            raise DataError("mask_history and train_on_prompt cannot be used together")
        if stage != "sft" and (options.mask_history or options.train_on_prompt or options.neat_packing):
            raise DataError("mask_history, train_on_prompt and neat_packing only apply to the sft stage")
        if options.train_on_prompt and template.efficient_eos:
            raise DataError(f"template {template.name!r} (efficient_eos) does not support train_on_prompt")
        self.stage, self.template, self.tokenizer = stage, template, tokenizer
        self.opts = options.resolved(stage)
        if self.opts.cutoff_len < 1:
            raise DataError(f"cutoff_len must be at least {2 if self.opts.packing else 1}, got {options.cutoff_len}")
        self.batch = BatchTokenizer(tokenizer)
        self.health = Health()

    # -- driver --------------------------------------------------------------------------------------------------
    def process(self, examples: list[Example], locate=None, workers: int | None = None) -> dict[str, list]:
        """Process all examples in LF's map batches; returns LF's feature columns. `locate(example)` gives
        (file, row) for error messages. `workers` > 1: LF's `preprocessing_num_workers` (see `shards`)."""
        return _columns_of(self.batches(examples, locate, workers))

    def batches(self, examples: list[Example], locate=None, workers: int | None = None) -> Iterator[dict[str, list]]:
        """The feature columns of each batch, in order. While batch k is tokenized (worker thread), batch k+1 is
        rendered; then batch k is assembled while batch k+1 is tokenized. With `workers` > 1 the examples are cut
        into that many contiguous shards, batched within each shard (LF's `datasets.map(num_proc=N)`: the batch
        boundaries, hence pt blocks, sft packing and KTO pairs, depend on N) and the shards run in worker
        processes."""
        size = self.opts.preprocessing_batch_size
        if workers is not None and workers > 1 and len(examples) > 1:
            yield from self._sharded(examples, locate, min(workers, len(examples)))
            return
        yield from self.stream((examples[start:start + size] for start in range(0, len(examples), size)), locate)

    def stream(self, batches: Iterable[list[Example]], locate=None, workers: int | None = None
               ) -> Iterator[dict[str, list]]:
        """`batches` (lists of examples, e.g. read lazily from a corpus) -> their feature columns, in order. With
        `workers` > 1 the batches are processed in that many worker processes, a few at a time, in order: the
        batches are those of the stream (LF's streaming ignores num_proc too), so the output is the same."""
        if workers is not None and workers > 1:
            yield from self._parallel(batches, locate, workers)
            return
        key = "chosen_input_ids" if self.stage == "dpo" else "input_ids"
        in_flight: deque[tuple[Generator | dict, _Pending | None]] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
            try:
                for batch in batches:
                    self.health.rows_in += len(batch)
                    in_flight.append(self._start_batch(batch, pool))
                    while len(in_flight) > 1:
                        yield self._count(self._finish_batch(in_flight.popleft()), key)
                while in_flight:
                    yield self._count(self._finish_batch(in_flight.popleft()), key)
            except _LocatedRowError as err:
                if locate is _IN_WORKER:
                    raise
                raise err.located(locate) from None

    def _count(self, out: dict[str, list], key: str) -> dict[str, list]:
        self.health.examples_out += len(out.get(key, []))
        return out

    def _parallel(self, batches: Iterable[list[Example]], locate, workers: int) -> Iterator[dict[str, list]]:
        import threading

        slots = threading.Semaphore(4 * workers)  # batches read ahead of the results: memory stays flat
        with _worker_pool(self, workers) as pool:
            try:
                for columns, health in pool.imap(_process_batch, _bounded(batches, slots)):  # imap keeps the order
                    slots.release()
                    self.health.merge(health)
                    yield columns
            except _LocatedRowError as err:
                raise err.located(locate) from None

    def _sharded(self, examples: list[Example], locate, workers: int) -> Iterator[dict[str, list]]:
        with _worker_pool(self, workers) as pool:
            try:
                shards_of = (examples[start:end] for start, end in shards(len(examples), workers))
                for columns, health in pool.imap(_process_shard, shards_of):
                    self.health.merge(health)
                    yield columns
            except _LocatedRowError as err:
                raise err.located(locate) from None

    def _start_batch(self, batch: list[Example], pool: ThreadPoolExecutor) -> tuple[Generator | dict, _Pending | None]:
        work = getattr(self, f"_batch_{self.stage}")(batch)
        if not inspect.isgenerator(work):  # a stage that tokenizes in one synchronous call (pt)
            return work, None
        try:
            return work, self.batch.start(next(work), pool)
        except StopIteration as done:
            return done.value, None

    def _finish_batch(self, started: tuple[Generator | dict, _Pending | None]) -> dict[str, list]:
        work, job = started
        if job is None:
            return work
        try:
            work.send(self.batch.finish(job))
        except StopIteration as done:
            return done.value
        raise RuntimeError("a batch processor asked to tokenize twice")

    def _render(self, batch: list[Example], render) -> list[Any]:
        rendered = []
        for example in batch:
            try:
                rendered.append(render(example))
            except RowError as err:
                raise _LocatedRowError(err, example) from None
        return rendered

    def _usable(self, batch: list[Example]) -> list[Example]:
        """The examples of the batch LF's processor keeps; the others are counted by reason."""
        usable = []
        for example in batch:
            reason = row_issue(example, self.stage)
            if reason:
                self.health.dropped[reason] += 1
            else:
                if self.stage != "pt":
                    self._check_media(example)
                usable.append(example)
        return usable

    def _drop(self, example: Example, reason: str) -> None:
        self.health.dropped[reason] += 1

    def _check_media(self, example: Example) -> None:
        error = media_error(example, self.template.name)
        if error:
            raise _LocatedRowError(error, example)

    # -- pt ------------------------------------------------------------------------------------------------------
    def _batch_pt(self, batch: list[Example]) -> dict[str, list]:
        tok = self.tokenizer
        eos = "<|end_of_text|>" if self.template.name == "llama3" else tok.eos_token  # LF's literal llama3 case
        # LF crashes (IndexError) on a row without prompt; we count it as dropped
        texts = [example.prompt[0]["content"] + eos for example in self._usable(batch)]
        if not texts:
            return {}
        add_bos = bool(getattr(tok, "add_bos_token", False))
        cutoff = self.opts.cutoff_len
        if not self.opts.packing:
            if add_bos:
                texts = [tok.bos_token + text for text in texts]
            full = tok(texts, add_special_tokens=False)
            result: dict[str, list] = {k: [v[:cutoff] for v in values] for k, values in full.items()}
            for ids in full["input_ids"]:
                self.health.lengths.append(len(ids))
                if len(ids) > cutoff:
                    self.health.truncated += 1
                    self.health.lost_eos += 1
        else:
            encoded = tok(texts, add_special_tokens=False)
            self.health.lengths.extend(len(ids) for ids in encoded["input_ids"])
            result = {}
            for key, values in encoded.items():
                flat = [token for ids in values for token in ids]
                total = (len(flat) // cutoff) * cutoff  # LF drops the remainder of every batch
                result[key] = [flat[i : i + cutoff] for i in range(0, total, cutoff)]
            if add_bos:  # LF overwrites the first token of every block with BOS
                for block in result["input_ids"]:
                    block[0] = tok.bos_token_id
        pad = tok.pad_token_id
        # LF trains pt with DataCollatorForLanguageModeling: labels = input_ids with every pad id masked (which,
        # when pad == eos, masks the document separators too).
        result["labels"] = [[IGNORE_INDEX if t == pad else t for t in ids] for ids in result["input_ids"]]
        for ids, labels in zip(result["input_ids"], result["labels"]):
            self.health.tokens += len(ids)
            self.health.label_tokens += sum(1 for t in labels if t != IGNORE_INDEX)
        return result

    # -- sft -----------------------------------------------------------------------------------------------------
    def _encode_supervised(self, batch: list[Example]
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

    def _account(self, full_length: int, input_ids: list[int], labels: list[int], lost_eos: bool = False) -> None:
        h = self.health
        h.lengths.append(full_length)
        h.tokens += len(input_ids)
        trained = len(labels) - labels.count(IGNORE_INDEX)
        h.label_tokens += trained
        h.zero_label += trained == 0
        if full_length > len(input_ids):
            h.truncated += 1
            h.lost_eos += lost_eos

    def _batch_sft(self, batch: list[Example]) -> Generator[Any, Any, dict[str, list]]:
        encoded = yield from self._encode_supervised(batch)
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

    # -- dpo (pairwise) ------------------------------------------------------------------------------------------
    def _batch_dpo(self, batch: list[Example]) -> Generator[Any, Any, dict[str, list]]:
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

    # -- kto (feedback) ------------------------------------------------------------------------------------------
    def _batch_kto(self, batch: list[Example]) -> Generator[Any, Any, dict[str, list]]:
        # KL completions rotate by one row within the batch, computed before invalid rows are filtered (LF).
        responses = [e.response for e in batch]
        valid, kl_responses = [], []
        for i, example in enumerate(batch):
            if reason := row_issue(example, "kto"):
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

    # -- unsupervised --------------------------------------------------------------------------------------------
    def _batch_unsupervised(self, batch: list[Example]) -> Generator[Any, Any, dict[str, list]]:
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


def _kl_response(responses: list[list[dict]], i: int) -> list[dict]:
    """The KL completion for row i: LF takes row i-1's response (row 0 takes the last row). LF crashes with an
    IndexError when that row has no usable response (a broken row); we walk further back instead."""
    n = len(responses)
    for step in range(1, n + 1):
        candidate = responses[(i - step) % n]
        if len(candidate) >= 2 or (len(candidate) == 1 and candidate[0]["content"]):
            return candidate
    return responses[i]


class _LocatedRowError(Exception):
    def __init__(self, error: RowError, example: Example):
        super().__init__(error, example)  # the args pickle it back from a worker process
        self.error, self.example = error, example

    def located(self, locate) -> Exception:
        """The user's error: dataset, file and row (`locate(example)`; without it, the row in the dataset)."""
        file, row = locate(self.example) if locate else (None, self.example.position)
        return self.error.located(dataset=self.example.dataset or None, file=file, row=row)
