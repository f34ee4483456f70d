"""ATLAS neural memory (atlas / ATL): kernel vs a per-token autograd oracle, Newton-Schulz,
features, the DESIGN invariant, padding, cache state, test-time memorization, learning."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch
import torch.nn.functional as F

from hymba_plus import RecipeError, build_model, load_recipe, registry
from hymba_plus.components.atlas import Atlas, AtlasConfig, AtlasState
from hymba_plus.core.cache import StepContext
from hymba_plus.kernels.atlas import atlas_memory, feature_dim, memory_apply, newton_schulz, poly_features
from tests.conftest import rel_err
from tests.helpers import tiny_recipe, train_mqar

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


def atlas_oracle(qf, kf, v, gamma, eta, log_theta, log_alpha, params, mom, C, c, ns_steps, muon):
    """The Atlas recurrence token by token, gradients by explicit autograd (slow, obvious).

    For token t of chunk n (chunk-start weights W_n):
        G_t = ∇_W Σ_{i=t-c+1}^{t} γ_i ||M(phi(k_i); W_n) - v_i||²   (torch.autograd.grad)
        S_t = θ_t S_{t-1} + G_t ;  M_t = α_t M_{t-1} - η_t NS(S_t)   (or S_t for sgd)
        y_t = M(phi(q_t); W_n)
    Returns y and the (weights, momentum) after the last complete chunk.
    """
    N, T, _ = qf.shape
    W_cur, S = list(params), list(mom)
    W_final, S_final = list(params), list(mom)
    ys = []
    for t in range(T):
        if t % C == 0:
            W_n = list(W_cur)
        ys.append(mlp_oracle(W_n, qf[:, t]))
        loss = qf.new_zeros(N)
        for i in range(t - c + 1, t + 1):
            e = i + c - 1  # index in the tail-extended key/value arrays
            loss = loss + gamma[:, e] * (mlp_oracle(W_n, kf[:, e]) - v[:, e]).pow(2).sum(-1)
        G = torch.autograd.grad(loss.sum(), W_n, create_graph=True)
        S = [log_theta[:, t, None, None].exp() * s + g for s, g in zip(S, G)]
        U = [ns_oracle(s, ns_steps) if muon else s for s in S]
        W_cur = [log_alpha[:, t, None, None].exp() * w - eta[:, t, None, None] * u for w, u in zip(W_cur, U)]
        if (t + 1) % C == 0:
            W_final, S_final = list(W_cur), list(S)
    return torch.stack(ys, 1), W_final, S_final


def random_problem(N=3, T=11, C=4, c=3, d=3, p=2, hid=5, depth=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    Fd = feature_dim(d, p)
    coef = torch.tensor([1.0 / math.sqrt(math.factorial(j + 1)) for j in range(p)], dtype=dtype)
    qf = poly_features(F.normalize(rn(N, T, d), dim=-1), coef)
    kf = poly_features(F.normalize(rn(N, T + c - 1, d), dim=-1), coef)
    v = rn(N, T + c - 1, d)
    gamma = torch.sigmoid(rn(N, T + c - 1))
    gamma[:, : c - 1] *= torch.tensor([0.0] + [1.0] * (c - 2), dtype=dtype) if c > 1 else 1.0  # one empty slot
    eta = 0.05 + 0.2 * torch.rand(N, T, generator=g, dtype=dtype)
    log_theta = F.logsigmoid(rn(N, T))
    log_alpha = F.logsigmoid(rn(N, T) + 3.0)
    shapes = [(d, Fd), (hid, Fd)] + [(hid, hid)] * (depth - 2) + [(d, hid)]
    params = [rn(N, *s) / math.sqrt(s[1]) for s in shapes]
    mom = [0.1 * rn(N, *s) for s in shapes]
    leaves = [qf, kf, v, gamma, eta, log_theta, log_alpha, *params, *mom]
    for x in leaves:
        x.requires_grad_(True)
    return (qf, kf, v, gamma, eta, log_theta, log_alpha, params, mom), leaves


@pytest.mark.parametrize("muon,depth,c,T", [(True, 2, 3, 11), (False, 3, 1, 8), (True, 3, 6, 9)])
def test_chunk_parallel_equals_per_token_oracle(muon, depth, c, T):
    """Float64: outputs, end state and every outer gradient agree with the autograd oracle."""
    C = 4
    (qf, kf, v, gamma, eta, lt, la, params, mom), leaves = random_problem(T=T, C=C, c=c, depth=depth)
    y, W, S = atlas_memory(qf, kf, v, gamma, eta, lt, la, params, mom, chunk_size=C, window=c,
                           ns_steps=5, muon=muon)
    y_ref, W_ref, S_ref = atlas_oracle(qf, kf, v, gamma, eta, lt, la, params, mom, C, c, 5, muon)
    assert rel_err(y, y_ref) < 1e-10
    for a, b in zip(W + S, W_ref + S_ref):
        assert rel_err(a, b) < 1e-10
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


def test_kernel_partial_rows_keep_state():
    """n_valid: a row's state is that of its complete chunks only; outputs of real tokens
    do not depend on the slots after them."""
    C, c, T = 4, 2, 10
    (qf, kf, v, gamma, eta, lt, la, params, mom), _ = random_problem(T=T, C=C, c=c, dtype=torch.float32)
    n_valid = torch.tensor([10, 3, 7])
    gam = gamma.detach().clone()
    for r, n in enumerate(n_valid.tolist()):
        gam[r, c - 1 + n :] = 0.0
    y, W, S = atlas_memory(qf, kf, v, gam, eta, lt, la, params, mom, chunk_size=C, window=c, n_valid=n_valid)
    for r, n in enumerate(n_valid.tolist()):
        full = (n // C) * C  # the row's state is that after its last complete chunk
        sl = lambda t, m: t[r : r + 1, :m]  # noqa: E731
        y_r, W_r, S_r = atlas_memory(
            sl(qf, n), sl(kf, n + c - 1), sl(v, n + c - 1), sl(gam, n + c - 1), sl(eta, n), sl(lt, n), sl(la, n),
            [p[r : r + 1] for p in params], [m[r : r + 1] for m in mom], chunk_size=C, window=c)
        assert rel_err(y[r : r + 1, :n], y_r) < 1e-5
        _, W_f, S_f = atlas_memory(
            sl(qf, full), sl(kf, full + c - 1), sl(v, full + c - 1), sl(gam, full + c - 1), sl(eta, full),
            sl(lt, full), sl(la, full), [p[r : r + 1] for p in params], [m[r : r + 1] for m in mom],
            chunk_size=C, window=c) if full else (None, [p[r : r + 1] for p in params], [m[r : r + 1] for m in mom])
        for a, b in zip(W + S, list(W_f) + list(S_f)):
            assert rel_err(a[r : r + 1], b) < 1e-5
