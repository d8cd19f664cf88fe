"""Checks of a run's files against its flags, before anything is built or written.

Each problem raises :class:`ConfigError` as one line ``<flag or file>: <what is wrong>; <what to
do>``, which ``pretrain_gpas.py`` prints as ``error: …`` with exit code 2. Nothing here writes.

What may change when a run resumes from a checkpoint, and what may not
(``config.ARCHITECTURE_FIELDS``): the parameters' shapes and the function the model computes
are fixed by the checkpoint; the layout (TP, PP, virtual stages, sequence parallelism, DP,
distributed optimizer, overlap), batch sizes, learning-rate schedule, iterations, precision,
recomputation, fusions, data and logging may change (the optimizer state is saved
reshardable). Initialisation-only settings (init stds, the DeepNorm init, the gate's initial
value) are ignored on resume.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from megatron_ext.config import ARCHITECTURE_FIELDS, ConfigError, ModelConfig, flag
from megatron_ext.config.data import DataConfig, parse_blend
from megatron_ext.data.dataset_info import DatasetInfo, sidecar_path, tokenizer_fingerprint
from megatron_ext.data.indexed_writer import bin_path, described_bin_size, idx_path

logger = logging.getLogger("gpas")

_DATA_FLAGS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")


def dataset_prefixes(data: DataConfig) -> list[tuple[str, str]]:
    """(flag, prefix) of every dataset the run reads."""
    out = []
    for name in _DATA_FLAGS:
        blend = parse_blend(getattr(data, name), flag_name=name)
        if blend:
            out += [(flag(name), prefix) for prefix in blend[0]]
    return out


def check_dataset_files(flag_name: str, prefix: str) -> int:
    """.bin and .idx exist, the .idx is one, and the .bin holds exactly what the .idx says.
    Returns the number of documents."""
    missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
    if missing:
        raise ConfigError(
            f"{flag_name}: {' and '.join(missing)} not found (a dataset prefix names "
            f"PREFIX.bin and PREFIX.idx); check the path, or preprocess the data with "
            "tools/preprocess_data.py"
        )
    try:
        documents, expected = described_bin_size(prefix)
    except ValueError as err:
        raise ConfigError(f"{err}; preprocess the data again") from err
    actual = os.path.getsize(bin_path(prefix))
    if actual != expected:
        state = "cut short (an unfinished copy?)" if actual < expected else "too long"
        raise ConfigError(
            f"{bin_path(prefix)}: holds {actual:,} bytes but its .idx describes {expected:,} "
            f"({documents:,} documents), the file is {state}; copy it again or preprocess "
            "the data again"
        )
    if documents == 0 or expected == 0:
        what = "no documents" if documents == 0 else f"{documents:,} documents but no tokens"
        raise ConfigError(
            f"{flag_name}: {prefix} holds {what}; check the preprocessing input (its JSON key: "
            "--json-keys) and preprocess again, or drop the prefix"
        )
    return documents


_SPLIT_NAMES = ("train", "validation", "test")


def check_loss_mask(flag_name: str, prefix: str, documents: int) -> None:
    """An SFT dataset's loss mask is there and covers the same examples."""
    from megatron_ext.data.sft import mask_prefix

    masks = mask_prefix(prefix)
    if not os.path.isfile(idx_path(masks)):
        raise ConfigError(
            f"{flag_name}: {prefix} has no loss mask ({idx_path(masks)} not found): --sft reads "
            "datasets written by tools/preprocess_sft.py"
        )
    if check_dataset_files(flag_name, masks) != documents:
        raise ConfigError(
            f"{flag_name}: {masks} does not describe the examples of {prefix}; preprocess the "
            "data again with tools/preprocess_sft.py"
        )


def _split_bounds(split: str) -> list:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def _train_blend(data: DataConfig):
    """(prefixes, weights or None) of the training split; None for mock data."""
    return parse_blend(data.train_data_path, "train_data_path") or parse_blend(data.data_path)


def _train_ranges(data: DataConfig) -> list[tuple[str, int, int]]:
    """(prefix, first, end) document ranges of the training split."""
    return [(p, first, end) for split, p, first, end in _split_ranges(data) if split == "train"]


