"""``benchmarks/atlas_step_ops.py``: the compiled ATLAS chunk step's operations per chunk, counted
on the CPU (a proxy for the GPU's kernels per chunk)."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


@pytest.mark.slow
def test_side_64_newton_schulz_cuts_the_quad_steps_operations():
    """At the Quad-Hybrid's memory NS_TRITON_MAX 32 (shipped before 2026-12-04 evening) iterates NS as
    padded batched matmuls; with 64, as shipped now, every side goes through the NS op (one launch
    per side and direction) and the step issues fewer operations (178 -> 119 with torch 2.13's
    Inductor on a CPU)."""
    mod = load_benchmark("atlas_step_ops")
    ns32, ns64 = mod.count("quad", {"NS_TRITON_MAX": 32}), mod.count("quad", {})
    assert not ns32["triton_ns"] and ns64["triton_ns"]
    assert "hymba::atlas_ns_gram" not in ns32["calls"]
    assert ns64["calls"]["hymba::atlas_ns_gram"] == ns64["calls"]["hymba::atlas_ns_gram_bwd"] == 2  # sides 32, 64
    assert ns64["ops_per_chunk"] < ns32["ops_per_chunk"]
