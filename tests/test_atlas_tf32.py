"""``benchmarks/atlas_tf32.py``: its TF32 emulation rounds what a TF32 GEMM rounds (both float32
operands of every matmul, the backward's included, to 10 mantissa bits), and a short run writes
the probe errors and MQAR rows of each configuration."""

from __future__ import annotations

import json

import torch

from tests.helpers import load_benchmark


def load_bench():  # noqa: ANN201 - the script as a module
    return load_benchmark("atlas_tf32")


def test_tf32_round_keeps_ten_mantissa_bits():
    bench = load_bench()
    x = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    r = bench.tf32_round(x)
    assert ((r - x).abs() <= 2.0**-11 * x.abs()).all()  # round to nearest: half a TF32 ulp
    assert (r.view(torch.int32) & 0x1FFF == 0).all()  # the 13 low mantissa bits cleared
    assert torch.equal(bench.tf32_round(r), r)  # TF32 values stay
    assert (r != x).float().mean() > 0.99  # random float32 values are not
    assert torch.equal(bench.tf32_round(x.double()), x.double())  # only float32 is rounded


def test_emulation_rounds_forward_and_backward_matmuls():
    bench = load_bench()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, 16, generator=g, requires_grad=True)
    b = torch.randn(3, 16, 4, generator=g)
    c = torch.randn(3, 8, 4, generator=g)
    r = bench.tf32_round
    with bench.TF32Rounding():
        y = torch.baddbmm(c, a, b)
        (ga,) = torch.autograd.grad(y, a, c)
    assert torch.equal(y, torch.baddbmm(c, r(a.detach()), r(b)))
    assert torch.equal(ga, torch.bmm(r(c), r(b.mT)))  # the backward's matmul rounded too
    assert not torch.equal(y, torch.baddbmm(c, a.detach(), b))


def test_short_run_writes_each_configuration(tmp_path):
    bench = load_bench()
    out = tmp_path / "tf32.json"
    assert bench.main(["--seeds", "0", "--steps", "2", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["device"].startswith("cpu") and set(rep["probe"]) == set(bench.CONFIGS)
    probe = rep["probe"]
    assert probe["float32"]["output"] < 1e-4 and probe["float32"]["gradients"] < 1e-2  # the library's probe limits
    # the rounding reaches the chunk step's GEMMs, then Newton-Schulz as well
    assert probe["float32"]["end_state"] < probe["tf32_gemm"]["end_state"] < probe["tf32_all"]["end_state"]
    # a rounded Newton-Schulz backward leaves the forward as it was and reaches the gradients
    assert probe["tf32_ns_bwd"]["output"] == probe["float32"]["output"]
    assert probe["tf32_ns_bwd"]["end_state"] == probe["float32"]["end_state"]
    assert probe["tf32_ns_bwd"]["gradients"] > probe["float32"]["gradients"]
    assert [(r["config"], r["seed"]) for r in rep["mqar"]] == [(c, 0) for c in bench.CONFIGS]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["final_loss"] > 0 for r in rep["mqar"])
