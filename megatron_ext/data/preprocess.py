"""C4-scale JSON-lines → megatron-core indexed datasets, one output per input shard, then a merge.

Each input file is a shard, processed start to finish by one worker process: a reader thread
decompresses and parses the next batch while the tokenizer encodes the current one on native
threads (the GIL is released), so parsing overlaps tokenization. With fewer shards than
``--workers`` each process gets several tokenizer threads. Memory is bounded by a few batches
per process whatever the input size. Shard outputs are written atomically; a complete shard is
skipped on re-run, so a crashed or preempted job resumes where it stopped. Shards can also be
spread over machines (``shard_index``/``num_shards``) and merged afterwards.
"""

from __future__ import annotations

import glob
import itertools
import logging
import multiprocessing as mp
import os
import queue
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_ext.data.dataset_info import DatasetInfo, merged_info, tokenizer_fingerprint
from megatron_ext.data.indexed_writer import (
    IndexedDatasetWriter,
    is_complete,
    merge_datasets,
    token_dtype,
)
from megatron_ext.data.jsonl_reader import InputError, RecordReader
from megatron_ext.data.tokenizers import Tokenizer, TokenizerError, build_tokenizer

logger = logging.getLogger(__name__)

INPUT_SUFFIXES = (
    ".json.gz",
    ".jsonl.gz",
    ".json",
    ".jsonl",
    ".json.zst",
    ".jsonl.zst",
    ".zst",
    ".gz",
)


class PreprocessError(RuntimeError):
    """The run cannot proceed or did not finish; the message says which file or flag."""


@dataclass
class PreprocessConfig:
    inputs: Sequence[str]
    output_prefix: Optional[str]
    tokenizer_type: str
    tokenizer_model: str
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    eod_id: Optional[int] = None
    workers: int = 1
    strict: bool = False
    stats_only: bool = False
    merge: bool = True
    merge_only: bool = False
    shard_index: int = 0
    num_shards: int = 1
    batch_docs: int = 1024
    progress: bool = True


@dataclass
class Shard:
    path: str
    name: str
    size: int


@dataclass
class ShardResult:
    name: str
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards_done: int = 0
    shards_resumed: int = 0
    failed: list = field(default_factory=list)
    seconds: float = 0.0
    input_bytes: int = 0
    merged: list = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.documents / self.seconds if self.seconds else 0.0
        out = [
            f"documents {self.documents:,}  tokens {self.tokens:,}  in {self.seconds:.1f} s "
            f"({rate:,.0f} docs/s, {self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s, "
            f"{self.input_bytes / 1e6 / max(self.seconds, 1e-9):.1f} MB/s)",
            f"shards: {self.shards_done} processed, {self.shards_resumed} already complete, "
            f"{len(self.failed)} failed",
        ]
        skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped.items())) or "none"
        out.append(f"skipped records: {skipped}")
        out += [f"merged dataset: {p}.bin/.idx" for p in self.merged]
        out += [f"FAILED {name}: {err}" for name, err in self.failed]
        return out


# --- planning ----------------------------------------------------------------------------------


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, globs and directories → sorted, de-duplicated input files (argument order kept)."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(item)
                for f in names
                if f.endswith(INPUT_SUFFIXES)
            )
        elif any(ch in item for ch in "*?["):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(item):
            found = [item]
        else:
            raise PreprocessError(f"--input: {item} does not exist")
        if not found:
            raise PreprocessError(
                f"--input: {item} matches no input files ({', '.join(INPUT_SUFFIXES)})"
            )
        files.extend(found)
    seen: set = set()
    return [f for f in files if not (os.path.abspath(f) in seen or seen.add(os.path.abspath(f)))]


def shard_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in INPUT_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)


def plan_shards(files: Sequence[str]) -> list[Shard]:
    shards, names = [], {}
    for path in files:
        name = shard_name(path)
        if name in names:
            raise PreprocessError(
                f"--input: {path} and {names[name]} would write the same shard output {name!r}; "
                "rename one of them"
            )
        names[name] = path
        shards.append(Shard(path, name, os.path.getsize(path)))
    return shards


def shard_prefix(output_prefix: str, shard: str, key: str) -> str:
    return os.path.join(f"{output_prefix}_shards", f"{shard}_{key}_document")


def merged_prefix(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


# --- worker ------------------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(cfg: PreprocessConfig, threads: int, counters) -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    _worker.update(
        cfg=cfg,
        threads=threads,
        counters=counters,
        tokenizer=build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.eod_id),
        fingerprint=tokenizer_fingerprint(cfg.tokenizer_model),
    )


