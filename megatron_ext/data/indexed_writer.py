"""Write megatron-core ``IndexedDataset`` files (.bin/.idx) streaming and atomically.

The format is megatron-core's (``megatron/core/datasets/indexed_dataset.py``): ``.bin`` is the
concatenation of token arrays; ``.idx`` is the header ``MMIDIDX\\0\\0``, version 1, dtype code,
sequence count, document count, then int32 sequence lengths, int64 byte pointers and int64
document indices. One document is one sequence here.

Unlike megatron-core's builder, lengths are kept in a growing numpy array (4 bytes per document,
not a Python list), pointers are computed with a cumulative sum, and both files are written
under temporary names and renamed when complete (the ``.idx`` last), so a crash never leaves a
file that passes as complete.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Sequence

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
# megatron-core's DType codes (indexed_dataset.DType), kept here so that preprocessing workers do
# not import megatron-core (seconds of start-up per process); tests check they agree.
DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_DTYPE_FROM_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}
_TMP = ".tmp"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def token_dtype(vocab_size: int) -> type:
    """Smallest dtype megatron-core uses for this vocabulary (uint16 below 65,500, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class _GrowingArray:
    def __init__(self, dtype, capacity: int = 1 << 16):
        self._data = np.empty(capacity, dtype=dtype)
        self._size = 0

    def extend(self, values: np.ndarray) -> None:
        need = self._size + len(values)
        if need > len(self._data):
            grown = np.empty(max(need, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : need] = values
        self._size = need

    def view(self) -> np.ndarray:
        return self._data[: self._size]


def write_index(path: str, dtype, lengths: np.ndarray) -> None:
    """Write an .idx for documents of ``lengths`` tokens (one sequence per document)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    doc_indices = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype).type]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_indices)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_indices.tobytes(order="C"))


_HEADER_BYTES = len(_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, two counts


def _read_header(f, path: str) -> tuple[type, int, int]:
    """(dtype, sequences, document-index entries) from an open .idx; checks that the file holds
    the arrays they announce. Raises ValueError if it is not a complete index file."""
    if f.read(len(_HEADER)) != _HEADER:
        raise ValueError(f"{path}: not a megatron-core index file (bad magic)")
    (version,) = struct.unpack("<Q", f.read(8))
    if version != 1:
        raise ValueError(f"{path}: unsupported index version {version}")
    (code,) = struct.unpack("<B", f.read(1))
    seq_count, doc_count = struct.unpack("<QQ", f.read(16))
    if code not in _DTYPE_FROM_CODE:
        raise ValueError(f"{path}: unknown dtype code {code}")
    if os.fstat(f.fileno()).st_size < _HEADER_BYTES + 12 * seq_count + 8 * doc_count:
        raise ValueError(f"{path}: truncated index")
    return _DTYPE_FROM_CODE[code], seq_count, doc_count


def read_index(path: str) -> tuple[type, np.ndarray]:
    """(dtype, per-sequence lengths) of an .idx file; raises ValueError if it is not one."""
    with open(path, "rb") as f:
        dtype, seq_count, _ = _read_header(f, path)
        lengths = np.frombuffer(f.read(4 * seq_count), dtype=np.int32)
    return dtype, lengths


def described_bin_size(prefix: str) -> tuple[int, int]:
    """(documents, bytes of .bin) that ``prefix``.idx describes: the last sequence's byte offset
    plus its length, read without loading the index (every rank checks this at start, and the
    index of all of C4 en is 7 GB). Raises ValueError if it is not an index file, OSError if it
    cannot be read."""
    path = idx_path(prefix)
    with open(path, "rb") as f:
        dtype, seq_count, _ = _read_header(f, path)
        if seq_count == 0:
            return 0, 0
        f.seek(_HEADER_BYTES + 4 * (seq_count - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(_HEADER_BYTES + 4 * seq_count + 8 * (seq_count - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    return seq_count, last_pointer + last_length * np.dtype(dtype).itemsize


def is_complete(prefix: str) -> bool:
    """True when ``prefix``.bin/.idx exist and the .bin holds exactly what the .idx describes."""
    try:
        return os.path.getsize(bin_path(prefix)) == described_bin_size(prefix)[1]
    except (OSError, ValueError):
        return False


class IndexedDatasetWriter:
    """Streams documents into ``prefix``.bin/.idx; nothing is visible until :meth:`finalize`."""

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(bin_path(prefix) + _TMP, "wb")
        self._lengths = _GrowingArray(np.int32)
        self.num_tokens = 0

    @property
    def num_documents(self) -> int:
        return len(self._lengths.view())

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths."""
        if len(tokens) != int(lengths.sum()):
            raise ValueError("token count does not match the document lengths")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.extend(lengths)
        self.num_tokens += len(tokens)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(idx_path(self.prefix) + _TMP, self.dtype, self._lengths.view())
        os.replace(bin_path(self.prefix) + _TMP, bin_path(self.prefix))
        os.replace(idx_path(self.prefix) + _TMP, idx_path(self.prefix))

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for path in (bin_path(self.prefix) + _TMP, idx_path(self.prefix) + _TMP):
            if os.path.exists(path):
                os.remove(path)


def merge_datasets(prefixes: Sequence[str], out_prefix: str, chunk_bytes: int = 64 << 20) -> int:
    """Concatenate complete datasets, in order, into ``out_prefix``; returns the document count.

    Streams the .bin files (bounded memory) and writes atomically like the writer.
    """
    dtypes, all_lengths = [], []
    for prefix in prefixes:
        if not is_complete(prefix):
            raise FileNotFoundError(f"{prefix}.bin/.idx: missing or incomplete; rerun its shard")
        dtype, lengths = read_index(idx_path(prefix))
        dtypes.append(np.dtype(dtype))
        all_lengths.append(lengths)
    if len(set(dtypes)) > 1:
        raise ValueError(
            f"cannot merge datasets of different token dtypes: {sorted(set(map(str, dtypes)))}"
        )
    dtype = dtypes[0] if dtypes else np.dtype(np.uint16)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    tmp_bin = bin_path(out_prefix) + _TMP
    with open(tmp_bin, "wb") as out:
        for prefix in prefixes:
            with open(bin_path(prefix), "rb") as src:
                shutil.copyfileobj(src, out, chunk_bytes)
        out.flush()
        os.fsync(out.fileno())
    lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, np.int32)
    write_index(idx_path(out_prefix) + _TMP, dtype, lengths)
    os.replace(tmp_bin, bin_path(out_prefix))
    os.replace(idx_path(out_prefix) + _TMP, idx_path(out_prefix))
    return len(lengths)
