"""The fused muon_chunk chunk step (``kernels/atlas_fused.py``: ten Triton launches, five a direction)
against the unfused step (float64) and the float64 reference end to end; in Triton's CPU interpreter
on any machine, compiled on a GPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from hymba_plus.kernels import atlas as atlas_kernels
from hymba_plus.kernels import atlas_fused
from hymba_plus.kernels.dispatch import max_rel_err
from tests.conftest import run_in_interpreter
from tests.helpers import load_benchmark
from tests.test_atlas import float32_errors, random_problem

STEP_NAMES = ("P", "W1", "W2", "S_P", "S_W1", "S_W2", "y", "dP", "dW1", "dW2", "dS_P", "dS_W1", "dS_W2", "dK", "dV",
              "dgamma", "dmix", "dlam", "dwu", "dkeep")


def step_problem(N: int = 3, C: int = 4, c: int = 3, d: int = 8, p: int = 2, mh: int = 2, seed: int = 0) -> list:
    """One chunk step's inputs (float32): the depth-2 memory's weights and momenta, the chunk's
    keys' features then its queries', values, γ (the window tail's first slot empty), the muon_chunk
    mixing rows, λ, the update weight and Π α."""
    g = torch.Generator().manual_seed(seed)
    Cp = C + c - 1
    coef = torch.tensor([1.0 / math.sqrt(math.factorial(j + 1)) for j in range(p)])
    Fd, hid = atlas_kernels.feature_dim(d, p), mh * d
    K = atlas_kernels.poly_features(F.normalize(torch.randn(N, Cp + C, d, generator=g), dim=-1), coef)
    V = F.normalize(torch.randn(N, Cp, d, generator=g), dim=-1)
    gam = torch.rand(N, Cp, generator=g)
    gam[:, 0] = 0.0
    shapes = [(d, Fd), (hid, Fd), (d, hid)]
    W = [torch.randn(N, *s, generator=g) / math.sqrt(s[1]) for s in shapes]
    M = [0.3 * torch.randn(N, *s, generator=g) / math.sqrt(s[1]) for s in shapes]
    mix, lam = torch.rand(N, 2, Cp, generator=g), torch.rand(N, 2, generator=g)
    wu, keep = 0.1 * torch.rand(N, 1, generator=g), 0.9 + 0.1 * torch.rand(N, generator=g)
    return [*W, *M, K, V, gam, mix, lam, wu, keep]


def step_errors(ins: list, n_q: int, device: str = "cpu") -> dict[str, float]:
    """The fused step (float32 on ``device``) against ``_chunk_step`` in float64 on the CPU: the
    relative error of every result and of every input's gradient for the same random cotangents."""
    res = []
    for fn, dev, dt in ((atlas_fused.fused_chunk_step, device, torch.float32), (atlas_kernels._chunk_step, "cpu",
                                                                                 torch.float64)):
        ts = [t.to(dev, dt).requires_grad_() for t in ins]
        out = fn(tuple(ts[:3]), tuple(ts[3:6]), *ts[6:], 5, True, False, False, False, True, False, False, n_q)
        outs = [*out[0], *out[1], out[2]]
        g = torch.Generator().manual_seed(1)
        cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dev, dt) for o in outs]
        grads = torch.autograd.grad(sum((o * s).sum() for o, s in zip(outs, cots)), ts)
        res.append([t.detach().double().cpu() for t in outs + list(grads)])
    return {k: max_rel_err(a, b) for k, a, b in zip(STEP_NAMES, *res)}


def test_applies_only_where_the_kernels_fit():
    """muon_chunk, depth 2, retrieval in the step, float32, hidden width between the head dim and
    the features, padded sides <= 64; else the unfused step."""
    ins = step_problem(d=8)
    params = tuple(ins[:3])
    ok = dict(Cp=6, n_q=4, ns_steps=5, muon=True, ns_chunk=True, factor=False)
    if atlas_fused.triton is None:
        assert not atlas_fused.applies(params, **ok)
        return
    assert atlas_fused.applies(params, **ok)
    assert not atlas_fused.applies(params, **{**ok, "ns_chunk": False})  # per-token Muon
    assert not atlas_fused.applies(params, **{**ok, "muon": False})  # SGD
    assert not atlas_fused.applies(params, **{**ok, "n_q": 0})  # retrieval after the loop
    assert not atlas_fused.applies(params, **{**ok, "factor": True})
    assert not atlas_fused.applies(params, **{**ok, "Cp": 65})
    assert not atlas_fused.applies(tuple(p.double() for p in params), **ok)
    d, Fd = params[0].shape[-2:]
    deep = (params[0], params[1], torch.zeros(3, 16, 16), params[2])
    assert not atlas_fused.applies(deep, **ok)
    narrow = (params[0], torch.zeros(3, 4, Fd), torch.zeros(3, d, 4))  # hidden width < head dim
    assert not atlas_fused.applies(narrow, **ok)
    wide = (torch.zeros(3, 8, Fd), torch.zeros(3, 128, Fd), torch.zeros(3, 8, 128))
    assert not atlas_fused.applies(wide, **ok)


