"""Supervised fine-tuning data: instruction records → token ids with a per-token loss mask.

Inputs: Commonsense170K's one JSON array (records with ``instruction``, ``input``, ``output``,
``answer``), JSON lines of the same fields, chat records (``messages``: ``role`` and
``content``), and LMFlow's dataset files (``{"type": "text_only", "instances": [{"text": …}]}``,
trained on every token, and ``{"type": "text2text", "instances": [{"input": …, "output": …}]}``,
the input a prompt). An instruction record is rendered with a named template (``TEMPLATES``):
``alpaca``, the Alpaca prompt as written, or ``llm-adapters``, the prompt exactly as the code
that built Commonsense170K writes it (16 spaces of indentation inside it and trailing spaces
after the header, from an indented triple-quoted f-string). A chat record gets a plain
role-tagged template. The loss mask is 1 on the response (assistant turns) and the closing EOD,
0 on the prompt; ``loss_on_prompt`` makes it 1 everywhere (the paper's recipe).

The output is two megatron-core indexed datasets with the same document boundaries: the tokens
at ``PREFIX`` and the mask (uint8) at ``PREFIX.loss_mask``, plus the tokenizer sidecar. One
document is one sample at training time (``--data-mode sft``), right-padded: either one example
(no example shares a sequence, so its per-token losses are those it would have alone) or, with
``pack``, one block of ``seq_length`` tokens cut from the examples concatenated, as LMFlow's
"group texts" does (see :func:`pack_blocks`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
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
LMFLOW_TYPES = ("text_only", "text2text")
#: LMFlow's group_texts_batch_size: examples concatenated at a time; each group's tail that
#: does not fill a block is dropped
PACK_GROUP = 1000


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


_INDENT = " " * 16  # LLM-Adapters' generate_prompt: its f-string lines are indented 16 spaces


def llm_adapters_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt as LLM-Adapters' finetune.py (which built Commonsense170K) renders it, up to
    the response: the header ends in one space (with input) or two (without), every following
    line, blank ones included, starts with 16 spaces, and so does the response."""
    lines = [f"### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"]
    if input_text:
        header = ALPACA_HEADER_WITH_INPUT + " "
        lines.append(f"{_INDENT}### Input:\n{_INDENT}{input_text}\n{_INDENT}\n")
    else:
        header = ALPACA_HEADER + "  "
    return f"{header}\n\n{_INDENT}" + "".join(lines) + f"{_INDENT}### Response:\n{_INDENT}"


TEMPLATES = {"alpaca": alpaca_prompt, "llm-adapters": llm_adapters_prompt}
Template = Literal["alpaca", "llm-adapters"]


@dataclass(frozen=True)
class Example:
    """An example as text segments, each trained on (response) or not (prompt)."""

    segments: tuple  # ((text, trained), ...)


def read_records(path: str) -> tuple[list, str]:
    """The records of ``path`` and what to call one in a message: one JSON array (``record``),
    an LMFlow dataset object (``instance``), or JSON lines (``record``; one line included)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        value = json.loads(text)
    except ValueError as err:
        if text.lstrip().startswith("["):
            raise SFTDataError(f"{path}: not a valid JSON array ({err})") from err
        value = None  # JSON lines
    if isinstance(value, list):
        return value, "record"
    if isinstance(value, dict) and ("instances" in value or "type" in value):
        return _lmflow_instances(value, path), "instance"
    if value is not None:
        return [value], "record"  # one JSON line
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise SFTDataError(f"{path}: line {number} is not JSON ({err})") from err
    return records, "record"


def _lmflow_instances(value, path: str) -> list:
    """LMFlow's ``{"type": …, "instances": […]}``, each instance tagged with the type."""
    kind = value.get("type")
    if kind not in LMFLOW_TYPES:
        raise SFTDataError(
            f"{path}: LMFlow dataset type {kind!r} is not supported; use one of {LMFLOW_TYPES}"
        )
    instances = value.get("instances")
    if not isinstance(instances, list):
        raise SFTDataError(f'{path}: "instances" must be a list')
    return [{"__lmflow__": kind, "instance": x} for x in instances]


def _string(record, key: str, where: str, *, required: bool = True) -> str:
    if key not in record:
        if required:
            raise SFTDataError(f"{where}: field {key!r} is missing")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise SFTDataError(f"{where}: field {key!r} holds {type(value).__name__}, not a string")
    return value


