"""ATLAS neural memory (atlas / ATL): kernel vs a per-token autograd oracle, Newton-Schulz,
features, the DESIGN invariant, padding, cache state, test-time memorization, learning."""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hymba_plus import RecipeError, build_model, load_recipe, registry
from hymba_plus.components.atlas import Atlas, AtlasConfig, AtlasState
from hymba_plus.core.cache import StepContext
from hymba_plus.kernels import atlas as atlas_kernels
from hymba_plus.kernels import dispatch
from hymba_plus.kernels.atlas import atlas_memory, feature_dim, memory_apply, newton_schulz, poly_features
from tests.conftest import rel_err, rms_rel
from tests.helpers import load_benchmark, tiny_recipe, train_mqar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NS = (3.4445, -4.7750, 2.0315)


# ----------------------------------------------------------------------------- the oracle


def ns_oracle(G: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's quintic Newton-Schulz written plainly (no transpose trick, no fusing)."""
    a, b, c = NS
    X = G / G.pow(2).sum((-2, -1), keepdim=True).sqrt()
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    return X


def mlp_oracle(W: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """M(x) = P x + W_L silu(... silu(W_1 x)) for one token per row: W [N, o, i], x [N, i]."""
    P, *Ws = W
    h = x
    for i, Wi in enumerate(Ws):
        h = torch.einsum("noi,ni->no", Wi, h)
        if i < len(Ws) - 1:
            h = F.silu(h)
    return torch.einsum("noi,ni->no", P, x) + h


def atlas_oracle(qf, kf, v, gamma, eta, log_theta, log_alpha, params, mom, C, c, ns_steps, muon, ns_chunk=False):
    """The Atlas recurrence token by token, gradients by explicit autograd (slow, obvious).

    For token t of chunk n (chunk-start weights W_n):
        G_t = ∇_W Σ_{i=t-c+1}^{t} γ_i ||M(phi(k_i); W_n) - v_i||²   (torch.autograd.grad)
        S_t = θ_t S_{t-1} + G_t ;  M_t = α_t M_{t-1} - η_t NS(S_t)   (or S_t for sgd)
        y_t = M(phi(q_t); W_n)
    ``ns_chunk`` (inner_optimizer muon_chunk): the step is accumulated instead, A_t = α_t A_{t-1}
    + η_t S_t, c_t = α_t c_{t-1} + η_t, K_t = α_t K_{t-1} from A = c = 0, K = 1 at the chunk
    start, and at its end M = K W_n - c NS(A).
    Returns y and the (weights, momentum) after the last complete chunk.
    """
    N, T, _ = qf.shape
    W_cur, S = list(params), list(mom)
    W_final, S_final = list(params), list(mom)
    ys = []
    for t in range(T):
        if t % C == 0:
            W_n = list(W_cur)
            A, acc, keep = [torch.zeros_like(w) for w in W_n], qf.new_zeros(N, 1, 1), qf.new_ones(N, 1, 1)
        ys.append(mlp_oracle(W_n, qf[:, t]))
        loss = qf.new_zeros(N)
        for i in range(t - c + 1, t + 1):
            e = i + c - 1  # index in the tail-extended key/value arrays
            loss = loss + gamma[:, e] * (mlp_oracle(W_n, kf[:, e]) - v[:, e]).pow(2).sum(-1)
        G = torch.autograd.grad(loss.sum(), W_n, create_graph=True)
        S = [log_theta[:, t, None, None].exp() * s + g for s, g in zip(S, G)]
        a_t, e_t = log_alpha[:, t, None, None].exp(), eta[:, t, None, None]
        if ns_chunk:
            A, acc, keep = [a_t * x + e_t * s for x, s in zip(A, S)], a_t * acc + e_t, a_t * keep
            if (t + 1) % C == 0:
                W_cur = [keep * w - acc * ns_oracle(x, ns_steps) for w, x in zip(W_n, A)]
        else:
            U = [ns_oracle(s, ns_steps) if muon else s for s in S]
            W_cur = [a_t * w - e_t * u for w, u in zip(W_cur, U)]
        if (t + 1) % C == 0:
            W_final, S_final = list(W_cur), list(S)
    return torch.stack(ys, 1), W_final, S_final


def random_problem(N=3, T=11, C=4, c=3, d=3, p=2, hid=5, depth=2, dtype=torch.float64, seed=0, float32=False):
    """One problem for ``atlas_memory``'s signature, float64 leaves that require grad. ``float32``:
    one whose float32 arithmetic is well conditioned (inner steps η <= 0.05 and momenta of norm
    ~0.3 per row, as ``probe_errors``'), for comparing a float32 path with the float64 reference:
    with the default η in [0.05, 0.25] and momenta 0.1 randn, the gradient through a chain of Muon
    steps amplifies float32 rounding (the float32 fast path on the CPU, Triton off: up to 1.47 from
    the reference at T 52, 4 of the 7 ``FAST_CASES``; in this mode <= 1.6e-3 at T 20-25, four seeds)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    Fd = feature_dim(d, p)
    coef = torch.tensor([1.0 / math.sqrt(math.factorial(j + 1)) for j in range(p)], dtype=dtype)
    qf = poly_features(F.normalize(rn(N, T, d), dim=-1), coef)
    kf = poly_features(F.normalize(rn(N, T + c - 1, d), dim=-1), coef)
    v = rn(N, T + c - 1, d)
    gamma = torch.sigmoid(rn(N, T + c - 1))
    gamma[:, : c - 1] *= torch.tensor([0.0] + [1.0] * (c - 2), dtype=dtype) if c > 1 else 1.0  # one empty slot
    eta = (0.05 if float32 else 0.2) * torch.rand(N, T, generator=g, dtype=dtype) + (0.0 if float32 else 0.05)
    log_theta = F.logsigmoid(rn(N, T))
    log_alpha = F.logsigmoid(rn(N, T) + 3.0)
    shapes = [(d, Fd), (hid, Fd)] + [(hid, hid)] * (depth - 2) + [(d, hid)]
    params = [rn(N, *s) / math.sqrt(s[1]) for s in shapes]
    mom = [(0.3 / math.sqrt(s[1]) if float32 else 0.1) * rn(N, *s) for s in shapes]
    leaves = [qf, kf, v, gamma, eta, log_theta, log_alpha, *params, *mom]
    for x in leaves:
        x.requires_grad_(True)
    return (qf, kf, v, gamma, eta, log_theta, log_alpha, params, mom), leaves


@pytest.fixture(params=["reference", "auto"])
def kernels(request, monkeypatch):
    """``atlas_memory`` as dispatched on this machine (``auto``: the CPU's fast path on a CPU) and
    forced to the reference."""
    monkeypatch.setenv("HYMBA_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("muon,depth,c,T,ns_chunk", [(True, 2, 3, 11, False), (False, 3, 1, 8, False),
                                                      (True, 3, 6, 9, False), (True, 2, 3, 11, True),
                                                      (True, 3, 2, 13, True)])
def test_chunk_parallel_equals_per_token_oracle(muon, depth, c, T, ns_chunk, kernels):
    """Float64: outputs, end state and every outer gradient agree with the autograd oracle
    (``ns_chunk``: the muon_chunk variant against the oracle's accumulated form), on the
    reference and on the path dispatched here."""
    C = 4
    (qf, kf, v, gamma, eta, lt, la, params, mom), leaves = random_problem(T=T, C=C, c=c, depth=depth)
    y, W, S = atlas_memory(qf, kf, v, gamma, eta, lt, la, params, mom, chunk_size=C, window=c,
                           ns_steps=5, muon=muon, ns_chunk=ns_chunk)
    y_ref, W_ref, S_ref = atlas_oracle(qf, kf, v, gamma, eta, lt, la, params, mom, C, c, 5, muon, ns_chunk)
    assert rel_err(y.detach(), y_ref.detach()) < 1e-10
    for a, b in zip(W + S, W_ref + S_ref):
        assert rel_err(a.detach(), b.detach()) < 1e-10
    # the gradient that reaches the outer parameters through the inner updates
    g = torch.Generator().manual_seed(1)
    outs, outs_ref = [y, *W, *S], [y_ref, *W_ref, *S_ref]
    R = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    L = sum((o * r).sum() for o, r in zip(outs, R))
    L_ref = sum((o * r).sum() for o, r in zip(outs_ref, R))
    gr = torch.autograd.grad(L, leaves)
    gr_ref = torch.autograd.grad(L_ref, leaves)
    errs = [rel_err(a, b) for a, b in zip(gr, gr_ref)]
    assert max(errs) < 1e-9, errs
    assert all(float(b.abs().max()) > 0 for b in gr_ref[1:])  # every input really matters


@pytest.mark.parametrize("opt", ["sgd", "muon", "muon_chunk"])
@pytest.mark.parametrize("fast", [False, True])
def test_gradients_pass_gradcheck(opt, fast):
    """Finite differences (float64, tiny: 5 tokens in chunks of 2, window 3 into the tail, 3 Newton-Schulz
    steps) confirm the autograd gradient of outputs, end weights and momentum with respect to every input,
    on the reference and on the eager fast path (the oracle tests compare two autograd graphs)."""
    args, leaves = random_problem(N=1, T=5, C=2, c=3, d=2, p=2, hid=2, depth=2)
    kw = dict(chunk_size=2, window=3, ns_steps=3, muon=opt != "sgd", ns_chunk=opt == "muon_chunk", n_valid=None,
              return_state=True, snapshots=())
    impl = functools.partial(atlas_kernels._atlas_memory_fast, compile=False) if fast else atlas_kernels._atlas_memory

    def f(*ls):
        y, W, S, _ = impl(*ls[:7], list(ls[7:10]), list(ls[10:]), **kw)
        return (y, *W, *S)

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-5, rtol=1e-4)

@torch.no_grad()
def test_kernel_partial_rows_keep_state(kernels):
    """n_valid: a row's state is that of its complete chunks only; outputs of real tokens
    do not depend on the slots after them."""
    C, c, T = 4, 2, 10
    (qf, kf, v, gamma, eta, lt, la, params, mom), _ = random_problem(T=T, C=C, c=c, dtype=torch.float64)
    n_valid = torch.tensor([10, 3, 7])
    gam = gamma.detach().clone()
    for r, n in enumerate(n_valid.tolist()):
        gam[r, c - 1 + n :] = 0.0
    y, W, S = atlas_memory(qf, kf, v, gam, eta, lt, la, params, mom, chunk_size=C, window=c, n_valid=n_valid)
    for r, n in enumerate(n_valid.tolist()):
        full = (n // C) * C  # the row's state is that after its last complete chunk
        sl = lambda t, m, r=r: t[r : r + 1, :m]  # noqa: E731
        y_r, W_r, S_r = atlas_memory(
            sl(qf, n), sl(kf, n + c - 1), sl(v, n + c - 1), sl(gam, n + c - 1), sl(eta, n), sl(lt, n), sl(la, n),
            [p[r : r + 1] for p in params], [m[r : r + 1] for m in mom], chunk_size=C, window=c)
        assert rel_err(y[r : r + 1, :n], y_r) < 1e-10
        _, W_f, S_f = atlas_memory(
            sl(qf, full), sl(kf, full + c - 1), sl(v, full + c - 1), sl(gam, full + c - 1), sl(eta, full),
            sl(lt, full), sl(la, full), [p[r : r + 1] for p in params], [m[r : r + 1] for m in mom],
            chunk_size=C, window=c) if full else (None, [p[r : r + 1] for p in params], [m[r : r + 1] for m in mom])
        for a, b in zip(W + S, list(W_f) + list(S_f)):
            assert rel_err(a[r : r + 1], b) < 1e-10


# ----------------------------------------------------------------------------- fast path


def run_impl(impl, args, **kw):
    """(y, states..., snapshot states...) of one implementation as a flat list."""
    (qf, kf, v, gamma, eta, lt, la, params, mom) = args
    y, W, S, snaps = impl(qf, kf, v, gamma, eta, lt, la, params, mom, **kw)
    return [y] + ([*W, *S] if W is not None else []) + [t for n in sorted(snaps) for t in (*snaps[n][0], *snaps[n][1])]


def compare_impls(args, leaves, fast_kw, **kw):
    """max rel error of the fast path against the reference: outputs, then every gradient."""
    got = run_impl(atlas_kernels._atlas_memory_fast, args, **fast_kw, **kw)
    want = run_impl(atlas_kernels._atlas_memory, args, **kw)
    assert [t.shape for t in got] == [t.shape for t in want]
    fwd = max(rel_err(a.detach(), b.detach()) for a, b in zip(got, want))
    g = torch.Generator().manual_seed(1)
    seeds = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in want]
    ga = torch.autograd.grad(sum((o * r).sum() for o, r in zip(got, seeds)), leaves, allow_unused=True)
    gb = torch.autograd.grad(sum((o * r).sum() for o, r in zip(want, seeds)), leaves, allow_unused=True)
    zero = torch.zeros(())
    bwd = max(rel_err(a if a is not None else zero, b) if b is not None else float((a if a is not None else zero).abs().max())
              for a, b in zip(ga, gb))
    return fwd, bwd



def float32_errors(args, leaves, depth, device, fast_kw=None, **kw):
    """The fast path in float32 on ``device`` against the reference in float64 on the CPU, one
    problem of ``random_problem``: the relative error of each output, end state and input
    gradient (the same random cotangents on both)."""
    f32 = [t.detach().float().to(device).requires_grad_() for t in leaves]
    nv = kw.get("n_valid")
    got = run_impl(atlas_kernels._atlas_memory_fast, (*f32[:7], f32[7 : 8 + depth], f32[8 + depth :]),
                   **(fast_kw or {}), **{**kw, "n_valid": None if nv is None else nv.to(device)})
    want = run_impl(atlas_kernels._atlas_memory, args, **kw)
    g = torch.Generator().manual_seed(1)
    seeds = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in want]
    ga = torch.autograd.grad(sum((o * r.float().to(device)).sum() for o, r in zip(got, seeds)), f32)
    gb = torch.autograd.grad(sum((o * r).sum() for o, r in zip(want, seeds)), leaves)
    return [rel_err(a.detach().double().cpu(), b.detach()) for a, b in zip(got + list(ga), want + list(gb))]


def with_valid_lengths(args, leaves, n_valid, c):  # noqa: ANN001, ANN201
    """``random_problem``'s arguments for rows with ``n_valid`` real tokens (None: all): the
    kernel's contract, γ = 0 in the slots past them (``leaves`` updated in place)."""
    if n_valid is None:
        return args
    gam = args[3].detach().clone()
    for r, n in enumerate(n_valid):
        gam[r, c - 1 + n :] = 0.0
    args = (*args[:3], gam.requires_grad_(), *args[4:])
    leaves[3] = args[3]
    return args


FAST_CASES = [  # muon, depth, window, T, p, hid (p = 1 with hid 5 > 3 features: a tall W_1), n_valid
    (True, 2, 3, 11, 2, 5, None), (False, 3, 1, 8, 2, 5, None), (True, 3, 6, 9, 2, 5, None),
    (True, 2, 2, 13, 1, 5, None), (True, 3, 2, 12, 1, 5, None),
    (True, 2, 2, 10, 2, 5, [10, 3, 7]), (False, 2, 2, 10, 2, 5, [10, 3, 7]),
]


@pytest.mark.parametrize("pad_ns,factor", [(False, None), (True, None), (False, True), (True, True)])
@pytest.mark.parametrize("muon,depth,c,T,p,hid,n_valid", FAST_CASES)
def test_fast_path_equals_reference(muon, depth, c, T, p, hid, n_valid, pad_ns, factor):
    """The closed-form chunk step (eager) == the torch.func reference in float64: outputs,
    final state (or snapshots) and the gradient of every input; Muon and SGD, deep memories,
    a tall weight, the Omega window reaching into the tail, partial rows (n_valid), with the
    Gram matrices in one padded batch (the GPU layout) or per short side (the CPU layout), and
    with the Gram matrices and update of every wide weight factored (``factor`` True; None: the
    default, ``FACTOR_GRAM``, the direct form)."""
    C = 4
    for return_state in (True, False):
        args, leaves = random_problem(T=T, C=C, c=c, p=p, hid=hid, depth=depth)
        args = with_valid_lengths(args, leaves, n_valid, c)
        snaps = [0, (T - 1) // C] if not return_state and n_valid is None else ()
        fwd, bwd = compare_impls(args, leaves, dict(compile=False, pad_ns=pad_ns, factor=factor), chunk_size=C,
                                 window=c, ns_steps=5, muon=muon, return_state=return_state, snapshots=snaps,
                                 n_valid=None if n_valid is None else torch.tensor(n_valid))
        assert fwd < 1e-10 and bwd < 1e-9, (return_state, fwd, bwd)


@pytest.mark.parametrize("muon,ns_chunk", [(True, False), (True, True), (False, False)])
def test_reference_under_bf16_autocast_computes_in_float32(muon, ns_chunk):
    """The reference (what ``torch.compile`` traces) under bf16 autocast computes the memory in
    float32 with autocast off, as the fast path does: its Muon step's Newton-Schulz in bf16
    diverged (memory weights 1e4-1e6 times too large after one chunk, the layer's output 160% off)."""
    args, _ = random_problem(T=11, C=4, c=3, depth=2, dtype=torch.float32, float32=True)
    kw = dict(chunk_size=4, window=3, ns_steps=5, muon=muon, ns_chunk=ns_chunk, n_valid=None, return_state=True,
              snapshots=())
    with torch.no_grad():
        want = run_impl(atlas_kernels._atlas_memory, args, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run_impl(atlas_kernels._atlas_memory, args, **kw)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and rel_err(a, b) < 1e-6


@pytest.mark.parametrize("muon,depth,c,T,p,hid,n_valid", [FAST_CASES[i] for i in (0, 1, 5)])
def test_fast_path_retrieving_after_the_loop_equals_reference(muon, depth, c, T, p, hid, n_valid):
    """``RETRIEVE_IN_STEP`` off (every chunk's retrieval after the loop from the stacked chunk-start
    weights, the form before the default): still the reference in float64, Muon and SGD, partial
    rows, with and without the end state, and the same as retrieving in the step."""
    C = 4
    for return_state in (True, False):
        args, leaves = random_problem(T=T, C=C, c=c, p=p, hid=hid, depth=depth)
        args = with_valid_lengths(args, leaves, n_valid, c)
        kw = dict(chunk_size=C, window=c, ns_steps=5, muon=muon, return_state=return_state, snapshots=(),
                  n_valid=None if n_valid is None else torch.tensor(n_valid))
        with atlas_kernels.settings(RETRIEVE_IN_STEP=False):
            fwd, bwd = compare_impls(args, leaves, dict(compile=False), **kw)
            after = run_impl(atlas_kernels._atlas_memory_fast, args, compile=False, **kw)
        assert fwd < 1e-10 and bwd < 1e-9, (return_state, fwd, bwd)
        inside = run_impl(atlas_kernels._atlas_memory_fast, args, compile=False, **kw)
        assert rel_err(inside[0].detach(), after[0].detach()) < 1e-12


@pytest.mark.parametrize("setting", [True, None])
@pytest.mark.parametrize("ns_chunk", [False, True])
def test_ns_forward_keeping_its_iterates_equals_reference(monkeypatch, ns_chunk, setting):
    """``NS_SAVE_FWD``: the Newton-Schulz op that returns its steps' iterates (``atlas_ns_gram_save``,
    its CPU body here) and the backward that reads them (``atlas_ns_gram_bwd_saved``) in the chunk
    step: the fast path still equals the reference in float64, gradients included, and the step
    took that op (not the one whose backward runs the steps again) where it is forced on, and by
    default (None) with muon_chunk only (per-token Muon would keep 16x the iterates)."""
    calls = []
    real = atlas_kernels.atlas_ns_gram_bwd_saved
    monkeypatch.setattr(atlas_kernels, "atlas_ns_gram_bwd_saved", lambda *a: calls.append(1) or real(*a))
    args, leaves = random_problem(T=11, C=4, c=3, hid=5, depth=2)
    kw = dict(chunk_size=4, window=3, ns_steps=5, muon=True, return_state=True, snapshots=(), n_valid=None)
    assert atlas_kernels.NS_SAVE_FWD is None  # the default
    with atlas_kernels.settings(NS_SAVE_FWD=setting):
        fwd, bwd = compare_impls(args, leaves, dict(compile=False, triton_ns=True, pad_ns=True), ns_chunk=ns_chunk,
                                 **kw)
    assert fwd < 1e-10 and bwd < 1e-9, (fwd, bwd)
    if setting or ns_chunk:
        assert calls, "the step did not take the iterate-keeping op"
    else:
        assert not calls, "per-token Muon kept its iterates by default"


@pytest.mark.slow  # an Inductor compile of the chunk step on a CPU
def test_ns_forward_keeping_its_iterates_through_the_compiled_step(monkeypatch):
    """``NS_SAVE_FWD`` through torch.compile (the ops' CPU bodies inside an Inductor graph: the kept
    iterates an output that the backward graph saves): no compile failure, and the float32 results
    and gradients those of the step without it."""
    monkeypatch.setattr(atlas_kernels, "compile_error", None)
    args, leaves = random_problem(N=2, T=14, C=4, c=2, dtype=torch.float32, seed=3, float32=True)
    kw = dict(chunk_size=4, window=2, ns_steps=5, muon=True, ns_chunk=True, return_state=True, snapshots=(),
              n_valid=None)
    errs = []
    for save in (False, True):
        torch._dynamo.reset()
        with atlas_kernels.settings(NS_SAVE_FWD=save):
            errs.append(compare_impls(args, leaves, dict(compile=True, triton_ns=True, pad_ns=True), **kw))
    assert atlas_kernels.compile_error is None
    assert errs[1][0] < 1e-3 and errs[1][1] < 5e-3 and abs(errs[1][1] - errs[0][1]) < 1e-4, errs


@pytest.mark.parametrize("pad_ns,factor", [(False, None), (True, True)])
@pytest.mark.parametrize("depth,c,T,n_valid", [(2, 3, 11, None), (3, 2, 12, None), (2, 2, 10, [10, 3, 7])])
def test_fast_path_equals_reference_muon_chunk(depth, c, T, n_valid, pad_ns, factor):
    """``inner_optimizer: muon_chunk`` (Newton-Schulz once per chunk on the weighted momentum
    sum): the fast path's two mixing rows == the reference in float64, outputs, end state and
    every gradient, with partial rows, the factored form and the padded Newton-Schulz launch (the
    Gram traces and scalings on each launch's stacked Gram matrices); and it is a different update
    from the per-token one."""
    args, leaves = random_problem(T=T, C=4, c=c, hid=5, depth=depth)
    args = with_valid_lengths(args, leaves, n_valid, c)
    kw = dict(chunk_size=4, window=c, ns_steps=5, muon=True, return_state=True, snapshots=(),
              n_valid=None if n_valid is None else torch.tensor(n_valid))
    fwd, bwd = compare_impls(args, leaves, dict(compile=False, pad_ns=pad_ns, factor=factor), ns_chunk=True, **kw)
    assert fwd < 1e-10 and bwd < 1e-9, (fwd, bwd)
    chunked = run_impl(atlas_kernels._atlas_memory, args, ns_chunk=True, **kw)
    per_token = run_impl(atlas_kernels._atlas_memory, args, **kw)
    assert rel_err(chunked[1].detach(), per_token[1].detach()) > 1e-2


def test_factor_gram_picks_the_form_with_fewer_flops():
    """By flop count (FACTOR_GRAM None) the feature-wide weights of the Quad-Hybrid's memory
    (head 32: 560 degree-2 features, hidden 64; chunk 16, window 16) are factored, the tests'
    small ones (3 x 9, chunk 4, window 3) and tall ones are not."""
    assert atlas_kernels._factor_gram(32, 560, 16, 31) and atlas_kernels._factor_gram(64, 560, 16, 31)
    assert not atlas_kernels._factor_gram(3, 9, 4, 6) and not atlas_kernels._factor_gram(5, 9, 4, 6)


@pytest.mark.parametrize("cancel", [1e-2, 1e-4])
def test_direct_gram_stays_accurate_when_a_momentum_cancels(cancel):
    """Why ``FACTOR_GRAM`` is off: one token's momentum of the first weight, ``S_t = Σ_i mix_ti
    e_i k_iᵀ + λ_t S_0``, cancels to ``cancel`` of its parts (the new gradients against the
    decayed momentum, as after an update that overshot). In float32 the direct form (S_t
    formed, then S_t S_tᵀ: positive semi-definite by construction) keeps the chunk step within
    1e-3 of float64 (measured 8.9e-6 at 1e-2, 6.9e-6 at 1e-3, 1.0e-5 at 1e-4); the factored Gram
    matrix, a sum of products of the parts, carries their rounding (~1e-7 of |parts|²) into a
    matrix whose trace is ``cancel``² of it: 3.8e-4 off at 1e-2, 0.20 at 1e-3, and at 1e-4 no
    longer positive semi-definite, so its trace-normalised Newton-Schulz diverges to NaN (the
    Quad-Hybrid recipe's first loss was NaN on an H200 with it on)."""
    g = torch.Generator().manual_seed(0)
    N, C, c, Fd, D, H = 2, 4, 3, 40, 6, 8
    f64 = torch.float64
    rn = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    Cp = C + c - 1
    K, V, gam = F.normalize(rn(N, Cp, Fd), dim=-1), rn(N, Cp, D), torch.rand(N, Cp, generator=g, dtype=f64)
    params = (rn(N, D, Fd) / math.sqrt(Fd), rn(N, H, Fd) / math.sqrt(Fd), rn(N, D, H) / math.sqrt(H))
    lth = F.logsigmoid(rn(N, C) + 2)
    mix = atlas_kernels._decay_matrix(lth) @ atlas_kernels._window_matrix(C, c, "cpu", f64)
    lam, wu, keep = lth.cumsum(-1).exp(), 0.05 * torch.rand(N, C, generator=g, dtype=f64), torch.ones(N, dtype=f64)
    e = 2 * gam[..., None] * (memory_apply(params, K) - V)  # the per-token gradient factors of P (with K)
    part = torch.einsum("ni,nid,nif->ndf", mix[:, 0], e, K) / lam[:, 0, None, None]
    mom = [-part + cancel * part.norm() / math.sqrt(part[0].numel()) * rn(*part.shape)]
    mom += [0.3 * rn(*p.shape) / math.sqrt(p.shape[-1]) for p in params[1:]]

    def step(dt, factor):
        cv = lambda ts: tuple(t.to(dt) for t in ts)  # noqa: E731
        return atlas_kernels._chunk_step(cv(params), cv(mom), *cv((K, V, gam, mix, lam, wu, keep)), 5, True, False,
                                         False, factor)[0]

    ref = step(f64, False)
    err = lambda got: max(float((a.double() - b).norm() / b.norm()) for a, b in zip(got, ref))  # noqa: E731
    assert err(step(torch.float32, False)) < 1e-3
    fac = err(step(torch.float32, True))
    assert (fac > 1e-4) if cancel == 1e-2 else not fac < 1.0, fac  # NaN compares False


def test_fast_path_compiled_equals_reference():
    """The torch.compile'd chunk step (what CUDA runs; Inductor's CPU backend here) == the
    reference in float32: outputs, state and gradients, Muon (per token and per chunk) and SGD."""
    for muon, ns_chunk, triton_ns in ((True, False, False), (True, True, False), (False, False, False),
                                      (True, True, True)):  # the NS op (its CPU kernel) through Inductor, padded
        args, leaves = random_problem(N=2, T=10, C=4, c=2, dtype=torch.float32, seed=3)
        fwd, bwd = compare_impls(args, leaves, dict(compile=True, pad_ns=True, triton_ns=triton_ns), chunk_size=4,
                                 window=2, ns_steps=5, muon=muon, ns_chunk=ns_chunk, return_state=True, snapshots=(),
                                 n_valid=None)
        # float32 NS: the reference itself is ~1e-4 off float64
        assert fwd < 1e-3 and bwd < 5e-3, (muon, ns_chunk, fwd, bwd)


def test_cpu_dispatch_takes_the_eager_fast_path(monkeypatch):
    """On a CPU ``atlas_memory`` takes the fast path (registered as ``atlas_cpu``, its probe passing
    here) with the chunk step eager; ``HYMBA_KERNELS=reference`` takes the reference."""
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    assert dispatch.probe_all([atlas_kernels.CPU_FAST])[atlas_kernels.CPU_FAST]
    calls = []
    real = atlas_kernels._atlas_memory_fast
    monkeypatch.setattr(atlas_kernels, "_atlas_memory_fast", lambda *a, **k: calls.append(k.get("compile")) or real(*a, **k))
    # the well-conditioned float32 problem: the default one's chain of Muon steps amplifies float32
    # rounding to ~1e-4 between any two orders of the same arithmetic (seeds 0-3: 1.0e-4 to 2.0e-4)
    args, _ = random_problem(N=2, T=10, C=4, c=2, dtype=torch.float32, seed=3, float32=True)
    kw = dict(chunk_size=4, window=2)
    y, W, S = atlas_memory(*args, **kw)
    assert calls == [False]
    monkeypatch.setenv("HYMBA_KERNELS", "reference")
    y_ref, W_ref, S_ref = atlas_memory(*args, **kw)
    assert calls == [False]
    for a, b in zip((y, *W, *S), (y_ref, *W_ref, *S_ref)):
        assert rel_err(a.detach(), b.detach()) < 1e-4


@pytest.mark.slow
def test_fast_path_compiled_several_chunks_per_call(monkeypatch):
    """CHUNKS_PER_CALL = 2: pairs of chunks unrolled into one compiled graph (the last chunk
    of an odd count through the one-chunk graph) == the reference, float32."""
    monkeypatch.setattr(atlas_kernels, "CHUNKS_PER_CALL", 2)
    for ns_chunk in (False, True):
        args, leaves = random_problem(N=2, T=14, C=4, c=2, dtype=torch.float32, seed=3)
        fwd, bwd = compare_impls(args, leaves, dict(compile=True, pad_ns=True), chunk_size=4, window=2, ns_steps=5,
                                 muon=True, ns_chunk=ns_chunk, return_state=True, snapshots=(), n_valid=None)
        assert fwd < 1e-3 and bwd < 5e-3, (ns_chunk, fwd, bwd)


def test_compile_options_this_inductor_lacks_are_left_out(monkeypatch):
    """``INDUCTOR``'s options reach torch.compile, less any this PyTorch's Inductor does not have
    (which would fail the compile and run the chunk step eagerly), dotted names looked up through
    the config's sections; none left: no options. The "pdl" set's option exists here, and a real
    compile takes it (on a CPU Inductor generates no PDL code: the same result)."""
    real_compile = torch.compile
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)
    monkeypatch.setitem(atlas_kernels.INDUCTOR_OPTIONS, "test", {"combo_kernels": True, "no_such_option": 1,
                                                               "triton.enable_pdl": True, "triton.no_such": 2})
    monkeypatch.setitem(atlas_kernels.INDUCTOR_OPTIONS, "test_none", {"no_such_option": 1, "no_such.section": 1})
    assert atlas_kernels._compile(len, "test") is len and atlas_kernels._compile(len, "test_none") is len
    assert seen == [{"combo_kernels": True, "triton.enable_pdl": True}, None]
    atlas_kernels._compile.cache_clear()
    assert atlas_kernels.inductor_options("pdl") == {"triton.enable_pdl": True}
    fn = real_compile(lambda x: torch.sigmoid(x) * x + 1, options=atlas_kernels.inductor_options("pdl"))
    x = torch.randn(64)
    assert torch.allclose(fn(x), torch.sigmoid(x) * x + 1)


def with_compiled_step(monkeypatch, step, warning: str) -> tuple[float, float]:
    """The fast path (Muon, float64) with ``step`` standing in for the compiled chunk step, from a
    clean compile state, warning ``warning``: its errors against the reference."""
    monkeypatch.setattr(atlas_kernels, "compile_error", None)
    monkeypatch.setattr(atlas_kernels, "recompile_limit_hits", 0)
    monkeypatch.setattr(atlas_kernels, "_STEP_CHECKED", {})
    monkeypatch.setattr(atlas_kernels, "_compiled_chunk_step", lambda: step)
    args, leaves = random_problem(T=9, C=4, c=2)
    with pytest.warns(UserWarning, match=warning):
        return compare_impls(args, leaves, dict(compile=True), chunk_size=4, window=2, ns_steps=5, muon=True,
                             return_state=True, snapshots=(), n_valid=None)


def test_fast_path_falls_back_to_eager_when_compile_fails(monkeypatch):
    """A chunk step that cannot be compiled here warns once and runs eagerly (same results)."""
    def broken(*args):
        raise RuntimeError("no compiler")

    fwd, bwd = with_compiled_step(monkeypatch, broken, "no compiler")
    assert fwd < 1e-10 and bwd < 1e-9 and "no compiler" in atlas_kernels.compile_error


class _ScaleGrad(torch.autograd.Function):
    """identity forward, gradient x 3: a compiled step whose gradients are wrong (the combo-kernel
    miscompile's symptom) while its results are right."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return 3 * g


@pytest.mark.parametrize("wrong", ["results", "gradients"])
def test_compiled_step_that_disagrees_with_the_eager_one_runs_eagerly(monkeypatch, wrong):
    """A compiled chunk step whose results, or only whose gradients, differ from the eager step's
    (as the combo-kernel compile's did on an H100, 2026-12-05) is caught at its first call: said
    once, the reason kept in ``compile_error``, the step eager from then on, and the layer's results
    and gradients those of the reference."""
    def miscompiled(params, *rest):
        p, m, *y = atlas_kernels._chunk_step(params, *rest)
        bad = (lambda t: 1.01 * t) if wrong == "results" else _ScaleGrad.apply
        return tuple(bad(t) for t in p), m, *y

    fwd, bwd = with_compiled_step(monkeypatch, miscompiled, "disagrees with the eager one")
    assert fwd < 1e-10 and bwd < 1e-9
    assert "disagrees with the eager one" in atlas_kernels.compile_error and list(atlas_kernels._STEP_CHECKED.values())
    off = re.search(r"results (\S+), gradients (\S+) off", atlas_kernels.compile_error)
    assert float(off[1 if wrong == "results" else 2]) > 1e-3 and (wrong == "results" or float(off[1]) == 0.0)


def test_compiled_step_check_passes_a_correct_compile_without_a_second_graph(monkeypatch):
    """The first-call check of a real torch.compile'd step (Inductor's CPU backend) agrees with the
    eager step, per compiled graph, single chunks and 2-chunk calls (``CHUNKS_PER_CALL``), and
    makes torch.compile build no graph beyond the ones the calls need (its inputs keep the call's
    shapes, strides and requires_grad: a second ~100 s compile on a GPU otherwise); inside a
    CUDA-graph capture no check runs."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(atlas_kernels, "compile_error", None)
    monkeypatch.setattr(atlas_kernels, "_STEP_CHECKED", {})
    args, leaves = random_problem(N=2, T=14, C=4, c=2, dtype=torch.float32, seed=3)
    kw = dict(chunk_size=4, window=2, ns_steps=5, muon=True, ns_chunk=True, return_state=True, snapshots=(),
              n_valid=None)
    graphs = []
    for check in (False, True):
        torch._dynamo.reset()
        counters.clear()
        with atlas_kernels.settings(CHECK_COMPILED_STEP=check, CHUNKS_PER_CALL=2):
            fwd, bwd = compare_impls(args, leaves, dict(compile=True, pad_ns=True), **kw)
        assert fwd < 1e-3 and bwd < 5e-3
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] == 2  # _chunk_steps (2 chunks a call) and _chunk_step (the last chunk)
    assert len(atlas_kernels._STEP_CHECKED) == 2 and set(atlas_kernels._STEP_CHECKED.values()) == {None}
    assert atlas_kernels.compile_error is None
    monkeypatch.setattr(atlas_kernels, "_STEP_CHECKED", {})
    monkeypatch.setattr(dispatch, "capturing", lambda: True)
    compare_impls(args, leaves, dict(compile=True, pad_ns=True), **kw)
    assert atlas_kernels._STEP_CHECKED == {}


def test_fast_path_runs_shapes_past_the_recompile_limit_eagerly(monkeypatch):
    """A call past torch.compile's recompile limit runs that call eagerly (same results), says so
    once, and does not turn compilation off for the process (``compile_error`` stays None)."""
    calls = []

    def limited(*args):
        calls.append(1)
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile_limit reached")

    fwd, bwd = with_compiled_step(monkeypatch, limited, "recompile limit")
    assert fwd < 1e-10 and bwd < 1e-9
    assert atlas_kernels.compile_error is None and atlas_kernels.recompile_limit_hits == len(calls) == 2


def test_ns_gram_op_matches_autograd():
    """hymba::atlas_ns_gram (the op the fast path's NS runs through; PyTorch on CPU, Triton on
    CUDA): forward and hand-written backward == autograd through ns_gram_factor, and the op
    passes torch.library's checks (fake tensor, autograd registration, compile)."""
    g = torch.Generator().manual_seed(0)
    for m, n, steps in ((4, 9, 5), (6, 6, 3), (3, 8, 1)):
        X = torch.randn(5, m, n, generator=g, dtype=torch.float64)
        A = (X @ X.mT / X.pow(2).sum((-2, -1), keepdim=True)).requires_grad_()
        dR = torch.randn(5, m, m, generator=g, dtype=torch.float64)
        R = atlas_kernels.atlas_ns_gram(A, steps)
        ref = atlas_kernels.ns_gram_factor(A, steps)
        assert rel_err(R, ref) < 1e-13
        got, want = torch.autograd.grad(R, A, dR)[0], torch.autograd.grad(ref, A, dR)[0]
        assert rel_err(got, want) < 1e-11
    torch.library.opcheck(torch.ops.hymba.atlas_ns_gram.default, (A.detach().requires_grad_(), 5))


def test_ns_launch_copies_nothing_at_a_padded_side(monkeypatch):
    """``_ns_gram_launch`` on Gram matrices whose side is already the kernels' (muon_chunk's padded
    launch: side 64) hands them to the kernels as they are, forward and backward (a pad by zero
    used to copy both: three copy kernels a chunk step); a non-contiguous dR (a transposed view)
    is made contiguous, a side under the kernels' is zero-padded. The kernels stand in as
    recorders of what they are given."""
    pytest.importorskip("triton")
    given = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: given.append(args)

    for name in ("_ns_gram_fwd_kernel", "_ns_gram_bwd_kernel", "_ns_gram_bwd_saved_kernel"):
        monkeypatch.setattr(atlas_kernels, name, Recorder())
    A, dR = torch.randn(3, 64, 64), torch.randn(3, 64, 64)
    atlas_kernels._ns_gram_launch(A, None, 5)
    atlas_kernels._ns_gram_launch(A, dR, 5)
    assert given[0][0] is A and given[1][0] is A and given[1][1] is dR
    atlas_kernels._ns_gram_launch(A, dR.mT, 5)
    assert given[2][1].is_contiguous() and torch.equal(given[2][1], dR.mT)
    atlas_kernels._ns_gram_launch(A[:, :40, :40], None, 5)  # side 40: padded to 64 with zeros
    padded = given[3][0]
    assert padded.shape == (3, 64, 64) and torch.equal(padded[:, :40, :40], A[:, :40, :40])
    assert not padded[:, 40:].any() and not padded[:, :, 40:].any()


@pytest.mark.parametrize("saved", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_ns_triton_kernels_in_interpreter_match_pytorch(saved):
    """The Triton Newton-Schulz kernels (forward, the backward that keeps the steps in scratch memory,
    ``NS_BWD_SAVED``, the default, and in ``make test-all`` the one that recomputes them) against autograd through ns_gram_factor, in Triton's CPU interpreter (subprocess:
    TRITON_INTERPRET must be set before import); sides padded to 16 / 32 / 64 (64: the
    saved-iterate backward whatever NS_BWD_SAVED says), 1-5 steps; two of them also with the
    products as split TF32 ones (``NS_TRITON_PRECISION`` "tf32x3_split"), two with the saved
    iterates stored transposed / transposed in registers (``NS_BWD_TRANS``) and through the forward
    that keeps its iterates and the backward that only reads them (``NS_SAVE_FWD``)."""
    pytest.importorskip("triton")
    code = f"SAVED = {saved!r}\n" + textwrap.dedent("""
        import itertools
        import torch
        from hymba_plus.kernels import atlas
        from hymba_plus.kernels.atlas import _ns_gram_launch, ns_gram_factor
        g = torch.Generator().manual_seed(0)
        rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
        cases = ((16, 40, 5), (24, 40, 5), (32, 150, 3), (5, 7, 2), (16, 16, 1), (48, 80, 5), (64, 560, 5))
        for saved, (m, n, steps) in itertools.product((SAVED,), cases):
            atlas.NS_BWD_SAVED = saved  # the recomputing backward kernel, and the one with scratch
            X = torch.randn(3, m, n, generator=g, dtype=torch.float64)
            A = X @ X.mT / X.pow(2).sum((-2, -1), keepdim=True)
            dR = torch.randn(3, m, m, generator=g, dtype=torch.float64)
            Ar = A.clone().requires_grad_()
            R = ns_gram_factor(Ar, steps)
            (dA,) = torch.autograd.grad(R, Ar, dR)
            assert rel(_ns_gram_launch(A.float(), None, steps).double(), R.detach()) < 2e-5, ("fwd", m, steps)
            assert rel(_ns_gram_launch(A.float(), dR.float(), steps).double(), dA) < 2e-5, ("bwd", saved, m, steps)
            if saved and m in (24, 64):  # the products written out as split TF32 ones
                assert rel(_ns_gram_launch(A.float(), None, steps, "tf32x3_split").double(), R.detach()) < 2e-5
                assert rel(_ns_gram_launch(A.float(), dR.float(), steps, "tf32x3_split").double(), dA) < 2e-5
            if saved and m in (5, 24):  # the saved iterates read transposed the other ways (NS_BWD_TRANS)
                for trans in ("store", "regs"):
                    atlas.NS_BWD_TRANS = trans
                    assert rel(_ns_gram_launch(A.float(), dR.float(), steps).double(), dA) < 2e-5, (trans, m)
                atlas.NS_BWD_TRANS = "load"
                # the forward that keeps its iterates, the backward from them alone (NS_SAVE_FWD)
                R_s, W = atlas._ns_save_launch(A.float(), steps)
                assert rel(R_s.double(), R.detach()) < 2e-5, ("save fwd", m, steps)
                assert rel(atlas._ns_bwd_saved_launch(W, dR.float(), steps).double(), dA) < 2e-5, ("save bwd", m)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


_NS_INTERPRETED = """
    import torch
    from hymba_plus.kernels import atlas
    atlas.NS_TRITON_PRECISION = "tf32x3"  # the interpreter's one float32 product (see the docstring)
    atlas.atlas_ns_gram.register_kernel("cpu")(lambda a, steps: atlas._ns_gram_launch(a, None, steps))
    atlas.atlas_ns_gram_bwd.register_kernel("cpu")(lambda a, dr, steps: atlas._ns_gram_launch(a, dr, steps))
"""


def _run_interpreted(code: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_NS_INTERPRETED) + textwrap.dedent(code)], env=env,
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-1000:] + res.stderr[-3000:]


@pytest.mark.slow  # ~55 s in the interpreter: make test-all runs it (the default kernel's case runs below)
def test_probe_with_the_recomputing_ns_backward_in_interpreter():
    """The dispatch probe's problem within the probe's limits with the recomputing Newton-Schulz
    backward (``NS_BWD_SAVED = False``; the default saved-iterate one is checked in the next test)."""
    pytest.importorskip("triton")
    _run_interpreted("""
        atlas.NS_BWD_SAVED = False
        errs = atlas.probe_errors("cpu", triton_ns=True)
        assert max(errs[:9]) < 1e-3 and max(errs[9:]) < 1e-2, errs
        print("ok")
    """)


def test_fast_path_with_triton_ns_kernels_in_interpreter():
    """The fast path with the Triton Newton-Schulz kernels in it, end to end, in Triton's CPU
    interpreter (the custom ops' CPU kernels replaced by the Triton launchers): the dispatch
    probe's problem within the probe's limits with the default saved-iterate backward (it failed
    the probe on an H200 when the probe started from zero momenta: see ``probe_errors``; the
    recomputing one: the test above). The next test: wider memories."""
    pytest.importorskip("triton")
    _run_interpreted("""
        assert atlas.NS_BWD_SAVED  # the default
        errs = atlas.probe_errors("cpu", triton_ns=True)
        assert max(errs[:9]) < 1e-3 and max(errs[9:]) < 1e-2, errs
        print("ok")
    """)


@pytest.mark.slow  # ~30 s in the interpreter: make test-all
def test_fast_path_with_triton_ns_kernels_padded_to_64_in_interpreter():
    """The fast path with the Triton Newton-Schulz kernels in Triton's CPU interpreter (as the test
    above): ``NS_TRITON_MAX = 64`` on a memory whose 40-wide hidden layer pads to side 64 (the
    Quad-Hybrid's case) against the float64 reference, outputs and gradients; the same with
    muon_chunk and every side padded into one launch (``PAD_NS``). The kernels' products run as
    "tf32x3" here, one float32 product in the interpreter: the default split products cost 3.4x the
    time in it (223 s against 65), and their arithmetic is checked per kernel in the interpreter
    (``test_ns_triton_kernels_in_interpreter_match_pytorch``) and end to end on a GPU."""
    pytest.importorskip("triton")
    _run_interpreted("""
        from tests.test_atlas import float32_errors, random_problem
        atlas.NS_TRITON_MAX = 64
        args, leaves = random_problem(N=2, T=10, C=4, c=3, d=8, p=2, hid=40, depth=2)
        errs = float32_errors(args, leaves, 2, "cpu", dict(compile=False, triton_ns=True), chunk_size=4, window=3,
                              ns_steps=5, muon=True, return_state=True, snapshots=(), n_valid=None)
        assert max(errs) < 2e-3, errs  # float32 reference: 3e-4
        atlas.PAD_NS = True  # every weight's Gram matrix padded to side 64, one launch (muon_chunk)
        atlas.FUSED_STEP = False  # the unfused step's launch is what this checks (tests/test_atlas_fused.py: the fused)
        errs = float32_errors(args, leaves, 2, "cpu", dict(compile=False, triton_ns=True), chunk_size=4, window=3,
                              ns_steps=5, muon=True, ns_chunk=True, return_state=True, snapshots=(), n_valid=None)
        assert max(errs) < 2e-3, ("pad_ns", errs)
        print("ok")
    """)


def test_ns_triton_check_says_once_why_it_falls_back(monkeypatch, capsys):
    """The Triton Newton-Schulz kernels' check on the GPU (``_ns_triton_works``): a failed check
    prints one line naming the side and the reason, once, and the PyTorch form is used; inside a
    CUDA-graph capture an unchecked side is not checked (no kernels may launch there) but said."""
    monkeypatch.setattr(atlas_kernels, "_NS_CHECKED", {})
    calls = []

    def check(M, precision):
        calls.append(M)
        return None if M == 16 else "relative error 0.5 over 0.0001"

    monkeypatch.setattr(atlas_kernels, "_ns_check", check)
    monkeypatch.setattr(atlas_kernels, "NS_BWD_SAVED", False)
    assert atlas_kernels._ns_triton_works(16) and not atlas_kernels._ns_triton_works(64)
    monkeypatch.setattr(atlas_kernels, "NS_BWD_SAVED", True)  # side 64 takes the saved backward either way
    assert not atlas_kernels._ns_triton_works(64) and calls == [16, 64]
    monkeypatch.setattr(atlas_kernels, "NS_BWD_SAVED", False)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["atlas: Newton-Schulz Triton kernels at side 64 unavailable (relative error 0.5 over 0.0001): "
                   "batched matmuls instead"]
    monkeypatch.setattr(dispatch, "capturing", lambda: True)
    assert not atlas_kernels._ns_triton_works(32) and calls == [16, 64] and not any(k[0] == 32 for k in atlas_kernels._NS_CHECKED)
    assert "side 32 not checked before this CUDA-graph capture" in capsys.readouterr().err
    assert atlas_kernels._ns_side(40) == 64 and atlas_kernels._ns_side(5) == 16 and atlas_kernels._ns_side(32) == 32


def test_fast_path_settings_parse_check_and_restore(monkeypatch):
    """``parse_setting`` reads a benchmark's NAME=VALUE into the setting's type or says in one
    line what it takes; ``settings`` sets them for a block and restores them, refusing a name or
    value outside ``SETTINGS`` before setting anything, and makes the dispatch probe the fast
    path again under the settings in effect."""
    assert atlas_kernels.parse_setting("NS_TRITON_MAX=64") == ("NS_TRITON_MAX", 64)
    assert atlas_kernels.parse_setting("NS_BWD_SAVED=1") == ("NS_BWD_SAVED", True)
    assert atlas_kernels.parse_setting("FACTOR_GRAM=none") == ("FACTOR_GRAM", None)
    assert atlas_kernels.parse_setting("CHUNKS_PER_CALL=4") == ("CHUNKS_PER_CALL", 4)
    assert atlas_kernels.parse_setting("NS_TRITON_PRECISION=tf32") == ("NS_TRITON_PRECISION", "tf32")
    assert atlas_kernels.parse_setting("INDUCTOR=combo") == ("INDUCTOR", "combo")
    assert atlas_kernels.SETTINGS["INDUCTOR"] == tuple(atlas_kernels.INDUCTOR_OPTIONS)
    for bad, msg in (("NS_TRITON_MAX=48", "takes 16 / 32 / 64"), ("NS_BWD_SAVED=none", "takes true / false"),
                     ("CHUNKS_PER_CALL=0", "a positive integer"), ("EVAL=1", "expected NAME=VALUE"),
                     ("NS_TRITON_MAX", "expected NAME=VALUE")):
        with pytest.raises(ValueError, match=msg):
            atlas_kernels.parse_setting(bad)
    before = atlas_kernels.NS_TRITON_MAX, atlas_kernels.NS_BWD_SAVED
    fp = dispatch._FAST["atlas"]
    monkeypatch.setattr(fp, "status", False)
    monkeypatch.setattr(fp, "error", "RuntimeError: probed under other settings")
    with atlas_kernels.settings(NS_TRITON_MAX=64, NS_BWD_SAVED=True):
        assert (atlas_kernels.NS_TRITON_MAX, atlas_kernels.NS_BWD_SAVED) == (64, True)
        assert (fp.status, fp.error) == (None, "")  # the dispatch probes again under these settings
        fp.status = True
    assert (atlas_kernels.NS_TRITON_MAX, atlas_kernels.NS_BWD_SAVED) == before and fp.status is None
    with pytest.raises(ValueError, match="NS_TRITON_MAX=48"):
        with atlas_kernels.settings(NS_BWD_SAVED=True, NS_TRITON_MAX=48):
            pass
    assert (atlas_kernels.NS_TRITON_MAX, atlas_kernels.NS_BWD_SAVED) == before


def test_pad_ns_default_pads_muon_chunk_on_cuda_unless_combo_kernels():
    """``PAD_NS`` unset: one padded Newton-Schulz launch on CUDA where the batched-matmul form runs
    and for muon_chunk's Triton kernels, but not under Inductor's combo kernels (padded, that step
    failed its GPU test) nor for per-token Muon or on a CPU; set, it is obeyed."""
    assert atlas_kernels.PAD_NS is None and atlas_kernels.INDUCTOR == "pdl"
    pad = atlas_kernels._pad_ns
    assert pad(True, False, False) and pad(True, True, True)
    assert not pad(True, True, False) and not pad(False, True, True) and not pad(False, False, False)
    with atlas_kernels.settings(INDUCTOR="combo"):
        assert not pad(True, True, True) and pad(True, False, False)
    with atlas_kernels.settings(PAD_NS=True, INDUCTOR="combo"):
        assert pad(False, True, False) and pad(True, True, True)


@pytest.mark.slow
def test_ns_kernels_keep_their_precision_under_tf32(monkeypatch):
    """``hymba train --tf32`` moves cuBLAS float32 matmuls to TF32; the Newton-Schulz Triton
    kernels keep ``NS_TRITON_PRECISION`` (tf32x3_split: float32 accuracy), checked once per side and
    precision, the check's PyTorch form in float32 (TF32 off around it)."""
    assert atlas_kernels.NS_TRITON_PRECISION == "tf32x3_split"
    checked = []
    monkeypatch.setattr(atlas_kernels, "_NS_CHECKED", {})
    monkeypatch.setattr(atlas_kernels, "_ns_check", lambda M, prec: checked.append((M, prec)))
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            assert atlas_kernels._ns_triton_works(32)
        with atlas_kernels.settings(NS_TRITON_PRECISION="tf32"):
            assert atlas_kernels._ns_triton_works(32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert checked == [(32, "tf32x3_split"), (32, "tf32")]


@pytest.mark.slow  # ~35 s of Triton / ptxas compiles on a CPU, like the other kernels' sm_90 compile tests
def test_ns_triton_kernels_compile_for_sm90():
    """The Triton Newton-Schulz kernels go through Triton's real compiler for an H100/H200
    (sm_90) without a GPU: TTIR -> PTX -> cubin, at the padded sides, the launch's warps and
    the default and float32 matmul precisions, and one TF32 pass (``NS_TRITON_PRECISION``
    "tf32") at side 64 (the interpreter test checks their numbers, which it computes in float32
    whatever the precision; this one that they compile). Where
    Triton ships ptxas, the resources of what ``_ns_gram_launch`` launches are held: no spills
    in the forward at sides 16 / 32 or the saved-iterate backward at 16, shared memory within
    an H100's 227 KiB, and side 64 on Hopper's wgmma (``benchmarks/kernel_resources.py`` prints
    them all)."""
    pytest.importorskip("triton")
    bench = load_benchmark("kernel_resources")

    prec0 = atlas_kernels.NS_TRITON_PRECISION
    for kernel in bench.KERNELS:
        # side 64 (one warpgroup): the forward and the saved-iterate backward, the only one launched there
        side64 = [] if kernel == "_ns_gram_bwd_kernel" else [(64, prec0), (64, "tf32")]
        for M, prec in [(16, prec0), (32, prec0), (32, "ieee"), *side64]:
            res = bench.ns_resources(M, kernel, prec)
            assert res["cubin_bytes"] > 0, (kernel, M)
            if prec != prec0 or "registers" not in res:  # no ptxas in this Triton
                continue
            assert res["shared_bytes"] <= 227 * 1024, (kernel, M, res["shared_bytes"])
            if kernel == "_ns_gram_fwd_kernel" and M <= 32 or kernel == "_ns_gram_bwd_saved_kernel" and M == 16:
                assert res["spill_stores"] == 0, (kernel, M, res)
            if M == 64:
                assert res["wgmma"] > 0, (kernel, res)


@pytest.fixture
def fast_on_cpu(monkeypatch):
    """The layer through the CPU's fast path (``atlas_cpu``: the eager chunk step) whatever the
    caller's ``HYMBA_KERNELS`` says; a failed probe is an error (``fast``)."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")


def test_layer_on_fast_path_equals_reference(fast_on_cpu, monkeypatch):
    """The whole layer through the fast path == through the reference (float64): output and
    every parameter gradient in a padded batch, and boundary_forward's states."""
    torch.manual_seed(0)
    mod = Atlas(AtlasConfig(**{**TINY, "memory_depth": 3, "memory_hidden": 2}), d_model=32).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    ctx = ctx_for(x, lengths=torch.tensor([19, 12]))
    dy = torch.randn(2, 19, 32, dtype=torch.float64)
    res = {}
    for path in ("fast", "reference"):
        if path == "reference":
            monkeypatch.setattr(dispatch, "use_fast", lambda name, *t: False)
        mod.zero_grad()
        y = mod(x, ctx)
        (y * dy).sum().backward()
        _, st = mod.boundary_forward(x[:, :18], ctx_for(x[:, :18]), block_size=5, offset=3)
        res[path] = [y[0], y[1, :12]] + [p.grad.clone() for p in mod.parameters()] + [*st.weights, *st.momentum]
    for a, b in zip(res["fast"], res["reference"]):
        assert rel_err(a.detach(), b.detach()) < 1e-9


@pytest.mark.parametrize("atlas", [{}, {"inner_optimizer": "sgd", "window": 1}, {"inner_optimizer": "muon_chunk"}])
def test_invariant_on_fast_path(fast_on_cpu, atlas):
    """DESIGN §1 through the fast path: any split through one cache == one full forward
    (the cached calls run partial chunks through n_valid's identity steps)."""
    assert split_invariant_error(tiny_model(atlas), seed=1, splits=3) <= 1e-4


# ----------------------------------------------------------------------------- pieces


def test_registered_as_atlas_and_atl():
    assert registry.canonical("ATL") == "atlas" and registry.get("atlas").cls is Atlas
    assert not registry.is_reserved("ATL") and not registry.is_reserved("atlas")


@pytest.mark.parametrize("shape", [(5, 12, 40), (5, 40, 12), (3, 16, 16)])
def test_newton_schulz_is_near_orthogonal(shape):
    """NS5 maps every singular value of a generic matrix into Muon's band around 1."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = newton_schulz(G, 5)
    sv = torch.linalg.svdvals(X)
    assert float(sv.min()) > 0.6 and float(sv.max()) < 1.25, sv
    # the polar factor U V^T of G is what NS approximates
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (X * (U @ Vh)).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert float(cos.min()) > 0.98
    Z = torch.zeros(2, 4, 6, requires_grad=True)  # zero in, zero out, finite gradient
    out = newton_schulz(Z, 5)
    out.sum().backward()
    assert float(out.detach().abs().max()) == 0.0 and bool(torch.isfinite(Z.grad).all())


@pytest.mark.parametrize("p", [1, 2, 3])
def test_polynomial_features_are_the_polynomial_kernel(p):
    g = torch.Generator().manual_seed(p)
    x, y = torch.randn(7, 2, 5, generator=g, dtype=torch.float64), torch.randn(7, 2, 5, generator=g, dtype=torch.float64)
    coef = torch.rand(2, p, generator=g, dtype=torch.float64) + 0.5  # per head, per degree
    fx, fy = poly_features(x, coef), poly_features(y, coef)
    assert fx.shape[-1] == feature_dim(5, p)
    dot = (x * y).sum(-1)
    want = sum(coef[:, j] ** 2 * dot ** (j + 1) for j in range(p))
    assert rel_err((fx * fy).sum(-1), want) < 1e-12


def test_polynomial_features_equal_the_indexed_monomials():
    """The monomials' factors are gathered by one-hot matmuls (their backward is a matmul, not a
    sort-based index_put): the features are bit-equal to indexing the factors, in float32, bf16
    and under bf16 autocast (the gather runs in x's dtype), and the gradient matches autograd
    through the indexed form."""
    from hymba_plus.kernels.atlas import _monomials

    def indexed(x, coef):
        parts = [x * coef[..., 0:1].to(x.dtype)]
        for j in range(2, coef.shape[-1] + 1):
            idx, w = _monomials(x.shape[-1], j)
            it = torch.tensor(idx)
            m = x[..., it[:, 0]]
            for r in range(1, j):
                m = m * x[..., it[:, r]]
            parts.append(m * torch.tensor(w, dtype=x.dtype) * coef[..., j - 1 : j].to(x.dtype))
        return torch.cat(parts, dim=-1)

    g = torch.Generator().manual_seed(0)
    coef = torch.rand(3, 1, 3, generator=g) + 0.5
    for dtype, autocast in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
        x = torch.randn(2, 3, 7, 6, generator=g).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, want = poly_features(x, coef), indexed(x, coef)
        assert got.dtype == want.dtype and torch.equal(got, want), (dtype, autocast)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    seed = torch.randn(2, 3, 7, feature_dim(6, 3), generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad(poly_features(x, coef.double()), x, seed)
    (gb,) = torch.autograd.grad(indexed(x, coef.double()), x, seed)
    assert rel_err(ga, gb) < 1e-13


def test_memory_apply_matches_oracle():
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(3, *s, generator=g) for s in [(4, 9), (6, 9), (6, 6), (4, 6)]]
    x = torch.randn(3, 9, generator=g)
    assert rel_err(memory_apply(W, x[:, None, :])[:, 0], mlp_oracle(W, x)) < 1e-6


def memory_recall(p: int, c: int, d: int = 4, n_pairs: int = 8, N: int = 256, seed: int = 0) -> float:
    """Write n_pairs random unit (key, value) pairs into a fresh memory (one chunk, Muon,
    η = 0.1, θ = 0.5), query every key from the next chunk, and return how often the
    nearest stored value to the retrieval is the right one."""
    g = torch.Generator().manual_seed(seed)
    C, T = 16, 32
    coef = torch.tensor([1 / math.sqrt(math.factorial(j + 1)) for j in range(p)])
    keys = F.normalize(torch.randn(N, n_pairs, d, generator=g), dim=-1)
    vals = F.normalize(torch.randn(N, n_pairs, d, generator=g), dim=-1)
    k, v, q = torch.zeros(N, T + c - 1, d), torch.zeros(N, T + c - 1, d), torch.zeros(N, T, d)
    k[:, c - 1 : c - 1 + n_pairs], v[:, c - 1 : c - 1 + n_pairs], q[:, C : C + n_pairs] = keys, vals, keys
    gamma = torch.zeros(N, T + c - 1)
    gamma[:, c - 1 : c - 1 + n_pairs] = 1.0
    Fd = feature_dim(d, p)
    params = [0.1 * torch.randn(N, *s, generator=g) / math.sqrt(s[1]) for s in [(d, Fd), (d, Fd), (d, d)]]
    y, _, _ = atlas_memory(poly_features(q, coef), poly_features(k, coef), v, gamma, torch.full((N, T), 0.1),
                           torch.full((N, T), math.log(0.5)), torch.full((N, T), math.log(0.999)), params,
                           chunk_size=C, window=c)
    sim = torch.einsum("npd,nqd->npq", F.normalize(y[:, C : C + n_pairs], dim=-1), vals)
    return float((sim.argmax(-1) == torch.arange(n_pairs)).float().mean())


def test_polynomial_memory_holds_more_pairs():
    """Capacity (paper §3): 8 pairs with 4-dim keys overfill a degree-1 memory (4 key
    features), a degree-2 memory has 14. Measured: p=2,c=2 0.53, p=1,c=1 0.42 (chance 0.125)."""
    hi, lo = memory_recall(p=2, c=2), memory_recall(p=1, c=1)
    print(f"recall of 8 pairs, head_dim 4: degree 2 / window 2 {hi:.3f}, degree 1 / window 1 {lo:.3f}")
    assert hi > lo + 0.05 and lo > 0.25


# ----------------------------------------------------------------------------- the module

TINY = {"n_heads": 2, "head_dim": 4, "chunk_size": 4, "window": 3, "poly_degree": 2, "memory_hidden": 1}


def ctx_for(x: torch.Tensor, lengths=None, start=0) -> StepContext:
    B, T, _ = x.shape
    return StepContext(positions=start + torch.arange(T)[None].expand(B, T), lengths=lengths)


def test_shapes_and_state_fields():
    torch.manual_seed(0)
    cfg = AtlasConfig(**{**TINY, "memory_depth": 3})
    mod = Atlas(cfg, d_model=32)
    x = torch.randn(2, 11, 32)
    assert mod(x, ctx_for(x)).shape == (2, 11, 32)
    st = mod.init_state(2, x.device, x.dtype)
    y = mod(x, ctx_for(x), st)
    assert y.shape == (2, 11, 32)
    Fd = feature_dim(4, 2)
    assert [tuple(w.shape) for w in st.weights] == [(2, 2, 4, Fd), (2, 2, 4, Fd), (2, 2, 4, 4), (2, 2, 4, 4)]
    assert [tuple(m.shape) for m in st.momentum] == [tuple(w.shape) for w in st.weights]
    assert st.n_buf.tolist() == [3, 3] and st.buf_k.shape == (2, 2, 4, 4) and st.tail_k.shape == (2, 2, 2, 4)
    assert isinstance(st, AtlasState)


def phi_oracle(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """phi(x) = [a_1 x, a_2 sqrt(mult) x_i x_j (i <= j), a_3 ...] for one head, written with plain loops
    over the monomials (x [..., d], coef [p])."""
    d, parts = x.shape[-1], []
    for j in range(1, coef.shape[0] + 1):
        for combo in itertools.combinations_with_replacement(range(d), j):
            mult = math.factorial(j) / math.prod(math.factorial(combo.count(i)) for i in set(combo))
            parts.append(coef[j - 1] * math.sqrt(mult) * math.prod(x[..., i] for i in combo))
    return torch.stack(parts, -1)


@pytest.mark.parametrize("atlas", [{}, {"conv_size": 0, "chunk_size": 1, "window": 2, "poly_degree": 3},
                                   {"inner_optimizer": "sgd", "window": 6, "chunk_size": 3, "memory_depth": 3},
                                   {"inner_optimizer": "muon_chunk", "window": 1, "poly_degree": 1}])
def test_layer_equals_a_per_token_oracle_from_its_parameters(atlas, kernels):
    """The whole layer in float64 against its equations written out from the module's parameters:
    projection, causal depthwise conv + SiLU (or SiLU alone), unit q / k / v, gates γ = σ, η = softplus,
    θ = σ, α = σ in that order per head, polynomial features with each head's coefficients, the
    per-token recurrence (``atlas_oracle``) with chunk-start retrieval, gated RMSNorm, output
    projection; on the reference and on the path dispatched here."""
    torch.manual_seed(0)
    cfg = AtlasConfig(**{**TINY, "head_dim": 3, **atlas})
    mod = Atlas(cfg, d_model=8).double()
    with torch.no_grad():  # gates and coefficients away from their (head-symmetric) initial values
        mod.gate_proj.bias.add_(0.5 * torch.randn(mod.gate_proj.bias.shape, dtype=torch.float64))
        mod.poly_coef.mul_(1 + 0.3 * torch.randn(mod.poly_coef.shape, dtype=torch.float64))
        mod.norm.weight.normal_(0.0, 0.2)
    B, T, H, d, C, c, K = 2, 11, cfg.n_heads, 3, cfg.chunk_size, cfg.window, cfg.conv_size
    x = torch.randn(B, T, 8, dtype=torch.float64)
    y = mod(x, ctx_for(x))
    with torch.no_grad():
        qkv = x @ mod.qkv_proj.weight.T  # [B, T, 3 H d]
        if K:
            xp = torch.cat([qkv.new_zeros(B, K - 1, qkv.shape[-1]), qkv], 1)
            qkv = sum(xp[:, j : j + T] * mod.conv_weight[:, j] for j in range(K))
        qkv = F.silu(qkv).view(B, T, 3, H, d)
        z = (x @ mod.gate_proj.weight.T + mod.gate_proj.bias).view(B, T, 4, H)
        g_out = (x @ mod.g_proj.weight.T).view(B, T, H, d)
        heads = []
        for h in range(H):
            q, k, v = (F.normalize(qkv[:, :, i, h], dim=-1) for i in range(3))  # [B, T, d]
            gam, eta = torch.sigmoid(z[:, :, 0, h]), F.softplus(z[:, :, 1, h])
            lt, la = F.logsigmoid(z[:, :, 2, h]), F.logsigmoid(z[:, :, 3, h])
            kf, qf = phi_oracle(k, mod.poly_coef[h]), phi_oracle(q, mod.poly_coef[h])
            pad = lambda t: torch.cat([t.new_zeros(B, c - 1, *t.shape[2:]), t], 1)  # noqa: E731 - empty window tail
            params = [w[h].expand(B, *w.shape[1:]).clone().requires_grad_() for w in mod.memory]  # the oracle's grad
            with torch.enable_grad():
                ys, _, _ = atlas_oracle(qf, pad(kf), pad(v), pad(gam), eta, lt, la, params,
                                        [torch.zeros_like(p) for p in params], C, c, cfg.ns_steps,
                                        cfg.inner_optimizer != "sgd", cfg.inner_optimizer == "muon_chunk")
            rms = ys.pow(2).mean(-1, keepdim=True).add(mod.norm.eps).rsqrt()
            heads.append(ys * rms * (1 + mod.norm.weight) * F.silu(g_out[:, :, h]))
        want = torch.cat(heads, -1) @ mod.o_proj.weight.T
    assert rel_err(y, want) < 1e-8  # Newton-Schulz (its eps) amplifies rounding to ~2e-10


def test_a_cache_holds_its_own_memory_not_views_of_the_parameters():
    """Batch 1, a first cached call that completes no chunk: the state's weights were views of the learned
    initial memory, so an in-place change of the parameters (an optimizer step) changed a live cache."""
    torch.manual_seed(0)
    mod = Atlas(AtlasConfig(**TINY), d_model=32)
    x = torch.randn(1, 2, 32)  # fewer tokens than a chunk
    st = mod.init_state(1, x.device, x.dtype)
    with torch.no_grad():
        mod(x, ctx_for(x), st)
        before = [w.clone() for w in st.weights]
        for p in mod.memory:
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, st.weights))


@pytest.mark.parametrize("opt", ["muon", "muon_chunk", "sgd"])
def test_gradients_reach_every_parameter(opt):
    torch.manual_seed(0)
    mod = Atlas(AtlasConfig(**{**TINY, "inner_optimizer": opt}), d_model=32)
    x = torch.randn(2, 13, 32)
    (mod(x, ctx_for(x)) * torch.randn(2, 13, 32)).sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().max()) > 0, name


def test_config_ranges_and_feature_limit():
    good = tiny_recipe("ATL", {"atlas": {"poly_degree": 3, "head_dim": 8}})
    load_recipe(good)
    for bad in ({"poly_degree": 4}, {"window": 0}, {"memory_depth": 1}, {"inner_optimizer": "adam"},
                {"poly_degree": 3, "head_dim": 32}, {"head_dim": None, "n_heads": 5}, {"chunk_size": 0}):
        with pytest.raises(RecipeError):
            load_recipe(tiny_recipe("ATL", {"atlas": bad}))


# ----------------------------------------------------------------------------- in a model


def tiny_model(atlas: dict | None = None, pattern: str = "ATL | GA", **model):
    torch.manual_seed(0)
    recipe = tiny_recipe(pattern, {"atlas": {**TINY, **(atlas or {})}, "gated_attn": {"n_heads": 2}},
                         meta_tokens=2, **model)
    return build_model(recipe).eval()


def random_split(T: int, rng: random.Random) -> list[int]:
    cuts = sorted(rng.sample(range(1, T), rng.randint(1, 6)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, T])]


SETTINGS = [{}, {"window": 1, "poly_degree": 1, "memory_depth": 3, "inner_optimizer": "sgd"},
            {"window": 6, "chunk_size": 3, "conv_size": 0}, {"inner_optimizer": "muon_chunk", "window": 2}]


@pytest.mark.parametrize("atlas", SETTINGS)
def test_invariant_any_split_equals_full_forward(atlas, monkeypatch):
    """DESIGN §1: chunked through one cache == one full forward, splits unaligned to C, and
    token by token, on the reference (``test_invariant_on_fast_path``: the fast path)."""
    monkeypatch.setenv("HYMBA_KERNELS", "reference")
    worst = split_invariant_error(tiny_model(atlas), seed=0, splits=4)
    assert worst <= 1e-4, worst


def split_invariant_error(model, seed: int, splits: int, T: int = 23) -> float:  # noqa: ANN001
    """The largest rel_err of ``splits`` random chunkings through one cache, and of token-by-token
    decoding, against one full forward."""
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        rng = random.Random(seed)
        worst = 0.0
        for _ in range(splits):
            cache = model.new_cache(2)
            outs, a = [], 0
            for n in random_split(T, rng):
                outs.append(model(ids[:, a : a + n], cache=cache).logits)
                a += n
            worst = max(worst, rel_err(torch.cat(outs, 1), full))
        cache = model.new_cache(2)
        step = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(T)], 1)
        return max(worst, rel_err(step, full))


@pytest.mark.parametrize("atlas", [{}, {"window": 6, "chunk_size": 3},
                                   {"inner_optimizer": "muon_chunk", "chunk_size": 1, "window": 2},
                                   {"conv_size": 0, "inner_optimizer": "sgd"}])
def test_cached_calls_with_ragged_lengths_equal_each_rows_full_forward(atlas, kernels):
    """Float64 layer: calls through one cache where every call gives each row its own number of real tokens
    (0 .. T, the rest garbage) give each row the outputs of one forward over its real tokens: the buffer,
    window tail, conv state and memory of a row advance by its real tokens only."""
    torch.manual_seed(0)
    mod = Atlas(AtlasConfig(**{**TINY, **atlas}), d_model=16).double()
    B, rng = 3, random.Random(0)
    st = mod.init_state(B, torch.device("cpu"), torch.float64)
    xs, ys = [[] for _ in range(B)], [[] for _ in range(B)]
    with torch.no_grad():
        for _ in range(6):
            T = rng.randint(1, 7)
            L = torch.tensor([rng.randint(0, T) for _ in range(B)])
            x = torch.randn(B, T, 16, dtype=torch.float64)
            y = mod(x, ctx_for(x, lengths=L), st)
            for b in range(B):
                xs[b].append(x[b, : L[b]])
                ys[b].append(y[b, : L[b]])
        for b in range(B):
            x = torch.cat(xs[b])[None]
            assert rel_err(torch.cat(ys[b]), mod(x, ctx_for(x))[0]) < 1e-12

def test_left_padding_equals_unpadded_row():
    """A left-padded row gives the unpadded row's logits, in one call and through a cache
    that is then fed without a mask; the padding never enters the memory or its buffers."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        alone = model(ids[1:, 5:]).logits
        padded = model(ids, attention_mask=mask).logits
        assert rel_err(padded[1, 5:], alone[0]) <= 1e-4
        ref0 = model(ids[:1]).logits
        assert rel_err(padded[0], ref0[0]) <= 1e-4
        cache = model.new_cache(2)
        first = model(ids[:, :9], attention_mask=mask[:, :9], cache=cache).logits
        rest = torch.cat([model(ids[:, 9:14], cache=cache).logits, model(ids[:, 14:15], cache=cache).logits,
                          model(ids[:, 15:], cache=cache).logits], 1)
        got = torch.cat([first, rest], 1)
        assert rel_err(got[1, 5:], alone[0]) <= 1e-4
        assert rel_err(got[0], ref0[0]) <= 1e-4


def test_state_is_constant_in_length_and_reported():
    model = tiny_model(pattern="ATL | ATL")
    sizes = []
    for T in (3, 9, 40):
        cache = model.new_cache(1)
        with torch.no_grad():
            model(torch.randint(0, 64, (1, T)), cache=cache)
        sizes.append(cache.nbytes())
        for block, real in zip(model.blocks, cache.layer_nbytes()):
            assert real == block.mixer.state_nbytes(T, model.dtype, n_meta=2)
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_reorder_selects_rows():
    model = tiny_model()
    ids = torch.randint(0, 64, (3, 15), generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([2, 0, 0])
    with torch.no_grad():
        cache = model.new_cache(3)
        a = model(ids[:, :6], cache=cache).logits
        cache.reorder(idx)
        b = model(ids[idx, 6:], cache=cache).logits
        full = model(ids[idx]).logits
    assert rel_err(torch.cat([a[idx], b], 1), full) <= 1e-4


@pytest.mark.parametrize("opt", ["muon", "muon_chunk"])
def test_memory_memorizes_at_inference(opt):
    """Test-time memorization: the cached memory weights change exactly when a chunk of
    real tokens completes, and the Omega loss of the tokens seen falls below that of the
    initial (learned) memory -- by 10% at the default inner learning rate (0.01) after two
    chunks, and by more than 15% with a ten times larger one (η sets how far each Muon step
    moves the memory; training learns it per token). With Newton-Schulz once per chunk
    (``muon_chunk``) as well at 0.01 (measured 0.895 against 0.912 per token), less at 0.1
    (0.926 against 0.751): the chunk's whole step is then one orthogonal matrix of size
    Σ_t η_t Π α, which overshoots where the per-token steps partly cancel."""
    ratios = {}
    for inner_lr in (0.01, 0.1):
        torch.manual_seed(0)
        cfg = AtlasConfig(**{**TINY, "window": 2, "inner_lr": inner_lr, "inner_optimizer": opt})
        mod = Atlas(cfg, d_model=32).eval()
        x = torch.randn(1, 16, 32)
        st = mod.init_state(1, x.device, x.dtype)
        init = [w.detach().clone() for w in mod.memory]
        changes = []
        with torch.no_grad():
            for t in range(16):
                prev = [w.clone() for w in st.weights] if st.weights is not None else [w[None] for w in init]
                mod(x[:, t : t + 1], ctx_for(x[:, t : t + 1], start=t), st)
                changes.append(any(not torch.equal(a, b) for a, b in zip(prev, st.weights)))
            assert changes == [(t + 1) % cfg.chunk_size == 0 for t in range(16)]
            q, k, v, gates = mod._project(x, ctx_for(x), None)
            kf = poly_features(k, mod.poly_coef[:, None, :])  # [1, H, T, F]
            def omega(weights, kf=kf, v=v):  # noqa: E306, ANN001, ANN202
                pred = memory_apply([w.reshape(-1, *w.shape[-2:]) for w in weights], kf.reshape(2, 16, -1))
                return float((pred - v.reshape(2, 16, -1)).pow(2).sum(-1).mean())
            before, after = omega([w[None] for w in init]), omega(st.weights)
        ratios[inner_lr] = after / before
    print(f"{opt}: Omega loss of the seen tokens after / before test-time memorization, by inner_lr: {ratios}")
    assert ratios[0.01] < 0.95 and ratios[0.1] < (0.85 if opt == "muon" else 0.95)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_matches_cpu_invariant_and_bf16():
    """The layer on CUDA (the dispatch's fast path where its probe passes): same logits as
    on CPU, the invariant through a cache (partial chunks: n_valid's identity steps), a
    finite bf16 training step."""
    model = tiny_model()
    T = 37
    ids = torch.randint(0, 64, (3, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cpu = model(ids).logits
        model = model.cuda()
        full = model(ids.cuda()).logits
        assert rel_err(full.cpu(), cpu) <= 1e-3  # TF32 convolutions may differ in low bits
        cache = model.new_cache(3)
        outs, a = [], 0
        for n in random_split(T, random.Random(5)):
            outs.append(model(ids[:, a : a + n].cuda(), cache=cache).logits)
            a += n
        # float32 CUDA kernels pick different algorithms per shape (SDPA with a cache vs
        # causal, cuBLAS tiles, fla's conv without a state): 1.16e-4 measured on an H100,
        # where the CPU invariant tests above hold 1e-4
        assert rel_err(torch.cat(outs, 1), full) <= 5e-4
    m16 = model.to(torch.bfloat16).train()
    loss = m16(ids.cuda(), labels=ids.cuda()).loss
    loss.backward()
    assert bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in m16.parameters()
                                              if p.grad is not None)


def ns_gram_problems():
    """(m, A, dR, R, dA) at Gram sides 12-64 (padded sides 16, 32, 64): 64 normalised Gram matrices
    of random m x n factors, a random cotangent, and float64 autograd's R and dA through ns_gram_factor."""
    g = torch.Generator().manual_seed(0)
    for m, n in ((12, 40), (16, 40), (24, 60), (32, 150), (48, 80), (64, 560)):
        X = torch.randn(64, m, n, generator=g, dtype=torch.float64)
        A = X @ X.mT / X.pow(2).sum((-2, -1), keepdim=True)
        dR = torch.randn(64, m, m, generator=g, dtype=torch.float64)
        Ar = A.clone().requires_grad_()
        R = atlas_kernels.ns_gram_factor(Ar, 5)
        (dA,) = torch.autograd.grad(R, Ar, dR)
        yield m, A, dR, R.detach(), dA


@pytest.mark.gpu
def test_ns_save_fwd_kernels_on_cuda():
    """``NS_SAVE_FWD``'s kernels on the GPU (the forward that keeps its iterates, the backward that
    only reads them) against autograd through ns_gram_factor in float64 on the CPU, at padded sides
    16, 32 and 64."""
    for m, A, dR, R, dA in ns_gram_problems():
        got_r, W = atlas_kernels._ns_save_launch(A.float().cuda(), 5)
        got_da = atlas_kernels._ns_bwd_saved_launch(W, dR.float().cuda(), 5)
        assert rel_err(got_r.cpu().double(), R) < 1e-4, (m, "forward")
        assert rel_err(got_da.cpu().double(), dA) < 1e-4, (m, "backward")


@pytest.mark.gpu
@pytest.mark.parametrize("saved,trans,warps", [(False, "load", None), (True, "load", None), (True, "store", None),
                                               (True, "regs", None), (True, "load", 8)])
def test_ns_triton_kernels_on_cuda(monkeypatch, saved, trans, warps):
    """Both Triton Newton-Schulz backward kernels (``NS_BWD_SAVED``; the saved-iterate one reading its
    iterates transposed each way, ``NS_BWD_TRANS``) and the forward on the GPU, at the sides' own
    warps and at 8 (``NS_WARPS``), against autograd through ns_gram_factor in float64 on the CPU, at
    padded sides 16, 32 and 64 (64: wgmma, the saved-iterate backward either way)."""
    monkeypatch.setattr(atlas_kernels, "NS_BWD_SAVED", saved)
    monkeypatch.setattr(atlas_kernels, "NS_BWD_TRANS", trans)
    monkeypatch.setattr(atlas_kernels, "NS_WARPS", warps)
    for m, A, dR, R, dA in ns_gram_problems():
        got_r = atlas_kernels._ns_gram_launch(A.float().cuda(), None, 5).cpu().double()
        got_da = atlas_kernels._ns_gram_launch(A.float().cuda(), dR.float().cuda(), 5).cpu().double()
        assert rel_err(got_r, R) < 1e-4, (m, "forward")
        assert rel_err(got_da, dA) < 1e-4, (m, "backward")


@pytest.mark.gpu
def test_fast_path_on_cuda_with_side_64_triton_ns(monkeypatch):
    """``NS_TRITON_MAX = 64``: a memory on 8-dim keys (44 features) with a 40-wide hidden layer
    (Gram sides 8 and 40, the 40 padded to 64 as the Quad-Hybrid's 64 x 560 weight is) takes the
    Triton kernels for every side, and the fast path still equals the float64 CPU reference,
    gradients included."""
    monkeypatch.setattr(atlas_kernels, "NS_TRITON_MAX", 64)
    args, leaves = random_problem(N=3, T=30, C=4, c=3, d=8, p=2, hid=40, depth=2)
    assert atlas_kernels._use_triton_ns([t.float().cuda() for t in leaves[7:10]], torch.float32)
    errs = float32_errors(args, leaves, 2, "cuda", dict(compile=False), chunk_size=4, window=3, ns_steps=5,
                          muon=True, return_state=True, snapshots=(), n_valid=None)
    assert max(errs) < 1e-2, errs


@pytest.mark.gpu
@pytest.mark.parametrize("inductor", ["default", "combo", "pdl", "pdl+save", "pdl+nosave"])
def test_fast_path_on_cuda_muon_chunk(inductor):
    """``inner_optimizer: muon_chunk`` on the CUDA fast path (Triton Newton-Schulz on one Gram
    matrix per weight and chunk, eager and compiled chunk step, the latter also with Inductor's
    combo kernels and with Programmatic Dependent Launch: ``INDUCTOR``) against the float64 CPU
    reference of that form: outputs, end
    state and every input gradient. By default muon_chunk pads every weight's Gram matrix into one
    Newton-Schulz launch (``PAD_NS``), under combo kernels not: padded, the combo-compiled step
    failed this test on an H100 (2026-12-05: gradients 2-6 relative off). "pdl+save" /
    "pdl+nosave": with / without the Newton-Schulz forward keeping its iterates for the backward
    (``NS_SAVE_FWD``; muon_chunk keeps them by default), eager and compiled."""
    assert dispatch.probe_all(["atlas"])["atlas"], dispatch.statuses()["atlas"]
    for compile_step in (False, True) if inductor in ("default", "pdl+save", "pdl+nosave") else (True,):
        args, leaves = random_problem(N=3, T=32, C=4, c=3, p=2, hid=5, depth=3, float32=True)
        base, _, save = inductor.partition("+")
        extra = {"NS_SAVE_FWD": save == "save"} if save else {}
        with atlas_kernels.settings(INDUCTOR=base, **extra):
            errs = float32_errors(args, leaves, 3, "cuda", dict(compile=compile_step), chunk_size=4, window=3,
                                  ns_steps=5, muon=True, ns_chunk=True, return_state=True, snapshots=(), n_valid=None)
        print("muon_chunk errors:", inductor, [f"{e:.2g}" for e in errs])
        # float32 vs float64 on a CPU over seeds 0-4: outputs and state <= 1.2e-3, gradients <= 1.7e-2
        assert max(errs[:9]) < 5e-3 and max(errs[9:]) < 5e-2, (compile_step, errs)  # y, 4 weights, 4 momenta


@pytest.mark.gpu
def test_fast_path_on_cuda_under_tf32():
    """``hymba train --tf32``: TF32 allowed for float32 matmuls moves the chunk step's cuBLAS
    GEMMs to tensor cores, Newton-Schulz stays in tf32x3_split, the dispatch's probe still checks in
    float32 and passes. The result stays finite; its outputs and end state near the float64
    reference (with TF32's rounding emulated on a CPU, ``benchmarks/atlas_tf32.py``'s tf32_gemm,
    this problem over seeds 0-3: outputs and state <= 8.6e-3, gradients <= 9.6e-2, so those are
    only printed)."""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        dispatch.forget("atlas")
        assert dispatch.probe_all(["atlas"])["atlas"], dispatch.statuses()["atlas"]
        args, leaves = random_problem(N=3, T=32, C=4, c=3, p=2, hid=2, depth=2, float32=True)
        errs = float32_errors(args, leaves, 2, "cuda", dict(compile=False), chunk_size=4, window=3, ns_steps=5,
                              muon=True, return_state=True, snapshots=(), n_valid=None)
        print("tf32 errors (output, end state, gradients):", [f"{e:.2g}" for e in errs])
        assert all(math.isfinite(e) for e in errs) and max(errs[:7]) < 5e-2, errs  # y, 3 weights, 3 momenta
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.gpu
def test_fast_path_on_cuda_matches_reference():
    """The CUDA fast path (Triton Newton-Schulz; the chunk step compiled in the first case, eager
    in the rest) in float32 against the reference on the CPU in float64: outputs, end state
    and every input gradient, Muon (padded and tall weights, partial rows) and SGD; then the
    dispatch picks it for a layer, and a bf16 layer's output and gradients match the float32
    CPU reference's within bf16 rounding."""
    assert dispatch.probe_all(["atlas"])["atlas"], dispatch.statuses()["atlas"]  # (available() probes every op)
    for i, (muon, depth, c, T, p, hid, n_valid) in enumerate(FAST_CASES):
        args, leaves = random_problem(N=3, T=T + 12, C=4, c=c, p=p, hid=hid, depth=depth, float32=True)  # CPU
        errs = float32_errors(args, leaves, depth, "cuda", dict(compile=i == 0),  # compiled once (compile time)
                              chunk_size=4, window=c, ns_steps=5, muon=muon, return_state=True, snapshots=(),
                              n_valid=None if n_valid is None else torch.tensor(n_valid) + 12)
        assert max(errs) < 1e-2, (muon, depth, c, p, errs)  # float32 vs float64 (CPU float32: <= 1.6e-3)
    torch.manual_seed(0)
    mod = Atlas(AtlasConfig(n_heads=4, head_dim=16, chunk_size=16, window=4), d_model=64)
    x = torch.randn(2, 100, 64)
    ref = mod(x, ctx_for(x))  # float32 on the CPU: the reference
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in mod.parameters()]
    m16 = mod.cuda().bfloat16()
    m16.zero_grad()
    xc = x.cuda().bfloat16()
    y = m16(xc, StepContext(positions=torch.arange(100, device="cuda")[None].expand(2, -1)))
    y.float().sum().backward()
    # the fast path keeps the memory in float32: the same bf16 layer forced through it on a CPU
    # (T 100) is 1.7e-2 RMS off in its output and <= 6.8e-2 in its gradients (the reference,
    # whose memory then runs in bf16: 0.22 and up to 0.89)
    assert rms_rel(y.detach().cpu(), ref.detach()) < 5e-2
    for p, r in zip(m16.parameters(), ref_grads):
        assert rms_rel(p.grad.cpu(), r) < 0.15


# ----------------------------------------------------------------------------- learning

#: vocab 32: keys 1..15, values 16..31 (chance 1/16); 6 pairs = 12 context tokens = chunk 0,
#: the queries fill chunk 1, so every query reads a memory that has seen all the pairs
MQAR = dict(steps=200, batch=32, seq_len=24, n_pairs=6, lr=5e-3)
#: inner_lr 0.1 (default 0.01): these sequences are 2-4 chunks long, too short for the gradient growth
#: that a large inner step causes over many chunks (``test_gradients_do_not_grow_with_length``), and a
#: 300-step budget learns recall faster with the larger step
LEARN = {"n_heads": 1, "head_dim": 8, "chunk_size": 12, "window": 2, "poly_degree": 2, "memory_hidden": 1,
         "inner_lr": 0.1}


def _qkv_grad_norm(inner_lr: float, T: int) -> float:
    torch.manual_seed(0)
    layer = Atlas(AtlasConfig(n_heads=2, head_dim=8, window=4, chunk_size=8, inner_lr=inner_lr), d_model=32)
    x = torch.randn(2, T, 32)
    layer(x, StepContext(positions=torch.arange(T)[None].expand(2, -1))).pow(2).mean().backward()
    return float(layer.qkv_proj.weight.grad.norm())


def test_gradients_do_not_grow_with_length():
    """At initialisation, with the default inner learning rate (0.01), the layer's gradients do
    not grow with the sequence length (the loss is a mean, so they shrink): 8 chunks -> 32 chunks,
    measured 0.083 -> 0.040. With η = 0.1 they grow with every chunk through the chain of Muon
    steps (0.158 -> 4.04 here; the Quad-Hybrid's layer overflowed on a GPU at T 2048 that way)."""
    assert AtlasConfig().inner_lr == 0.01
    short, long = _qkv_grad_norm(0.01, 64), _qkv_grad_norm(0.01, 256)
    assert long < 1.5 * short, (short, long)
    short, long = _qkv_grad_norm(0.1, 64), _qkv_grad_norm(0.1, 256)
    assert long > 5 * short, (short, long)


@pytest.mark.parametrize("inner_lr", [0.01, 1000.0, 1e30])
def test_any_inner_lr_the_recipe_accepts_builds(inner_lr):
    """The gate bias starts at softplus^-1(inner_lr); log(expm1(x)) overflowed past x ~ 710 (OverflowError:
    math range error), so a recipe with inner_lr 1000 passed the loader and failed build_model (hymba
    check: 'the recipe validates but the model cannot be built'). Found by probing check with extreme
    values. x + log(-expm1(-x)) is the same function (equal in float32 for the usual values)."""
    layer = Atlas(AtlasConfig(n_heads=2, head_dim=8, inner_lr=inner_lr), d_model=32)
    eta = F.softplus(layer.gate_proj.bias.view(4, 2)[1].double())
    torch.testing.assert_close(eta, torch.full_like(eta, inner_lr), rtol=1e-6, atol=0.0)


#: ``test_learns_mqar``'s layer: ``LEARN`` with head_dim 16 and degree-1 features (16 of them, as
#: cheap a step as LEARN's 44), which finds the recall solution on every seed tried within 300 steps
RECALL = {**LEARN, "head_dim": 16, "poly_degree": 1}


def test_learns_mqar():
    """A 2-layer ATLAS model (Muon inner optimizer, Omega window 2, a deep memory) learns
    associative recall through its test-time memory: its accuracy is well above what a model
    gets that answers any value seen in the sequence (1 / the distinct values among the 6,
    0.20 on average; 1/16 = 0.0625 is chance over the vocabulary). With chunk 12 the queries
    read only the memory written by the pairs' chunk, so they cannot rule out the values of
    earlier queries, but through the two short convs (3 tokens back each), at most the last
    three: answering a seen value other than those gets 0.30 (simulated). The bar is 0.4.

    Measured (fast path, CPU, seeds 0 / 1 / 2, 300 steps): 0.452 / 0.633 / 0.731, mean 0.605.
    LEARN (head_dim 8, degree-2 features) at 200 steps was a lottery: 0.146 / 0.674 / 0.058, mean
    0.29, and at 400 steps 0.298 / 1.0 / 0.469; with head_dim 16 and degree 1 at 200 steps 0.322 /
    0.232 / 0.758. At this budget float32 round-off can still move a seed, so this asserts the mean
    of seeds 0-2."""
    accs = [train_mqar(tiny_recipe("ATL | ATL", {"atlas": RECALL}, vocab_size=32), **{**MQAR, "steps": 300}, seed=s)
            for s in (0, 1, 2)]
    print(f"atlas MQAR accuracy: {accs} (any seen value ~0.20, chance {1 / 16:.3f})")
    assert sum(accs) / 3 > 0.4, accs


@pytest.mark.slow
def test_mqar_with_newton_schulz_per_chunk():
    """``inner_optimizer: muon_chunk`` (one Newton-Schulz per chunk instead of per token) learns
    the recall task of ``test_learns_mqar`` about as the per-token step does. Measured over seeds
    0-5 (accuracy, mean loss of the last 20 steps): muon_chunk 0.158 / 2.44, 0.122 / 2.65,
    0.061 / 2.78, 0.685 / 1.45, 0.120 / 2.63, 0.111 / 2.64 (mean loss 2.43); muon 0.201 / 2.45,
    0.595 / 1.39, 0.101 / 2.72, 0.108 / 2.56, 0.189 / 2.36, 0.146 / 2.52 (2.33). At this budget a
    seed either finds the recall solution or not, so this asserts the mean over seeds 0-3."""
    accs = {opt: [train_mqar(tiny_recipe("ATL | ATL", {"atlas": {**LEARN, "inner_optimizer": opt}}, vocab_size=32),
                             **MQAR, seed=s) for s in range(4)] for opt in ("muon", "muon_chunk")}
    print("MQAR accuracy per seed:", {k: [round(a, 3) for a in v] for k, v in accs.items()})
    for v in accs.values():
        assert sum(v) / len(v) > 2 / 16


#: 12 pairs with head_dim 8: more pairs than the 8 key features of a degree-1 memory can
#: keep apart, well within the 44 features of degree 2
CAPACITY = dict(steps=300, batch=32, seq_len=48, n_pairs=12, lr=5e-3)
RICH = {"n_heads": 1, "head_dim": 8, "chunk_size": 24, "window": 2, "poly_degree": 2, "memory_hidden": 1,
        "inner_lr": 0.1}
BASE = {**RICH, "window": 1, "poly_degree": 1}


@pytest.mark.slow
def test_mqar_window_and_degree_vs_online_linear_memory():
    """The capacity comparison end to end, stated as measured. Same model, data and budget;
    only the Omega window and the feature degree differ (the degree-2 memory has more
    weights: P and W_1 read 44 features instead of 8, which is the point of the map).

    Measured (accuracy per seed 0 / 1; inner_lr 0.1): at 300 steps (2026-12-04) window 2 + degree 2
    0.084 / 0.189, window 1 + degree 1 0.364 / 0.116; again at 300 steps on 2026-12-07 0.158 / 0.092
    and 0.376 / 0.131 (the richer memory's mean 0.125, at this test's bound: it failed); at 600 steps
    (2026-12-07, what this test runs) **0.769 / 1.000 against 0.605 / 0.106**. At 300 steps the outcome
    was decided by whether a run "found" the recall solution; with twice the steps both learn and the
    richer memory is ahead on both seeds. This asserts that both learn (mean over two seeds) and prints
    the numbers; without outer training the capacity gain is clear and is asserted in
    ``test_polynomial_memory_holds_more_pairs``."""
    accs = {}
    for name, cfg in (("window 2, degree 2", RICH), ("window 1, degree 1", BASE)):
        accs[name] = [train_mqar(tiny_recipe("ATL | ATL", {"atlas": cfg}, vocab_size=32), seed=s,
                                 **{**CAPACITY, "steps": 600}) for s in (0, 1)]
    print("MQAR 12 pairs, head_dim 8 (chance 0.0625):", {k: [round(a, 3) for a in v] for k, v in accs.items()})
    for v in accs.values():
        assert sum(v) / len(v) > 2 / 16


def test_fast_path_backward_is_linear_in_the_chunks():
    """Each chunk's inputs are pieces of one unbind of the stacked per-chunk tensors: the backward
    fills no zero gradient of a whole stack per chunk (indexing chunks out of the stack did, and
    summed them: 32 ms of the Quad-Hybrid's ATLAS step on an H200, quadratic in the chunks), nor of
    one chunk's inputs (a split into one-chunk pieces, each indexed, zero-filled and copied a
    gradient per input and chunk: 14 kernels a chunk); it stacks each input's gradients once."""
    U, C, c, d, p = 12, 4, 3, 3, 2
    args, leaves = random_problem(N=2, T=U * C, C=C, c=c, d=d, p=p, hid=5, depth=2)
    stack = [U, 2, C + c - 1, feature_dim(d, p)]  # Kc: [chunks, N, C', F]
    kw = dict(chunk_size=C, window=c, ns_steps=5, muon=True, return_state=True, snapshots=(), n_valid=None)
    out = run_impl(atlas_kernels._atlas_memory_fast, args, compile=False, **kw)
    loss = sum(o.sum() for o in out)
    with torch.profiler.profile(record_shapes=True) as prof:
        torch.autograd.grad(loss, leaves)
    ops = prof.key_averages(group_by_input_shape=True)
    n = sum(e.count for e in ops
            if e.key in ("aten::fill_", "aten::zero_", "aten::add_") and e.input_shapes and list(e.input_shapes[0]) == stack)
    assert n <= 2, f"{n} fills / adds of a whole stack's gradient for {U} chunks"
    chunk = stack[1:]  # one chunk's keys [N, C', F]: no gradient of it is scattered into a zero piece
    n = sum(e.count for e in ops if e.key == "aten::select_backward" and e.input_shapes and list(e.input_shapes[0]) == chunk)
    assert n == 0, f"{n} one-chunk gradients of the keys zero-filled and copied for {U} chunks"


@pytest.mark.slow  # ~100 s of Inductor compiles on a CPU
def test_atlas_check_inductor_mode_reports_errors_and_the_check():
    """``benchmarks/atlas_check.py --inductor`` (what finds which Inductor options miscompile the
    chunk step on a GPU), run on the CPU with Inductor's defaults: a line per Newton-Schulz layout
    with the compiled muon_chunk step's errors against float64 (float32 rounding here) and the
    first-call check agreeing; the module's check state left as found."""
    mod = load_benchmark("atlas_check")
    lines = mod.inductor_check(["default"], device="cpu")
    assert len(lines) == 2 and all("first-call check: agrees with the eager step" in x for x in lines), lines
    worst = [float(x) for line in lines for x in re.findall(r"worst (\S+?)[,;]", line)]
    assert len(worst) == 4 and max(worst) < 1e-2, lines
    assert atlas_kernels.compile_error is None and atlas_kernels.CHECK_COMPILED_STEP


def test_atlas_check_chain_mode_reports_worst_errors():
    """``benchmarks/atlas_check.py --chain`` (a chain of muon_chunk steps per Newton-Schulz
    precision and GEMM: what showed the truncating 3xTF32 split's bias on a GPU), run on the CPU
    (the settings pick no Triton kernel there): a line per setting with the worst result and
    gradient errors against float64, within the GPU test's limits (float32 on this CPU, seed 0:
    4.8e-3 and 1.2e-2)."""
    mod = load_benchmark("atlas_check")
    lines = mod.chain_check(("tf32x3_split",), ("bmm32", "cublas"), seeds=1, device="cpu")
    assert len(lines) == 2, lines
    worst = [float(x) for line in lines for x in re.findall(r"worst (\S+)", line)]
    assert len(worst) == 4 and max(worst[0::2]) < 5e-3 and max(worst[1::2]) < 5e-2, lines
