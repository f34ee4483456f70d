"""ATLAS neural memory, chunk-parallel (Behrouz et al. 2025, "ATLAS: Learning to Optimally
Memorize the Context at Test Time", arXiv 2505.23735).

The memory is a small residual MLP ``M(x; W)`` per (sequence, head) whose weights are
learned *inside* the forward pass (test-time memorization). Notation of this module:

* features: ``phi(k)``, the polynomial feature map of degree ``p`` (paper §3, "polynomial
  kernels"): ``phi(x) = [a_1 x, a_2 (x⊗x)_sym, a_3 (x⊗x⊗x)_sym, ...]`` where ``(x⊗x)_sym``
  keeps each monomial once with weight ``sqrt(multinomial)``, so
  ``<phi_j(x), phi_j(y)> = (x·y)^j`` exactly (Taylor terms of ``exp(x·y)`` with
  ``a_j = 1/sqrt(j!)``, learned per head and degree);
* memory (deep residual MLP, paper Eq. 32-33 in spirit):
  ``M(x; W) = P x + W_L σ(W_{L-1} ... σ(W_1 x))``, ``W = (P, W_1, ..., W_L)``, σ = SiLU,
  input dim = feature dim, output dim = head dim; ``P`` is the (inner-updated) linear
  path, i.e. the matrix memory on polynomial features;
* Omega rule (paper Eq. 9): the inner loss at token ``t`` is
  ``sum_{i=t-c+1}^{t} γ_i ||M(phi(k_i)) - v_i||²`` over a sliding window of ``c`` tokens;
* Muon inner optimizer (the Atlas update): momentum ``S_t = θ_t S_{t-1} + ∇_t`` and
  ``M_t = α_t M_{t-1} - η_t NS5(S_t)``, NS5 = the 5-step quintic Newton–Schulz
  orthogonalisation of Muon applied to every 2-D weight (1-D weights would take the raw
  momentum; this memory has none). ``muon=False`` ablates NS (plain momentum SGD).

Chunk-parallel form (as in Titans / ATLAS training): the sequence is cut into chunks of
``C`` tokens. Inside chunk ``n`` every per-token gradient is taken at the chunk-start
weights ``W_n`` (``torch.func.vmap(grad(...))`` over tokens and over batch×heads), so the
whole chunk is parallel:

1. ``g_i = ∇_W γ_i ||M(phi(k_i); W_n) - v_i||²`` for the chunk's ``C`` tokens and the
   ``c-1`` tokens before it (the window tail, kept across chunks and calls);
2. window sums ``∇_t = Σ_{i=t-c+1}^{t} g_i`` as differences of a cumulative sum;
3. momentum scan ``S_t = Σ_{j≤t} (Π_{s=j+1}^{t} θ_s) ∇_j + (Π_{s≤t} θ_s) S_0``, with the
   decay products formed stably in log space as a ``[C, C]`` lower-triangular matrix;
4. ``U_t = NS5(S_t)`` batched over all tokens of the chunk;
5. closed form ``W_{n+1} = (Π_t α_t) W_n - Σ_t (Π_{s>t} α_s) η_t U_t``.

Retrieval for the tokens of chunk ``n``: ``y_t = M(phi(q_t); W_n)``. The Python loop runs
over chunks only. Gradients flow to everything (keys, values, gates, the initial weights)
through the inner updates: ``torch.func.grad`` composes with the outer autograd.

``atlas_memory(..., snapshots=[...])`` returns, instead of the final state, the weights and momentum
at the start of chosen chunks (block diffusion needs the cached state at every block
start: ``components/atlas.py``, ``Atlas.boundary_forward``).

Chunks that are not complete in a row (``n_valid``) leave that row's weights and momentum
unchanged: a partial chunk waits in the caller's buffer until it is complete, which is
what makes a cached, chunk-split run equal one full forward.

There is no fused fast path: this reference runs on every device (the dispatch registers
nothing for ``atlas``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

# Muon's quintic Newton-Schulz coefficients (K. Jordan et al. 2024): they push every
# singular value of the Frobenius-normalised input towards ~1 in 5 steps.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Quintic Newton–Schulz orthogonalisation of the last two dims (batched over the rest).

    Muon's iteration: ``X_0 = G / ||G||_F``, ``X_{k+1} = (a I + b A_k + c A_k²) X_k`` with
    ``A_k = X_k X_kᵀ``. With the short side first (``X`` is m×n, m <= n) every factor
    ``Q_k = a I + b A_k + c A_k²`` is a polynomial in ``A_0``, so all of them commute and

        X_k = R_k X_0,   R_k = Q_{k-1} ... Q_0,   A_{k+1} = Q_k A_k Q_k

    — the same iterates computed on the small m×m Gram matrix (two m×n products in all
    instead of two per step; the answer is identical in exact arithmetic). Half precision
    inputs are orthogonalised in float32. A zero input gives zero (the norm is smoothed by
    ``eps``, so the gradient stays finite there too).
    """
    a, b, c = NS_COEFFS
    dtype = G.dtype
    tall = G.shape[-2] > G.shape[-1]
    X = (G.mT if tall else G).float() if dtype in (torch.float16, torch.bfloat16) else (G.mT if tall else G)
    X = X * torch.rsqrt(X.pow(2).sum((-2, -1), keepdim=True) + eps * eps)
    lead, (m, n) = X.shape[:-2], X.shape[-2:]
    X = X.reshape(-1, m, n)
    A = torch.bmm(X, X.mT)
    eye = torch.eye(m, dtype=X.dtype, device=X.device).expand_as(A)
    R = None
    for _ in range(steps):
        Q = torch.baddbmm(torch.add(eye, A, alpha=b / a) * a, A, A, alpha=c)  # aI + bA + cA²
        R = Q if R is None else torch.bmm(Q, R)
        A = torch.bmm(torch.bmm(Q, A), Q)
    X = torch.bmm(R, X) if R is not None else X
    X = X.view(*lead, m, n).to(dtype)
    return X.mT if tall else X


