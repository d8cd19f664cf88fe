"""Training-side datasets: packed sample boundaries, blending, the per-document protocol, and
an order that depends only on the seed and the sample index."""

import numpy as np
import pytest
import torch

from megatron_ext.config import ConfigError
from megatron_ext.config.data import DataConfig, parse_blend
from megatron_ext.data.datasets import build_datasets
from megatron_ext.data.indexed_writer import IndexedDatasetWriter
from megatron_ext.data.sampler import PretrainingBatchSampler, build_data_loader

EOD = 1

# megatron-core's dataset builder synchronises ranks through torch.distributed.
pytestmark = pytest.mark.usefixtures("megatron_cpu")


def _write(prefix, docs, vocab=1000):
    writer = IndexedDatasetWriter(prefix, np.uint16)
    flat = np.concatenate([np.asarray(d + [EOD]) for d in docs])
    writer.add_documents(flat, np.array([len(d) + 1 for d in docs], dtype=np.int32))
    writer.finalize()
    return prefix


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.RandomState(0)
    docs = [list(rng.randint(2, 1000, size=rng.randint(3, 40))) for _ in range(200)]
    return _write(str(tmp_path / "a_text_document"), docs), docs


def _build(data, n=(64, 8, 0), seq=16, seed=5):
    return build_datasets(
        data, seq_length=seq, seed=seed, vocab_size=1000, eod_id=EOD, num_samples=list(n)
    )


def test_packed_samples_are_windows_of_eod_separated_documents(tmp_path, corpus):
    prefix, docs = corpus
    train, valid, _ = _build(
        DataConfig(data_path=[prefix], split="90,10,0", data_cache_path=str(tmp_path / "cache"))
    )
    assert len(train) >= 64 and len(valid) >= 8
    with_eod = [d + [EOD] for d in docs]
    for i in range(40):
        s = train[i]
        tokens, labels = s["tokens"].numpy(), s["labels"].numpy()
        assert tokens.shape == (16,) and torch.all(s["loss_mask"] == 1)
        np.testing.assert_array_equal(tokens[1:], labels[:-1])  # labels are the next tokens
        window = list(np.concatenate([tokens, labels[-1:]]))
        cuts = [j + 1 for j, t in enumerate(window) if t == EOD]
        pieces = [window[a:b] for a, b in zip([0] + cuts, cuts + [len(window)], strict=True)]
        pieces = [p for p in pieces if p]
        # interior pieces are whole documents; the first ends one, the last starts one
        for piece in pieces[1:-1]:
            assert piece in with_eod
        if len(pieces) > 1:
            assert any(d[-len(pieces[0]) :] == pieces[0] for d in with_eod)
            assert any(d[: len(pieces[-1])] == pieces[-1] for d in with_eod)
        else:
            assert any(any(d[j : j + 17] == window for j in range(len(d))) for d in with_eod)


def test_blending_proportions(tmp_path):
    rng = np.random.RandomState(1)
    a = _write(str(tmp_path / "a"), [[10] * rng.randint(5, 20) for _ in range(300)])
    b = _write(str(tmp_path / "b"), [[20] * rng.randint(5, 20) for _ in range(300)])
    train, _, _ = _build(
        DataConfig(
            data_path=["0.75", a, "0.25", b], split="100,0,0", data_cache_path=str(tmp_path / "c")
        ),
        n=(400, 0, 0),
    )
    counts = {10: 0, 20: 0}
    for i in range(400):
        toks = train[i]["tokens"].numpy()
        counts[10] += int((toks == 10).sum())
        counts[20] += int((toks == 20).sum())
    share = counts[10] / (counts[10] + counts[20])
    assert 0.70 < share < 0.80


