"""Supervised fine-tuning data: instruction records → token ids with a per-token loss mask.

Inputs: Commonsense170K's one JSON array (records with ``instruction``, ``input``, ``output``,
``answer``), JSON lines of the same fields, or chat records (``messages``: ``role`` and
``content``). An instruction record is rendered with the Alpaca template (the ``### Input:``
branch when ``input`` is non-empty), as the code that built Commonsense170K did; a chat record
with a plain role-tagged template. The loss mask is 1 on the response (assistant turns) and the
closing EOD, 0 on the prompt; ``loss_on_prompt`` makes it 1 everywhere (the paper's recipe).

The output is two megatron-core indexed datasets with the same document boundaries: the tokens
at ``PREFIX`` and the mask (uint8) at ``PREFIX.loss_mask``, plus the tokenizer sidecar. One
example is one sample at training time (``--data-mode sft``): no example shares a sequence, so
its per-token losses are those it would have alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from megatron_ext.data.dataset_info import DatasetInfo, tokenizer_fingerprint
from megatron_ext.data.indexed_writer import IndexedDatasetWriter, token_dtype

MASK_SUFFIX = ".loss_mask"

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
CHAT_ROLES = ("system", "user", "assistant")
LongExamples = Literal["truncate", "drop"]


class SFTDataError(ValueError):
    """A record cannot be used; the message names the file, the record's index and the field."""


def mask_prefix(prefix: str) -> str:
    return prefix + MASK_SUFFIX


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt up to and including ``### Response:\\n``; the response follows it."""
    if input_text:
        return (
            f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
            f"### Input:\n{input_text}\n\n### Response:\n"
        )
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Example:
    """An example as text segments, each trained on (response) or not (prompt)."""

    segments: tuple  # ((text, trained), ...)


def read_records(path: str) -> list:
    """The records of ``path``: one JSON array, or JSON lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as err:
            raise SFTDataError(f"{path}: not a valid JSON array ({err})") from err
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise SFTDataError(f"{path}: line {number} is not JSON ({err})") from err
    return records


def _string(record, key: str, where: str, *, required: bool = True) -> str:
    if key not in record:
        if required:
            raise SFTDataError(f"{where}: field {key!r} is missing")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise SFTDataError(f"{where}: field {key!r} holds {type(value).__name__}, not a string")
    return value


def to_example(record, where: str) -> Example:
    """An instruction record (Alpaca template) or a chat record (``messages``)."""
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        return _chat_example(record["messages"], where)
    prompt = alpaca_prompt(
        _string(record, "instruction", where), _string(record, "input", where, required=False)
    )
    return Example(((prompt, False), (_string(record, "output", where), True)))


def _chat_example(messages, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: field 'messages' must be a non-empty list")
    segments = []
    for i, message in enumerate(messages):
        here = f"{where}, message {i}"
        if not isinstance(message, dict):
            raise SFTDataError(f"{here}: a message must be a JSON object")
        role = _string(message, "role", here)
        if role not in CHAT_ROLES:
            raise SFTDataError(f"{here}: field 'role' is {role!r}; use one of {CHAT_ROLES}")
        content = _string(message, "content", here)
        header = f"### {role.capitalize()}:\n"
        if role == "assistant":
            segments += [(header, False), (content + "\n\n", True)]
        else:
            segments.append((header + content + "\n\n", False))
    if not any(trained for _, trained in segments):
        raise SFTDataError(f"{where}: no assistant message, so nothing to train on")
    return Example(tuple(segments))


def tokenize(tokenizer, example: Example, *, loss_on_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """(token ids with EOD, loss mask). The text is tokenized whole, as the reference does, and
    each segment boundary found by tokenizing the text up to it; where a boundary's tokens are
    not a prefix of the whole's (a merge across it), the segments are tokenized one by one."""
    texts = [text for text, _ in example.segments]
    prefixes = ["".join(texts[: k + 1]) for k in range(len(texts))]
    encoded = tokenizer.encode_batch(prefixes)
    whole = encoded[-1]
    if all(whole[: len(e)] == e for e in encoded[:-1]):
        bounds = [len(e) for e in encoded]
        ids = list(whole)
    else:
        pieces = tokenizer.encode_batch(texts)
        ids = [t for p in pieces for t in p]
        bounds = np.cumsum([len(p) for p in pieces]).tolist()
    mask = np.zeros(len(ids) + 1, dtype=np.uint8)
    start = 0
    for (_, trained), end in zip(example.segments, bounds, strict=True):
        mask[start:end] = 1 if (trained or loss_on_prompt) else 0
        start = end
    mask[-1] = 1  # the EOD closes the response: the model learns to stop
    return np.asarray([*ids, tokenizer.eod], dtype=np.int64), mask


