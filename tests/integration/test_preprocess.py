"""tools/preprocess_data.py: loss-free round trip through megatron-core's IndexedDataset, bad
input handling, atomic outputs and resume, sharded runs and merge."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import sentencepiece as spm

from megatron_ext.data import indexed_writer
from megatron_ext.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from tests.helpers.tool_commands import preprocess_command


def _compressed(name: str, data: bytes) -> bytes:
    if name.endswith(".gz"):
        return gzip.compress(data)
    if name.endswith(".zst"):
        import zstandard

        # two frames, as concatenated or multi-threaded zstd writers produce
        half = len(data) // 2
        c = zstandard.ZstdCompressor()
        return c.compress(data[:half]) + c.compress(data[half:])
    return data


def _write_shards(directory, docs, n=3, extra_keys=True, compression="gz"):
    """Split docs over a .json.gz (C4 style; or .json.zst), a .jsonl and a .json file, in
    order."""
    os.makedirs(directory, exist_ok=True)
    first = f"c4-train.00000-of-00003.json.{compression}"
    names = [first, "part-b.jsonl", "part-c.json"][:n]
    chunks = np.array_split(np.arange(len(docs)), n)
    paths = []
    for name, idx in zip(names, chunks, strict=True):
        path = os.path.join(directory, name)
        lines = [
            json.dumps({"text": docs[i], "timestamp": "2019-04-25", "url": f"u{i}"}) for i in idx
        ]
        data = ("\n".join(lines) + "\n").encode()
        with open(path, "wb") as f:
            f.write(_compressed(name, data))
        paths.append(path)
    return paths


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def _cfg(inputs, prefix, model, kind="SentencePieceTokenizer", **kw):
    kw.setdefault("append_eod", True)
    kw.setdefault("progress", False)
    return PreprocessConfig(
        inputs=inputs, output_prefix=prefix, tokenizer_type=kind, tokenizer_model=model, **kw
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_sentencepiece(tmp_path, english_docs, mistral_model, workers):
    docs = english_docs[:120]
    inputs = _write_shards(str(tmp_path / "in"), docs)
    summary = run_preprocess(
        _cfg([str(tmp_path / "in")], str(tmp_path / "out" / "c4"), mistral_model, workers=workers)
    )
    sp = spm.SentencePieceProcessor(model_file=mistral_model)
    expected = [sp.encode(d) + [sp.eos_id()] for d in docs]
    ds, got = _read_back(str(tmp_path / "out" / "c4_text_document"))
    assert got == expected
    assert ds.index.dtype == np.uint16
    assert summary.documents == len(docs) and summary.tokens == sum(map(len, expected))
    assert summary.shards_done == len(inputs) and not summary.failed


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_huggingface(tmp_path, english_docs, hf_tokenizer_dir, workers):
    from tokenizers import Tokenizer

    docs = english_docs[120:200]
    _write_shards(str(tmp_path / "in"), docs)
    run_preprocess(
        _cfg(
            [str(tmp_path / "in" / "*")],
            str(tmp_path / "out"),
            hf_tokenizer_dir,
            kind="HuggingFaceTokenizer",
            workers=workers,
        )
    )
    tok = Tokenizer.from_file(os.path.join(hf_tokenizer_dir, "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    expected = [tok.encode(d, add_special_tokens=False).ids + [eos] for d in docs]
    assert _read_back(str(tmp_path / "out_text_document"))[1] == expected


def test_without_append_eod_and_multiple_keys(tmp_path, mistral_model):
    path = tmp_path / "in.jsonl"
    rows = [{"text": f"Document number {i} is here.", "title": f"Title {i}"} for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_preprocess(
        _cfg(
            [str(path)],
            str(tmp_path / "o"),
            mistral_model,
            append_eod=False,
            json_keys=("text", "title"),
        )
    )
    sp = spm.SentencePieceProcessor(model_file=mistral_model)
    assert _read_back(str(tmp_path / "o_text_document"))[1] == [sp.encode(r["text"]) for r in rows]
    assert _read_back(str(tmp_path / "o_title_document"))[1] == [
        sp.encode(r["title"]) for r in rows
    ]


def _bad_file(path):
    lines = [
        b'{"text": "good one", "url": "a"}',
        b'{"text": "broken json',
        b'{"url": "no text key"}',
        b'{"text": 42}',
        b'{"text": "bad utf8 \xff\xfe here"}',
        b"[1, 2, 3]",
        b"",
        b'{"text": "good two", "timestamp": "x"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_records_are_skipped_counted_and_reported(tmp_path, mistral_model, caplog):
    path = _bad_file(tmp_path / "bad.jsonl")
    with caplog.at_level("WARNING"):
        summary = run_preprocess(_cfg([str(path)], str(tmp_path / "o"), mistral_model))
    assert summary.documents == 2
    assert summary.skipped == {
        "malformed_json": 2,
        "missing_key": 1,
        "non_string_text": 1,
        "invalid_utf8": 1,
    }
    assert f"{path}:2: skipped (malformed_json" in caplog.text
    assert f"{path}:5: skipped (invalid_utf8" in caplog.text
    sp = spm.SentencePieceProcessor(model_file=mistral_model)
    assert _read_back(str(tmp_path / "o_text_document"))[1] == [
        sp.encode("good one") + [2],
        sp.encode("good two") + [2],
    ]


def test_strict_makes_bad_records_fatal(tmp_path, mistral_model):
    path = _bad_file(tmp_path / "bad.jsonl")
    summary = run_preprocess(_cfg([str(path)], str(tmp_path / "o"), mistral_model, strict=True))
    assert (
        summary.failed
        and f"{path}:2" in summary.failed[0][1]
        and "--strict" in summary.failed[0][1]
    )
    assert not os.path.exists(tmp_path / "o_text_document.idx")
    assert not os.listdir(tmp_path / "o_shards")  # no partial output left behind


def test_round_trip_zstd(tmp_path, english_docs, mistral_model):
    pytest.importorskip("zstandard", reason="pip install zstandard (or bash run_tests.sh)")
    docs = english_docs[:90]
    _write_shards(str(tmp_path / "in"), docs, compression="zst")
    summary = run_preprocess(_cfg([str(tmp_path / "in")], str(tmp_path / "out"), mistral_model))
    sp = spm.SentencePieceProcessor(model_file=mistral_model)
    expected = [sp.encode(d) + [sp.eos_id()] for d in docs]
    assert _read_back(str(tmp_path / "out_text_document"))[1] == expected
    assert summary.documents == len(docs) and not summary.failed


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_truncated_archive_fails_its_shard_only(tmp_path, english_docs, mistral_model, compression):
    if compression == "zst":
        pytest.importorskip("zstandard", reason="pip install zstandard (or bash run_tests.sh)")
    paths = _write_shards(str(tmp_path / "in"), english_docs[:60], compression=compression)
    data = open(paths[0], "rb").read()
    with open(paths[0], "wb") as f:
        f.write(data[: len(data) // 2])
    summary = run_preprocess(
        _cfg([str(tmp_path / "in")], str(tmp_path / "o"), mistral_model, workers=2)
    )
    assert len(summary.failed) == 1
    name, message = summary.failed[0]
    assert paths[0] in message and "truncated" in message
    shards = tmp_path / "o_shards"
    assert sorted(os.listdir(shards)) == sorted(  # the failed shard left nothing, not even
        f"part-{x}_text_document.{e}" for x in "bc" for e in ("bin", "idx", "meta.json")
    )  # a description
    for x in "bc":
        assert indexed_writer.is_complete(str(shards / f"part-{x}_text_document"))
    assert not os.path.exists(tmp_path / "o_text_document.idx")  # no merge over a hole


def test_rerun_skips_complete_shards_and_redoes_partial_ones(tmp_path, english_docs, mistral_model):
    _write_shards(str(tmp_path / "in"), english_docs[:60])
    cfg = _cfg([str(tmp_path / "in")], str(tmp_path / "o"), mistral_model)
    first = run_preprocess(cfg)
    merged = open(tmp_path / "o_text_document.bin", "rb").read()
    shard = str(tmp_path / "o_shards" / "part-b_text_document")
    # A partial shard output: its .bin lost its tail (e.g. a crash while copying).
    with open(shard + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(shard + ".bin") - 2)
    assert not indexed_writer.is_complete(shard)
    second = run_preprocess(cfg)
    assert second.shards_resumed == 2 and second.shards_done == 1
    assert second.documents == 20 and first.documents == 60
    assert open(tmp_path / "o_text_document.bin", "rb").read() == merged


def test_killed_run_leaves_nothing_that_passes_as_complete(tmp_path, english_docs, mistral_model):
    docs = english_docs * 12
    inputs = []
    for i in range(6):
        inputs += _write_shards(str(tmp_path / f"in{i}"), docs[i::6], n=1)
        os.rename(inputs[-1], str(tmp_path / f"in{i}" / f"s{i}.json.gz"))
        inputs[-1] = str(tmp_path / f"in{i}" / f"s{i}.json.gz")
    out = str(tmp_path / "o")
    cmd = preprocess_command(inputs, "SentencePieceTokenizer", mistral_model, "--append-eod")
    cmd += ["--output-prefix", out, "--workers", "1"]
    shards = tmp_path / "o_shards"
    interrupted = False
    for _ in range(5):  # a kill can land just after a shard's rename: then try again
        shutil.rmtree(shards, ignore_errors=True)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 60
        partial = []
        while time.time() < deadline and not partial and proc.poll() is None:
            if shards.exists():
                partial = [f for f in os.listdir(shards) if f.endswith(".tmp")]
            if not partial:
                time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # the kill interrupted a write: the half-written shard is still a temporary file
        if any(os.path.exists(shards / f) for f in partial):
            interrupted = True
            break
    assert interrupted, "no kill landed while a shard was being written"
    for i in range(6):
        prefix = str(shards / f"s{i}_text_document")
        if os.path.exists(prefix + ".idx"):
            assert indexed_writer.is_complete(prefix)  # whatever is visible is whole
    assert not os.path.exists(out + "_text_document.idx")
    summary = run_preprocess(_cfg(inputs, out, mistral_model))
    assert summary.shards_done + summary.shards_resumed == 6 and not summary.failed
    clean = str(tmp_path / "clean")
    run_preprocess(_cfg(inputs, clean, mistral_model))
    assert (
        open(out + "_text_document.bin", "rb").read()
        == open(clean + "_text_document.bin", "rb").read()
    )


def test_stats_counts_without_writing(tmp_path, english_docs, mistral_model):
    _write_shards(str(tmp_path / "in"), english_docs[:30])
    summary = run_preprocess(_cfg([str(tmp_path / "in")], None, mistral_model, stats_only=True))
    sp = spm.SentencePieceProcessor(model_file=mistral_model)
    assert summary.documents == 30
    assert summary.tokens == sum(len(sp.encode(d)) + 1 for d in english_docs[:30])
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_sharded_jobs_then_merge_equal_single_run(tmp_path, english_docs, mistral_model):
    _write_shards(str(tmp_path / "in"), english_docs[:45])
    single = str(tmp_path / "single")
    run_preprocess(_cfg([str(tmp_path / "in")], single, mistral_model))
    split = str(tmp_path / "split")
    for i in range(2):
        s = run_preprocess(
            _cfg([str(tmp_path / "in")], split, mistral_model, shard_index=i, num_shards=2)
        )
        assert not s.merged
    run_preprocess(_cfg([str(tmp_path / "in")], split, mistral_model, merge_only=True))
    for ext in (".bin", ".idx"):
        assert (
            open(split + "_text_document" + ext, "rb").read()
            == open(single + "_text_document" + ext, "rb").read()
        )


def test_tokenizer_without_eos_needs_eod_id(tmp_path, english_docs):
    from tests.helpers.text_fixtures import train_hf_tokenizer

    tok_dir = train_hf_tokenizer(english_docs[:50], str(tmp_path / "tok"), with_eos=False)
    _write_shards(str(tmp_path / "in"), english_docs[:5], n=1)
    with pytest.raises(PreprocessError, match="--eod-id"):
        run_preprocess(
            _cfg([str(tmp_path / "in")], str(tmp_path / "o"), tok_dir, kind="HuggingFaceTokenizer")
        )
    summary = run_preprocess(
        _cfg(
            [str(tmp_path / "in")],
            str(tmp_path / "o"),
            tok_dir,
            kind="HuggingFaceTokenizer",
            eod_id=0,
        )
    )
    assert all(doc[-1] == 0 for doc in _read_back(str(tmp_path / "o_text_document"))[1])
    assert summary.documents == 5


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            dict(inputs=["/nonexistent/file.jsonl"]),
            "--input: /nonexistent/file.jsonl does not exist",
        ),
        (dict(tokenizer_model="/nonexistent.model"), "--tokenizer-model: no SentencePiece model"),
        (dict(tokenizer_type="GPT2BPETokenizer"), "--tokenizer-type: unknown"),
        (dict(workers=0), "--workers"),
        (dict(output_prefix=None), "--output-prefix is required"),
    ],
)
def test_bad_setup_names_the_flag(tmp_path, mistral_model, bad, match):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "hi"}\n')
    kw = dict(
        inputs=[str(path)],
        output_prefix=str(tmp_path / "o"),
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=mistral_model,
        progress=False,
    )
    kw.update(bad)
    with pytest.raises(PreprocessError, match=match):
        run_preprocess(PreprocessConfig(**kw))


def test_dtype_codes_agree_with_megatron_core():
    from megatron.core.datasets.indexed_dataset import DType

    for dtype, code in indexed_writer.DTYPE_CODES.items():
        assert DType.code_from_dtype(dtype) == code
    assert indexed_writer.token_dtype(32000) == DType.optimal_dtype(32000)
    assert indexed_writer.token_dtype(128256) == DType.optimal_dtype(128256)


def test_cli_exit_codes_and_summary(tmp_path, english_docs, mistral_model):
    _write_shards(str(tmp_path / "in"), english_docs[:10], n=1)
    base = preprocess_command(tmp_path / "in", "SentencePieceTokenizer", mistral_model)
    ok = subprocess.run(
        base + ["--append-eod", "--output-prefix", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "documents 10" in ok.stdout and "merged dataset" in ok.stdout
    bad = subprocess.run(
        base + ["--workers", "0", "--output-prefix", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--workers" in bad.stderr