def to_example(record, where: str, template: Template = "alpaca") -> Example:
    """An instruction record (rendered with ``template``), a chat record (``messages``) or an
    LMFlow instance (``text_only``: trained on every token; ``text2text``: input as prompt)."""
    if isinstance(record, dict) and "__lmflow__" in record:
        return _lmflow_example(record["__lmflow__"], record["instance"], where)
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        return _chat_example(record["messages"], where)
    prompt = TEMPLATES[template](
        _string(record, "instruction", where), _string(record, "input", where, required=False)
    )
    return Example(((prompt, False), (_string(record, "output", where), True)))


def _lmflow_example(kind: str, instance, where: str) -> Example:
    if not isinstance(instance, dict):
        raise SFTDataError(
            f"{where}: an instance must be a JSON object, not {type(instance).__name__}"
        )
    if kind == "text_only":
        return Example(((_string(instance, "text", where), True),))
    return Example(((_string(instance, "input", where), False),
                    (_string(instance, "output", where), True)))  # fmt: skip


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
    examples: int = 0  # examples written (packed: examples read into blocks)
    tokens: int = 0  # tokens written
    trained_tokens: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_no_response: int = 0  # the prompt alone fills the sequence
    blocks: Optional[int] = None  # packed: blocks written
    remainder_tokens: int = 0  # packed: tokens of each group's tail that filled no block
    inputs: list = field(default_factory=list)

    def nothing_kept(self) -> str:
        where = ", ".join(self.inputs)
        if self.blocks is not None and self.examples:
            return (
                f"{where}: the {self.examples:,} examples hold {self.remainder_tokens:,} tokens, "
                "not enough for one block of --seq-length per group of "
                f"{PACK_GROUP} examples; nothing was written: use a shorter --seq-length"
            )
        read = self.dropped_long + self.dropped_no_response
        if read == 0:
            return f"{where}: holds no records; nothing was written"
        return (
            f"{where}: none of the {read:,} examples was kept "
            f"({self.dropped_long:,} longer than --seq-length and --long-examples drop, "
            f"{self.dropped_no_response:,} with no response token within --seq-length); nothing "
            "was written: give a longer --seq-length, or --long-examples truncate"
        )

    def lines(self) -> list[str]:
        share = f"{self.trained_tokens / max(self.tokens, 1):.1%}"
        if self.blocks is not None:
            return [
                f"{self.output_prefix}: {self.examples:,} examples packed into {self.blocks:,} "
                f"blocks, {self.tokens:,} tokens ({self.trained_tokens:,} with loss, {share})",
                f"dropped: {self.remainder_tokens:,} tokens, the tails of the groups of "
                f"{PACK_GROUP} examples that filled no block (as LMFlow's group texts)",
            ]
        return [
            f"{self.output_prefix}: {self.examples:,} examples, {self.tokens:,} tokens "
            f"({self.trained_tokens:,} with loss, {share})",
            f"longer than the sequence: {self.truncated:,} truncated, {self.dropped_long:,} "
            f"dropped; no response token within the sequence: {self.dropped_no_response:,} "
            "dropped",
        ]


def examples_of(paths: Sequence[str], template: Template = "alpaca") -> Iterator[Example]:
    """Every example of every file, validated (an error names the file, record and field)."""
    for path in paths:
        records, noun = read_records(path)
        for index, record in enumerate(records):
            yield to_example(record, f"{path}: {noun} {index}", template)


