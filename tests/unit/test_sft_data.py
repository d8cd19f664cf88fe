"""SFT data: the Alpaca and chat templates, the loss mask of hand-built records against the
expected token positions, bad records named, and the training sample built from it."""

import json
import os

import numpy as np
import pytest

from megatron_ext.data import sft
from megatron_ext.data.tokenizers import build_tokenizer

RECORD = {
    "instruction": "Which is a mammal?\n\nAnswer1: shark Answer2: whale",
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}


@pytest.fixture(scope="module")
def tokenizer(mistral_model):
    return build_tokenizer("SentencePieceTokenizer", mistral_model)


def test_alpaca_template_both_branches():
    assert sft.alpaca_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nQ?\n\n### Response:\n"
    )
    assert sft.alpaca_prompt("Q?", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nQ?\n\n### Input:\nctx\n\n### Response:\n"
    )


def test_loss_mask_covers_the_response_and_the_eod(tokenizer):
    """Expected positions re-derived by hand: the prompt's own tokens are 0, the rest of the
    whole text's tokens are 1, and so is the closing EOD."""
    ids, mask = sft.tokenize(tokenizer, sft.to_example(RECORD, "r"), loss_on_prompt=False)
    prompt = sft.alpaca_prompt(RECORD["instruction"])
    whole = tokenizer.encode_batch([prompt + RECORD["output"]])[0]
    n_prompt = len(tokenizer.encode_batch([prompt])[0])
    assert ids.tolist() == [*whole, tokenizer.eod]
    assert mask.tolist() == [0] * n_prompt + [1] * (len(whole) - n_prompt) + [1]
    decoded = tokenizer._impl.decode([int(i) for i, m in zip(ids, mask, strict=True) if m])
    assert decoded == "the correct answer is answer2"

    _, everywhere = sft.tokenize(tokenizer, sft.to_example(RECORD, "r"), loss_on_prompt=True)
    assert everywhere.tolist() == [1] * len(ids)


def test_chat_records_train_on_assistant_turns_only(tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]}  # fmt: skip
    ids, mask = sft.tokenize(tokenizer, sft.to_example(record, "r"), loss_on_prompt=False)
    trained = tokenizer._impl.decode([int(i) for i, m in zip(ids, mask, strict=True) if m])
    assert trained.split() == ["4", "6"]
    assert mask[-1] == 1 and ids[-1] == tokenizer.eod