# ----------------------------------------------------------------------------- features


@functools.cache
def _monomials(d: int, degree: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Index tuples i_1 <= ... <= i_j of the degree-j monomials and sqrt(multinomial) weights."""
    idx, w = [], []
    for combo in itertools.combinations_with_replacement(range(d), degree):
        counts = [combo.count(i) for i in set(combo)]
        mult = math.factorial(degree) / math.prod(math.factorial(n) for n in counts)
        idx.append(combo)
        w.append(math.sqrt(mult))
    return tuple(idx), tuple(w)


@functools.lru_cache(maxsize=64)
def _monomial_tensors(d: int, degree: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    idx, w = _monomials(d, degree)
    return torch.tensor(idx, device=device), torch.tensor(w, device=device, dtype=dtype)


def feature_dim(d: int, degree: int) -> int:
    """Dimension of ``phi`` for head dim ``d``: ``sum_{j=1}^{p} C(d + j - 1, j)``."""
    return sum(math.comb(d + j - 1, j) for j in range(1, degree + 1))


def poly_features(x: Tensor, coef: Tensor) -> Tensor:
    """Polynomial feature map ``phi_p`` of the last dim.

    x: [..., d]; coef: [..., p], the per-degree coefficients ``a_j`` (per head), its leading
    dims broadcastable against ``x[..., :1]`` (e.g. x [B, H, T, d] with coef [H, 1, p]).
    Returns [..., feature_dim(d, p)] with ``<phi(x), phi(y)> = Σ_j a_j² (x·y)^j``.
    """
    d, p = x.shape[-1], coef.shape[-1]
    coef = coef.to(x.dtype)
    parts = [x * coef[..., 0:1]]
    for j in range(2, p + 1):
        it, wt = _monomial_tensors(d, j, x.device, x.dtype)
        m = x[..., it[:, 0]]
        for r in range(1, j):
            m = m * x[..., it[:, r]]
        parts.append(m * wt * coef[..., j - 1 : j])
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------- memory


def memory_apply(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """``M(x; W) = P x + W_L σ(... σ(W_1 x))`` with ``params = (P, W_1, ..., W_L)``.

    Each weight is ``[..., out, in]``; ``x`` is ``[..., N, in]`` (batched rows) or ``[in]``
    (one token, as seen inside ``vmap``).
    """
    P, *Ws = params
    h = x
    for i, W in enumerate(Ws):
        h = h @ W.mT
        if i < len(Ws) - 1:
            h = F.silu(h)
    return x @ P.mT + h


def _token_loss(params: tuple[Tensor, ...], kf: Tensor, v: Tensor, gamma: Tensor) -> Tensor:
    """One token's weighted Omega term ``γ_i ||M(phi(k_i)) - v_i||²``."""
    return gamma * (memory_apply(params, kf) - v).pow(2).sum()


# per-token gradients: inner vmap over the tokens of a window (weights shared), outer vmap
# over batch x heads (weights per row)
_per_token_grads = vmap(vmap(grad(_token_loss), in_dims=(None, 0, 0, 0)), in_dims=(0, 0, 0, 0))


def _decay_matrix(log_decay: Tensor) -> Tensor:
    """[N, C] log factors -> [N, C, C] with ``D[t, j] = Π_{s=j+1}^{t} exp(log_decay_s)``, j <= t."""
    cum = log_decay.cumsum(-1)
    diff = cum[..., :, None] - cum[..., None, :]
    C = log_decay.shape[-1]
    tri = torch.ones(C, C, dtype=torch.bool, device=log_decay.device).tril()
    return diff.masked_fill(~tri, float("-inf")).exp()


def chunk_update(
    params: tuple[Tensor, ...],
    mom: tuple[Tensor, ...],
    kf: Tensor,
    v: Tensor,
    gamma: Tensor,
    eta: Tensor,
    log_theta: Tensor,
    log_alpha: Tensor,
    *,
    window: int,
    ns_steps: int,
    muon: bool,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One chunk of the Atlas update, all tokens in parallel (steps 1-5 of the module doc).

    params/mom: tuples of [N, out, in] at the chunk start. kf [N, C+c-1, F], v [N, C+c-1, D],
    gamma [N, C+c-1]: the chunk's tokens preceded by the ``c-1`` window-tail tokens.
    eta, log_theta, log_alpha: [N, C]. Returns the weights and momentum after the chunk.
    """
    C = eta.shape[-1]
    g = _per_token_grads(params, kf, v, gamma)  # tuple of [N, C+c-1, out, in]
    lt = log_theta.cumsum(-1)  # [N, C]
    D_theta = _decay_matrix(log_theta)  # [N, C, C]
    la = log_alpha.cumsum(-1)
    w_upd = eta * (la[:, -1:] - la).exp()  # [N, C]: η_t Π_{s>t} α_s
    keep = la[:, -1].exp()  # [N]: Π_t α_t
    new_p, new_m = [], []
    for W, S0, gi in zip(params, mom, g):
        N = gi.shape[0]
        # Omega window: ∇_t = Σ_{i=t-c+1}^{t} g_i (window coords: token t sits at t + c - 1)
        cs = gi.reshape(N, C + window - 1, -1).cumsum(1)
        cs = torch.cat([torch.zeros_like(cs[:, :1]), cs], dim=1)
        G = cs[:, window:] - cs[:, :C]  # [N, C, numel]
        # momentum: S_t = θ_t S_{t-1} + ∇_t for the whole chunk at once
        S = torch.bmm(D_theta, G) + lt.exp()[..., None] * S0.reshape(N, 1, -1)
        S = S.view(N, C, *W.shape[1:])
        # NS5 on every 2-D weight (per token); vectors would take the raw momentum
        U = newton_schulz(S, ns_steps) if (muon and W.dim() == 3) else S
        # M_t = α_t M_{t-1} - η_t U_t, closed form over the chunk
        upd = torch.bmm(w_upd[:, None, :], U.reshape(N, C, -1))[:, 0]
        new_p.append((keep[:, None] * W.reshape(N, -1) - upd).view_as(W))
        new_m.append(S[:, -1])
    return tuple(new_p), tuple(new_m)


def atlas_memory(
    qf: Tensor,
    kf: Tensor,
    v: Tensor,
    gamma: Tensor,
    eta: Tensor,
    log_theta: Tensor,
    log_alpha: Tensor,
    params: Sequence[Tensor],
    mom: Sequence[Tensor] | None = None,
    *,
    chunk_size: int,
    window: int,
    ns_steps: int = 5,
    muon: bool = True,
    n_valid: Tensor | None = None,
    return_state: bool = True,
    snapshots: Sequence[int] | None = None,
) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]:
    """Chunk-parallel ATLAS memory over a sequence that starts at a chunk boundary.

    qf:        [N, T, F] query features (N = batch x heads).
    kf, v:     [N, c-1+T, F] / [N, c-1+T, D]: the ``c-1`` window-tail tokens, then the T tokens.
    gamma:     [N, c-1+T] Omega weights γ (0 for an empty tail slot).
    eta, log_theta, log_alpha: [N, T] inner lr, log momentum, log decay per token.
    params:    memory weights at the start, each [N, out, in]; mom: momentum (None = zeros).
    n_valid:   [N] real tokens per row (None = all T); a chunk updates a row's memory only
               when all its C tokens are real. Slots past n_valid must have γ = 0.
    return_state: False skips the update after the last chunk (nothing would read it).
    Returns ``y`` [N, T, D] (retrieval with each chunk's start weights) and the weights /
    momentum after the last complete chunk of every row (None when not return_state).

    ``snapshots``: chunk indices (distinct, each < ceil(T / C); rows fully real): instead of
    the final state, the weights and momentum at the START of each of those chunks, collected
    inside the chunk loop on the way (block diffusion: a cached run's state at every block
    start, ``components/atlas.py``), per memory matrix stacked as [len(snapshots), N, out, in]
    in their order (chunk 0's momentum is the given ``mom`` or zeros).
    """
    if snapshots is None:
        y, W, S, _ = _atlas_memory(qf, kf, v, gamma, eta, log_theta, log_alpha, params, mom, chunk_size=chunk_size,
                                   window=window, ns_steps=ns_steps, muon=muon, n_valid=n_valid,
                                   return_state=return_state, snapshots=())
        return y, W, S
    want = list(snapshots)
    n_chunks = -(-qf.shape[1] // chunk_size)
    if not want or len(set(want)) != len(want) or any(not 0 <= n < n_chunks for n in want) or n_valid is not None:
        raise ValueError(f"atlas_memory: snapshots must be distinct chunk indices in [0, {n_chunks}) of fully real "
                         f"rows (no n_valid), got {want}")
    y, _, _, snaps = _atlas_memory(qf, kf, v, gamma, eta, log_theta, log_alpha, params, mom,
                                   chunk_size=chunk_size, window=window, ns_steps=ns_steps, muon=muon,
                                   n_valid=None, return_state=False, snapshots=want)
    W = tuple(torch.stack(ws) for ws in zip(*(snaps[n][0] for n in want)))
    S = tuple(torch.stack(ms) for ms in zip(*(snaps[n][1] for n in want)))
    return y, W, S


def _atlas_memory(
    qf: Tensor, kf: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, log_theta: Tensor, log_alpha: Tensor,
    params: Sequence[Tensor], mom: Sequence[Tensor] | None, *, chunk_size: int, window: int, ns_steps: int,
    muon: bool, n_valid: Tensor | None, return_state: bool, snapshots: Sequence[int],
) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None,
           dict[int, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]]:
    """The chunk loop of ``atlas_memory``; also returns {chunk index: (weights, momentum) at
    that chunk's start} for the indices in ``snapshots``."""
    N, T, _ = qf.shape
    C, c = chunk_size, window
    params = tuple(params)
    mom = tuple(torch.zeros_like(p) for p in params) if mom is None else tuple(mom)
    pad = (-T) % C
    if pad:  # neutral padding: γ = η = 0, θ = α = 1
        qf = F.pad(qf, (0, 0, 0, pad))
        kf, v = F.pad(kf, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        gamma, eta = F.pad(gamma, (0, pad)), F.pad(eta, (0, pad))
        log_theta, log_alpha = F.pad(log_theta, (0, pad)), F.pad(log_alpha, (0, pad))
    n_chunks = (T + pad) // C
    want = set(snapshots)
    snaps: dict[int, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {}
    ys = []
    for n in range(n_chunks):
        s = n * C
        if n in want:
            snaps[n] = (params, mom)
        ys.append(memory_apply(params, qf[:, s : s + C]))
        last = n == n_chunks - 1
        if last and not return_state:
            break
        if n_valid is None:
            complete = None
            if s + C > T:  # a trailing partial chunk never updates
                break
        else:
            complete = n_valid >= s + C  # [N]
            if not bool(complete.any()):
                break
        new_p, new_m = chunk_update(
            params, mom, kf[:, s : s + C + c - 1], v[:, s : s + C + c - 1], gamma[:, s : s + C + c - 1],
            eta[:, s : s + C], log_theta[:, s : s + C], log_alpha[:, s : s + C],
            window=c, ns_steps=ns_steps, muon=muon,
        )
        if complete is not None and not bool(complete.all()):
            m3 = complete[:, None, None]
            new_p = tuple(torch.where(m3, a, b) for a, b in zip(new_p, params))
            new_m = tuple(torch.where(m3, a, b) for a, b in zip(new_m, mom))
        params, mom = new_p, new_m
    if len(ys) < n_chunks:  # chunks after the last update see the same weights
        for n in want:
            if n >= len(ys):
                snaps[n] = (params, mom)
        rest = qf[:, len(ys) * C :]
        ys.append(memory_apply(params, rest))
    y = torch.cat(ys, dim=1)[:, :T]
    return y, (params if return_state else None), (mom if return_state else None), snaps
