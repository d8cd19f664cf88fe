"""Training-side datasets built with megatron-core's dataset machinery.

* ``packed`` (default): megatron-core's ``GPTDataset`` — documents concatenated with EOD and cut
  into fixed-length samples — through ``BlendedMegatronDatasetBuilder`` (blending by weights,
  ``--split`` or per-split paths, cached indices).
* ``per-document``: the GPAS reference protocol (spec §6): one document per sample, its first
  seq_len − 1 tokens plus EOS, right-padded, loss mask 0 on the padding. Built through the same
  builder, so blending and splits work identically; each epoch's order is a seeded Feistel
  bijection (``order.py``), so nothing is built, cached or held per document.

Sample order depends only on the seed and the sample index, never on data-loader workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core.datasets import gpt_dataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megatron_ext.config.data import DataConfig, parse_blend
from megatron_ext.data.order import FeistelOrder
from megatron_ext.data.sft import loss_tokens_kept, mask_prefix


@dataclass
class DatasetTokenizer:
    """The few tokenizer facts megatron-core's dataset code reads."""

    vocab_size: int
    eod: int

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        """Part of megatron-core's dataset cache key."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


# The packed index build's rates on one core of a 2-core machine, fitted to bench/bench_scale.py
# at 25% and 100% of C4 en (102 s and 142 s for the 7B recipe): what a build's line expects
BUILD_DOCUMENTS_PER_S = 6.8e6
BUILD_SAMPLES_PER_S = 3.4e6


class GPTDataset(gpt_dataset.GPTDataset):
    """megatron-core's ``GPTDataset`` (documents concatenated with EOD, cut into samples), given
    its split as a ``range``: the int32 array of every document its index build needs is made
    only on the rank that builds the index, and released after. A build announces itself in one
    line with its expected time (the other ranks wait for it). It keeps megatron-core's class
    name, from which the index cache's folder and key derive: caches built before, or by
    megatron-core itself, are found."""

    def _build_document_sample_shuffle_indices(self):
        documents = self.indices
        building = not self.cache_complete() and (
            not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        )
        if building:
            self.indices = np.arange(documents.start, documents.stop, dtype=np.int32)
            if self.config.say is not None:
                self.config.say(self._build_line(len(documents)))
        try:
            return super()._build_document_sample_shuffle_indices()
        finally:
            self.indices = documents

    def cache_paths(self) -> list[str]:
        """The files megatron-core caches this split's indices in (its own naming)."""
        name = type(self).__name__
        cache = self.config.path_to_cache or os.path.join(
            self.dataset.path_prefix, "cache", f"{name}_indices"
        )
        base = os.path.join(cache, f"{self.unique_description_hash}-{name}-{self.index_split.name}")
        parts = ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy")
        return [f"{base}-{part}" for part in parts]

    def cache_complete(self) -> bool:
        return all(map(os.path.isfile, self.cache_paths()))

    def _build_line(self, num_documents: int) -> str:
        samples = self.num_samples or 0
        seconds = num_documents / BUILD_DOCUMENTS_PER_S + samples / BUILD_SAMPLES_PER_S
        wanted = "one epoch" if self.num_samples is None else f"{samples:,} samples"
        return (
            f"data: no cached {self.index_split.name} index for {self.dataset_path} (seed "
            f"{self.config.random_seed}, {wanted}): building it on this rank "
            f"from {num_documents:,} documents, ~{max(1, round(seconds))} s expected; the other "
            f"ranks wait (build it before the job: pretrain_gpas.py --prepare-data-only); cache: "
            f"{os.path.dirname(self.cache_paths()[0])}"
        )


