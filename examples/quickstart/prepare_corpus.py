#!/usr/bin/env python3
"""Write a small real-English corpus in C4's JSON-lines schema, from text every Python
installation ships (the language reference topics of ``pydoc_data`` and standard-library
docstrings): about 1 MB of training text and every 10th document held out for validation.

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
import warnings

MIN_CHARS = 300


def _module_docs(name: str) -> list[str]:
    """Long docstrings of a standard-library module and its public members. Importing every
    module trips their own deprecation notices (distutils, typing.io, …), and some imports
    change the warning filters: silenced here, per module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or "site-packages" in spec.origin:
            return []
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - some stdlib modules need optional system libraries
            return []
        members = [module] + [
            getattr(module, a, None) for a in sorted(dir(module)) if not a.startswith("_")
        ]
        docs = [getattr(obj, "__doc__", None) for obj in members]
    return [d.strip() for d in docs if isinstance(d, str) and len(d) >= MIN_CHARS]


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
        docs.extend(_module_docs(name))
    seen, unique = set(), []
    for doc in docs:
        if doc not in seen:
            seen.add(doc)
            unique.append(doc)
    return [d for d in unique if len(d) >= MIN_CHARS]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--valid-every", type=int, default=10, help="every Nth document is held out")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
