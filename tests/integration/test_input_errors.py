"""Bad input at the training boundary: one line ``error: <flag or file>: …; <what to do>``,
exit code 2, found before the model is built, and nothing written to --save.

Also the dataset sidecar (``<prefix>.meta.json``) that lets training refuse data made with
another tokenizer: the Mistral v1 (32,000 pieces) and v2 (32,768) SentencePiece models that the
mistral-common package ships pass every size check, yet give the same text different ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megatron_ext.data.dataset_info import DatasetInfo, sidecar_path
from megatron_ext.resilience import exit_codes
from tests.helpers import ROOT
from tests.helpers.dist_workers import run_cli, run_ranks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, english_docs, mistral_model):
    """Real English text preprocessed with the Mistral v1 SentencePiece model."""
    from megatron_ext.data.preprocess import PreprocessConfig, run_preprocess

    root = tmp_path_factory.mktemp("data")
    with open(root / "docs.jsonl", "w") as f:
        for doc in english_docs[:150]:
            f.write(json.dumps({"text": doc}) + "\n")
    summary = run_preprocess(
        PreprocessConfig(
            inputs=[str(root / "docs.jsonl")],
            output_prefix=str(root / "en"),
            tokenizer_type="SentencePieceTokenizer",
            tokenizer_model=mistral_model,
            append_eod=True,
            progress=False,
        )
    )
    return summary.merged[0]


@pytest.fixture(scope="module")
def v2_model(mistral_model):
    path = os.path.join(
        os.path.dirname(mistral_model), "mistral_instruct_tokenizer_240216.model.v2"
    )
    if not os.path.isfile(path):
        pytest.fail(f"mistral-common no longer ships {path}; the tokenizer-mismatch test needs it")
    return path


def _args(save, *extra, data=None, tokenizer=None, iters=2):
    args = ["--device", "cpu", "--model-size", "tiny", "--micro-batch-size", "2"]
    args += ["--global-batch-size", "2", "--train-iters", str(iters), "--eval-iters", "0"]
    args += ["--log-interval", "1", "--num-workers", "0", "--seq-length", "32"]
    args += ["--save", str(save), "--load", str(save)]
    if data is None:
        args += ["--mock-data", "--vocab-size", "512"]
    else:
        args += ["--data-path", data, "--split", "90,10,0"]
    if tokenizer is not None:
        args += ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer]
    return args + list(extra)


def _refused(capsys, argv) -> str:
    """Run the CLI in this process; it must refuse with exit 2 and one error line."""
    from megatron_ext.cli import pretrain as pretrain_gpas

    assert pretrain_gpas.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _listing(path) -> dict:
    """Every file under ``path`` with its size and modification time (empty: nothing there)."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            out[full] = (st.st_size, st.st_mtime_ns)
    return out


# --- the sidecar -------------------------------------------------------------------------------


def test_preprocessing_describes_its_dataset(dataset, mistral_model):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    info = DatasetInfo.read(dataset)
    ds = IndexedDataset(dataset)
    tokens = np.concatenate([ds[i] for i in range(len(ds))])
    assert info.tokenizer_type == "SentencePieceTokenizer"
    assert info.tokenizer_fingerprint == (
        "sha256:" + hashlib.sha256(open(mistral_model, "rb").read()).hexdigest()
    )
    assert (info.vocab_size, info.eod_id) == (32000, 2)
    assert info.documents == len(ds) == 150
    assert info.tokens == len(tokens)
    assert info.max_token_id == int(tokens.max())
    assert 1000 < info.max_token_id < 32000


# --- one error per row of the table ----------------------------------------------------


def test_token_ids_beyond_the_vocabulary_are_refused_from_the_sidecar(capsys, dataset, tmp_path):
    save = tmp_path / "run"
    line = _refused(capsys, _args(save, "--vocab-size", "512", data=dataset))
    assert line.startswith("error: --vocab-size: ") and dataset in line
    assert "token id" in line
    assert not save.exists()


