"""docs/flags.md is the reference of every pretrain_gpas.py flag, generated from the config:
it lists each flag of --help, with its help text, and is regenerated when the config changes."""

import os
import re

from megatron_ext.planning.arguments import build_parser, flags_reference
from tests.helpers import ROOT

REGENERATE = (
    "python -c 'from megatron_ext.planning.arguments import flags_reference; "
    'print(flags_reference(), end="")\' > docs/flags.md'
)


def test_docs_flags_md_is_the_generated_reference():
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        assert f.read() == flags_reference(), f"docs/flags.md is stale; regenerate: {REGENERATE}"


def test_the_reference_lists_every_flag_with_what_it_does():
    text = flags_reference()
    rows = {
        m[0]: m[1] for m in re.findall(r"^\| `(--[\w-]+)`[^|]* \| [^|]* \| (.*) \|$", text, re.M)
    }
    flags = [a.option_strings[0] for a in build_parser()._actions if a.option_strings]
    flags.remove("-h")
    assert sorted(rows) == sorted(flags)
    assert not [f for f, what in rows.items() if not what.strip()], "flags without a help text"
    assert "| `--lr` | `0.001` | peak learning rate |" in text
