"""The configuration package is the house's ground floor: importing it pulls in nothing of the
project but itself and ``variants.py``, and neither torch nor megatron-core, so light tools
(the grid, the planner's checks) can use it anywhere."""

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_config_imports_only_itself_and_variants():
    probe = (
        "import json, sys; import megatron_ext.config; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'megatron', 'megatron_ext', 'numpy'))))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    allowed = {"megatron_ext", "megatron_ext.variants"}
    outside = [m for m in loaded if m not in allowed and not m.startswith("megatron_ext.config")]
    assert not outside, outside
