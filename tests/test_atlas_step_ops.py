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


def test_flop_count_orders_the_memory_layouts_as_the_step_chooses_them():
    """``--flops``: the step's matmul arithmetic per chunk. The factored Gram form takes fewer flops
    than the direct one exactly where ``_factor_gram`` (the step's own multiply-add estimate) says
    so, Newton-Schulz once per chunk takes several times fewer than per token, the backward is
    counted, and the floor scales with the rate (TF32x3 = three TF32 products)."""
    from hymba_plus.kernels import atlas as ak

    mod = load_benchmark("atlas_step_ops")
    direct, factored, chunk = mod.flops("quad"), mod.flops("quad", factor=True), mod.flops("quad_chunk")
    total = {name: sum(r["per_chunk_per_row_head"].values()) for name, r in
             (("direct", direct), ("factored", factored), ("chunk", chunk))}
    _, d, p, hid, C, c = mod.CONFIGS["quad"]
    assert ak._factor_gram(hid, ak.feature_dim(d, p), C, C + c - 1)  # the 64 x 560 weight: factoring pays
    assert total["factored"] < 0.7 * total["direct"]
    assert total["chunk"] < total["direct"] / 8
    fwd, bwd = direct["per_chunk_per_row_head"].values()
    assert fwd > 0 and bwd >= fwd
    floor = direct["floor_ms"]
    assert floor["tf32x3"] == pytest.approx(3 * floor["tf32"])
    assert floor["bf16"] < floor["tf32"] < floor["float32 (no tensor cores)"]
    B, T, H = mod.LAYER_SHAPES["quad"]
    assert direct["layer"]["tflop"] == pytest.approx((fwd + bwd) * B * H * (T // C) / 1e12)


@pytest.mark.slow
def test_grouped_gemms_cut_the_chunk_steps_matmul_calls():
    """``GROUP_GEMMS`` (the default): the memory's three weights' momenta, Gram matrices and updates go as one
    grouped call per phase, the MLP's first layer and linear residual (both on the keys) as one, its
    other products as groups of one, forward and backward (each grouped call's backward one grouped
    call for every gradient): 6 + 6 calls of ``hymba::bmm_f32_group`` instead of 39 single GEMMs."""
    mod = load_benchmark("atlas_step_ops")
    plain, grouped = mod.count("quad_chunk", {"GROUP_GEMMS": False}), mod.count("quad_chunk", {})
    assert "hymba::bmm_f32_group" not in plain["calls"] and plain["calls"]["hymba::bmm_f32"] == 39
    assert "hymba::bmm_f32" not in grouped["calls"] and grouped["calls"]["hymba::bmm_f32_group"] == 12
    assert grouped["ops_per_chunk"] < plain["ops_per_chunk"] - 25


def test_chain_counts_the_newton_schulz_iteration_and_scales_the_floor():
    """``--chain``: the chunk step's longest chain of dependent products. Newton-Schulz alone is 13 of
    them forward at 5 steps (Q_k = aI + bA_k + cA_k² one product, A_{k+1} = Q_k A_k Q_k two, for the
    first four steps; the R_k products run beside them), the memory MLP, gradient factors, momenta,
    Gram matrices and update add theirs before and after it; one step fewer shortens both directions;
    the floor is chunks x chain x the time of a product."""
    from hymba_plus.kernels import atlas as ak

    mod = load_benchmark("atlas_step_ops")
    r = mod.chain("quad_chunk")
    f, b = r["forward"]["products"], r["backward"]["products"]
    assert f >= 13 + 6 and b >= 13 and r["forward"]["operations"] > f and r["backward"]["operations"] > b
    chunks = r["layer"]["chunks"]
    for us in mod.CHAIN_PRODUCT_US:
        assert r["floor_ms"][f"{us:g} us a product"] == pytest.approx((f + b) * chunks * us / 1e3)
    with pytest.MonkeyPatch.context() as mp:  # 4 Newton-Schulz steps: 3 products fewer forward
        real = ak._chunk_step
        mp.setattr(ak, "_chunk_step", lambda *a, **k: real(*a[:9], 4, *a[10:], **k))
        r4 = mod.chain("quad_chunk")
    assert r4["forward"]["products"] == f - 3 and r4["backward"]["products"] < b