def _flatten(tokenizer: Tokenizer, ids: list, append_eod: bool, dtype):
    """Per-document token lists → one flat array and the lengths (EOD appended when asked)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    if append_eod:
        lengths += 1
        flat = itertools.chain.from_iterable(itertools.chain(d, (tokenizer.eod,)) for d in ids)
    else:
        flat = itertools.chain.from_iterable(ids)
    return np.fromiter(flat, dtype=dtype, count=int(lengths.sum())), lengths


def _start_consumer(target, inbox: queue.Queue) -> threading.Thread:
    """A thread applying ``target`` to each item of ``inbox`` until ``None``.

    Its first error is kept in ``thread.errors``; after an error it keeps draining the queue so
    that the producer never blocks on a full queue, and the producer raises it after join()."""
    errors: list = []

    def loop():
        try:
            while (item := inbox.get()) is not None:
                target(item)
        except BaseException as err:
            errors.append(err)
            while inbox.get() is not None:
                pass

    thread = threading.Thread(target=loop, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def process_shard(shard: Shard) -> ShardResult:
    """Three overlapping stages: read+parse (thread) → tokenize (native threads, GIL released)
    → flatten+write (thread). Memory: at most a few batches in flight."""
    cfg: PreprocessConfig = _worker["cfg"]
    tokenizer: Tokenizer = _worker["tokenizer"]
    threads = _worker["threads"]
    bytes_done, docs_done, tokens_done = _worker["counters"]
    dtype = token_dtype(tokenizer.vocab_size)
    result = ShardResult(shard.name)
    start = time.perf_counter()
    writers = (
        {}
        if cfg.stats_only
        else {
            key: IndexedDatasetWriter(shard_prefix(cfg.output_prefix, shard.name, key), dtype)
            for key in cfg.json_keys
        }
    )
    reader = RecordReader(shard.path, cfg.json_keys, cfg.strict)
    parsed: queue.Queue = queue.Queue(maxsize=4)
    encoded: queue.Queue = queue.Queue(maxsize=2)
    position = [0]
    per_key = {key: {"documents": 0, "tokens": 0, "max_token_id": -1} for key in cfg.json_keys}

    def write(item):
        key_ids, offset = item
        for key, ids in zip(cfg.json_keys, key_ids, strict=True):
            tokens, lengths = _flatten(tokenizer, ids, cfg.append_eod, dtype)
            if writers:
                writers[key].add_documents(tokens, lengths)
            stats = per_key[key]
            stats["documents"] += len(lengths)
            stats["tokens"] += len(tokens)
            if len(tokens):
                stats["max_token_id"] = max(stats["max_token_id"], int(tokens.max()))
            if key == cfg.json_keys[0]:
                result.documents += len(lengths)
                with docs_done.get_lock():
                    docs_done.value += len(lengths)
            result.tokens += len(tokens)
            with tokens_done.get_lock():
                tokens_done.value += len(tokens)
        with bytes_done.get_lock():
            bytes_done.value += offset - position[0]
        position[0] = offset

    writer_thread = _start_consumer(write, encoded)
    reader_thread = threading.Thread(
        target=_read_into, args=(reader, parsed, cfg.batch_docs), daemon=True
    )
    reader_thread.start()
    try:
        while (item := parsed.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            batch, offset = item
            encoded.put(([tokenizer.encode_batch(texts, threads) for texts in batch], offset))
        encoded.put(None)
        writer_thread.join()
        if writer_thread.errors:
            raise writer_thread.errors[0]
        for key, writer in writers.items():
            writer.finalize()
            _describe(tokenizer, _worker["fingerprint"], per_key[key]).write(writer.prefix)
    except (InputError, OSError) as err:
        _abort(writers, encoded, writer_thread, parsed, reader_thread)
        result.error = str(err)
    except BaseException:
        _abort(writers, encoded, writer_thread, parsed, reader_thread)
        raise
    with bytes_done.get_lock():
        bytes_done.value += shard.size - position[0]  # count the whole file once it is finished
    result.skipped = reader.stats.skipped
    result.examples = [str(s) for s in reader.stats.examples]
    result.seconds = time.perf_counter() - start
    return result


def _describe(tokenizer: Tokenizer, fingerprint: str, stats: dict) -> DatasetInfo:
    from megatron_ext import __version__

    return DatasetInfo(
        tokenizer_type=tokenizer.kind,
        tokenizer_fingerprint=fingerprint,
        vocab_size=tokenizer.vocab_size,
        eod_id=tokenizer.eod,
        tool_version=__version__,
        **stats,
    )


def _read_into(reader: RecordReader, out: queue.Queue, batch_docs: int) -> None:
    try:
        for batch in reader.batches(max_docs=batch_docs):
            out.put((batch, reader.bytes_read()))
        out.put(None)
    except BaseException as err:  # handed to the tokenizing thread, which re-raises it
        out.put(err)


def _abort(writers, encoded, writer_thread, parsed, reader_thread) -> None:
    _stop(encoded, writer_thread)
    while reader_thread.is_alive():  # unblock the reader, which may wait on a full queue
        try:
            parsed.get(timeout=0.1)
        except queue.Empty:
            pass
    for writer in writers.values():
        writer.abort()


def _stop(inbox: queue.Queue, thread: threading.Thread) -> None:
    """Ask a pipeline thread to finish and wait for it (dropping what it still holds)."""
    while thread.is_alive():
        try:
            inbox.put(None, timeout=0.1)
        except queue.Full:
            try:
                inbox.get_nowait()
            except queue.Empty:
                pass
        thread.join(timeout=0.1)


# --- driver ------------------------------------------------------------------------------------


def _validate(cfg: PreprocessConfig) -> Tokenizer:
    if cfg.workers < 1:
        raise PreprocessError(f"--workers: must be ≥ 1, got {cfg.workers}")
    if not cfg.stats_only and not cfg.output_prefix:
        raise PreprocessError("--output-prefix is required (or pass --stats)")
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise PreprocessError(
            f"--shard-index: must be in [0, {cfg.num_shards}), got {cfg.shard_index}"
        )
    try:
        tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.eod_id)
    except TokenizerError as err:
        raise PreprocessError(str(err)) from err
    if cfg.append_eod and tokenizer.eod is None:
        raise PreprocessError(
            f"--append-eod: the tokenizer {cfg.tokenizer_model} has no end-of-document token; "
            "pass --eod-id N"
        )
    return tokenizer


def _progress_bar(total_bytes: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="preprocess",
        file=sys.stderr,
        smoothing=0.1,
        dynamic_ncols=True,
    )


def run_preprocess(cfg: PreprocessConfig) -> Summary:
    """Preprocess ``cfg.inputs``; returns the summary (raises PreprocessError on bad setup)."""
    start = time.perf_counter()
    _validate(cfg)
    shards = plan_shards(expand_inputs(cfg.inputs))
    summary = Summary()
    if cfg.merge_only:
        return _merge(cfg, shards, summary, start)
    mine = [s for i, s in enumerate(shards) if i % cfg.num_shards == cfg.shard_index]
    pending = []
    for shard in mine:
        done = not cfg.stats_only and all(
            is_complete(shard_prefix(cfg.output_prefix, shard.name, k)) for k in cfg.json_keys
        )
        if done:
            summary.shards_resumed += 1
        else:
            pending.append(shard)
    if summary.shards_resumed:
        logger.info("%d shard(s) already complete; skipping them", summary.shards_resumed)
    summary.input_bytes = sum(s.size for s in pending)
    _run_pool(cfg, pending, summary)
    summary.seconds = time.perf_counter() - start
    if summary.failed or cfg.stats_only or not cfg.merge or cfg.num_shards > 1:
        return summary
    return _merge(cfg, shards, summary, start)


def _run_pool(cfg: PreprocessConfig, pending: list, summary: Summary) -> None:
    if not pending:
        return
    processes = min(cfg.workers, len(pending))
    threads = max(1, cfg.workers // processes)
    ctx = mp.get_context("spawn")
    counters = (ctx.Value("q", 0), ctx.Value("q", 0), ctx.Value("q", 0))
    bar = _progress_bar(summary.input_bytes, cfg.progress)
    # Largest shards first: the pool's tail is then made of short tasks.
    order = sorted(pending, key=lambda s: -s.size)
    with ProcessPoolExecutor(
        processes, mp_context=ctx, initializer=_init_worker, initargs=(cfg, threads, counters)
    ) as pool:
        futures = {pool.submit(process_shard, s): s for s in order}
        remaining = set(futures)
        while remaining:
            finished = [f for f in remaining if f.done()]
            for future in finished:
                remaining.discard(future)
                _collect(future.result(), summary)
            if bar is not None:
                bar.n = min(counters[0].value, summary.input_bytes)
                elapsed = max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(
                    f"{counters[1].value / elapsed:,.0f} docs/s, "
                    f"{counters[2].value / elapsed:,.0f} tok/s",
                    refresh=False,
                )
                bar.refresh()
            if remaining:
                wait(remaining, timeout=0.5, return_when=FIRST_COMPLETED)
    if bar is not None:
        bar.n = summary.input_bytes
        bar.close()


def _collect(result: ShardResult, summary: Summary) -> None:
    for example in result.examples:
        logger.warning(example)
    summary.skipped.update(result.skipped)
    if result.error:
        summary.failed.append((result.name, result.error))
        logger.error("shard %s failed: %s", result.name, result.error)
        return
    summary.shards_done += 1
    summary.documents += result.documents
    summary.tokens += result.tokens


def _merge(cfg: PreprocessConfig, shards: list, summary: Summary, start: float) -> Summary:
    for key in cfg.json_keys:
        prefixes = [shard_prefix(cfg.output_prefix, s.name, key) for s in shards]
        missing = [p for p in prefixes if not is_complete(p)]
        if missing:
            raise PreprocessError(
                f"cannot merge: {len(missing)} shard output(s) missing or incomplete, e.g. "
                f"{missing[0]}.bin/.idx; rerun preprocessing for them"
            )
        out = merged_prefix(cfg.output_prefix, key)
        merge_datasets(prefixes, out)
        infos = [DatasetInfo.read(p) for p in prefixes]
        if all(infos):  # shards made before sidecars existed leave the merged one without
            merged_info(infos).write(out)
        summary.merged.append(out)
    summary.seconds = time.perf_counter() - start
    return summary