@dataclass
class SFTSummary:
    output_prefix: str
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_no_response: int = 0  # the prompt alone fills the sequence
    inputs: list = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"{self.output_prefix}: {self.examples:,} examples, {self.tokens:,} tokens "
            f"({self.trained_tokens:,} with loss, {self.trained_tokens / max(self.tokens, 1):.1%})",
            f"longer than the sequence: {self.truncated:,} truncated, {self.dropped_long:,} "
            f"dropped; no response token within the sequence: {self.dropped_no_response:,} "
            "dropped",
        ]


def examples_of(paths: Sequence[str]) -> Iterator[Example]:
    """Every example of every file, validated (an error names the file, record and field)."""
    for path in paths:
        for index, record in enumerate(read_records(path)):
            yield to_example(record, f"{path}: record {index}")


def write_sft_dataset(
    paths: Sequence[str],
    tokenizer,
    output_prefix: str,
    *,
    seq_length: Optional[int] = None,
    long_examples: LongExamples = "truncate",
    loss_on_prompt: bool = False,
    tool_version: str = "preprocess_sft",
) -> SFTSummary:
    """Tokenize every record into ``output_prefix`` (+ ``.loss_mask``). All records are checked
    before anything is written, so a bad record leaves no output."""
    examples = list(examples_of(paths))
    if tokenizer.eod is None:
        raise SFTDataError(f"--tokenizer-model: {tokenizer.path} has no end-of-document token")
    summary = SFTSummary(output_prefix, inputs=list(paths))
    dtype = token_dtype(tokenizer.vocab_size)
    tokens_out = IndexedDatasetWriter(output_prefix, dtype)
    masks_out = IndexedDatasetWriter(mask_prefix(output_prefix), np.uint8)
    max_id = -1
    try:
        for example in examples:
            ids, mask = tokenize(tokenizer, example, loss_on_prompt=loss_on_prompt)
            if seq_length is not None and len(ids) > seq_length + 1:
                if long_examples == "drop":
                    summary.dropped_long += 1
                    continue
                summary.truncated += 1
                ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
            if not mask[1:].any():
                summary.dropped_no_response += 1
                continue
            length = np.array([len(ids)], dtype=np.int32)
            tokens_out.add_documents(ids, length)
            masks_out.add_documents(mask, length)
            summary.examples += 1
            summary.tokens += len(ids)
            summary.trained_tokens += int(mask[1:].sum())
            max_id = max(max_id, int(ids.max()))
        masks_out.finalize()
        tokens_out.finalize()
    except BaseException:
        tokens_out.abort()
        masks_out.abort()
        raise
    DatasetInfo(
        tokenizer.kind,
        tokenizer_fingerprint(tokenizer.path),
        tokenizer.vocab_size,
        tokenizer.eod,
        max_id,
        summary.examples,
        summary.tokens,
        tool_version,
    ).write(output_prefix)
    return summary


def mask_exists(prefix: str) -> bool:
    from megatron_ext.data.indexed_writer import bin_path, idx_path

    return all(os.path.isfile(p(mask_prefix(prefix))) for p in (bin_path, idx_path))