def test_a_failing_fused_step_says_so_once_and_falls_back(monkeypatch):
    """A fused step that fails (here: no kernel) is said once; that call and every later one runs
    the fallback."""
    def broken(*args):  # noqa: ANN002, ANN202
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(atlas_fused, "fused_chunk_step", broken)
    monkeypatch.setattr(atlas_kernels, "fused_error", None)
    ins = step_problem()
    args = (tuple(ins[:3]), tuple(ins[3:6]), *ins[6:], 5, True, False, False, False, True, False, False, 4)
    calls = []
    fallback = lambda *a: calls.append(a) or "fell back"  # noqa: E731
    with pytest.warns(UserWarning, match="fused chunk step is off .*no kernel here"):
        assert atlas_kernels._fused(args, fallback) == "fell back"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert atlas_kernels._fused(args, fallback) == "fell back"
    assert len(calls) == 2 and "no kernel here" in atlas_kernels.fused_error


def test_a_fused_step_that_disagrees_is_not_used(monkeypatch):
    """The first call per shape is checked against the eager step; a wrong result turns the fused
    step off with the size of the disagreement."""
    def wrong(params, mom, *rest):  # noqa: ANN001, ANN002, ANN202
        new_p, new_m, y = atlas_kernels._chunk_step(params, mom, *rest)
        return tuple(2 * p for p in new_p), new_m, y

    monkeypatch.setattr(atlas_fused, "fused_chunk_step", wrong)
    monkeypatch.setattr(atlas_kernels, "fused_error", None)
    ins = step_problem()
    args = (tuple(ins[:3]), tuple(ins[3:6]), *ins[6:], 5, True, False, False, False, True, False, False, 4)
    with pytest.warns(UserWarning, match="fused chunk step is off .*results"):
        out = atlas_kernels._fused(args, atlas_kernels._chunk_step)
    want = atlas_kernels._chunk_step(*args)
    assert all(torch.equal(a, b) for a, b in zip(out[0], want[0]))


def test_fused_step_in_interpreter_matches_the_unfused_step():
    """Forward and hand-written backward of the fused step in Triton's CPU interpreter against
    ``_chunk_step`` in float64 (autograd): every result and every input's gradient. Every side is
    padded here (head dim 8 -> 16, C' 6 -> 16, queries 4 -> 16, 44 features in three 16-wide tiles, and the
    backward also in two 32-wide ones: ``BLOCK_F_BWD``),
    so the masks are exercised; products as "tf32x3" (one float32 product in the interpreter; the
    split form's arithmetic is the Newton-Schulz kernels', checked there)."""
    pytest.importorskip("triton")
    out = run_in_interpreter("""
        from hymba_plus.kernels import atlas_fused
        from tests.test_atlas_fused import step_errors, step_problem
        atlas_fused.PRECISION = "tf32x3"
        atlas_fused.BLOCK_F = 16  # three feature tiles, the last one masked
        for seed, mh, bwd in ((0, 2, None), (1, 1, None), (0, 2, 32)):  # 32: two backward tiles, three forward
            atlas_fused.BLOCK_F_BWD = bwd
            errs = step_errors(step_problem(seed=seed, mh=mh), 4)
            print(seed, {k: f"{v:.1e}" for k, v in errs.items()})
            assert max(errs.values()) < 1e-4, errs  # measured <= 2.4e-5 (dlam)
        print("ok")
    """)
    print(out)


