"""Asking for Transformer Engine's layers where it is not installed is one clear line (the
training CLI rejects it on CPU before building; a GPU machine without TE reaches the spec)."""

import pytest

from megatron_ext.config import ConfigError, ModelConfig
from megatron_ext.layers.specs import get_layer_spec, model_layer_recipes


def test_the_te_spec_without_transformer_engine_names_what_to_install():
    from megatron.core.extensions import transformer_engine as te_extension

    if getattr(te_extension, "HAVE_TE", False):
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ConfigError, match=r"^--transformer-impl transformer_engine needs Trans"):
        get_layer_spec(model_layer_recipes(ModelConfig(num_layers=2))[0], "transformer_engine")
