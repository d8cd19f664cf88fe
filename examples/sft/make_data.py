#!/usr/bin/env python3
"""A small stand-in for Commonsense170K, for trying the pipeline without network: questions in
its exact record format (``instruction`` with the options and an ``Answer format:`` line,
``input``, ``output`` = "the correct answer is X", ``answer`` = X) in the styles of its boolq,
piqa and ARC parts, written as one JSON array; and the same kind of questions, held out, as a
local lm-evaluation-harness multiple-choice task (``TASK_DIR/sft_local_mc.yaml``).

    python examples/sft/make_data.py --out runs/sft/data --records 600

The real set: download ``commonsense_170k.json`` (LLM-Adapters) and pass it to
``tools/preprocess_sft.py`` instead; the real tasks are lm-eval's own.
"""

from __future__ import annotations

import argparse
import json
import os
import random

OBJECTS = [
    ("a feather", "a brick", "lighter"), ("an ice cube", "a cup of tea", "colder"),
    ("a mouse", "an elephant", "smaller"), ("a candle", "the sun", "dimmer"),
    ("a bicycle", "a jet plane", "slower"), ("a pebble", "a mountain", "smaller"),
]  # fmt: skip
FACTS = [
    ("Water boils at 100 degrees Celsius at sea level.", True),
    ("The moon is larger than the earth.", False),
    ("Fish breathe with gills.", True),
    ("A week has nine days.", False),
    ("Plants need light to grow.", True),
    ("Snow is usually hot.", False),
]


def arithmetic(rng):
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    right = a + b
    wrong = right + rng.choice([-3, -2, -1, 1, 2, 3])
    options = [right, wrong]
    rng.shuffle(options)
    k = options.index(right) + 1
    q = (f"Question: What is {a} plus {b}?\n\nAnswer1: {options[0]} Answer2: {options[1]}\n\n"
         "Answer format: answer1/answer2")  # fmt: skip
    return q, f"answer{k}", [str(o) for o in options], k - 1, f"What is {a} plus {b}? The answer is"


def comparison(rng):
    x, y, rel = rng.choice(OBJECTS)
    first = rng.random() < 0.5
    a, b = (x, y) if first else (y, x)
    right = x
    q = (f"Please choose the correct answer to the question: Which is {rel}?\n\n"
         f"Answer1: {a} Answer2: {b}\n\nAnswer format: answer1/answer2")  # fmt: skip
    k = [a, b].index(right) + 1
    return q, f"answer{k}", [a, b], k - 1, f"Which is {rel}, {a} or {b}? It is"


def fact(rng):
    text, truth = rng.choice(FACTS)
    q = (f"Please answer the following question with true or false, question: {text}\n\n"
         "Answer format: true/false")  # fmt: skip
    answer = "true" if truth else "false"
    return q, answer, ["true", "false"], 0 if truth else 1, f"{text} True or false? It is"


STYLES = (arithmetic, comparison, fact)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--records", type=int, default=600)
    p.add_argument("--held-out", type=int, default=60, help="questions in the local eval task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    os.makedirs(os.path.join(args.out, "task"), exist_ok=True)
    records = []
    for _ in range(args.records):
        instruction, answer, _, _, _ = rng.choice(STYLES)(rng)
        records.append({"instruction": instruction, "input": "",
                        "output": f"the correct answer is {answer}", "answer": answer})  # fmt: skip
    with open(os.path.join(args.out, "commonsense_sample.json"), "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(args.out, "task", "questions.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(args.held_out):
            _, _, choices, gold, stem = rng.choice(STYLES)(rng)
            f.write(json.dumps({"question": stem, "choices": choices,
                                "answer": gold}) + "\n")  # fmt: skip
    with open(os.path.join(args.out, "task", "sft_local_mc.yaml"), "w", encoding="utf-8") as f:
        f.write(
            "# Held-out questions as an lm-evaluation-harness task (run from this directory).\n"
            "task: sft_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            "    test: questions.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
            'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n'
            "    aggregation: mean\n    higher_is_better: true\n  - metric: acc_norm\n"
            "    aggregation: mean\n    higher_is_better: true\n"
        )
    print(f"{len(records)} records, {args.held_out} held-out questions under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