def test_fast_path_with_the_fused_step_in_interpreter():
    """The fast path end to end with the fused step (muon_chunk, depth 2, rows with fewer valid
    tokens) in Triton's CPU interpreter against the float64 reference: outputs, end state and every
    input's gradient; the fused step ran for every chunk."""
    pytest.importorskip("triton")
    run_in_interpreter("""
        import torch
        from hymba_plus.kernels import atlas, atlas_fused
        from tests.test_atlas import float32_errors, random_problem, with_valid_lengths
        atlas_fused.PRECISION = "tf32x3"
        atlas_fused.BLOCK_F = 32  # 44 features: two tiles
        atlas.FUSED_STEP = True
        calls = []
        real = atlas_fused.fused_chunk_step
        atlas_fused.fused_chunk_step = lambda *a: calls.append(1) or real(*a)
        args, leaves = random_problem(N=3, T=14, C=4, c=3, d=8, p=2, hid=16, depth=2, float32=True)
        n_valid = torch.tensor([14, 9, 12])
        args = with_valid_lengths(args, leaves, n_valid, 3)
        errs = float32_errors(args, leaves, 2, "cpu", dict(compile=False), chunk_size=4, window=3, ns_steps=5,
                              muon=True, ns_chunk=True, return_state=True, snapshots=(), n_valid=n_valid)
        print([f"{e:.1e}" for e in errs])
        assert atlas.fused_error is None and len(calls) >= 3, (atlas.fused_error, len(calls))
        assert max(errs[:7]) < 1e-3 and max(errs[7:]) < 1e-2, errs
        print("ok")
    """)


@pytest.mark.slow  # ~26 s in the interpreter (one fused step is checked in the CPU suite): make test-all
def test_fused_step_through_a_chain_of_chunks_in_interpreter():
    """Four chunks of the fast path with the fused step at the d 2048 layer's memory (head dim 16, hidden
    32, window 4) in Triton's interpreter against float64: the gradients through the chain stay within
    5e-3 (measured 1.1e-3). Newton-Schulz's backward in forward mode on symmetric tangents (tried on
    2026-12-06), as accurate as the reverse mode for one step, was 2.4e-2 off here: the chain is what
    tells such a change apart."""
    pytest.importorskip("triton")
    run_in_interpreter("""
        from hymba_plus.kernels import atlas, atlas_fused
        from tests.test_atlas import float32_errors, random_problem
        atlas_fused.PRECISION = "tf32x3"
        atlas.FUSED_STEP = True
        args, leaves = random_problem(N=2, T=64, C=16, c=4, d=16, p=2, hid=32, depth=2, float32=True, seed=0)
        errs = float32_errors(args, leaves, 2, "cpu", dict(compile=False), chunk_size=16, window=4, ns_steps=5,
                              muon=True, ns_chunk=True, return_state=True, snapshots=(), n_valid=None)
        print([f"{e:.1e}" for e in errs])
        assert atlas.fused_error is None, atlas.fused_error
        assert max(errs[:7]) < 2e-3 and max(errs[7:]) < 5e-3, errs
        print("ok")
    """)


@pytest.mark.gpu
def test_fused_step_on_cuda_matches_the_unfused_step():
    """The fused step compiled for this GPU (split 3xTF32 products) against ``_chunk_step`` in
    float64, at the Quad-Hybrid's memory (head dim 32, hidden 64, 560 features, C 16, window 16:
    the backward's 16-column tiles), at the d 2048 benchmark layer's (head dim 16, hidden 32, 152
    features, window 4: C' 19 padded to 32) and at a padded one."""
    for kw in (dict(N=8, C=16, c=16, d=32, mh=2), dict(N=4, C=16, c=4, d=16, mh=2), dict(N=3, C=4, c=3, d=8, mh=2)):
        errs = step_errors(step_problem(**kw), kw["C"], "cuda")
        print(kw, {k: f"{v:.1e}" for k, v in errs.items()})
        # H100, 2026-12-06, the Quad-Hybrid's memory: results <= 5.2e-5, gradients <= 2.3e-3 (dlam, a sum
        # over all the momenta's entries; dgamma 1.0e-3, dwu 1.2e-3, the rest <= 1.8e-4)
        vals = list(errs.values())
        assert max(vals[:7]) < 1e-3 and max(vals[7:]) < 1e-2, errs