def pack_blocks(
    tokenized: Iterable[tuple[np.ndarray, np.ndarray]],
    block: int,
    summary: SFTSummary,
    group: int = PACK_GROUP,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """LMFlow's "group texts": ``group`` tokenized examples at a time are concatenated and cut
    into blocks of ``block`` tokens; the tail of each group that does not fill a block is
    dropped (a group with fewer tokens than a block gives none). Counts into ``summary``."""
    pending: list = []

    def cut():
        ids = np.concatenate([i for i, _ in pending])
        mask = np.concatenate([m for _, m in pending])
        pending.clear()
        full = len(ids) // block * block
        summary.remainder_tokens += len(ids) - full
        for start in range(0, full, block):
            yield ids[start : start + block], mask[start : start + block]

    for item in tokenized:
        pending.append(item)
        summary.examples += 1
        if len(pending) == group:
            yield from cut()
    if pending:
        yield from cut()


def _cut_examples(
    tokenized: Iterable[tuple[np.ndarray, np.ndarray]],
    seq_length: Optional[int],
    long_examples: LongExamples,
    summary: SFTSummary,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One example per document: cut (or dropped) to ``seq_length + 1`` tokens, and dropped
    when no token with loss is left."""
    for ids, mask in tokenized:
        if seq_length is not None and len(ids) > seq_length + 1:
            if long_examples == "drop":
                summary.dropped_long += 1
                continue
            summary.truncated += 1
            ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
        if not mask[1:].any():
            summary.dropped_no_response += 1
            continue
        summary.examples += 1
        yield ids, mask


def write_sft_dataset(
    paths: Sequence[str],
    tokenizer,
    output_prefix: str,
    *,
    seq_length: Optional[int] = None,
    long_examples: LongExamples = "truncate",
    loss_on_prompt: bool = False,
    template: Template = "alpaca",
    pack: bool = False,
    tool_version: str = "preprocess_sft",
) -> SFTSummary:
    """Tokenize every record into ``output_prefix`` (+ ``.loss_mask``): one example per
    document, or with ``pack`` blocks of ``seq_length`` tokens. All records are checked before
    anything is written, and nothing is written when nothing would be kept."""
    if pack and not seq_length:
        raise SFTDataError("--pack: give --seq-length, the length of a block")
    examples = list(examples_of(paths, template))
    if tokenizer.eod is None:
        raise SFTDataError(f"--tokenizer-model: {tokenizer.path} has no end-of-document token")
    summary = SFTSummary(output_prefix, inputs=list(paths), blocks=0 if pack else None)
    tokenized = (tokenize(tokenizer, e, loss_on_prompt=loss_on_prompt) for e in examples)
    if pack:
        documents = pack_blocks(tokenized, seq_length, summary)
    else:
        documents = _cut_examples(tokenized, seq_length, long_examples, summary)
    tokens_out = IndexedDatasetWriter(output_prefix, token_dtype(tokenizer.vocab_size))
    masks_out = IndexedDatasetWriter(mask_prefix(output_prefix), np.uint8)
    max_id, written = -1, 0
    try:
        for ids, mask in documents:
            length = np.array([len(ids)], dtype=np.int32)
            tokens_out.add_documents(ids, length)
            masks_out.add_documents(mask, length)
            written += 1
            summary.tokens += len(ids)
            summary.trained_tokens += int(mask[1:].sum())
            max_id = max(max_id, int(ids.max()))
        if pack:
            summary.blocks = written
        if written == 0:
            raise SFTDataError(summary.nothing_kept())
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
        written,
        summary.tokens,
        tool_version,
        sft={
            "seq_length": seq_length,
            "packed": pack,
            "template": template,
            "loss_on_prompt": loss_on_prompt,
        },  # fmt: skip
    ).write(output_prefix)
    return summary


def loss_tokens_kept(prefix: str, seq_length: int) -> np.ndarray:
    """Per example of the SFT dataset at ``prefix``: how many tokens with loss it keeps when
    training cuts it to ``seq_length + 1`` tokens (the first token is never a label). An example
    with none teaches nothing: its response falls past the window."""
    from megatron_ext.data.indexed_writer import bin_path, idx_path, read_index

    masks = mask_prefix(prefix)
    _, lengths = read_index(idx_path(masks))
    lengths = lengths.astype(np.int64)
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    begin = starts + 1
    end = starts + np.minimum(lengths, seq_length + 1)
    flat = np.memmap(bin_path(masks), dtype=np.uint8, mode="r")
    padded = np.concatenate([flat, np.zeros(1, dtype=np.uint8)])  # reduceat needs end < len
    bounds = np.stack([begin, end], axis=1).reshape(-1)
    sums = np.add.reduceat(padded, bounds, dtype=np.int64)[::2]
    return np.where(end > begin, sums, 0)


def mask_exists(prefix: str) -> bool:
    from megatron_ext.data.indexed_writer import bin_path, idx_path

    return all(os.path.isfile(p(mask_prefix(prefix))) for p in (bin_path, idx_path))
