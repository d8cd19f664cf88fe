"""Model presets have the reference shapes (spec §4), and the parameter-count helper is exact."""

import pytest

from megatron_ext.models.gpt import build_model, build_transformer_config
from megatron_ext.models.params import count_parameters
from megatron_ext.models.presets import PRESET_NAMES, model_preset

# Totals (untied embedding + head, vocab 32000) computed independently in spec §4, in millions,
# and the non-embedding parameter counts.
SPEC_TOTALS = {"71m": 70.6, "130m": 134.1, "250m": 247.4, "350m": 368.0, "1b": 1339.1, "7b": 6738.4}
SPEC_NON_EMBEDDING = {
    "71m": 37.8,
    "130m": 85.0,
    "250m": 198.2,
    "350m": 302.4,
    "1b": 1208.0,
    "7b": 6476.3,
}


@pytest.mark.parametrize("name", list(SPEC_TOTALS))
def test_reference_presets_match_spec_counts(name):
    count = count_parameters(model_preset(name, norm_type="pre"))
    assert count.total / 1e6 == pytest.approx(SPEC_TOTALS[name], abs=0.05)
    assert count.non_embedding / 1e6 == pytest.approx(SPEC_NON_EMBEDDING[name], abs=0.05)


@pytest.mark.parametrize("name", ["71m", "250m"])
def test_reference_preset_names_are_within_3_percent(name):
    """Where the name is a parameter count (71m, 250m), the count is within 3% of it."""
    target = {"71m": 71e6, "250m": 250e6}[name]
    assert abs(count_parameters(model_preset(name)).total / target - 1) < 0.03


def test_reference_shapes():
    cfg = model_preset("7b")
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.num_attention_heads) == (
        4096,
        11008,
        32,
        32,
    )
    assert cfg.vocab_size == 32000 and cfg.seq_length == 256
    assert model_preset("1b").ffn_hidden_size == 5461


@pytest.mark.parametrize(
    "norm_type,extra_norms,gates",
    [("pre", 0, 0), ("pre_gpas", 0, 12), ("sandwich", 2 * 12, 0), ("post_pre_gpas", 0, 12)],
)
def test_count_tracks_architecture(norm_type, extra_norms, gates):
    base = count_parameters(model_preset("71m", norm_type="pre"))
    count = count_parameters(model_preset("71m", norm_type=norm_type))
    assert count.total - base.total == extra_norms * 512 + gates
    assert count.gates == gates


@pytest.mark.parametrize("norm_type", ["pre_gpas", "sandwich_gpas", "post_pre"])
def test_count_equals_built_model(megatron_cpu, norm_type):
    cfg = model_preset("tiny4", norm_type=norm_type)
    model = build_model(cfg, build_transformer_config(cfg, use_cpu=True))
    built = sum(p.numel() for p in model.parameters())
    assert built == count_parameters(cfg, padded_vocab=True).total


def test_count_is_printable():
    text = str(count_parameters(model_preset("71m", norm_type="pre_gpas")))
    assert "70.6M parameters" in text and "12 GPAS gates" in text


def test_unknown_preset_names_the_flag():
    with pytest.raises(ValueError, match="--model-size"):
        model_preset("3b")
    assert "tiny" in PRESET_NAMES
