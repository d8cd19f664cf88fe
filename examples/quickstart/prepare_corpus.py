#!/usr/bin/env python3
"""Write a small real-English corpus in C4's JSON-lines schema, from text every Python
installation ships (the language reference topics of ``pydoc_data`` and standard-library
docstrings), and print the path of a real 32k SentencePiece model (from ``mistral-common``).

    python examples/quickstart/prepare_corpus.py --out runs/quickstart/corpus
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import sys

MIN_CHARS = 300


def documents() -> list[str]:
    from pydoc_data.topics import topics

    docs = [re.sub(r"\n{3,}", "\n\n", text).strip() for _, text in sorted(topics.items())]
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        name = info.name
        if name.startswith("_") or name in (
            "this",
            "antigravity",
            "idlelib",
            "tkinter",
            "turtle",
            "turtledemo",
            "test",
        ):
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or "site-packages" in spec.origin:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - some stdlib modules need optional system libraries
            continue
        for obj in [module] + [
            getattr(module, a, None) for a in sorted(dir(module)) if not a.startswith("_")
        ]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) >= MIN_CHARS:
                docs.append(doc.strip())
    seen, unique = set(), []
    for doc in docs:
        if doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return [d for d in unique if len(d) >= MIN_CHARS]


def tokenizer_path() -> str:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        sys.exit("error: pip install --no-deps mistral-common (it ships the tokenizer model)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--valid-every", type=int, default=20, help="every Nth document is held out")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    docs = documents()
    splits = {"train": [], "valid": []}
    for i, doc in enumerate(docs):
        splits["valid" if i % args.valid_every == 0 else "train"].append(doc)
    for split, items in splits.items():
        path = os.path.join(args.out, f"{split}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for i, text in enumerate(items):
                f.write(
                    json.dumps({"text": text, "timestamp": "", "url": f"python-doc:{i}"}) + "\n"
                )
        os.replace(path + ".tmp", path)
        print(
            f"{path}: {len(items)} documents, {sum(map(len, items)) / 1e6:.1f} MB", file=sys.stderr
        )
    print(tokenizer_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