class PerDocumentDataset(MegatronDataset):
    """One document per sample (the GPAS reference's protocol), order set by seed and index."""

    build_low_level_dataset = staticmethod(gpt_dataset.GPTDataset.build_low_level_dataset)
    numel_low_level_dataset = staticmethod(gpt_dataset.GPTDataset.numel_low_level_dataset)

    def __init__(self, dataset, dataset_path, indices, num_samples, index_split, config):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.seq_length = config.sequence_length
        self.eod = config.tokenizer.eod
        self.pad_id = config.per_document_pad_id
        self.num_docs = len(indices)
        if self.num_docs == 0:
            raise ValueError(f"{dataset_path}: no documents in the {index_split.name} split")
        self.length = num_samples if num_samples is not None else self.num_docs
        self._order: tuple[int, FeistelOrder] | None = None  # (epoch, its order)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return ["random_seed", "sequence_length", "split", "split_matrix"]

    def __len__(self) -> int:
        return self.length

    def _document(self, idx: int) -> int:
        """Sample ``idx`` reads document ``indices[order_e(position)]``: each epoch ``e`` visits
        every document once, in an order keyed by the seed and the epoch."""
        epoch, position = divmod(idx, self.num_docs)
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                FeistelOrder(self.num_docs, self.config.random_seed + 7919 * epoch),
            )
        return int(self.indices[self._order[1](position)])

    def __getitem__(self, idx):
        tokens = self.dataset.get(self._document(int(idx)))
        if len(tokens) and tokens[-1] == self.eod:
            tokens = tokens[:-1]
        text = np.concatenate([tokens[: self.seq_length - 1].astype(np.int64), [self.eod]])
        real = len(text)
        sample = np.full(self.seq_length + 1, self.pad_id, dtype=np.int64)
        sample[:real] = text
        loss_mask = np.zeros(self.seq_length, dtype=np.float32)
        loss_mask[: real - 1] = 1.0
        return {
            "tokens": torch.from_numpy(sample[:-1].copy()),
            "labels": torch.from_numpy(sample[1:].copy()),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


class SFTDataset(PerDocumentDataset):
    """One fine-tuning example per sample (``--data-mode sft``): its tokens (ending in EOD) and
    the loss mask written beside them (``data/sft.py``), right-padded; an example longer than the
    sequence keeps its first ``seq_length + 1`` tokens. Each epoch visits every example once,
    in an order set by the seed; examples that would keep no token with loss are left out
    (preflight counts them)."""

    def __init__(self, dataset, dataset_path, indices, num_samples, index_split, config):
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.masks = IndexedDataset(mask_prefix(dataset_path))
        self.indices = np.asarray(self.indices)  # a range from the builder; filtered below
        kept = loss_tokens_kept(dataset_path, self.seq_length)[self.indices] > 0
        if not kept.any():
            raise ValueError(
                f"{dataset_path}: no example of the {index_split.name} split keeps a token with "
                f"loss within --seq-length {self.seq_length}"
            )
        self.indices = self.indices[kept]
        self.num_docs = len(self.indices)
        if num_samples is None:
            self.length = self.num_docs

    def __getitem__(self, idx):
        document = self._document(int(idx))
        ids = self.dataset.get(document)[: self.seq_length + 1].astype(np.int64)
        mask = self.masks.get(document)[: self.seq_length + 1]
        sample = np.full(self.seq_length + 1, self.pad_id, dtype=np.int64)
        sample[: len(ids)] = ids
        loss_mask = np.zeros(self.seq_length, dtype=np.float32)
        loss_mask[: len(ids) - 1] = mask[1:]  # label j is token j + 1
        return {
            "tokens": torch.from_numpy(sample[:-1].copy()),
            "labels": torch.from_numpy(sample[1:].copy()),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


class _DocumentRangeBuilder(BlendedMegatronDatasetBuilder):
    """megatron-core's builder, handing each split's documents to the dataset as a ``range``
    instead of an int32 array of every document (1.5 GB per rank at C4 en's size): per-document
    datasets index it, and a packed dataset that finds its cache needs nothing more. The config's
    ``fast_cache_load`` is not supported (it is never set here)."""

    def _build_megatron_dataset_splits(self, dataset_path, split, sizes, synchronize_ranks=True):
        if torch.distributed.is_initialized() and not self.is_built_on_rank():
            for part in split:
                if part is not None and synchronize_ranks:
                    torch.distributed.barrier()
            return [None] * len(split)
        low_level = self.cls.build_low_level_dataset(dataset_path, self.config)
        n = self.cls.numel_low_level_dataset(low_level)
        out = []
        for part, index_split in zip(split, Split, strict=True):
            if part is None:
                out.append(None)
                continue
            documents = range(int(round(part[0] * float(n))), int(round(part[1] * float(n))))
            args = (low_level, dataset_path, documents, sizes[index_split.value], index_split,
                    self.config)  # fmt: skip
            out.append(
                self.build_generic_dataset(
                    self.cls, self.is_built_on_rank, synchronize_ranks, *args
                )
            )
        return out


@dataclass
class DatasetConfig(GPTDatasetConfig):
    """megatron-core's dataset config and what this project's datasets read beside it."""

    per_document_pad_id: int = 0  # the input id on per-document padding (masked out)
    say: Optional[Callable[[str], None]] = None  # gets the line of a packed index build


def _gpt_config(
    data: DataConfig, seq_length: int, seed: int, tokenizer: DatasetTokenizer, say=None
) -> DatasetConfig:
    return DatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=parse_blend(data.data_path),
        blend_per_split=[
            parse_blend(data.train_data_path, "train_data_path"),
            parse_blend(data.valid_data_path, "valid_data_path"),
            parse_blend(data.test_data_path, "test_data_path"),
        ]
        if any((data.train_data_path, data.valid_data_path, data.test_data_path))
        else None,
        split=data.split if data.data_path or data.mock_data else None,
        path_to_cache=data.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        per_document_pad_id=data.pad_id,
        say=say,
    )


def build_datasets(
    data: DataConfig,
    *,
    seq_length: int,
    seed: int,
    vocab_size: int,
    eod_id: int,
    num_samples: Sequence[int],
    is_built_on_rank: Callable[[], bool] = lambda: True,
    say: Optional[Callable[[str], None]] = None,
):
    """(train, valid, test) datasets holding at least ``num_samples`` samples each (None where a
    split is empty); ``say`` gets a line when a packed index must be built."""
    data.validate()
    tokenizer = DatasetTokenizer(vocab_size=vocab_size, eod=eod_id)
    config = _gpt_config(data, seq_length, seed, tokenizer, say)
    if data.mock_data:
        cls, builder = MockGPTDataset, BlendedMegatronDatasetBuilder
    else:
        cls = {"per-document": PerDocumentDataset, "sft": SFTDataset}.get(
            data.data_mode, GPTDataset
        )
        builder = _DocumentRangeBuilder
    return builder(cls, list(num_samples), is_built_on_rank, config).build()