@pytest.mark.gpu
def test_fast_path_with_the_fused_step_on_cuda():
    """The CUDA fast path with the fused step (``FUSED_STEP`` on) against the float64 reference, and
    the fused step having run (not turned off by its first-call check)."""
    atlas_kernels.fused_error = None
    args, leaves = random_problem(N=3, T=32, C=4, c=3, d=8, p=2, hid=16, depth=2, float32=True)
    with atlas_kernels.settings(FUSED_STEP=True):
        errs = float32_errors(args, leaves, 2, "cuda", dict(compile=True), chunk_size=4, window=3, ns_steps=5,
                              muon=True, ns_chunk=True, return_state=True, snapshots=(), n_valid=None)
    print("fused fast path errors:", [f"{e:.2g}" for e in errs])
    assert atlas_kernels.fused_error is None
    assert max(errs[:7]) < 5e-3 and max(errs[7:]) < 5e-2, errs


@pytest.mark.slow  # ~40 s of Triton / ptxas compiles on a CPU
def test_fused_kernels_compile_for_sm90():
    """Every kernel of the fused step goes through Triton's real compiler for an H100 / H200 (sm_90)
    without a GPU, at the Quad-Hybrid's memory and the launch's settings, and fits an SM's 227 KiB of
    shared memory (``benchmarks/kernel_resources.py --fused`` prints registers and spills: on
    2026-12-06 the backward's Newton-Schulz launch 208 KiB and 2.5 KB of spills a thread)."""
    pytest.importorskip("triton")
    bench = load_benchmark("kernel_resources")
    for kernel in bench.FUSED_KERNELS:
        res = bench.fused_resources(kernel)
        assert res["cubin_bytes"] > 0 and res["shared_bytes"] <= 227 * 1024, res


def test_backward_tile_width():
    """``BLOCK_F_BWD``: None takes 16 feature columns where the padded hidden side is 64 (the Quad-Hybrid's
    memory: the 64-wide tiles spill there) and the forward's width elsewhere; a value overrides both."""
    quad = atlas_fused._meta(torch.empty(1, 32, 560), torch.empty(1, 64, 560), torch.empty(1, 31, 32), 16, 5)
    bench = atlas_fused._meta(torch.empty(1, 16, 152), torch.empty(1, 32, 152), torch.empty(1, 19, 16), 16, 5)
    saved = atlas_fused.BLOCK_F_BWD
    try:
        atlas_fused.BLOCK_F_BWD = None
        assert [atlas_fused._bwd_meta(quad)[k] for k in ("BF", "NT", "NG")] == [16, 35, quad["NT"]]
        assert atlas_fused._bwd_meta(bench)["BF"] == bench["BF"] == atlas_fused.BLOCK_F
        atlas_fused.BLOCK_F_BWD = 32
        assert (atlas_fused._bwd_meta(quad)["BF"], atlas_fused._bwd_meta(quad)["NT"]) == (32, 18)
        assert quad["NT"] == -(-560 // atlas_fused.BLOCK_F)  # the forward's own tiles are unchanged
    finally:
        atlas_fused.BLOCK_F_BWD = saved


def test_fused_bench_configs_and_arguments():
    """``benchmarks/atlas_fused_bench.py``: a config names the tile width, the warps and optionally the
    precision; the step's arguments are the fast path's (the unfused step runs on them here)."""
    bench = load_benchmark("atlas_fused_bench")
    names = ("BLOCK_F", "NUM_WARPS", "BLOCK_F_BWD", "ROW_WARPS", "PRECISION")
    saved = [getattr(atlas_fused, k) for k in names]
    try:
        bench.set_config("64x8:tf32")
        assert [getattr(atlas_fused, k) for k in names] == [64, 8, None, None, "tf32"]
        bench.set_config("64x4b16")
        assert [getattr(atlas_fused, k) for k in names] == [64, 4, 16, None, "tf32x3_split"]
        bench.set_config("32x4b16r8")
        assert [getattr(atlas_fused, k) for k in names] == [32, 4, 16, 8, "tf32x3_split"]
    finally:
        for k, v in zip(names, saved):
            setattr(atlas_fused, k, v)
    args = bench.step_args(2, "cpu")
    assert atlas_fused.applies(args[0], args[3].shape[1], args[-1], 5, True, True, False)
    new_p, new_m, y = atlas_kernels._chunk_step(*args)
    assert y.shape == (2, 16, 32) and [p.shape for p in new_p] == [p.shape for p in args[0]]
