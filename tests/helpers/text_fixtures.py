"""Real English text and real tokenizers for tests, from registry packages only.

* Text: the documentation strings of Python's standard library (real English prose, present in
  every Python installation).
* SentencePiece: the Mistral-7B v0.1 tokenizer shipped inside the ``mistral-common`` package
  (BPE, 32,000 pieces, EOS 2), found without importing that package.
* Hugging Face: a byte-level BPE trained here with the ``tokenizers`` library on that text.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os

_MODULES = (
    "json",
    "argparse",
    "collections",
    "csv",
    "email",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "logging",
    "pathlib",
    "pickle",
    "random",
    "shutil",
    "string",
    "tarfile",
    "textwrap",
    "threading",
    "unittest",
    "urllib.request",
    "zipfile",
    "decimal",
    "difflib",
    "gzip",
    "calendar",
    "statistics",
    "typing",
    "subprocess",
)


def english_documents(min_chars: int = 200) -> list[str]:
    """Docstrings of standard-library modules, classes and functions (deterministic order)."""
    docs = []
    for name in _MODULES:
        module = importlib.import_module(name)
        for obj in [
            module,
            *(getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")),
        ]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) >= min_chars and doc not in docs:
                docs.append(doc.strip())
    return docs


def mistral_tokenizer_path() -> str | None:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")
    return path if os.path.isfile(path) else None


def train_hf_tokenizer(texts: list[str], directory: str, with_eos: bool = True) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["</s>"] if with_eos else []
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=special,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    if with_eos:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "</s>"}, f)
    return directory
