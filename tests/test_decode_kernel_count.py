"""benchmarks/decode_kernel_count.py: the decode-step fast paths cut the kernels of a captured
step (counted on the CPU, their Triton kernels in the interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_decode_fast_paths_cut_the_step_kernels(tmp_path):
    """The decode.py recipe (gdn, attention, MoE) at width 64: with the decode fast paths the
    step launches well under half the reference's kernels, every gdn layer's recurrence and conv
    are one Triton launch each, and every MoE layer's routed experts two; projections of one input
    are one GEMM (the engine's packed weights)."""
    pytest.importorskip("triton")
    out = tmp_path / "count.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "benchmarks/decode_kernel_count.py", "--d-model", "64", "--batch", "4",
                           "--prompt", "12", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    ref, fast = rows["reference"], rows["decode fast paths"]
    assert ref["triton_launches"] == 0 and fast["triton_launches"] > 0
    assert fast["kernels"] < 0.5 * ref["kernels"], (fast["kernels"], ref["kernels"])
    gdn, moe = fast["by_module"]["GatedDeltaNet"], fast["by_module"]["MoE"]
    # per gdn layer: the packed q|k|v|a|b|z GEMM and out_proj, the conv update, the recurrence
    assert gdn == {"mm": 18, "triton:_conv_update_kernel": 9, "triton:_gdn_decode_kernel": 9}, gdn
    # per attention layer: the packed q|k|v|gate GEMM and o_proj; per MoE layer: the packed
    # router|shared-gate GEMM and the shared expert's packed gate|up GEMM
    assert fast["by_module"]["GatedAttention"]["mm"] == 6 and moe["mm"] == 24
    assert moe["triton:_decode_gate_up_kernel"] == moe["triton:_decode_down_kernel"] == 12, moe
