"""Hugging Face export and import (tools/convert_to_hf.py, tools/convert_from_hf.py).

Checkpoints of all 11 norm types are trained for two steps under TP=2 and PP=2 with the gates
moved away from 0 first (layer 1's gate gives a negative scale c). Each export must reproduce
the logits of our model loaded from the same checkpoint (which tests/unit/test_variants_reference.py
holds to the plain re-derivation of the spec).
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_ext.export.dcp_reader import CheckpointError, DistCheckpointReader
from megatron_ext.export.llama_fold import FoldError
from megatron_ext.export.to_hf import ExportOptions, export_to_hf
from megatron_ext.export.verify import verify_export
from megatron_ext.variants import NORM_TYPE_NAMES
from tests.helpers import ROOT
from tests.helpers.dist_workers import run_ranks, train_layout

pytestmark = pytest.mark.slow

# c_l = 1 − SiLU(g_l) ≈ 1.19, −1.0, 1.09, 0.90: away from 1, negative at layer 1
GATES = [-0.5, 2.25, -0.2, 0.18]
LAYOUTS = {"tp2": {"tensor_model_parallel_size": 2}, "pp2": {"pipeline_model_parallel_size": 2}}
FOLDABLE = ("pre", "lns", "pre_gpas", "lns_gpas")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_checkpoints")
    for name, layout in LAYOUTS.items():
        args = (layout, NORM_TYPE_NAMES, None, 2, GATES, str(root / name))
        run_ranks(train_layout, 2, args, root)
    return root


def _export(checkpoint, out, **kw):
    return export_to_hf(ExportOptions(str(checkpoint), str(out), overwrite=True, **kw))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("norm_type", NORM_TYPE_NAMES)
def test_export_reproduces_our_logits(checkpoints, tmp_path, norm_type, layout):
    ckpt = checkpoints / layout / norm_type
    targets = ["llama", "gpas"] if norm_type in FOLDABLE else ["gpas"]
    reader = DistCheckpointReader(str(ckpt))
    if norm_type.endswith("_gpas"):
        gate = reader.layer_tensor(1, "gpas_gate").double()
        assert 1 - torch.nn.functional.silu(gate) < 0, "the test needs a negative c_l"
    for target in targets:
        out = tmp_path / target
        result = _export(ckpt, out, target=target)
        assert result.target == target
        report = verify_export(str(ckpt), str(out))
        assert report.max_abs_diff <= TOLERANCE, (target, report.summary())
        assert report.max_abs_logit > 0.1  # a real comparison, not of two zero tensors
        assert abs(report.ppl_hf / report.ppl_megatron - 1) < 1e-4
        config = json.load(open(out / "config.json"))
        assert ("auto_map" in config) == (target == "gpas")


def test_stock_llama_export_loads_without_remote_code_and_generates(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _export(checkpoints / "pp2" / "pre_gpas", tmp_path / "llama")
    assert not any(f.endswith(".py") for f in os.listdir(tmp_path / "llama"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")  # no trust_remote_code
    assert type(model) is LlamaForCausalLM
    prompt = torch.tensor([[5, 17, 42, 8]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], prompt)


@pytest.mark.parametrize("norm_type", ["sandwich_gpas", "post_pre_gpas", "deeppost"])
def test_gpas_export_generates_with_kv_cache(checkpoints, tmp_path, norm_type):
    """Cached incremental decoding equals re-running the whole sequence."""
    from transformers import AutoModelForCausalLM

    _export(checkpoints / "tp2" / norm_type, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    prompt = torch.tensor([[3, 9, 27, 81, 243]])
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    nocache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(out, nocache)


def test_llama_target_of_a_post_norm_type_is_refused(checkpoints, tmp_path):
    with pytest.raises(FoldError, match="--target gpas"):
        _export(checkpoints / "tp2" / "sandwich", tmp_path / "x", target="llama")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.tmp")


def test_missing_and_partial_checkpoints_are_named(checkpoints, tmp_path):
    import shutil

    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        DistCheckpointReader(str(tmp_path / "nowhere"))
    partial = tmp_path / "partial"
    shutil.copytree(checkpoints / "tp2" / "pre", partial)
    iteration_dir = partial / "iter_0000002"
    victim = sorted(f for f in os.listdir(iteration_dir) if f.endswith(".distcp"))[-1]
    os.remove(iteration_dir / victim)
    with pytest.raises(CheckpointError, match=re.escape(victim)):
        DistCheckpointReader(str(partial))
    os.replace(iteration_dir, str(iteration_dir) + ".tmp")
    with pytest.raises(CheckpointError, match="names iteration 2"):
        DistCheckpointReader(str(partial))
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoints / "tp2" / "pre", truncated)
    with open(truncated / "iter_0000002" / victim, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=f"is damaged: .*{re.escape(victim)}: 100 bytes"):
        DistCheckpointReader(str(truncated))
    # the same size, other contents: every reader runs the same check (hashes included)
    altered = tmp_path / "altered"
    shutil.copytree(checkpoints / "tp2" / "pre", altered)
    shard = altered / "iter_0000002" / victim
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    expected = re.escape(f"checkpoint {altered}/iter_0000002 is damaged: {shard}: contents differ")
    with pytest.raises(CheckpointError, match=expected):
        DistCheckpointReader(str(altered))
    from megatron_ext.checkpoint.weights import load_model
    from megatron_ext.export.megatron_model import build_cpu_model

    cfg = DistCheckpointReader(str(checkpoints / "tp2" / "pre")).model_config()
    with pytest.raises(CheckpointError, match=expected):
        load_model([build_cpu_model(cfg)], str(altered))


def test_existing_output_is_kept_without_overwrite(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_to_hf(ExportOptions(str(checkpoints / "tp2" / "pre"), str(out)))
    assert (out / "keep.txt").read_text() == "mine"


def test_sharded_output_and_index(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    result = _export(checkpoints / "tp2" / "pre", tmp_path / "m", max_shard_size="40KB")
    assert len(result.files) > 3
    index = json.load(open(tmp_path / "m" / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(result.files)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert len(index["weight_map"]) == len(model.state_dict())


def _random_llama(directory, vocab=300):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def _run_tool(*argv):
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def _convert_to_hf(load, output, *flags):
    return _run_tool("tools/convert_to_hf.py", "--load", str(load), "--output", str(output), *flags)


def test_hf_llama_to_ours_to_hf_is_the_identity(tmp_path):
    from safetensors.torch import load_file

    llama = _random_llama(tmp_path / "llama")
    imported = _run_tool(
        "tools/convert_from_hf.py",
        "--hf-dir",
        str(tmp_path / "llama"),
        "--save",
        str(tmp_path / "ours"),
    )
    assert imported.returncode == 0, imported.stderr
    assert "--norm-type pre" in imported.stderr and "--num-query-groups 2" in imported.stderr
    exported = _convert_to_hf(tmp_path / "ours", tmp_path / "back", "--verify")
    assert exported.returncode == 0, exported.stderr
    assert "verify passed" in exported.stderr
    original, back = (
        load_file(tmp_path / "llama" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert sorted(original) == sorted(back)
    for name in original:
        assert torch.equal(original[name], back[name]), name
    # our model (padded vocabulary 384) gives the Llama's logits on the real 300 entries
    from megatron_ext.checkpoint.weights import load_model
    from megatron_ext.export.megatron_model import build_cpu_model, megatron_logits

    cfg = DistCheckpointReader(str(tmp_path / "ours")).model_config()
    # the printed model flags rebuild exactly the imported architecture
    from megatron_ext.config import ARCHITECTURE_FIELDS
    from megatron_ext.planning.arguments import parse_run_config

    printed = imported.stderr.split("model flags: ", 1)[1].splitlines()[0].split()
    rebuilt = parse_run_config(printed).model
    for name in ARCHITECTURE_FIELDS:
        assert getattr(rebuilt, name) == getattr(cfg, name), name
    ours = build_cpu_model(cfg)
    load_model([ours], str(tmp_path / "ours"))
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = llama(tokens).logits
    assert (megatron_logits(ours, tokens, 300) - expected).abs().max() <= TOLERANCE


def test_cli_reports_errors_with_exit_code(checkpoints, tmp_path):
    bad = _convert_to_hf(tmp_path / "none", tmp_path / "o")
    assert bad.returncode == 2 and "no checkpoint directory" in bad.stderr
    refused = _convert_to_hf(
        checkpoints / "tp2" / "deeppost_gpas", tmp_path / "o", "--target", "llama"
    )
    assert refused.returncode == 2 and "--target gpas" in refused.stderr


def test_sentencepiece_tokenizer_export_matches(mistral_model, english_docs, tmp_path):
    """The exported tokenizer.json encodes real English like the SentencePiece model; the only
    known differences are splits inside runs of 4+ spaces."""
    import difflib

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_ext.export.tokenizer_export import export_tokenizer

    ids = export_tokenizer("SentencePieceTokenizer", mistral_model, str(tmp_path))
    assert (ids.bos, ids.eos, ids.unk) == (1, 2, 0)
    sp = spm.SentencePieceProcessor(model_file=mistral_model)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    total = differing = 0
    for doc in english_docs:
        want, got = sp.encode(doc), hf.encode(doc, add_special_tokens=False)
        total += len(want)
        if want != got:
            assert re.search(" {4}", doc), doc[:200]
            blocks = difflib.SequenceMatcher(a=want, b=got, autojunk=False).get_matching_blocks()
            differing += len(want) - sum(b.size for b in blocks)
        # either way the two decode to the same text (up to how whitespace runs are split)
        assert " ".join(hf.decode(got).split()) == " ".join(sp.decode(want).split())
    assert differing / total < 0.01


def test_tokenizer_travels_with_the_export_and_is_verified(mistral_model, tmp_path):
    """A run trained with a SentencePiece model: --verify checks the tokenizer ids too."""
    import dataclasses

    from megatron_ext.checkpoint.save_load import save_checkpoint
    from megatron_ext.export.megatron_model import build_cpu_model
    from megatron_ext.models.presets import model_preset

    cfg = model_preset("tiny", norm_type="pre_gpas", vocab_size=32000)
    model = build_cpu_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    tokenizer = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": mistral_model}
    run_state = {"config": {"model": dataclasses.asdict(cfg), "tokenizer": tokenizer}}
    save_checkpoint(str(tmp_path / "ck"), 1, [model], None, None, run_state)
    done = _convert_to_hf(tmp_path / "ck", tmp_path / "hf", "--verify")
    assert done.returncode == 0, done.stderr
    assert "tokenizer: identical ids" in done.stderr
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(
        os.listdir(tmp_path / "hf")
    )
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    # the fingerprint training checks against each dataset's sidecar travels with the export
    from megatron_ext.data.dataset_info import tokenizer_fingerprint

    tok_config = json.load(open(tmp_path / "hf" / "tokenizer_config.json"))
    assert tok_config["gpas_tokenizer_fingerprint"] == tokenizer_fingerprint(mistral_model)


def test_llama_fold_is_exact_with_per_norm_epsilon(tmp_path):
    """Gates that shrink the stream ~40× make the shared-ε effect of a stock Llama visible
    (spec §9); with each norm's ε/P² the folded Llama is exact, so only ε differs."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from megatron_ext.checkpoint.save_load import save_checkpoint
    from megatron_ext.export.megatron_model import build_cpu_model, megatron_logits
    from megatron_ext.models.presets import model_preset
    from tests.helpers.dist_workers import set_gates

    cfg = model_preset("tiny4", norm_type="lns_gpas", lns_mode="fixed")
    model = build_cpu_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
            else:
                p.add_(0.1 * torch.randn_like(p))
    set_gates([model], [0.4, -0.9, 1.6, 0.7])  # c ≈ 0.76, 1.26, −0.33, 0.53
    run_state = {"config": {"model": dataclasses.asdict(cfg)}}
    save_checkpoint(str(tmp_path / "ck"), 1, [model], None, None, run_state)
    result = _export(tmp_path / "ck", tmp_path / "hf", target="llama")
    fold = result.fold
    assert abs(fold.final_scale) < 0.05 and min(fold.mlp_scale) < 0
    assert "worst ε effect at the final norm" in fold.epsilon_report()

    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    expected = megatron_logits(model, tokens, cfg.vocab_size)
    with torch.no_grad():
        shared = (llama(tokens).logits - expected).abs().max().item()
        for i, layer in enumerate(llama.model.layers):
            layer.input_layernorm.variance_epsilon = fold.eps / fold.attn_scale[i] ** 2
            layer.post_attention_layernorm.variance_epsilon = fold.eps / fold.mlp_scale[i] ** 2
        llama.model.norm.variance_epsilon = fold.eps / fold.final_scale**2
        exact = (llama(tokens).logits - expected).abs().max().item()
    assert exact <= TOLERANCE, exact
    assert shared > 10 * exact  # the shared ε is what differs, and the report says where