def test_token_ids_beyond_the_vocabulary_without_a_sidecar_stop_at_the_first_batch(
    dataset, tmp_path
):
    """A dataset made before sidecars existed: the ids are checked on the host, batch by batch,
    before the embedding sees them; the run stops with one line and exit code 2."""
    legacy = str(tmp_path / "legacy")
    for ext in (".bin", ".idx"):
        shutil.copy(dataset + ext, legacy + ext)
    save = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "pretrain_gpas.py", *_args(save, "--vocab-size", "512", data=legacy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == exit_codes.BAD_INPUT, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "no .meta.json description" in proc.stderr  # the warning at start
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {legacy}: a batch holds token id"), last
    assert not any(p.name.startswith("iter_") for p in save.iterdir())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-iteration pre-LN run saved under ./ckpt (4-layer tiny4 model, mock data)."""
    root = tmp_path_factory.mktemp("ckpt")
    save = root / "ckpt"
    argv = _args(save, "--norm-type", "pre", "--model-size", "tiny4")
    assert run_ranks(run_cli, 1, (argv,), root) == [0]
    return save


@pytest.mark.parametrize(
    "changed,named",
    [
        (["--num-layers", "2"], "--num-layers 2 (checkpoint: 4)"),
        (["--norm-type", "pre_gpas"], "--norm-type pre_gpas (checkpoint: pre)"),
        (
            ["--hidden-size", "128", "--ffn-hidden-size", "352"],
            "--hidden-size 128 (checkpoint: 64)",
        ),
        (["--vocab-size", "1000"], "--vocab-size 1001 (checkpoint: 513)"),  # + the EOD row
    ],
)
def test_resume_with_another_architecture_names_each_flag(capsys, checkpoint, changed, named):
    before = _listing(checkpoint)
    argv = _args(checkpoint, "--norm-type", "pre", "--model-size", "tiny4", *changed)
    line = _refused(capsys, argv)
    assert line.startswith("error: --load: ") and "iter_0000002" in line
    assert named in line
    assert _listing(checkpoint) == before  # checkpoint and metrics untouched


def test_resume_may_change_layout_batch_and_schedule(checkpoint, tmp_path):
    """The documented freedoms: layout, batch size, learning rate, iterations."""
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    argv = _args(moved, "--norm-type", "pre", "--model-size", "tiny4", iters=3)
    argv[argv.index("--global-batch-size") + 1] = "4"
    argv += ["--lr", "5e-4", "--tensor-model-parallel-size", "2"]
    assert run_ranks(run_cli, 2, (argv,), tmp_path) == [0, 0]
    assert (moved / "iter_0000003").is_dir()


def test_a_bin_file_cut_short_is_named(capsys, dataset, tmp_path):
    cut = str(tmp_path / "cut")
    shutil.copy(dataset + ".idx", cut + ".idx")
    data = open(dataset + ".bin", "rb").read()
    with open(cut + ".bin", "wb") as f:
        f.write(data[: len(data) // 2])
    save = tmp_path / "run"
    line = _refused(capsys, _args(save, data=cut, tokenizer=None) + ["--vocab-size", "32000"])
    assert line.startswith(f"error: {cut}.bin: holds {len(data) // 2:,} bytes")
    assert "cut short" in line
    assert not save.exists()


@pytest.mark.parametrize("missing", ["--train-data-path", "--test-data-path"])
def test_a_missing_dataset_prefix_names_the_flag(capsys, tmp_path, dataset, missing):
    save = tmp_path / "run"
    nope = str(tmp_path / "nope")
    argv = _args(save, "--vocab-size", "32000")
    argv.remove("--mock-data")
    for flag in ("--train-data-path", "--valid-data-path", "--test-data-path"):
        argv += [flag, nope if flag == missing else dataset]
    line = _refused(capsys, argv)
    assert line.startswith(f"error: {missing}: {nope}.bin and {nope}.idx not found")
    assert not save.exists()


def test_a_split_without_documents_is_refused_rather_than_hanging(capsys, dataset, tmp_path):
    """150 documents × 1/1000 rounds to no test document; megatron-core would loop forever."""
    save = tmp_path / "run"
    argv = _args(save, "--vocab-size", "32000", data=dataset)
    argv += ["--split", "969,30,1"]
    line = _refused(capsys, argv)
    assert line.startswith("error: --split: the test share of '969,30,1' is no whole document")
    assert dataset in line and "150 documents" in line
    assert not save.exists()


def test_a_missing_tokenizer_model_is_one_line(capsys, tmp_path, dataset):
    save = tmp_path / "run"
    line = _refused(capsys, _args(save, data=dataset, tokenizer=str(tmp_path / "none.model")))
    assert line.startswith("error: --tokenizer-model: no SentencePiece model at")
    assert not save.exists()


# --- data that knows its tokenizer -------------------------------------------------------------


def test_data_from_another_tokenizer_of_a_larger_vocabulary_is_refused(
    capsys, dataset, v2_model, mistral_model, tmp_path
):
    from megatron_ext.data.tokenizers import build_tokenizer

    v1 = build_tokenizer("SentencePieceTokenizer", mistral_model)
    v2 = build_tokenizer("SentencePieceTokenizer", v2_model)
    text = ["The quick brown fox jumps over the lazy dog."]
    assert v2.vocab_size > v1.vocab_size  # every size check passes …
    assert v1.encode_batch(text) != v2.encode_batch(text)  # … yet the ids differ
    save = tmp_path / "run"
    line = _refused(capsys, _args(save, data=dataset, tokenizer=v2_model))
    assert line.startswith("error: --tokenizer-model: ") and dataset in line
    assert "another tokenizer" in line and "--override-tokenizer-check" in line
    assert not save.exists()


def test_override_tokenizer_check_lets_a_deliberate_mismatch_through(dataset, v2_model, tmp_path):
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.trainer import Trainer

    argv = _args(tmp_path / "run", "--override-tokenizer-check", data=dataset, tokenizer=v2_model)
    trainer = Trainer(parse_run_config(argv))
    assert list(trainer.resolved.undescribed_data) == []
    assert not (tmp_path / "run").exists()


def test_a_dataset_without_sidecar_still_loads(dataset, mistral_model, tmp_path):
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.trainer import Trainer

    legacy = str(tmp_path / "legacy")
    for ext in (".bin", ".idx"):
        shutil.copy(dataset + ext, legacy + ext)
    assert not os.path.exists(sidecar_path(legacy))
    trainer = Trainer(
        parse_run_config(_args(tmp_path / "run", data=legacy, tokenizer=mistral_model))
    )
    assert list(trainer.resolved.undescribed_data) == [legacy]


def test_the_same_tokenizer_passes(dataset, mistral_model, tmp_path):
    from megatron_ext.planning.arguments import parse_run_config
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(
        parse_run_config(_args(tmp_path / "r", data=dataset, tokenizer=mistral_model))
    )
    assert list(trainer.resolved.undescribed_data) == []


def test_errors_print_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "pretrain_gpas.py", *_args(tmp_path / "r", "--num-layers", "0")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == exit_codes.BAD_INPUT
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --num-layers: ")


def test_a_tokenizer_vocabulary_that_tp_cannot_split_is_refused_before_building(
    capsys, tmp_path, monkeypatch
):
    """The null tokenizer adds its end-of-document row (512 → 513): the flags alone pass, the
    run's configuration with the tokenizer's vocabulary does not."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = _args(tmp_path / "run", "--tensor-model-parallel-size", "2")
    argv += ["--make-vocab-size-divisible-by", "1"]
    line = _refused(capsys, argv)
    assert line.startswith("error: --make-vocab-size-divisible-by: ") and "513" in line
    assert not (tmp_path / "run").exists()


# --- what --save and --load name, and datasets with nothing in them ----------------------------


def test_a_pointer_naming_a_missing_checkpoint_is_one_line(capsys, checkpoint, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    (moved / "latest_checkpointed_iteration.txt").write_text("5")
    before = _listing(moved)
    line = _refused(capsys, _args(moved, "--norm-type", "pre", "--model-size", "tiny4"))
    assert line.startswith(f"error: --load: {moved}/latest_checkpointed_iteration.txt names ")
    assert "iteration 5, but" in line and "iter_0000005 is missing" in line
    assert _listing(moved) == before


@pytest.mark.parametrize("flag", ["--load", "--save"])
def test_a_checkpoint_flag_naming_a_file_is_refused(capsys, tmp_path, flag):
    """A --load file used to train from scratch silently and write a checkpoint."""
    afile = tmp_path / "model.pt"
    afile.write_bytes(b"weights")
    save = tmp_path / "run"
    argv = _args(save)
    argv[argv.index(flag) + 1] = str(afile)
    line = _refused(capsys, argv)
    assert line.startswith(f"error: {flag}: {afile} is a file, not a directory")
    assert not save.exists() and afile.read_bytes() == b"weights"


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_load_other_than_save_must_hold_a_checkpoint(capsys, tmp_path, state):
    """--load = --save with nothing there is a first run (Megatron's auto-resume convention);
    a --load elsewhere holding nothing is a typo that would silently train from scratch."""
    load, save = tmp_path / "pretrained", tmp_path / "run"
    if state == "empty":
        load.mkdir()
    argv = _args(save)
    argv[argv.index("--load") + 1] = str(load)
    what = "does not exist" if state == "missing" else "holds no checkpoint"
    assert _refused(capsys, argv).startswith(f"error: --load: {load} {what}")
    assert not save.exists()


@pytest.mark.parametrize("lengths", [[], [0, 0, 0]], ids=["no_documents", "no_tokens"])
def test_a_dataset_with_nothing_in_it_is_one_line(capsys, tmp_path, lengths):
    from megatron_ext.data.indexed_writer import bin_path, idx_path, write_index

    prefix = str(tmp_path / "empty_text_document")
    open(bin_path(prefix), "wb").close()
    write_index(idx_path(prefix), np.uint16, np.array(lengths, dtype=np.int32))
    save = tmp_path / "run"
    argv = _args(save)
    argv.remove("--mock-data")
    argv += ["--data-path", prefix, "--split", "100,0,0"]
    line = _refused(capsys, argv)
    what = "no documents" if not lengths else "3 documents but no tokens"
    assert line.startswith(f"error: --data-path: {prefix} holds {what}")
    assert not save.exists()
