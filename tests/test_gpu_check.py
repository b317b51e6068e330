"""scripts/gpu_check.py's reduced CPU mode runs end to end, so the GPU check cannot rot before a GPU arrives."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_passes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env)
    summary = json.loads(out.read_text())
    parts = summary["parts"]
    assert proc.returncode == 0 and summary["ok"], json.dumps(parts, indent=1)[-4000:]
    assert list(parts) == ["bnb_codes", "check_kernel", "unlearn", "scale"]
    assert parts["bnb_codes"]["compared"] == 2 * 3 * 4 and not parts["bnb_codes"]["mismatches"]
    for dtype in ("float32", "bfloat16"):
        kernel = parts["check_kernel"][dtype]
        assert kernel["compiled"] and kernel["fused"] == kernel["eager"]
    unlearn = parts["unlearn"]
    assert unlearn["certified"] and unlearn["edited"] > 0
    assert unlearn["mansu_nf4"] == unlearn["transformers_4bit"]  # on CPU bit for bit (docs/quant.md)
    (size,) = parts["scale"]["results"]
    assert size["size"] == "135M" and size["memory_ratio"] > 0 and size["time_ratio"] > 0
