"""Stream documents out of JSON-lines files (plain, gzip or zstd) without loading them whole.

Bad records are skipped and counted by reason; the first few are kept with file:line for the
report. A corrupt or truncated compressed stream is fatal for its file (:class:`InputError`).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

try:  # orjson parses C4 lines ~1.5× faster; the standard library is the fallback
    from orjson import JSONDecodeError as _OrjsonError
    from orjson import loads as _loads

    _JSON_ERRORS: tuple = (ValueError, _OrjsonError)
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
    _JSON_ERRORS = (ValueError,)

SKIP_REASONS = ("malformed_json", "missing_key", "non_string_text", "invalid_utf8")
MAX_REPORTED = 5


class InputError(RuntimeError):
    """An input file cannot be read to the end; the message names the file and what to do."""


@dataclass
class Skip:
    path: str
    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: skipped ({self.reason}: {self.detail})"


@dataclass
class ReadStats:
    lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)


def open_stream(path: str):
    """(decompressed binary stream, underlying raw file) — the raw file's tell() is progress."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), 1 << 20), raw
    if path.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError as err:
            raw.close()
            raise InputError(
                f"{path}: reading .zst needs the 'zstandard' package (pip install zstandard)"
            ) from err
        return io.BufferedReader(_ZstdFrames(raw, zstandard), 1 << 20), raw
    return io.BufferedReader(raw, 1 << 20), raw


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of a zstd file of one or more frames, raising EOFError when the file
    ends inside a frame: zstandard's stream_reader returns a truncated file's partial data as if
    it were whole, which would drop the rest of the shard without a word."""

    def __init__(self, raw, zstandard):
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._out):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self._out = memoryview(self._decompress(chunk))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        parts = []
        while chunk:
            parts.append(self._frame.decompress(chunk))
            self._in_frame = True
            if not self._frame.eof:
                break
            chunk = self._frame.unused_data  # the next frame starts here
            self._frame = self._decompressor.decompressobj()
            self._in_frame = False
        return b"".join(parts)


class RecordReader:
    """Yields batches of documents (one list of texts per JSON key) from one file."""

    def __init__(self, path: str, keys: Sequence[str], strict: bool = False):
        self.path, self.keys, self.strict = path, tuple(keys), strict
        self.stats = ReadStats()
        self._raw = None

    def bytes_read(self) -> int:
        return self._raw.tell() if self._raw is not None and not self._raw.closed else 0

    def _skip(self, line: int, reason: str, detail: str) -> None:
        skip = Skip(self.path, line, reason, detail)
        if self.strict:
            raise InputError(f"{skip} (--strict makes bad records fatal)")
        self.stats.skipped[reason] += 1
        if len(self.stats.examples) < MAX_REPORTED:
            self.stats.examples.append(skip)

    def _parse(self, raw_line: bytes, line: int):
        try:
            raw_line.decode("utf-8")
        except UnicodeDecodeError as err:
            self._skip(line, "invalid_utf8", str(err))
            return None
        try:
            record = _loads(raw_line)
        except _JSON_ERRORS as err:
            self._skip(line, "malformed_json", str(err))
            return None
        if not isinstance(record, dict):
            self._skip(line, "malformed_json", f"a JSON {type(record).__name__}, not an object")
            return None
        texts = []
        for key in self.keys:
            if key not in record:
                self._skip(line, "missing_key", f"no {key!r} key")
                return None
            value = record[key]
            if not isinstance(value, str):
                self._skip(line, "non_string_text", f"{key!r} is a {type(value).__name__}")
                return None
            texts.append(value)
        return texts

    def batches(self, max_docs: int = 1024, max_bytes: int = 4 << 20) -> Iterator[list[list[str]]]:
        stream, self._raw = open_stream(self.path)
        batch = [[] for _ in self.keys]
        size = 0
        line = 0
        try:
            with stream:
                for line, raw_line in enumerate(_lines(stream, self.path), start=1):
                    self.stats.lines = line
                    if not raw_line.strip():
                        continue
                    texts = self._parse(raw_line, line)
                    if texts is None:
                        continue
                    for column, text in zip(batch, texts, strict=True):
                        column.append(text)
                    size += len(raw_line)
                    if len(batch[0]) >= max_docs or size >= max_bytes:
                        yield batch
                        batch = [[] for _ in self.keys]
                        size = 0
        finally:
            self._raw.close()
        if batch[0]:
            yield batch


def _lines(stream, path: str) -> Iterator[bytes]:
    line = 0
    try:
        for line, raw_line in enumerate(stream, start=1):  # noqa: B007
            yield raw_line
    except (EOFError, OSError, zlib.error) as err:
        raise InputError(
            f"{path}: corrupt or truncated compressed data after line {line} ({err}); "
            "re-download or re-create this file"
        ) from err
    except Exception as err:  # zstandard raises its own ZstdError
        if type(err).__name__ == "ZstdError":
            raise InputError(f"{path}: corrupt zstd data after line {line} ({err})") from err
        raise
