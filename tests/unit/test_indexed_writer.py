"""The .idx reading every rank does at start: the .bin size an index describes comes from its
last offset and length without loading it (the index of all of C4 en is 7 GB), and equals the
sum of its lengths; a cut index is refused."""

import os

import numpy as np
import pytest

from megatron_ext.data import indexed_writer as iw


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_the_described_size_is_the_sum_of_the_lengths(tmp_path, dtype):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 5000, size=3000)
    tokens = rng.integers(0, 30000, size=int(lengths.sum())).astype(dtype)
    writer = iw.IndexedDatasetWriter(str(tmp_path / "d"), dtype)
    writer.add_documents(tokens, lengths.astype(np.int32))
    writer.finalize()
    documents, size = iw.described_bin_size(str(tmp_path / "d"))
    assert (documents, size) == (3000, int(lengths.sum()) * np.dtype(dtype).itemsize)
    assert size == os.path.getsize(iw.bin_path(str(tmp_path / "d")))
    assert iw.is_complete(str(tmp_path / "d"))
    _, read = iw.read_index(iw.idx_path(str(tmp_path / "d")))
    assert read.tolist() == lengths.tolist()


def test_an_empty_and_a_cut_index(tmp_path):
    iw.write_index(iw.idx_path(str(tmp_path / "e")), np.uint16, np.array([], dtype=np.int32))
    assert iw.described_bin_size(str(tmp_path / "e")) == (0, 0)
    path = iw.idx_path(str(tmp_path / "c"))
    iw.write_index(path, np.uint16, np.array([5, 7, 9], dtype=np.int32))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)  # the last document-index entry is missing
    with pytest.raises(ValueError, match="truncated index"):
        iw.described_bin_size(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="truncated index"):
        iw.read_index(path)
