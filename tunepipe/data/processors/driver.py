"""The driver every stage's processor runs on: LF's `datasets.map` batches, the tokenize thread, worker processes.

LF works on `datasets.map` batches of `preprocessing_batch_size` rows and that is observable (pt packing drops the
remainder of each batch, sft packing packs within a batch, the KTO KL pairing rotates within a batch), so we keep the
same batches. Inside a batch we are faster: every message is rendered first, then all distinct text pieces of the
batch are tokenized in one call to the (Rust) tokenizer instead of one Python call per piece. Each piece is still
tokenized on its own, as LF does, so the ids are identical. Across batches we overlap: the Rust call releases the
GIL, so it runs in a background thread while the next batch is rendered and the previous one assembled in Python.

A stage's `process_batch` is written as one readable function: it renders, hands the element lists to the driver
with `flat = yield element_lists`, and assembles the columns from the token ids it gets back (`return columns`).
"""

from __future__ import annotations

import inspect
from collections import Counter, defaultdict, deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunepipe.data.converters import Example
from tunepipe.data.processors.processor_utils import (IGNORE_INDEX, Health, ProcessorOptions, media_error,
                                                      row_issue)
from tunepipe.errors import DataError, RowError

if TYPE_CHECKING:
    from tunepipe.data.templates import Element, Template


class BatchTokenizer:
    """Tokenize many text pieces in one call; each piece on its own (`add_special_tokens=False`), as LF's
    `tokenizer.encode(piece)` does. Pieces that repeat (system prompts, template constants) are tokenized once.

    For fast tokenizers the backend (`tokenizer.backend_tokenizer`, a `tokenizers.Tokenizer`) encodes with its
    public `encode_batch_fast`: it skips offset tracking and the per-encoding Python conversion, which is most of
    the cost besides the tokenization itself. The first batch is also encoded through the regular `tokenizer(...)`
    call and compared piece by piece; any difference (a tokenizer class that adds Python-side processing) switches
    the fast path off for good (tests/data/test_processors.py pins the two against each other; the gain:
    bench/preprocess.py --encode).

    `start()` may hand the Rust call to a worker thread and `finish()` collects it: between the two the caller is
    free to do Python work. Only `start`/`finish` touch the piece cache, and both run on the caller's thread.
    """

    def __init__(self, tokenizer, fast: bool = True):
        self.tokenizer = tokenizer
        self.keep: dict[str, list[int]] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self.backend = backend if fast and hasattr(backend, "encode_batch_fast") else None
        self.fast = self.backend is not None
        self.verified = False

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        if not self.fast:
            return self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
        fast = [e.ids for e in self.backend.encode_batch_fast(pieces, add_special_tokens=False)]
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
_WORKER: Any = None  # this worker process's DatasetProcessor
_IN_WORKER = object()  # `locate` inside a worker: row errors go back to the caller, which knows the files


def _start_worker(processor: DatasetProcessor) -> None:
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


def _worker_pool(processor: DatasetProcessor, workers: int):
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


class DatasetProcessor:
    """Turns converted examples into feature columns for one stage: a subclass per stage (LF's DatasetProcessor)
    implements `process_batch`, this class drives the batches."""

    stage: str  # LF's stage name: pt | sft | dpo | kto | unsupervised
    count_column = "input_ids"  # one value per example written (health.examples_out)

    def __init__(self, template: Template, tokenizer, options: ProcessorOptions):
        stage = self.stage
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
        key = self.count_column
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
        work = self.process_batch(batch)
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

    def process_batch(self, batch: list[Example]) -> Generator[Any, Any, dict[str, list]] | dict[str, list]:
        """One batch's feature columns. A generator renders, yields the element lists to tokenize
        (`flat = yield element_lists`) and returns the columns assembled from their ids; a plain function (pt)
        tokenizes in one synchronous call and returns the columns."""
        raise NotImplementedError

    # -- shared by the stages -----------------------------------------------------------------------------------
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


class _LocatedRowError(Exception):
    def __init__(self, error: RowError, example: Example):
        super().__init__(error, example)  # the args pickle it back from a worker process
        self.error, self.example = error, example

    def located(self, locate) -> Exception:
        """The user's error: dataset, file and row (`locate(example)`; without it, the row in the dataset)."""
        file, row = locate(self.example) if locate else (None, self.example.position)
        return self.error.located(dataset=self.example.dataset or None, file=file, row=row)