def _document_range(bounds, documents: int) -> tuple[int, int]:
    """The documents a split's share takes, rounded as megatron-core rounds them."""
    return int(round(bounds[0] * float(documents))), int(round(bounds[1] * float(documents)))


def train_examples(data: DataConfig, seq_length: int) -> int:
    """The samples one pass over the training split gives, as megatron-core cuts it: for
    ``--epochs``. ``sft``: its examples (or packed blocks) less those that keep no loss token
    within ``seq_length`` (training skips them too); ``per-document``: its documents;
    ``packed``: the ``seq_length``-token samples its tokens fill (as GPTDataset counts them)."""
    from megatron_ext.data.indexed_writer import read_index

    blend = _train_blend(data)
    if blend is None or blend[1] is not None:
        raise ConfigError(
            "--epochs: counts the examples of unweighted dataset prefixes; with a weighted blend "
            "or mock data give --train-iters"
        )
    total = 0
    for prefix, first, end in _train_ranges(data):
        if data.data_mode == "sft":
            from megatron_ext.data.sft import loss_tokens_kept

            total += int((loss_tokens_kept(prefix, seq_length)[first:end] > 0).sum())
        elif data.data_mode == "packed":
            tokens = int(read_index(idx_path(prefix))[1][first:end].astype("int64").sum())
            total += max(0, (tokens - 1) // seq_length)
        else:
            total += end - first
    return total


def train_split_lengths(data: DataConfig) -> list[tuple]:
    """(prefix, blend weight or None, its training documents' lengths) for each prefix of the
    training split: what ``--dry-run`` counts real tokens from."""
    from megatron_ext.data.indexed_writer import read_index

    blend, ranges = _train_blend(data), _train_ranges(data)
    if blend is None or not ranges:
        return []
    weights = blend[1] or [None] * len(ranges)
    return [
        (prefix, weight, read_index(idx_path(prefix))[1][first:end])
        for (prefix, first, end), weight in zip(ranges, weights, strict=True)
    ]


def _split_ranges(data: DataConfig) -> list[tuple[str, str, int, int]]:
    """(split, prefix, first, end) document ranges of every split the run reads."""
    out = []
    blend = parse_blend(data.data_path)
    if blend:
        for prefix in blend[0]:
            n = described_bin_size(prefix)[0]
            for name, bounds in zip(_SPLIT_NAMES, _split_bounds(data.split), strict=True):
                if bounds is not None:
                    out.append((name, prefix, *_document_range(bounds, n)))
    for name, field_name in zip(_SPLIT_NAMES, _DATA_FLAGS[1:], strict=True):
        per_split = parse_blend(getattr(data, field_name), field_name)
        for prefix in per_split[0] if per_split else []:
            out.append((name, prefix, 0, described_bin_size(prefix)[0]))
    return out


def check_sft_examples(data: DataConfig, seq_length: int) -> None:
    """SFT examples that keep no loss token within the training window (their responses fall
    past it) teach nothing, and training leaves them out: a dataset split with no other is an
    error; some in the training split, a warning with the count."""
    from megatron_ext.data.sft import loss_tokens_kept

    kept_by_prefix: dict = {}
    examples = empty = 0
    for split, prefix, first, end in _split_ranges(data):
        if prefix not in kept_by_prefix:
            kept_by_prefix[prefix] = loss_tokens_kept(prefix, seq_length)
            _warn_if_cut_longer(prefix, seq_length)
        kept = kept_by_prefix[prefix][first:end]
        if len(kept) and not kept.any():
            raise ConfigError(
                f"{prefix}: none of the {len(kept):,} examples of its {split} split keeps a token "
                f"with loss within --seq-length {seq_length} (their responses fall past it), so "
                "training would learn nothing from them; train with a longer --seq-length, or "
                f"preprocess with tools/preprocess_sft.py --seq-length {seq_length} (it "
                "truncates or drops long examples and says how many)"
            )
        if split == "train":
            examples += len(kept)
            empty += int((kept == 0).sum())
    if empty:
        logger.warning(
            "%s of the %s training examples keep no token with loss within --seq-length %d "
            "(their responses fall past it): they are left out of training and of the --epochs "
            "arithmetic",
            f"{empty:,}", f"{examples:,}", seq_length,
        )  # fmt: skip


def _warn_if_cut_longer(prefix: str, seq_length: int) -> None:
    info = DatasetInfo.read(prefix)
    sft = (info.sft or {}) if info is not None else {}
    cut = sft.get("seq_length")
    if cut is None or cut <= seq_length:
        return
    if sft.get("packed"):
        logger.warning(
            "%s holds blocks of %d tokens (--pack --seq-length %d); training at --seq-length %d "
            "keeps the first %d tokens of each block and never trains on the rest",
            prefix, cut, cut, seq_length, seq_length + 1,
        )  # fmt: skip
    else:
        logger.warning(
            "%s was cut for --seq-length %d when preprocessed; training uses %d, so longer "
            "examples are cut again", prefix, cut, seq_length,
        )  # fmt: skip


def check_split_sizes(prefix: str, num_documents: int, split: str) -> None:
    """Every split ``--split`` gives a share holds a document (megatron-core 0.16.1 loops
    forever building an empty split: its epoch count never reaches the tokens asked for)."""
    for name, bounds in zip(_SPLIT_NAMES, _split_bounds(split), strict=True):
        if bounds is None:
            continue
        begin, end = _document_range(bounds, num_documents)
        if end <= begin:
            raise ConfigError(
                f"--split: the {name} share of '{split}' is no whole document of {prefix} "
                f"({num_documents:,} documents); use more data, or give that split 0 (e.g. "
                "--split 95,5,0)"
            )


def check_dataset_info(
    prefix: str,
    *,
    vocab_size: int,
    tokenizer_type: str,
    fingerprint: Optional[str],
    eod_id: int,
) -> Optional[DatasetInfo]:
    """The dataset's sidecar against the run's tokenizer and vocabulary (None: no sidecar).
    ``fingerprint``: the run's tokenizer file's (None: no tokenizer file, or the check is
    overridden)."""
    try:
        info = DatasetInfo.read(prefix)
    except ValueError as err:
        raise ConfigError(f"{err}; delete it to train without the check") from err
    if info is None:
        return None
    if info.max_token_id >= vocab_size:
        vocab_flag = "--vocab-size" if tokenizer_type == "NullTokenizer" else "--tokenizer-model"
        raise ConfigError(
            f"{vocab_flag}: the model's vocabulary has {vocab_size:,} ids but {prefix} holds "
            f"token id {info.max_token_id:,} (made with a {info.vocab_size:,}-piece "
            f"{info.tokenizer_type}); train with the tokenizer the data was made with"
        )
    if fingerprint is None:
        return info
    mismatch = []
    if info.tokenizer_fingerprint != fingerprint:
        mismatch.append(f"tokenizer file {info.tokenizer_fingerprint[:19]}… vs {fingerprint[:19]}…")
    if info.eod_id is not None and info.eod_id != eod_id:
        mismatch.append(f"EOD id {info.eod_id} vs {eod_id}")
    if mismatch:
        raise ConfigError(
            f"--tokenizer-model: {prefix} was made with another tokenizer "
            f"({'; '.join(mismatch)}, per {sidecar_path(prefix)}): the same text would get "
            "other ids; train with the tokenizer the data was made with, or pass "
            "--override-tokenizer-check if this is deliberate"
        )
    return info


def check_checkpoint_architecture(
    model: ModelConfig, saved: dict, directory: str, flag_name: str = "--load"
) -> None:
    """Every architecture field of the command line equals the checkpoint's."""
    current = _resolved(model)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    theirs = _resolved(ModelConfig(**{k: v for k, v in saved.items() if k in known}))
    differ = [
        f"{flag(name)} {current[name]} (checkpoint: {theirs[name]})"
        for name in ARCHITECTURE_FIELDS
        if name in saved and theirs[name] != current[name]
    ]
    if differ:
        raise ConfigError(
            f"{flag_name}: {directory} holds another architecture: {', '.join(differ)}; use the "
            "checkpoint's values, or a new --load/--save directory for a new model"
        )


def _resolved(model: ModelConfig) -> dict:
    values = {name: getattr(model, name) for name in ARCHITECTURE_FIELDS}
    values["num_query_groups"] = model.query_groups
    values["post_num"] = model.resolved_post_num
    return values


def check_run(cfg, eod_id: int) -> list[str]:
    """Every file the run reads, against its flags. Returns the dataset prefixes made before
    sidecars existed (their token ids are checked batch by batch instead)."""
    from megatron_ext.checkpoint import layout as checkpoint_layout
    from megatron_ext.checkpoint.weights import read_run_state

    undescribed = []
    t = cfg.tokenizer
    checked = t.tokenizer_model is not None and not t.override_tokenizer_check
    fingerprint = tokenizer_fingerprint(t.tokenizer_model) if checked else None  # hashed once
    for flag_name, prefix in dataset_prefixes(cfg.data):
        documents = check_dataset_files(flag_name, prefix)
        if cfg.data.data_mode == "sft":
            check_loss_mask(flag_name, prefix, documents)
        if flag_name == "--data-path":
            check_split_sizes(prefix, documents, cfg.data.split)
        info = check_dataset_info(
            prefix,
            vocab_size=cfg.model.vocab_size,
            tokenizer_type=t.tokenizer_type,
            fingerprint=fingerprint,
            eod_id=eod_id,
        )
        if info is None:
            undescribed.append(prefix)
    if cfg.data.data_mode == "sft":
        check_sft_examples(cfg.data, cfg.model.seq_length)
    check_checkpoint_dirs(cfg.checkpoint)
    for flag_name, root in (
        ("--load", cfg.checkpoint.load),
        ("--pretrained-checkpoint", cfg.checkpoint.pretrained_checkpoint),
    ):
        if not root:
            continue
        try:
            directory = checkpoint_layout.latest_checkpoint_dir(root)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{err}; point {flag_name} at a complete checkpoint") from err
        if directory is not None:
            try:
                saved = read_run_state(directory).get("config", {}).get("model")
            except Exception:  # a damaged checkpoint: loading names the file and falls back
                saved = None
            if saved:
                check_checkpoint_architecture(cfg.model, saved, directory, flag_name)
    return undescribed


def check_checkpoint_dirs(c) -> None:
    """``--save`` and ``--load`` name directories; a ``--load`` other than ``--save`` holds a
    checkpoint. (``--load`` = ``--save`` with nothing there yet is Megatron's auto-resume
    convention: a first run starts from scratch.)"""
    from megatron_ext.checkpoint import layout as checkpoint_layout

    if c.pretrained_checkpoint and not os.path.isdir(c.pretrained_checkpoint):
        raise ConfigError(
            f"--pretrained-checkpoint: no checkpoint directory at {c.pretrained_checkpoint}"
        )
    for name, path in (("--save", c.save), ("--load", c.load)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(
                f"{name}: {path} is a file, not a directory; point {name} at the checkpoint "
                "directory (the one holding latest_checkpointed_iteration.txt and iter_*)"
            )
    if c.load and os.path.abspath(c.load) != os.path.abspath(c.save or ""):
        holds = os.path.isfile(checkpoint_layout.pointer_path(c.load)) or bool(
            checkpoint_layout.saved_iterations(c.load)
        )
        if not holds:
            state = "does not exist" if not os.path.exists(c.load) else "holds no checkpoint"
            raise ConfigError(
                f"--load: {c.load} {state}; give the directory a run saved into (--save), or "
                "leave --load out to start from scratch"
            )


class TokenIdError(ConfigError):
    """A batch holds a token id outside the model's vocabulary."""


def checked_batches(iterator, vocab_size: int, prefixes: list[str]):
    """Pass batches through, refusing one whose token ids do not fit the model (a host-side
    check for datasets without a sidecar, before the batch reaches the device)."""
    for batch in iterator:
        for key in ("tokens", "labels"):
            top = int(batch[key].max())
            if top >= vocab_size:
                raise TokenIdError(
                    f"{' '.join(prefixes)}: a batch holds token id {top:,}, outside the "
                    f"model's vocabulary of {vocab_size:,} ids; train with the tokenizer (or "
                    "--vocab-size) the data was made with"
                )
        yield batch
