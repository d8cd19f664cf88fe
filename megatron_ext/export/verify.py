"""Check an export against the checkpoint: same tokens through our model and the HF model.

Reports max |Δlogits| over the real vocabulary and both perplexities on a text sample (random
tokens when the run had no tokenizer), and whether the exported tokenizer encodes the sample to
the same ids as the original.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ext.checkpoint.weights import load_model
from megatron_ext.export.dcp_reader import DistCheckpointReader
from megatron_ext.export.megatron_model import build_cpu_model, megatron_logits

#: a few sentences of plain English used when no --verify-text is given
DEFAULT_TEXT = (
    "The committee met on Tuesday to discuss the new library. After a long debate, the members "
    "agreed that the building should open in the spring, with longer hours on weekends and a "
    "reading room for children. The budget, they said, would be published next month."
)


@dataclass
class VerifyReport:
    num_tokens: int
    max_abs_diff: float
    max_abs_logit: float
    ppl_megatron: float
    ppl_hf: float
    tokenizer_identical: Optional[bool]  # None: no tokenizer to compare

    def passed(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance and self.tokenizer_identical is not False

    def summary(self) -> str:
        tok = {None: "n/a", True: "identical ids", False: "DIFFERENT ids"}[self.tokenizer_identical]
        return (
            f"{self.num_tokens} tokens: max |Δlogits| {self.max_abs_diff:.3e} "
            f"(max |logit| {self.max_abs_logit:.3g}); perplexity ours {self.ppl_megatron:.4f}, "
            f"export {self.ppl_hf:.4f}; tokenizer: {tok}"
        )


def _perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten())
    return math.exp(loss.item())


def _original_ids(reader: DistCheckpointReader, text: str) -> Optional[list[int]]:
    tok = reader.tokenizer_config()
    kind, path = tok.get("tokenizer_type"), tok.get("tokenizer_model")
    if kind in (None, "NullTokenizer") or not path or not os.path.exists(path):
        return None
    from megatron_ext.data.tokenizers import build_tokenizer

    return list(build_tokenizer(kind, path).encode_batch([text])[0])


def _sample_tokens(export_dir: str, reader, text: str, seq_length: int, vocab: int):
    """([b, s] token windows, whether the export's tokenizer agrees with the original)."""
    tokenizer_file = os.path.join(export_dir, "tokenizer.json")
    if os.path.isfile(tokenizer_file):
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(tokenizer_file).encode(text, add_special_tokens=False).ids
        original = _original_ids(reader, text)
        identical = None if original is None else original == ids
    else:
        gen = torch.Generator().manual_seed(0)
        ids, identical = torch.randint(0, vocab, (4 * seq_length,), generator=gen).tolist(), None
    ids = ids[: 4 * seq_length]
    width = min(seq_length, len(ids))
    rows = max(1, len(ids) // width)
    return torch.tensor(ids[: rows * width]).view(rows, width), identical


def verify_export(checkpoint: str, export_dir: str, text: Optional[str] = None) -> VerifyReport:
    from transformers import AutoModelForCausalLM

    reader = DistCheckpointReader(checkpoint)
    model_cfg = reader.model_config()
    tokens, identical = _sample_tokens(
        export_dir, reader, text or DEFAULT_TEXT, model_cfg.seq_length, model_cfg.vocab_size
    )
    ours = build_cpu_model(model_cfg)
    load_model([ours], reader.directory)
    expected = megatron_logits(ours, tokens, model_cfg.vocab_size)
    del ours

    with open(os.path.join(export_dir, "config.json")) as f:
        remote = "auto_map" in json.load(f)
    hf = AutoModelForCausalLM.from_pretrained(
        export_dir, dtype=torch.float32, trust_remote_code=remote
    ).eval()
    with torch.no_grad():
        actual = hf(tokens).logits.float()
    return VerifyReport(
        num_tokens=tokens.numel(),
        max_abs_diff=(actual - expected).abs().max().item(),
        max_abs_logit=expected.abs().max().item(),
        ppl_megatron=_perplexity(expected, tokens),
        ppl_hf=_perplexity(actual, tokens),
        tokenizer_identical=identical,
    )