@pytest.mark.parametrize(
    "record,message",
    [
        ({"input": "", "output": "x"}, "record 1: field 'instruction' is missing"),
        ({"instruction": 3, "output": "x"}, "record 1: field 'instruction' holds int"),
        ({"instruction": "q", "input": None, "output": "x"}, "record 1: field 'input' holds"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "message 0: field 'role' is 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ],
)
def test_a_bad_record_is_named_and_nothing_is_written(tokenizer, tmp_path, record, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([RECORD, record]))
    with pytest.raises(sft.SFTDataError) as err:
        sft.write_sft_dataset([str(path)], tokenizer, str(tmp_path / "out" / "sft"))
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_json_array_and_json_lines_give_the_same_dataset(tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    records = [dict(RECORD, output=f"the correct answer is answer{i % 2 + 1}") for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for name in ("a.json", "b.jsonl"):
        sft.write_sft_dataset([str(tmp_path / name)], tokenizer, str(tmp_path / name[0]))
    for prefix in ("", ".loss_mask"):
        a, b = (
            IndexedDataset(str(tmp_path / "a") + prefix),
            IndexedDataset(str(tmp_path / "b") + prefix),
        )
        assert len(a) == len(b) == 5
        assert all(np.array_equal(a[i], b[i]) for i in range(5))


def test_long_examples_are_truncated_or_dropped_and_counted(tokenizer, tmp_path):
    long = dict(RECORD, output="word " * 200)
    no_room = dict(RECORD, instruction="question " * 200)
    (tmp_path / "d.json").write_text(json.dumps([RECORD, long, no_room]))
    cut = sft.write_sft_dataset([str(tmp_path / "d.json")], tokenizer, str(tmp_path / "t"),
                                seq_length=64)  # fmt: skip
    assert (cut.examples, cut.truncated, cut.dropped_no_response) == (2, 2, 1)
    dropped = sft.write_sft_dataset([str(tmp_path / "d.json")], tokenizer, str(tmp_path / "d"),
                                    seq_length=64, long_examples="drop")  # fmt: skip
    assert (dropped.examples, dropped.dropped_long) == (1, 2)


def _sft_train_split(tokenizer, tmp_path, records, seq):
    """(prefix, training split) of ``records`` preprocessed, one sample per record."""
    from megatron_ext.config.data import DataConfig
    from megatron_ext.data.datasets import build_datasets

    (tmp_path / "d.json").write_text(json.dumps(records))
    prefix = str(tmp_path / "sft")
    sft.write_sft_dataset([str(tmp_path / "d.json")], tokenizer, prefix)
    train, _, _ = build_datasets(
        DataConfig(data_path=[prefix], split="100,0,0", data_mode="sft"),
        seq_length=seq, seed=1, vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod,
        num_samples=[len(records), 0, 0],
    )  # fmt: skip
    return prefix, train


def test_the_training_sample_shifts_the_mask_onto_the_labels(tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    seq = 96
    prefix, train = _sft_train_split(tokenizer, tmp_path, [RECORD] * 4, seq)
    tokens_ds, masks_ds = IndexedDataset(prefix), IndexedDataset(prefix + ".loss_mask")
    ids, mask = tokens_ds[0].copy(), masks_ds[0].copy()  # copies: the views die with the mmap
    sample = train[0]
    n = len(ids)
    assert sample["tokens"][:n].tolist() == ids.tolist()
    assert sample["labels"][: n - 1].tolist() == ids[1:].tolist()
    assert sample["loss_mask"].tolist() == [float(m) for m in mask[1:]] + [0.0] * (seq - n + 1)
    # each epoch visits every example once
    assert sorted(train._document(i) for i in range(4)) == [0, 1, 2, 3]


def test_an_examples_losses_do_not_depend_on_the_others_in_its_batch(tokenizer, tmp_path):
    """One example per sample (no packing): its per-token losses in a batch with others are
    those it has alone, on a real (randomly initialised) model."""
    import torch

    from megatron_ext.export.megatron_model import build_cpu_model, megatron_logits
    from megatron_ext.models.presets import model_preset

    records = [dict(RECORD, output=f"the correct answer is answer{i}", instruction=q)
               for i, q in enumerate(["Is ice cold?", "Which is larger, a cat or a car?",
                                      "What is two plus two?"])]  # fmt: skip
    seq = 96
    _, train = _sft_train_split(tokenizer, tmp_path, records, seq)
    samples = [train[i] for i in range(3)]
    cfg = model_preset("tiny", norm_type="pre_gpas", vocab_size=tokenizer.vocab_size,
                       seq_length=seq)  # fmt: skip
    model = build_cpu_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)

    def token_losses(batch):
        tokens = torch.stack([s["tokens"] for s in batch])
        labels = torch.stack([s["labels"] for s in batch])
        mask = torch.stack([s["loss_mask"] for s in batch])
        logits = megatron_logits(model, tokens, cfg.padded_vocab_size())
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return ce * mask

    alone = token_losses([samples[0]])[0]
    together = token_losses([samples[1], samples[0], samples[2]])[1]
    assert samples[0]["loss_mask"].sum() > 5
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_llm_adapters_template_keeps_its_indentation_and_trailing_spaces():
    """Written out by hand from LLM-Adapters' finetune.py: an f-string whose lines are indented
    16 spaces inside the function, so the spaces are part of the prompt."""
    pad = " " * 16
    assert sft.llm_adapters_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.  \n\n"
        f"{pad}### Instruction:\n{pad}Q?\n{pad}\n{pad}### Response:\n{pad}"
    )
    assert sft.llm_adapters_prompt("Q?", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request. \n\n"
        f"{pad}### Instruction:\n{pad}Q?\n{pad}\n{pad}### Input:\n{pad}ctx\n{pad}\n"
        f"{pad}### Response:\n{pad}"
    )
    example = sft.to_example(RECORD, "r", template="llm-adapters")
    assert example.segments[0][0] == sft.llm_adapters_prompt(RECORD["instruction"])


def _lmflow(path, kind, instances):
    path.write_text(json.dumps({"type": kind, "instances": instances}))
    return str(path)


def test_lmflow_text2text_trains_on_the_output(tokenizer, tmp_path):
    path = _lmflow(tmp_path / "t.json", "text2text", [{"input": "Q: 2+2?\nA:", "output": " 4"}])
    (example,) = list(sft.examples_of([path]))
    ids, mask = sft.tokenize(tokenizer, example, loss_on_prompt=False)
    n_input = len(tokenizer.encode_batch(["Q: 2+2?\nA:"])[0])
    assert mask.tolist() == [0] * n_input + [1] * (len(ids) - n_input)


@pytest.mark.parametrize(
    "body,message",
    [
        ({"type": "text_only", "instances": [{"text": "ok"}, {"txt": "x"}]},
         r"t\.json: instance 1: field 'text' is missing"),
        ({"type": "text2text", "instances": [{"input": "a", "output": 3}]},
         r"t\.json: instance 0: field 'output' holds int, not a string"),
        ({"type": "text_only", "instances": ["just text"]},
         r"t\.json: instance 0: an instance must be a JSON object, not str"),
        ({"type": "conversation", "instances": []},
         r"t\.json: LMFlow dataset type 'conversation' is not supported"),
        ({"instances": [{"text": "a"}]}, r"t\.json: LMFlow dataset type None"),
        ({"text": "a"}, r"t\.json: record 0: field 'instruction' is missing"),  # one JSON line
    ],
)  # fmt: skip
def test_bad_lmflow_files_are_named_with_the_instance(tmp_path, body, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(body))
    with pytest.raises(sft.SFTDataError, match=message):
        list(sft.examples_of([str(path)]))


def _read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, masks = IndexedDataset(prefix), IndexedDataset(sft.mask_prefix(prefix))
    return [(tokens[i].tolist(), masks[i].tolist()) for i in range(len(tokens))]


def test_packing_cuts_the_concatenated_tokens_into_full_blocks(tokenizer, tmp_path):
    texts = [f"Note {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 4)
             for i in range(30)]  # fmt: skip
    path = _lmflow(tmp_path / "t.json", "text_only", [{"text": t} for t in texts])
    summary = sft.write_sft_dataset([path], tokenizer, str(tmp_path / "p"), seq_length=32,
                                    pack=True)  # fmt: skip
    blocks = _read_documents(str(tmp_path / "p"))
    stream = [t for text in texts for t in [*tokenizer.encode_batch([text])[0], tokenizer.eod]]
    full = len(stream) // 32 * 32  # one group (30 < 1000 examples): one tail dropped
    assert [len(ids) for ids, _ in blocks] == [32] * (full // 32)
    assert all(mask == [1] * 32 for _, mask in blocks)  # text_only: every token trained
    assert [t for ids, _ in blocks for t in ids] == stream[:full]
    assert (summary.blocks, summary.examples) == (full // 32, 30)
    assert summary.remainder_tokens == len(stream) - full
    meta = json.load(open(tmp_path / "p.meta.json"))
    assert meta["sft"] == {"seq_length": 32, "packed": True, "template": "alpaca",
                           "loss_on_prompt": False}  # fmt: skip


def test_packing_drops_each_groups_tail_as_lmflow_does():
    summary = sft.SFTSummary("x", blocks=0)
    examples = [(np.arange(n) + 100 * n, np.ones(n, np.uint8)) for n in (5, 6, 7, 3, 9)]
    blocks = list(sft.pack_blocks(iter(examples), 4, summary, group=2))
    # groups: 5+6 = 11 → 2 blocks, 3 dropped; 7+3 = 10 → 2 blocks, 2 dropped; 9 → 2, 1 dropped
    assert len(blocks) == 6 and summary.remainder_tokens == 3 + 2 + 1
    first_group = np.concatenate([examples[0][0], examples[1][0]])
    assert np.concatenate([b for b, _ in blocks[:2]]).tolist() == first_group[:8].tolist()


def test_loss_tokens_kept_counts_labels_within_the_window(tmp_path):
    from megatron_ext.data.indexed_writer import IndexedDatasetWriter

    masks = [[0, 0, 1, 1], [0, 0, 0, 0, 0, 1], [1, 0], [0, 1, 1, 1, 1, 1, 1]]
    prefix = str(tmp_path / "d")
    writer = IndexedDatasetWriter(sft.mask_prefix(prefix), np.uint8)
    for m in masks:
        writer.add_documents(np.array(m, np.uint8), np.array([len(m)], np.int32))
    writer.finalize()
    for seq in (1, 2, 3, 5, 10):
        expected = [sum(m[1 : seq + 1]) for m in masks]  # the first token is never a label
        assert sft.loss_tokens_kept(prefix, seq).tolist() == expected, seq


def test_preprocessing_that_keeps_nothing_writes_nothing_and_says_why(tokenizer, tmp_path):
    path = tmp_path / "cs.json"
    path.write_text(json.dumps([RECORD] * 3))
    prefix = str(tmp_path / "out")
    with pytest.raises(sft.SFTDataError, match=r"none of the 3 examples was kept \(0 longer .*"
                       r"3 with no response token within --seq-length\)"):  # fmt: skip
        sft.write_sft_dataset([str(path)], tokenizer, prefix, seq_length=8)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]