@pytest.mark.parametrize("lns_mode", ["gamma", "fixed"])
def test_hf_config_resolves_layers_like_training(lns_mode):
    """configuration_gpas.py carries its own copy of the norm-type table (exports must not
    import this package); it must resolve every layer as megatron_ext.variants does."""
    from megatron_ext.hf.configuration_gpas import GPASConfig
    from megatron_ext.variants import GPASPlacement, layer_recipe

    for norm_type in NORM_TYPE_NAMES:
        config = GPASConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=8,
            num_attention_heads=4,
            norm_type=norm_type,
            lns_mode=lns_mode,
        )
        for i in range(8):
            recipe = layer_recipe(norm_type, i, 8, post_num=2, lns_mode=lns_mode)
            assert config.layer_style(i) == recipe.style.value, (norm_type, i)
            assert config.has_gpas == (recipe.gpas is not GPASPlacement.NONE)
            if recipe.style.value == "post":
                assert config.residual_scale() == pytest.approx(recipe.residual_scale)
            assert config.pre_norm_output_scale(i) == pytest.approx(recipe.pre_norm_output_scale)


def _random_indexed_dataset(prefix: str, vocab: int, docs: int = 6, length: int = 40) -> None:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    gen = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(docs):
        builder.add_document(torch.from_numpy(gen.integers(0, vocab, length)), [length])
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("norm_type", ["post_pre_gpas", "sandwich_gpas"])
def test_depth_analysis_of_a_checkpoint_matches_the_model_with_a_layer_removed(
    checkpoints, tmp_path, norm_type
):
    """Skipping layer l must give the loss of the same model with layer l deleted (computed by
    the HF model's own loss); angular distances and RMS must match the HF hidden states."""
    import copy

    from megatron_ext.analysis import depth
    from megatron_ext.hf.modeling_gpas import GPASForCausalLM

    ckpt = checkpoints / "pp2" / norm_type
    model_cfg = DistCheckpointReader(str(ckpt)).model_config()
    prefix = str(tmp_path / "valid")
    _random_indexed_dataset(prefix, model_cfg.vocab_size)
    seq = model_cfg.seq_length
    tokens = depth.validation_windows(prefix, 4, seq)
    model, found = depth.load_hf_model(str(ckpt))  # exported on the fly
    assert found == norm_type
    report = depth.analyze(model, tokens, label=norm_type, source=str(ckpt), norm_type=found)

    _export(ckpt, tmp_path / "export", target="gpas", dtype="float32")
    hf = GPASForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    L = hf.config.num_hidden_layers
    with torch.no_grad():
        full = hf(tokens, labels=tokens, output_hidden_states=True)
        assert report.loss == pytest.approx(full.loss.item(), rel=1e-5)
        for skipped in range(L):
            cut = copy.deepcopy(hf)
            cut.model.layers = torch.nn.ModuleList(
                layer for i, layer in enumerate(hf.model.layers) if i != skipped
            )
            cut.config.num_hidden_layers = L - 1
            expected = cut(tokens, labels=tokens, use_cache=False).loss.item()
            # the differences, to a precision well below the layers' effects (asserted below)
            assert report.importance[skipped] == pytest.approx(
                expected - full.loss.item(), abs=2e-6
            ), skipped
    # HF's hidden states: the embeddings, then each layer's output (the last one normed).
    hs = [h.double() for h in full.hidden_states]
    for layer in range(L - 1):
        a, b = hs[layer].flatten(0, 1), hs[layer + 1].flatten(0, 1)
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        angle = (torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean().item()
        assert report.angular_distance[layer] == pytest.approx(angle, rel=1e-5, abs=1e-7)
    for i in range(L):
        assert report.rms[i] == pytest.approx(hs[i].pow(2).mean().sqrt().item(), rel=1e-5)
    assert report.gpas_scales == pytest.approx(hf.gpas_scales())
    assert max(abs(x) for x in report.importance) > 1e-4  # the layers do something


def test_depth_analysis_tool_compares_two_models(checkpoints, tmp_path):
    ckpt = checkpoints / "tp2"
    model_cfg = DistCheckpointReader(str(ckpt / "pre")).model_config()
    prefix = str(tmp_path / "valid")
    _random_indexed_dataset(prefix, model_cfg.vocab_size)
    _export(ckpt / "pre_gpas", tmp_path / "pre_gpas_export", target="llama")
    proc = _run_tool(
        "tools/depth_analysis.py",
        "--model",
        str(ckpt / "pre"),
        str(tmp_path / "pre_gpas_export"),
        "--labels",
        "pre",
        "pre_gpas_llama",
        "--data-path",
        prefix,
        "--num-sequences",
        "3",
        "--out",
        str(tmp_path / "depth"),
    )
    assert proc.returncode == 0, proc.stderr
    reports = json.load(open(tmp_path / "depth" / "depth.json"))
    assert [r["label"] for r in reports] == ["pre", "pre_gpas_llama"]
    assert reports[1]["norm_type"] == "llama"
    assert all(len(r["importance"]) == model_cfg.num_layers for r in reports)
    md = open(tmp_path / "depth" / "depth.md").read()
    assert "Importance side by side" in md and "| pre | pre_gpas_llama |" in md
    assert os.path.getsize(tmp_path / "depth" / "depth.png") > 10_000
    bad = _run_tool(
        "tools/depth_analysis.py",
        "--model",
        str(tmp_path / "nothing"),
        "--data-path",
        prefix,
        "--out",
        str(tmp_path / "d2"),
    )
    assert bad.returncode == 2 and "no directory at" in bad.stderr