def test_per_document_protocol(tmp_path):
    docs = [[5, 6, 7], list(range(100, 140)), [9] * 14, [11] * 15]
    prefix = _write(str(tmp_path / "p"), docs)
    seq = 16
    train, _, _ = _build(
        DataConfig(
            data_path=[prefix],
            split="100,0,0",
            data_mode="per-document",
            data_cache_path=str(tmp_path / "c"),
        ),
        n=(16, 0, 0),
        seq=seq,
    )
    seen = {}
    for i in range(4):
        s = train[i]
        tokens, labels, mask = s["tokens"].tolist(), s["labels"].tolist(), s["loss_mask"].tolist()
        real = int(sum(mask)) + 1
        seen[tokens[0]] = (tokens, labels, mask, real)
    # short document: all tokens, EOS, then padding (id 0) with the loss masked
    t, lab, m, real = seen[5]
    assert t[:4] == [5, 6, 7, EOD] and t[4:] == [0] * 12
    assert lab[:3] == [6, 7, EOD] and m == [1.0] * 3 + [0.0] * 13
    # long document: its first seq−1 tokens plus EOS at the last position (reference quirk)
    t, lab, m, real = seen[100]
    assert t == list(range(100, 115)) + [EOD] and m == [1.0] * 15 + [0.0]
    assert lab[:15] == list(range(101, 115)) + [EOD]
    # a document of exactly seq−1 tokens fills the sample; one of seq tokens is cut to seq−1
    assert seen[9][0] == [9] * 14 + [EOD, 0] and seen[11][0] == [11] * 15 + [EOD]
    # every document exactly once per epoch; the epochs are not all in the same order
    epochs = [tuple(train[i]["tokens"][0].item() for i in range(e, e + 4)) for e in (0, 4, 8, 12)]
    assert all(sorted(e) == [5, 9, 11, 100] for e in epochs)
    assert len(set(epochs)) > 1


def test_order_depends_only_on_seed_and_index(tmp_path, corpus):
    prefix, _ = corpus
    mk = lambda seed, cache: _build(
        DataConfig(
            data_path=[prefix],
            split="100,0,0",  # noqa: E731
            data_mode="per-document",
            data_cache_path=str(tmp_path / cache),
        ),
        seed=seed,
    )[0]
    a, b, c = mk(5, "c1"), mk(5, "c2"), mk(6, "c3")
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(30))
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(30))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_order_is_independent_of_workers_and_resumable(tmp_path, corpus, workers):
    prefix, _ = corpus
    train = _build(
        DataConfig(data_path=[prefix], split="100,0,0", data_cache_path=str(tmp_path / "c"))
    )[0]
    full = [b["tokens"] for b in build_data_loader(train, 0, 4, 1, 2, num_workers=workers)]
    reference = [
        torch.stack([train[i]["tokens"] for i in range(8 * k + 4, 8 * k + 8)])
        for k in range(len(full))
    ]
    assert all(torch.equal(x, y) for x, y in zip(full, reference, strict=True))
    resumed = [b["tokens"] for b in build_data_loader(train, 24, 4, 1, 2, num_workers=workers)]
    assert all(torch.equal(x, y) for x, y in zip(resumed, full[3:], strict=True))


def test_sampler_splits_global_batches_over_data_parallel_ranks():
    ranks = [list(PretrainingBatchSampler(24, 0, 2, r, 3)) for r in range(3)]
    assert ranks[0][:2] == [[0, 1], [6, 7]] and ranks[2][0] == [4, 5]
    assert sorted(i for r in ranks for b in r for i in b) == list(range(24))


def test_mock_data(tmp_path):
    train, _, _ = _build(DataConfig(mock_data=True), n=(10, 2, 0))
    assert train[0]["tokens"].shape == (16,)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(data_path=["0.5", "a", "b"]), "--data-path: expected 'weight prefix' pairs"),
        (dict(), "--data-path: give a dataset prefix"),
        (dict(data_path=["a"], data_mode="docs"), "--data-mode"),
        (dict(data_path=["a"], train_data_path=["b"]), "not both"),
    ],
)
def test_bad_data_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**bad).validate()


def test_parse_blend():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["1", "a", "3", "b"]) == (["a", "b"], [1.0, 3.0])
