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
  ``ns_chunk=True`` (``inner_optimizer: muon_chunk``, a variant, not the paper's step) applies
  NS5 once per chunk instead of per token, to the chunk's update: ``Σ_t w_t NS5(S_t)`` becomes
  ``(Σ_t w_t) NS5(Σ_t w_t S_t)`` (``w_t = η_t Π_{s>t} α_s``, step 5 below; the momentum
  recurrence is unchanged). The weights inside a chunk are never read (retrieval uses the
  chunk-start weights), so this changes only how the chunk's summed step is orthogonalised,
  with C times fewer Newton-Schulz problems and no per-token momenta.

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

Two implementations of the same recurrence, chosen by ``kernels/dispatch.py``:

* the reference (``_atlas_memory``, any device: what is being traced, what
  ``HYMBA_KERNELS=reference`` asks for, where a probe failed): steps 1-5
  as written above, per-token gradients by ``torch.func``;
* the fast path (``_atlas_memory_fast``, registered as ``atlas`` for CUDA and as ``atlas_cpu``
  for the CPU, where its chunk step runs eagerly and Newton-Schulz as batched matmuls; never
  while traced). Per
  chunk it does the same mathematics in far fewer, larger operations (details at the fast
  path below): the per-token gradients in closed form as rank-1 outer products, the Omega
  window and the momentum scan as one gate-only mixing matrix per chunk (all chunks' matrices
  built before the loop), NS5 on the Gram matrices batched over rows, tokens and weights
  (one Triton kernel per direction on CUDA, ``hymba::atlas_ns_gram``), the chunk's update as
  one matmul per weight, each chunk's retrieval in its step (the queries through the memory MLP
  with the keys), no host synchronisation;
  the loop body runs under ``torch.compile``. Tested equal to the reference (outputs, states,
  every gradient) in ``tests/test_atlas.py``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import sys
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from . import dispatch
from ._triton import INTERPRET, next_pow2
from .bmm32 import bmm_f32, bmm_f32_group
from .dispatch import fast_path, max_rel_err

try:  # Triton is optional: only the CUDA fast path's Newton-Schulz kernels use it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = None

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
    dtype = G.dtype
    tall = G.shape[-2] > G.shape[-1]
    X = (G.mT if tall else G).float() if dtype in (torch.float16, torch.bfloat16) else (G.mT if tall else G)
    X = X * torch.rsqrt(X.pow(2).sum((-2, -1), keepdim=True) + eps * eps)
    lead, (m, n) = X.shape[:-2], X.shape[-2:]
    X = X.reshape(-1, m, n)
    R = ns_gram_factor(torch.bmm(X, X.mT), steps)
    X = torch.bmm(R, X) if R is not None else X
    X = X.view(*lead, m, n).to(dtype)
    return X.mT if tall else X


def ns_gram_factor(A: Tensor, steps: int) -> Tensor | None:
    """``R_steps`` of ``newton_schulz`` from the Gram matrix ``A_0 = X_0 X_0ᵀ`` [B, m, m]:
    ``NS(X_0) = R X_0`` (None for 0 steps). ``Q_k = a I + b A_k + c A_k²``,
    ``R_{k+1} = Q_k R_k``, ``A_{k+1} = Q_k A_k Q_k``; the last step's ``A`` is never read, so it
    is not formed (two m×m products saved; the result is the same bit for bit)."""
    a, b, c = NS_COEFFS
    aI = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).mul_(a).expand_as(A)
    R = None
    for k in range(steps):
        Q = torch.baddbmm(torch.add(aI, A, alpha=b), A, A, alpha=c)  # aI + bA + cA²
        R = Q if R is None else torch.bmm(Q, R)
        if k < steps - 1:
            A = torch.bmm(torch.bmm(Q, A), Q)
    return R


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
    """One-hot selection matrices [degree, d, n] (column m of slice r picks the r-th index of
    monomial m) and the monomials' weights [n]."""
    idx, w = _monomials(d, degree)
    sel = F.one_hot(torch.tensor(idx).mT, d).mT  # [degree, d, n]
    return sel.to(device, dtype), torch.tensor(w, device=device, dtype=dtype)


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
        # each factor gathered as a matmul with a one-hot matrix (exact): its backward is a matmul
        # too, where indexing's is a sort-based index_put (4 a training step of the Quad-Hybrid's
        # ATLAS layer, 5.2 ms each on an H200 at batch 8 x 2048)
        sel, wt = _monomial_tensors(d, j, x.device, x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # in x's dtype, as indexing would be
            m = x @ sel[0]
            for r in range(1, j):
                m = m * (x @ sel[r])
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
    ns_chunk: bool = False,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One chunk of the Atlas update, all tokens in parallel (steps 1-5 of the module doc;
    ``ns_chunk``: NS5 once on the chunk's weighted momentum sum, see the module doc).

    params/mom: tuples of [N, out, in] at the chunk start. kf [N, C+c-1, F], v [N, C+c-1, D],
    gamma [N, C+c-1]: the chunk's tokens preceded by the ``c-1`` window-tail tokens.
    eta, log_theta, log_alpha: [N, C]. Returns the weights and momentum after the chunk.
    """
    C = eta.shape[-1]
    with dispatch.without_saved_tensor_hooks():  # torch.func inside a checkpointed block (core/recompute.py)
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
        if muon and ns_chunk and W.dim() == 3:  # NS5 once: (Σ_t w_t) NS5(Σ_t w_t S_t)
            summed = torch.bmm(w_upd[:, None, :], S.reshape(N, C, -1))[:, 0].view_as(W)
            upd = (newton_schulz(summed, ns_steps) * w_upd.sum(-1)[:, None, None]).reshape(N, -1)
        else:
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
    ns_chunk: bool = False,
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

    ``snapshots``: chunk indices (distinct, each <= ceil(T / C)): instead of the final state,
    the weights and momentum at the START of each of those chunks, collected inside the chunk
    loop on the way (block diffusion: a cached run's state at every block start,
    ``components/atlas.py``), per memory matrix stacked as [len(snapshots), N, out, in] in
    their order (chunk 0's momentum is the given ``mom`` or zeros); index ``ceil(T / C)`` is
    the end state (after every complete chunk). With ``n_valid`` a row's snapshot of a chunk
    it does not complete is its state after the chunks it does (a speculative verify chunk's
    recording, ``Atlas`` with ``StepContext.record``).
    """
    impl = _atlas_memory  # traced code traces the reference
    if not dispatch.tracing(qf):
        if dispatch.use_fast("atlas", qf):  # CUDA's (COMPILE_CHUNK_STEP)
            impl = _atlas_memory_fast
        elif dispatch.use_fast(CPU_FAST, qf):  # the CPU's: the step eagerly (no Inductor build, no C++ compiler)
            impl = functools.partial(_atlas_memory_fast, compile=False)
    if snapshots is None:
        y, W, S, _ = impl(qf, kf, v, gamma, eta, log_theta, log_alpha, params, mom, chunk_size=chunk_size,
                          window=window, ns_steps=ns_steps, muon=muon, ns_chunk=ns_chunk, n_valid=n_valid,
                          return_state=return_state, snapshots=())
        return y, W, S
    want = list(snapshots)
    n_chunks = -(-qf.shape[1] // chunk_size)
    if not want or len(set(want)) != len(want) or any(not 0 <= n <= n_chunks for n in want):
        raise ValueError(f"atlas_memory: snapshots must be distinct chunk indices in [0, {n_chunks}], got {want}")
    y, _, _, snaps = impl(qf, kf, v, gamma, eta, log_theta, log_alpha, params, mom, chunk_size=chunk_size,
                          window=window, ns_steps=ns_steps, muon=muon, ns_chunk=ns_chunk, n_valid=n_valid,
                          return_state=n_chunks in want, snapshots=want)
    W = tuple(torch.stack(ws) for ws in zip(*(snaps[n][0] for n in want)))
    S = tuple(torch.stack(ms) for ms in zip(*(snaps[n][1] for n in want)))
    return y, W, S


@dispatch.reference_math
def _atlas_memory(
    qf: Tensor, kf: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, log_theta: Tensor, log_alpha: Tensor,
    params: Sequence[Tensor], mom: Sequence[Tensor] | None, *, chunk_size: int, window: int, ns_steps: int,
    muon: bool, n_valid: Tensor | None, return_state: bool, snapshots: Sequence[int], ns_chunk: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None,
           dict[int, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]]:
    """The chunk loop of ``atlas_memory``; also returns {chunk index: (weights, momentum) at
    that chunk's start} for the indices in ``snapshots``. Computed in float32 (float64 for
    float64 inputs) with autocast off, as the fast path: y in qf's dtype, states in the
    weights' (a Muon step in bf16, what ``torch.compile`` traced under bf16 autocast, diverged)."""
    N, T, _ = qf.shape
    C, c = chunk_size, window
    ct = dispatch.compute_dtype(qf)
    out_dtype, state_dtype = qf.dtype, params[0].dtype
    qf, kf, v, gamma, eta, log_theta, log_alpha = (t.to(ct) for t in (qf, kf, v, gamma, eta, log_theta, log_alpha))
    params = tuple(p.to(ct) for p in params)
    mom = tuple(torch.zeros_like(p) for p in params) if mom is None else tuple(m.to(ct) for m in mom)
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
            window=c, ns_steps=ns_steps, muon=muon, ns_chunk=ns_chunk,
        )
        if complete is not None and not bool(complete.all()):
            m3 = complete[:, None, None]
            new_p = tuple(torch.where(m3, a, b) for a, b in zip(new_p, params))
            new_m = tuple(torch.where(m3, a, b) for a, b in zip(new_m, mom))
        params, mom = new_p, new_m
    if len(ys) < n_chunks:  # chunks after the last update see the same weights
        rest = qf[:, len(ys) * C :]
        ys.append(memory_apply(params, rest))
    for n in want:  # chunks after the last update (and the end, index n_chunks) start from the last weights
        snaps.setdefault(n, (params, mom))
    y = torch.cat(ys, dim=1)[:, :T].to(out_dtype)
    cast = lambda ts: tuple(t.to(state_dtype) for t in ts)  # noqa: E731
    snaps = {n: (cast(w), cast(m)) for n, (w, m) in snaps.items()}
    return y, (cast(params) if return_state else None), (cast(mom) if return_state else None), snaps


# ----------------------------------------------------------------------------- fast path
#
# The same chunk-parallel recurrence with the per-chunk work cut to a few batched matmuls
# (``atlas_memory`` takes it on CUDA through ``dispatch.use_fast("atlas", ...)``; the
# reference above stays the oracle and the CPU / traced path):
#
# * per-token gradients in closed form. For the residual MLP memory the gradient of token
#   i's Omega term is a sum of rank-1 outer products, one per weight (backpropagation by
#   hand through ``M``, no ``torch.func``): with ``e_i = 2 γ_i (M(phi(k_i)) - v_i)``,
#   ``∇P_i = e_i phi(k_i)ᵀ``, ``∇W_L,i = e_i h_{L-1,i}ᵀ`` and ``∇W_l,i = δ_l,i h_{l-1,i}ᵀ``,
#   ``δ_{l-1} = σ'(z_{l-1}) ⊙ W_lᵀ δ_l`` (``h_0 = phi(k)``, ``z_l = W_l h_{l-1}``,
#   ``h_l = σ(z_l)``);
# * window sums and the momentum scan of the module doc (steps 2-3) as ONE mixing matrix
#   per chunk, ``S_t = Σ_i Mix[t, i] a_i b_iᵀ + λ_t S_0`` with ``Mix = D_θ · Window``
#   ([C, C+c-1]) and ``λ_t = Π_{s≤t} θ_s``: one ``[C·out, C+c-1] @ [C+c-1, in]`` matmul per
#   weight; ``Mix``, ``λ`` and the update coefficients (step 5) depend on the gates only, so
#   they are formed for ALL chunks at once before the loop;
# * NS5 (step 4) on the small Gram matrices (``ns_gram_factor``), batched over rows, the
#   chunk's tokens and the weights with the same short side, and the chunk's update
#   ``Σ_t η_t Π_{s>t} α_s NS5(S_t) = Σ_t w_t R_t X_t`` as one matmul per weight (the
#   orthogonalised momenta ``U_t`` are never materialised); with ``inner_optimizer: sgd``
#   the update ``Σ_t w_t S_t`` and the new momentum ``S_{C-1}`` are two rows of the same
#   mixing matmul;
# * retrieval ``y_t = M(phi(q_t); W_n)`` inside chunk n's step, the queries' rows going through
#   the memory MLP with the keys' (``RETRIEVE_IN_STEP``; else for all chunks at once after the
#   loop, from the stacked chunk-start weights);
# * no host synchronisation: rows whose chunk is incomplete (``n_valid``) get identity
#   coefficients (no gradient mixing, ``λ = 1``, no update, ``Π α = 1``) instead of a
#   ``torch.where`` after a ``.any()``, so the path is CUDA-graph capturable;
# * the loop body (``_chunk_step``) runs under ``torch.compile`` (``COMPILE_CHUNK_STEP``;
#   ``CHUNKS_PER_CALL`` > 1 unrolls several chunks into one graph): its element-wise work
#   fused, about 26 kernels forward and 48 backward per chunk (Inductor's CPU code for the
#   benchmark's memory; the eager step issues ~78 and ~190 ops, the reference ~200 and ~440).
#
# It computes in float32 (float64 for float64 inputs) and returns y in the inputs' dtype,
# the weights / momentum in the given weights' dtype: a bf16 model's memory recurrence runs
# in float32 here, as in the reference (``dispatch.reference_math``; a bf16 layer at T 100 on a
# CPU: 0.017 RMS off float32 on either path).

# Newton-Schulz on the Gram matrices as one op (``hymba::atlas_ns_gram``): opaque to
# torch.compile, with its own backward. On CUDA (float32, short side <= NS_TRITON_MAX) both
# directions are one Triton kernel each, a program per matrix holding it in registers for all
# the steps, its matmuls on tensor cores in float32 accuracy (``NS_TRITON_PRECISION``
# "tf32x3_split", also under ``hymba train --tf32``; the PyTorch form is 4 batched float32 matmuls
# and an add per step, x 2-3 in the backward); elsewhere the PyTorch form: ``ns_gram_factor``
# forward, ``_ns_gram_vjp`` backward.
# The chunk step calls the op only where the Triton kernels apply (``_use_triton_ns``: CUDA,
# float32, every Gram side <= NS_TRITON_MAX, the kernels checked once on this GPU).

if triton is not None:
    from ._triton import dot_f32

    @triton.jit
    def _mm(x, y, PREC: tl.constexpr):
        """x @ y in float32 at matmul precision PREC (``_triton.dot_f32``)."""
        return dot_f32(x, y, tl.zeros((x.shape[0], y.shape[1]), dtype=tl.float32), PREC)

    @triton.jit
    def _ns_q(A, eye, a: tl.constexpr, b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr):
        return a * eye + b * A + c * _mm(A, A, PREC)

    @triton.jit
    def _saved_tiles(M: tl.constexpr, STEPS: tl.constexpr):
        """This program's offsets: its M×M tile (row-major) and the same tile transposed, relative to
        its matrix, and the start of its scratch slice (4 x STEPS tiles) in the saved iterates."""
        pid = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, M)
        return pid * M * M, i[:, None] * M + i[None, :], i[None, :] * M + i[:, None], pid * 4 * STEPS * M * M

    @triton.jit
    def _saved_t(ptr, tile, tile_t, TRANS: tl.constexpr):
        """The transpose of the saved M×M tile at ``ptr`` (see ``_ns_gram_bwd_saved_kernel``'s TRANS)."""
        if TRANS == "load":
            return tl.load(ptr + tile_t)
        elif TRANS == "store":
            return tl.load(ptr + tile)
        else:
            return tl.trans(tl.load(ptr + tile))

    @triton.jit
    def _ns_gram_fwd_kernel(A_ptr, R_ptr, M: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr,
                            b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, M)
        off = pid * M * M + i[:, None] * M + i[None, :]
        A = tl.load(A_ptr + off)
        eye = (i[:, None] == i[None, :]).to(tl.float32)
        R = eye
        for k in tl.static_range(STEPS):  # ns_gram_factor, step for step
            Q = _ns_q(A, eye, a, b, c, PREC)
            R = Q if k == 0 else _mm(Q, R, PREC)
            if k < STEPS - 1:
                A = _mm(_mm(Q, A, PREC), Q, PREC)
        tl.store(R_ptr + off, R)

    @triton.jit
    def _ns_gram_bwd_kernel(A_ptr, dR_ptr, dA_ptr, M: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr,
                            b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr):
        """Reverse mode through the steps of ``ns_gram_factor``; step k's A_k and R_k are
        recomputed from A_0 (STEPS² / 2 steps of m×m products: no scratch memory)."""
        pid = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, M)
        off = pid * M * M + i[:, None] * M + i[None, :]
        A0 = tl.load(A_ptr + off)
        gR = tl.load(dR_ptr + off)
        eye = (i[:, None] == i[None, :]).to(tl.float32)
        gA = tl.zeros([M, M], dtype=tl.float32)
        for k in tl.static_range(STEPS - 1, -1, -1):
            A = A0  # recompute A_k and R_k (the product of Q_0 .. Q_{k-1})
            R = eye
            for j in tl.static_range(k):
                Q = _ns_q(A, eye, a, b, c, PREC)
                R = Q if j == 0 else _mm(Q, R, PREC)
                A = _mm(_mm(Q, A, PREC), Q, PREC)
            Q = _ns_q(A, eye, a, b, c, PREC)
            if k > 0:  # R_{k+1} = Q_k R_k
                gQ = _mm(gR, tl.trans(R), PREC)
                gR = _mm(tl.trans(Q), gR, PREC)
            else:  # R_1 = Q_0
                gQ = gR
            if k < STEPS - 1:  # A_{k+1} = (Q_k A_k) Q_k
                T = _mm(Q, A, PREC)
                gT = _mm(gA, tl.trans(Q), PREC)
                gQ += _mm(tl.trans(T), gA, PREC) + _mm(gT, tl.trans(A), PREC)
                gA = _mm(tl.trans(Q), gT, PREC)
            else:
                gA = tl.zeros([M, M], dtype=tl.float32)
            # Q_k = a I + b A_k + c A_k A_k
            gA += b * gQ + c * (_mm(gQ, tl.trans(A), PREC)
                                + _mm(tl.trans(A), gQ, PREC))
        tl.store(dA_ptr + off, gA)


    @triton.jit
    def _ns_gram_bwd_saved_kernel(A_ptr, dR_ptr, dA_ptr, W_ptr, M: tl.constexpr, STEPS: tl.constexpr,
                                  a: tl.constexpr, b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr,
                                  TRANS: tl.constexpr = "load"):
        """``_ns_gram_bwd_kernel`` without the recomputation: one forward pass writes every step's
        A_k, Q_k, R_k and T_k = Q_k A_k to the program's slice of the scratch ``W`` [B, 4, STEPS,
        M, M] (80 KiB a program at side 32, 320 KiB at 64: it stays in L2 only while few programs
        are in flight), then the reverse pass loads them instead of keeping them live in registers;
        the reverse pass reads every saved iterate transposed, ``TRANS`` says how (``NS_BWD_TRANS``):
        "load" loads the tile transposed (its offsets swapped: strided reads), "store" writes it
        transposed in the forward pass (strided writes, which nothing waits on) and loads it as
        stored, "regs" loads it as stored and transposes it in registers (on an H200 all three
        within 1%, 2026-12-05). The iterates are polynomials in A_0, so for a symmetric A_0 the
        transposes could drop out (one product fewer a step), but in float32 that form is an order of magnitude less
        accurate through the chunk step (``test_fast_path_with_triton_ns_kernels_in_interpreter``:
        1e-2 against 3e-4), so this is the general reverse mode, as autograd does it."""
        base, tile, tile_t, slice0 = _saved_tiles(M, STEPS)
        off = base + tile
        ws = W_ptr + slice0  # slot (j, k) at + (j * STEPS + k) * M * M
        _ns_save_iterates(tl.load(A_ptr + off), ws, tile, tile_t, M, STEPS, a, b, c, PREC, TRANS)
        tl.debug_barrier()
        gA = _ns_reverse_saved(tl.load(dR_ptr + off), ws, tile, tile_t, M, STEPS, b, c, PREC, TRANS)
        tl.store(dA_ptr + off, gA)

    @triton.jit
    def _ns_save_iterates(A, ws, tile, tile_t, M: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr,
                          b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr, TRANS: tl.constexpr):
        """``ns_gram_factor``'s steps from A_0 = ``A``, writing A_k, Q_k, R_k (R_0 = I) and T_k = Q_k A_k
        to the program's scratch slice ``ws`` (slot (j, k) at + (j * STEPS + k) * M * M; transposed
        where TRANS is "store"); returns R."""
        i = tl.arange(0, M)
        put = tile_t if TRANS == "store" else tile  # where a saved tile is written
        eye = (i[:, None] == i[None, :]).to(tl.float32)
        R = eye
        for k in tl.static_range(STEPS):
            Q = _ns_q(A, eye, a, b, c, PREC)
            tl.store(ws + k * M * M + put, A)
            tl.store(ws + (STEPS + k) * M * M + put, Q)
            tl.store(ws + (2 * STEPS + k) * M * M + put, R)
            R = Q if k == 0 else _mm(Q, R, PREC)
            if k < STEPS - 1:
                T = _mm(Q, A, PREC)
                tl.store(ws + (3 * STEPS + k) * M * M + put, T)
                A = _mm(T, Q, PREC)
        return R

    @triton.jit
    def _ns_reverse_saved(gR, ws, tile, tile_t, M: tl.constexpr, STEPS: tl.constexpr, b: tl.constexpr,
                          c: tl.constexpr, PREC: tl.constexpr, TRANS: tl.constexpr):
        """dA_0 from dR = ``gR`` by reverse mode through the steps whose iterates ``_ns_save_iterates``
        wrote to ``ws``."""
        gA = tl.zeros([M, M], dtype=tl.float32)
        for k in tl.static_range(STEPS - 1, -1, -1):
            Qt = _saved_t(ws + (STEPS + k) * M * M, tile, tile_t, TRANS)
            if k > 0:  # R_{k+1} = Q_k R_k
                gQ = _mm(gR, _saved_t(ws + (2 * STEPS + k) * M * M, tile, tile_t, TRANS), PREC)
                gR = _mm(Qt, gR, PREC)
            else:  # R_1 = Q_0
                gQ = gR
            At = _saved_t(ws + k * M * M, tile, tile_t, TRANS)
            if k < STEPS - 1:  # A_{k+1} = T_k Q_k, T_k = Q_k A_k
                gT = _mm(gA, Qt, PREC)
                gQ += _mm(_saved_t(ws + (3 * STEPS + k) * M * M, tile, tile_t, TRANS), gA, PREC)
                gQ += _mm(gT, At, PREC)
                gA = _mm(Qt, gT, PREC)
            else:
                gA = tl.zeros([M, M], dtype=tl.float32)
            # Q_k = a I + b A_k + c A_k A_k
            gA += b * gQ + c * (_mm(gQ, At, PREC) + _mm(At, gQ, PREC))
        return gA

    @triton.jit
    def _ns_gram_fwd_save_kernel(A_ptr, R_ptr, W_ptr, M: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr,
                                 b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr, TRANS: tl.constexpr = "load"):
        """The forward (``_ns_gram_fwd_kernel``'s R) that also keeps every step's iterates in the
        scratch ``W`` [B, 4, STEPS, M, M] for ``_ns_gram_bwd_from_saved_kernel`` (``NS_SAVE_FWD``)."""
        base, tile, tile_t, slice0 = _saved_tiles(M, STEPS)
        R = _ns_save_iterates(tl.load(A_ptr + base + tile), W_ptr + slice0, tile, tile_t, M, STEPS, a, b, c, PREC,
                              TRANS)
        tl.store(R_ptr + base + tile, R)

    @triton.jit
    def _ns_gram_bwd_from_saved_kernel(W_ptr, dR_ptr, dA_ptr, M: tl.constexpr, STEPS: tl.constexpr,
                                       b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr,
                                       TRANS: tl.constexpr = "load"):
        """The saved-iterate backward's reverse pass alone, from the iterates the forward kept."""
        base, tile, tile_t, slice0 = _saved_tiles(M, STEPS)
        off = base + tile
        gA = _ns_reverse_saved(tl.load(dR_ptr + off), W_ptr + slice0, tile, tile_t, M, STEPS, b, c, PREC, TRANS)
        tl.store(dA_ptr + off, gA)


#: the Triton backward of Newton-Schulz: False = ``_ns_gram_bwd_kernel`` (recomputes every
#: step's iterates from A_0; Triton's compiler merges the repeated, fully unrolled products, so
#: what it costs is registers: all iterates live at once), True = ``_ns_gram_bwd_saved_kernel``
#: (writes them once to a scratch buffer of 4 x steps m×m matrices per Gram matrix and reads them
#: back, transposed operands loaded transposed; the same products). Triton 3.9 + ptxas 13.4 for
#: sm_90a, 5 steps, tf32x3, per thread: side 16 / 2 warps 255 registers + 736 B spilled -> 183
#: registers, no spills; side 32 / 8 warps 255 + 2,236 B -> 255 + 56 B; side 64 / 4 warps (wgmma
#: m64n64k8): the recomputing kernel needs 256 KiB of shared memory (it cannot run), this one
#: 96 KiB and 4.4 KB of spills, so side 64 always takes it. Timed on an H200 (2026-12-04
#: evening, with NS_TRITON_MAX = 64; eager layer forward+backward, today's ``mixers.py
#: --atlas-paths fast fast_ns_recompute``): the Quad-Hybrid's shape 512.2 ms against 551.7,
#: d 2048 913.3 against 957.4; the Quad-Hybrid recipe's CUDA-graph training step 464.9 against
#: 512.9 ms (``quad_atlas.py --atlas-setting NS_BWD_SAVED=true``). So on at every side
NS_BWD_SAVED = True

#: the Triton kernels' matmul precision: "tf32x3" (three TF32 tensor-core products per
#: matmul, float32 accuracy), "ieee" (float32 FMAs: NS5 is most of the step's flops, and
#: float32 without tensor cores is the slowest way to do them), "tf32" (one TF32 product:
#: ~1e-3 relative, as Muon implementations that orthogonalise in bf16 accept). It does not follow
#: ``torch.backends.cuda.matmul.allow_tf32`` (``hymba train --tf32``, which moves the chunk step's
#: cuBLAS matmuls to TF32): in a CPU emulation of TF32 rounding (``benchmarks/atlas_tf32.py``),
#: one-pass NS on top of TF32 GEMMs took the probe problem's gradients 3.9 off float64 (the GEMMs
#: alone 0.64, float32 3e-3) and the 2-layer ATLAS MQAR model's mean final loss over 6 seeds
#: from 2.36 to 2.69 (the GEMMs alone 2.37). Benchmark choices besides: "tf32x3_split" (the same
#: three products written out in ``_mm``), Triton's "bf16x3" / "bf16x6" (split bf16 products; not in
#: Triton's CPU interpreter). Timed per launch on an H100 (2026-12-05, ``atlas_check.py --time-ns``,
#: muon_chunk's Quad-Hybrid launches, forward / backward): side 64 x 32 problems tf32x3 52 / 215 us,
#: tf32 12 / 43 us; side 32 x 64 problems 17 / 104 us against 10 / 22: Triton's tf32x3 costs 4-5x
#: one TF32 pass, not 3x. A one-pass backward alone is no option: emulated on a CPU
#: (``atlas_tf32.py`` tf32_ns_bwd) it took the probe's gradients 1.3e6 off float64 and the MQAR
#: model to chance (mean final loss 3.12 against 2.36 over 6 seeds). Default "tf32x3_split": the
#: same three products written out (``_triton.dot_f32``), both parts of each operand rounded to
#: nearest TF32. Its first form split by truncation, and the tensor cores' own truncation of the
#: small part biased every product toward zero: per launch it was 9e-6 / 1.8e-5 off float64 (tf32x3
#: 6e-6 / 1.2e-5), but the muon_chunk GPU test's problem, a chain of steps, ended 1.2e-2 off in its
#: state (limit 5e-3; tf32x3 2.8e-3). Rounded (H100, 2026-12-05 evening, eager, 3 seeds, bmm32
#: GEMMs): state <= 1.8e-3, gradients <= 1.6e-2, as tf32x3's 1.7e-3 / 2.1e-2; the Quad-Hybrid's
#: muon_chunk layer (padded NS, default Inductor, CUDA graphs) 106.5 ms with tf32x3, 102.0 with it
NS_TRITON_PRECISION = "tf32x3_split"

#: largest Gram side the Triton kernels take, 32 or 64 (a program holds its matrices in registers:
#: at 32 the backward already uses 255 registers per thread; at 64 a program is one warpgroup on
#: Hopper's wgmma, 255 registers and a few KB spilled in each direction, the backward through the
#: saved-iterate kernel). 64 is what the Quad-Hybrid's memory needs (its 64 x 560 weight: without
#: it every side there runs as float32 batched matmuls, 65% of that layer's kernel time on an
#: H200, 2026-12-04). Timed at the Quad-Hybrid's shape (H200, 2026-12-04 evening, eager layer
#: forward+backward, today's ``mixers.py --atlas-paths fast fast_ns32 --atlas-config quad``):
#: 543.8 ms at 64 (saved-iterate backward) against 799.8 ms at 32 (recomputing), so 64
NS_TRITON_MAX = 64


#: on CUDA, run Newton-Schulz through the Triton kernels (``atlas_ns_gram``) where they apply
TRITON_NS = True

#: where the saved-iterate backward applies (``_ns_saved_bwd``) and the step is differentiated: the
#: forward kernel keeps every step's iterates (``atlas_ns_gram_save``: 4 x steps M x M floats per Gram
#: matrix, kept for the backward), so the backward kernel runs only the reverse pass (the saved-iterate
#: backward otherwise first runs the forward steps again: ~18 of its ~56 chained 64 x 64 products, in the
#: step's largest kernel, 196 us a chunk on an H100). ptxas for sm_90a at side 64, tf32x3_split, 4 warps
#: (``benchmarks/kernel_resources.py``): the backward 1,200 wgmma instructions and 4.0 KB spilled a
#: thread recomputing, 816 and 2.9 KB reading the kept iterates; the forward 408 either way. None (the
#: default) = with muon_chunk only (one Gram matrix per weight and chunk: at the Quad-Hybrid's shape 96
#: x 320 KiB a chunk, ~3.9 GB for 127 chunks); per-token Muon has 16x the problems there (~31 GB of
#: kept iterates at 8 x 2048), so it recomputes; True / False = always / never. Measured on an H100
#: (2026-12-05 late, the Quad-Hybrid's muon_chunk layer at 8 x 2048 in CUDA graphs, one process,
#: ``mixers.py --atlas-paths fast_graphed fast_retrieve_after_graphed fast_nssave_graphed``, before this
#: default): 75.9 -> 69.2 ms forward+backward; the recipe trained at 92.3 ms a step with it (the gdn
#: swap 20.05, ratio 0.217, ``quad_atlas.py --atlas-setting NS_SAVE_FWD=True``); its GPU tests
#: (``test_ns_save_fwd_kernels_on_cuda``, ``test_fast_path_on_cuda_muon_chunk[pdl+save]``) passed there
NS_SAVE_FWD: bool | None = None


def _ns_save_fwd(ns_chunk: bool) -> bool:
    """Does the chunk step's Newton-Schulz forward keep its iterates (``NS_SAVE_FWD``)?"""
    return ns_chunk if NS_SAVE_FWD is None else NS_SAVE_FWD


#: Newton-Schulz of all the memory's weights in ONE launch, every Gram matrix zero-padded to the
#: widest side (``_chunk_step``'s ``pad_ns``): None = on CUDA where the batched-matmul form runs
#: (no Triton kernels) and with muon_chunk (not under ``INDUCTOR``'s combo kernels: see there), True /
#: False = always / never. With muon_chunk a chunk has only 32-64 Newton-Schulz problems per side at
#: the Quad-Hybrid's shape, one program each, so a launch is as long as its slowest program (side 64:
#: 52 us forward, 215 us backward for 32 problems, H100) and the side-32 launch (17 / 104 us) rides
#: along in the side-64 one for the price of padding: the quad-shape layer 115.1 -> 100.3 ms (H100,
#: 2026-12-05, combo kernels then; ``gpu_suite.sh atlas_padns``). Per-token Muon has 16x the
#: problems, where padding costs flops and the per-side launches stay.
PAD_NS: bool | None = None


#: Gram sides over NS_TRITON_MAX next to sides within it: False = every side through the
#: batched-matmul form, zero-padded to the largest (one iteration for all weights); True = the
#: sides within it through the Triton kernels, the others through batched matmuls (one
#: iteration per side: 8x fewer flops for a 32-side weight next to a 64-side one)
TRITON_NS_SPLIT = False


def _pad_ns(cuda: bool, triton_ns: bool, ns_chunk: bool) -> bool:
    """``PAD_NS``'s choice for a call: the setting where given, else padded on CUDA where the
    batched-matmul form runs and with muon_chunk, unless the step compiles with combo kernels."""
    if PAD_NS is not None:
        return PAD_NS
    return cuda and (not triton_ns or (ns_chunk and "combo_kernels" not in INDUCTOR_OPTIONS[INDUCTOR]))


def _use_triton_ns(params: Sequence[Tensor], dtype: torch.dtype) -> bool:
    sides = [min(p.shape[-2:]) for p in params]
    fits = (min if TRITON_NS_SPLIT else max)(sides) <= NS_TRITON_MAX
    return (TRITON_NS and triton is not None and params[0].is_cuda and dtype == torch.float32
            and fits and all(_ns_triton_works(_ns_side(m)) for m in sides if m <= NS_TRITON_MAX))


def _ns_side(m: int) -> int:
    """The side a Gram matrix of side m is zero-padded to for the Triton kernels."""
    return max(16, next_pow2(m))


#: the Triton kernels' warps a program: None = by side (``_ns_warps``), else this many at every side
NS_WARPS: int | None = None

#: how the saved-iterate backward reads its saved iterates transposed (``_ns_gram_bwd_saved_kernel``'s
#: TRANS): "load" (strided loads), "store" (written transposed, loaded as written), "regs"
#: (transposed in registers). Timed on an H200 (2026-12-05 night, the Quad-Hybrid's muon_chunk
#: layer in CUDA graphs, one process, ``gpu_suite.sh atlas_ns_layout``): 84.6 / 85.4 / 84.8 ms, and
#: 93.5 with 8 warps (``NS_WARPS``): the kernel waits on its chain of products, not on these reads
NS_BWD_TRANS = "load"


def _ns_warps(M: int) -> int:
    """The Triton kernels' warps at padded side M (``NS_WARPS`` where set). sm_90, tf32x3: the forward
    spills nothing at 16 / 2 warps or 32 / 8 warps and 196 B at 64 / 4 warps (one warpgroup: wgmma);
    the backward: see NS_BWD_SAVED (``benchmarks/kernel_resources.py`` reports them)."""
    if NS_WARPS is not None:
        return NS_WARPS
    return 2 if M <= 16 else 8 if M <= 32 else 4


def _ns_saved_bwd(M: int) -> bool:
    """Does the Newton-Schulz backward at padded side M take the saved-iterate kernel? (At 64 the
    recomputing one needs more shared memory than an SM has: see NS_BWD_SAVED.)"""
    return NS_BWD_SAVED or M > 32


#: the Triton kernels' check on this GPU per (padded side, saved-iterate backward, precision, warps,
#: the backward's transposed reads, the forward keeping its iterates)
_NS_CHECKED: dict[tuple[int, bool, str, int, str, bool], bool] = {}


def _ns_triton_works(M: int) -> bool:
    """Do the Triton kernels at padded side M, as the module's settings launch them, match the
    PyTorch form on this GPU? Checked once per side, backward kernel and precision; a failed
    check says so in one line, and the PyTorch form runs there. The first call that needs a
    side runs eagerly (the training step's eager first step, or the warm-up passes before a
    CUDA-graph capture); a side first met inside a capture cannot be checked there (no kernel
    may launch) and takes the PyTorch form, with a line saying so."""
    key = (M, _ns_saved_bwd(M), NS_TRITON_PRECISION, _ns_warps(M), NS_BWD_TRANS,
           NS_SAVE_FWD is not False and _ns_saved_bwd(M))
    if key not in _NS_CHECKED:
        if dispatch.capturing():
            print(f"atlas: Newton-Schulz Triton kernels at side {M} not checked before this CUDA-graph capture: "
                  "batched matmuls in this graph", file=sys.stderr, flush=True)
            return False
        with dispatch.side_check():  # (inside a checkpointed block's forward: core/recompute.py)
            why = _ns_check(M, key[2])
        _NS_CHECKED[key] = why is None
        if why is not None:
            print(f"atlas: Newton-Schulz Triton kernels at side {M} unavailable ({why}): batched matmuls instead",
                  file=sys.stderr, flush=True)
    return _NS_CHECKED[key]


def _ns_check(M: int, precision: str) -> str | None:
    """Why the Triton kernels at padded side M disagree with the PyTorch form here (None: they
    agree, forward and backward, within the precision's tolerance; the PyTorch form in float32)."""
    try:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(6, M - M // 4, M + 8, generator=g)
        X = X / X.norm(dim=(-2, -1), keepdim=True)
        A = F.pad(X @ X.mT, (0, M // 4, 0, M // 4)).cuda()
        dR = torch.randn(6, M, M, generator=g).cuda()
        Ar = A.clone().requires_grad_()
        with dispatch.full_float32():
            R = ns_gram_factor(Ar, 5)
            (dA,) = torch.autograd.grad(R, Ar, dR)
        tol = 3e-2 if precision == "tf32" else 1e-4
        errs = (max_rel_err(_ns_gram_launch(A, None, 5, precision), R),
                max_rel_err(_ns_gram_launch(A, dR, 5, precision), dA))
        if NS_SAVE_FWD is not False and _ns_saved_bwd(M):  # the forward keeping its iterates, the backward from them
            R_s, W = _ns_save_launch(A, 5, precision)
            errs += (max_rel_err(R_s, R), max_rel_err(_ns_bwd_saved_launch(W, dR, 5, precision), dA))
        return None if max(errs) < tol else f"relative error {max(errs):.2g} over {tol:g}"
    except Exception as e:  # noqa: BLE001 - any compile / launch failure: use the PyTorch form
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"{type(e).__name__}: {first}"


def _ns_gram_launch(A: Tensor, dR: Tensor | None, steps: int, precision: str | None = None) -> Tensor:
    """R (``dR is None``) or dA for A [B, m, m], float32, through the Triton kernels (m is
    zero-padded to a power of two >= 16; the padding stays zero, see ``_chunk_step``), at
    ``precision`` (default ``NS_TRITON_PRECISION``)."""
    B, m = A.shape[0], A.shape[-1]
    M = _ns_side(m)
    # the kernels read [B, M, M] contiguous: a tensor already so is passed as it is (F.pad by zero
    # copies: three copy kernels a chunk step for muon_chunk's padded launch, whose sides are M)
    pad = functools.partial(_ns_pad, M=M)
    out = torch.empty(B, M, M, device=A.device, dtype=torch.float32)
    a, b, c = NS_COEFFS
    warps = _ns_warps(M)
    prec = precision or NS_TRITON_PRECISION
    if dR is None:
        _ns_gram_fwd_kernel[(B,)](pad(A), out, M=M, STEPS=steps, a=a, b=b, c=c, PREC=prec, num_warps=warps)
    elif _ns_saved_bwd(M):
        scratch = torch.empty(B, 4, steps, M, M, device=A.device, dtype=torch.float32)
        _ns_gram_bwd_saved_kernel[(B,)](pad(A), pad(dR), out, scratch, M=M, STEPS=steps, a=a, b=b, c=c, PREC=prec,
                                        TRANS=NS_BWD_TRANS, num_warps=warps)
    else:
        _ns_gram_bwd_kernel[(B,)](pad(A), pad(dR), out, M=M, STEPS=steps, a=a, b=b, c=c, PREC=prec, num_warps=warps)
    return _ns_unpad(out, m)


def _ns_pad(t: Tensor, M: int) -> Tensor:
    """t [B, m, m] zero-padded to [B, M, M], contiguous (as it is where m == M)."""
    m = t.shape[-1]
    return t.contiguous() if M == m else F.pad(t, (0, M - m, 0, M - m)).contiguous()


def _ns_unpad(out: Tensor, m: int) -> Tensor:
    """The leading [B, m, m] block of a kernel's [B, M, M] result (itself where m == M)."""
    return out[:, :m, :m].contiguous() if out.shape[-1] != m else out


def _ns_save_launch(A: Tensor, steps: int, precision: str | None = None) -> tuple[Tensor, Tensor]:
    """R and the steps' iterates W [B, 4, steps, M, M] (M the padded side) for A [B, m, m] through
    ``_ns_gram_fwd_save_kernel`` (``NS_SAVE_FWD``)."""
    B, m = A.shape[0], A.shape[-1]
    M = _ns_side(m)
    out = torch.empty(B, M, M, device=A.device, dtype=torch.float32)
    W = torch.empty(B, 4, steps, M, M, device=A.device, dtype=torch.float32)
    a, b, c = NS_COEFFS
    _ns_gram_fwd_save_kernel[(B,)](_ns_pad(A, M), out, W, M=M, STEPS=steps, a=a, b=b, c=c,
                                   PREC=precision or NS_TRITON_PRECISION, TRANS=NS_BWD_TRANS, num_warps=_ns_warps(M))
    return _ns_unpad(out, m), W


def _ns_bwd_saved_launch(W: Tensor, dR: Tensor, steps: int, precision: str | None = None) -> Tensor:
    """dA [B, m, m] from dR and the iterates ``_ns_save_launch`` kept, through
    ``_ns_gram_bwd_from_saved_kernel``."""
    B, m, M = dR.shape[0], dR.shape[-1], W.shape[-1]
    out = torch.empty(B, M, M, device=dR.device, dtype=torch.float32)
    _, b, c = NS_COEFFS
    _ns_gram_bwd_from_saved_kernel[(B,)](W, _ns_pad(dR, M), out, M=M, STEPS=steps, b=b, c=c,
                                         PREC=precision or NS_TRITON_PRECISION, TRANS=NS_BWD_TRANS,
                                         num_warps=_ns_warps(M))
    return _ns_unpad(out, m)


@torch.library.custom_op("hymba::atlas_ns_gram", mutates_args=())
def atlas_ns_gram(A: Tensor, steps: int) -> Tensor:
    """``ns_gram_factor(A, steps)`` as one op (Triton on CUDA, else PyTorch); A [B, m, m]
    float32 with m <= ``NS_TRITON_MAX`` on CUDA (the chunk step calls it only then)."""
    if A.is_cuda and triton is not None:
        return _ns_gram_launch(A, None, steps)
    with torch.no_grad():
        return ns_gram_factor(A, steps)


@torch.library.custom_op("hymba::atlas_ns_gram_bwd", mutates_args=())
def atlas_ns_gram_bwd(A: Tensor, dR: Tensor, steps: int) -> Tensor:
    """The vector-Jacobian product of ``atlas_ns_gram``: dA from dR."""
    if A.is_cuda and triton is not None:
        return _ns_gram_launch(A, dR, steps)
    return _ns_gram_vjp(A, dR, steps)


def _ns_gram_vjp(A: Tensor, dR: Tensor, steps: int) -> Tensor:
    """The reverse mode of ``ns_gram_factor`` written out (what the Triton backward kernel
    does, in batched matmuls): with ``Q_k = aI + bA_k + cA_k²``, ``R_{k+1} = Q_k R_k`` and
    ``A_{k+1} = (Q_k A_k) Q_k``, walk the steps backwards accumulating dQ_k, then dA_k."""
    return _ns_reverse(_ns_iterates(A, steps)[1], dR, steps)


def _ns_iterates(A: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``ns_gram_factor(A, steps)`` and its steps' iterates ``W`` [B, 4, steps, m, m]: A_k, Q_k,
    R_k (R_0 = I) and T_k = Q_k A_k (the last step's T unused, zero), as the Triton kernels keep them."""
    a, b, c = NS_COEFFS
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    W = A.new_zeros(A.shape[0], 4, steps, *A.shape[1:])
    R = eye
    for k in range(steps):
        Q = torch.baddbmm(torch.add(a * eye, A, alpha=b), A, A, alpha=c)
        W[:, 0, k], W[:, 1, k], W[:, 2, k] = A, Q, R
        R = Q if k == 0 else torch.bmm(Q, R)
        if k < steps - 1:
            W[:, 3, k] = T = torch.bmm(Q, A)
            A = torch.bmm(T, Q)
    return R, W


def _ns_reverse(W: Tensor, dR: Tensor, steps: int) -> Tensor:
    """dA_0 from dR through the steps whose iterates ``_ns_iterates`` returned."""
    _, b, c = NS_COEFFS
    gR, gA = dR, None
    for k in reversed(range(steps)):
        A, Q, R, T = W[:, 0, k], W[:, 1, k], W[:, 2, k], W[:, 3, k]
        if k > 0:  # R_{k+1} = Q_k R_k
            gQ = torch.bmm(gR, R.mT)
            gR = torch.bmm(Q.mT, gR)
        else:
            gQ = gR
        if gA is not None:  # A_{k+1} = T_k Q_k
            gT = torch.bmm(gA, Q.mT)
            gQ = gQ + torch.bmm(T.mT, gA) + torch.bmm(gT, A.mT)
            gA = torch.bmm(Q.mT, gT)
        else:
            gA = torch.zeros_like(A)
        gA = gA + b * gQ + c * (torch.bmm(gQ, A.mT) + torch.bmm(A.mT, gQ))
    return gA


@atlas_ns_gram.register_fake
def _(A: Tensor, steps: int) -> Tensor:
    return A.new_empty(A.shape)  # contiguous whatever A's strides, as ``_ns_gram_launch`` writes it


@atlas_ns_gram_bwd.register_fake
def _(A: Tensor, dR: Tensor, steps: int) -> Tensor:
    return A.new_empty(A.shape)


def _ns_gram_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(inputs[0])
    ctx.steps = inputs[1]


def _ns_gram_backward(ctx, dR):  # noqa: ANN001, ANN202
    (A,) = ctx.saved_tensors
    return atlas_ns_gram_bwd(A, dR.contiguous(), ctx.steps), None


atlas_ns_gram.register_autograd(_ns_gram_backward, setup_context=_ns_gram_setup)


@torch.library.custom_op("hymba::atlas_ns_gram_save", mutates_args=())
def atlas_ns_gram_save(A: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``atlas_ns_gram`` that also returns its steps' iterates (``NS_SAVE_FWD``), which its backward
    reads instead of running the steps again: ``_ns_save_launch`` on CUDA, ``_ns_iterates`` else."""
    if A.is_cuda and triton is not None:
        return _ns_save_launch(A, steps)
    with torch.no_grad():
        return _ns_iterates(A, steps)


@torch.library.custom_op("hymba::atlas_ns_gram_bwd_saved", mutates_args=())
def atlas_ns_gram_bwd_saved(W: Tensor, dR: Tensor, steps: int) -> Tensor:
    """The vector-Jacobian product of ``atlas_ns_gram_save``: dA from dR and the kept iterates."""
    if W.is_cuda and triton is not None:
        return _ns_bwd_saved_launch(W, dR, steps)
    return _ns_reverse(W, dR, steps)


@atlas_ns_gram_save.register_fake
def _(A: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    M = _ns_side(A.shape[-1]) if A.is_cuda and triton is not None else A.shape[-1]
    return A.new_empty(A.shape), A.new_empty(A.shape[0], 4, steps, M, M)


@atlas_ns_gram_bwd_saved.register_fake
def _(W: Tensor, dR: Tensor, steps: int) -> Tensor:
    return dR.new_empty(dR.shape)


def _ns_save_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(output[1])
    ctx.steps = inputs[1]
    ctx.mark_non_differentiable(output[1])


def _ns_save_backward(ctx, dR, _dW):  # noqa: ANN001, ANN202
    (W,) = ctx.saved_tensors
    return atlas_ns_gram_bwd_saved(W, dR.contiguous(), ctx.steps), None


atlas_ns_gram_save.register_autograd(_ns_save_backward, setup_context=_ns_save_setup)


#: compile the loop body with ``torch.compile`` (fullgraph, static shapes) on the fast path
COMPILE_CHUNK_STEP = True
#: the factored Gram matrices / update of ``_chunk_step`` for wide weights: None = per weight by
#: flop count (``_factor_gram``), True = every wide weight, False = never (every token's momentum
#: formed). Off by default: on an H200 (B 4, T 4096, d 2048, CUDA graphs) the layer took 577.6 ms
#: forward+backward with it (by flop count, i.e. every weight factored) against 550.6 ms without,
#: the step being bound by its Newton-Schulz work and its kernel count there, not by these products
#: (on a CPU, the Quad-Hybrid's memory: 2x faster with it). Not for float32 training: where a
#: token's momentum cancels (new gradients against the decayed momentum) the factored Gram matrix
#: keeps the rounding of its parts, is no longer positive semi-definite, and Newton-Schulz
#: diverges (``test_direct_gram_stays_accurate_when_a_momentum_cancels``: NaN at cancellation 1e-4,
#: the direct form 1e-5 off float64); the Quad-Hybrid recipe's first loss was NaN with it on an H200
FACTOR_GRAM: bool | None = False
#: each chunk's retrieval ``M(phi(q_t); W_n)`` inside its chunk step (``_chunk_step``'s ``n_q``): the
#: chunk's queries go through the memory MLP with its keys, in the same launches; only the chunks
#: after the last update (a partial one) are retrieved after the loop. False: every chunk after the
#: loop at once, from the stacked chunk-start weights (a copy of every chunk's weights, [chunks, N,
#: out, in] each, and in the backward an add per weight and chunk where the two uses' gradients meet:
#: at the Quad-Hybrid's shape, B 8 x 2048, 127 chunks x 32 rows x 55.8k floats, 0.9 GB a copy; the
#: H100 profile of 2026-12-05 night has 388 element-wise adds a pass, ~3 a chunk, 1.8 ms, which by their
#: count are these). Counted on a CPU
#: (``atlas_step_ops.py --atlas-config quad_chunk``) the step itself grows from 88 to 92 operations
#: a chunk (the keys' and queries' rows sliced apart and their gradients joined). On a 2-core CPU
#: (Inductor's CPU backend, the quad-shape muon_chunk layer at 2 x 512, ``mixers.py --device cpu
#: --atlas-paths fast fast_retrieve_after``, two rounds) 485.7 / 443.2 ms forward+backward against
#: 518.4 / 531.7. On an H100 (2026-12-05 late, the same layer at 8 x 2048 in CUDA graphs, one process,
#: ``gpu_suite.sh atlas_owed``) 75.9 ms against 82.4 with every chunk retrieved after the loop (this
#: and the chunk inputs by one unbind took the layer from 85.5 ms the evening before); its GPU tests passed
RETRIEVE_IN_STEP = True
#: chunks per compiled call (1: one graph per chunk; k > 1: k chunks unrolled into one graph,
#: compile time x k, host overhead / k; the remainder runs one chunk per call)
CHUNKS_PER_CALL = 1


def _window_matrix(C: int, c: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[C, C+c-1]: 1 where token t's Omega window covers slot i of the tail-extended chunk
    (token t sits at slot t + c - 1, its window is slots t .. t + c - 1)."""
    t = torch.arange(C, device=device)[:, None]
    i = torch.arange(C + c - 1, device=device)[None]
    return ((i >= t) & (i <= t + c - 1)).to(dtype)


def _chunk_step(
    params: tuple[Tensor, ...], mom: tuple[Tensor, ...], K: Tensor, V: Tensor, gam: Tensor, mix: Tensor,
    lam: Tensor, wu: Tensor, keep: Tensor, ns_steps: int, muon: bool, pad_ns: bool, triton_ns: bool,
    factor: bool | None, ns_chunk: bool = False, bmm32: bool = False, group: bool = False, n_q: int = 0,
) -> tuple[tuple[Tensor, ...], ...]:
    """One chunk of the Atlas update in closed form (see the fast-path notes above).

    params / mom: [N, out, in] each at the chunk start; K [N, C', F], V [N, C', D], gam [N, C']
    (C' = C + c - 1: the window tail, then the chunk). Muon: mix [N, C, C'], lam [N, C] (the
    momentum of token t is ``Σ_i mix[t, i] ∇_i + lam[t] S_0``), wu [N, C] the update weights
    ``η_t Π_{s>t} α_s``. SGD: mix [N, 2, C'], lam [N, 2] give the new momentum (row 0) and the
    whole update ``Σ_t wu_t S_t`` (row 1) directly. Muon with ``ns_chunk``: mix [N, 2, C'], lam
    [N, 2] give ``Σ_t wu_t S_t`` (row 0, Newton-Schulz's one input) and the new momentum (row 1),
    wu [N, 1] = ``Σ_t wu_t``. keep [N] = ``Π_t α_t``. ``bmm32``: the batched matmuls of the direct
    form through ``kernels.bmm32`` (``BMM``), else torch's; ``group`` (with it): the memory's weights'
    momenta, Gram matrices and updates one grouped launch per phase (``GROUP_GEMMS``). ``n_q`` > 0:
    K's last ``n_q`` rows are the chunk's queries, which go through the memory MLP with the keys (the
    same chunk-start weights, the same launches), and the step returns their retrieval
    ``M(phi(q); W_n)`` [N, n_q, D] as a third result (``RETRIEVE_IN_STEP``).
    """
    P, *Ls = params
    Cp = V.shape[1]
    hs, zs, h, z = [K], [], K, K
    # grouped: the first layer and the linear residual both read the keys, one launch for the two
    first = _bmms([(K, Ls[0].mT), (K, P.mT)], bmm32, group) if bmm32 and group and Ls else None
    for i, W in enumerate(Ls):  # the memory MLP on the keys (and queries), at the chunk-start weights
        z = first[0] if first is not None and i == 0 else _bmm(h, W.mT, bmm32, group)
        if i < len(Ls) - 1:
            zs.append(z)
            h = F.silu(z)
            hs.append(h)
    out = z + first[1] if first is not None else _baddbmm(z, K, P.mT, bmm32)
    y = None
    if n_q:  # the queries' rows: their retrieval; the keys' rows: the inner loss's gradient factors
        y, out = out[:, Cp:], out[:, :Cp]
        K, zs, hs = K[:, :Cp], [z[:, :Cp] for z in zs], [h[:, :Cp] for h in hs]
    e = (2.0 * gam)[..., None] * (out - V)  # ∂/∂M of γ_i ||M(phi(k_i)) - v_i||²
    # per-token gradient of weight j = outer product a_i b_iᵀ of the factors fac[j] = (a, b)
    fac: list[tuple[Tensor, Tensor]] = [(e, K)] * (len(Ls) + 1)
    delta = e
    for i in range(len(Ls), 0, -1):  # fac[i] belongs to Ls[i - 1]
        fac[i] = (delta, hs[i - 1])
        if i > 1:
            sg = torch.sigmoid(zs[i - 2])  # σ'(z) = s (1 + z (1 - s)), s = sigmoid(z), for σ = SiLU
            delta = _bmm(delta, Ls[i - 1], bmm32, group) * (sg * (1 + zs[i - 2] * (1 - sg)))
    N, R, Cp = mix.shape
    kp = keep[:, None, None]
    lam4 = lam[:, :, None, None]
    Lt = [mix[:, :, None, :] * a.mT[:, None] for a, _ in fac]  # per weight [N, R, out, C']

    def momenta(items: list[tuple[Tensor, Tensor, Tensor]], lam4: Tensor) -> list[Tensor]:
        """S_t = L_t b + λ_t S_0 [N, r, out, in] of every (L, b, S0)."""
        shapes = [(S0.shape[-2], S0.shape[-1], L.shape[1]) for L, _, S0 in items]
        lhs = [(L.reshape(N, r * o, Cp), b) for (L, b, _), (o, _, r) in zip(items, shapes)]
        bias = [(lam4 * S0[:, None]).reshape(N, r * o, n) for (_, _, S0), (o, n, r) in zip(items, shapes)]
        out = ([c + P for c, P in zip(bias, _bmms(lhs, bmm32, group))] if bmm32 else
               [torch.baddbmm(c, L, b) for c, (L, b) in zip(bias, lhs)])
        return [S.view(N, r, o, n) for S, (o, n, r) in zip(out, shapes)]

    if not muon:  # mix rows: the new momentum, the whole update
        Ss = momenta([(L, b, S0) for L, (_, b), S0 in zip(Lt, fac, mom)], lam4)
        res = tuple(kp * W - S[:, 1] for W, S in zip(params, Ss)), tuple(S[:, 0].contiguous() for S in Ss)
        return (*res, y) if n_q else res
    rows, lam_rows, end_m = Lt, lam4, []
    if ns_chunk:  # row 0, the weighted sum, is the one "token" NS5 sees; row 1 is the new momentum
        Lt, lam4, R = [L[:, :1] for L in Lt], lam4[:, :1], 1
    # Token t's momentum of a weight [o, n] is S_t = L_t B + λ_t S_0 with L_t = aᵀ diag(mix_t)
    # [o, C'] and B = b [C', n] (the chunk's rank-1 gradient factors). NS5 of every S_t runs on
    # its Gram matrix G_t = S_t S_tᵀ (short side first): X_0 = S / ||S||_F has Gram G / tr G,
    # and NS5(S_t) = R_t X_0 = R_t S_t / ||S_t||_F, so the normalised momenta are never formed.
    # Two ways to the Gram matrices and the update (``factor``; default ``FACTOR_GRAM``, direct):
    # * direct: every S_t formed ([C, o, n] per row), G_t = X_t X_tᵀ;
    # * factored (o <= n): G_t = L_t (B Bᵀ) L_tᵀ + λ_t (H_t + H_tᵀ) + λ_t² S_0 S_0ᵀ with
    #   H_t = L_t (B S_0ᵀ), and the update Σ_t w_t R_t S_t = (Σ_t w_t R_t L_t) B + (Σ_t w_t λ_t R_t) S_0:
    #   only [C', C'], [C', o] and [o, o] products per token, no S_t at all (for the memory's
    #   feature-wide weights, n = feature dim >> C' = C + c - 1, several times fewer flops
    #   and no [C, o, n] tensors through the backward). Equal in exact arithmetic.
    Ss, Xs, Gs = [], [], []  # per weight: the momenta, short side first (None: factored), Gram matrices
    factored = [o <= n and (_factor_gram(o, n, R, Cp) if factor is None else factor) for o, n in
                (S0.shape[-2:] for S0 in mom)]
    direct = iter(momenta([(L2, b, S0) for L2, (_, b), S0, f in zip(rows, fac, mom, factored) if not f], lam_rows))
    for L, S0, (_, b), L2, f in zip(Lt, mom, fac, rows, factored):
        o, n = S0.shape[-2:]
        if f:
            Lf = L.reshape(N, R * o, Cp)
            LBL = torch.matmul(torch.bmm(Lf, torch.bmm(b, b.mT)).view(N, R, o, Cp), L.mT)
            H = torch.bmm(Lf, torch.bmm(b, S0.mT)).view(N, R, o, o)
            Gs.append(LBL + lam4 * (H + H.mT) + lam4.square() * torch.bmm(S0, S0.mT)[:, None])
            Ss.append(None)
            Xs.append(None)
            if ns_chunk:
                end_m.append(torch.baddbmm(lam[:, 1, None, None] * S0, L2[:, 1], b))
        else:  # every mixing row's momentum in one matmul (ns_chunk: the weighted sum, the new momentum)
            S = next(direct)
            if ns_chunk:
                end_m.append(S[:, 1].contiguous())
                S = S[:, :1]
            X = S.mT.contiguous() if o > n else S  # [N, C, m, n'], m <= n'
            Gs.append(None)
            Ss.append(S)
            Xs.append(X)
    grams = iter(_grams([X for X in Xs if X is not None], bmm32, group))
    Gs = [next(grams) if G is None else G for G in Gs]
    # ``pad_ns``: all weights share ONE batched iteration, their Gram matrices zero-padded to the
    # largest short side (a zero block stays zero through the iteration, so the leading m×m block
    # of R is the unpadded result): a third of the launches, for the batched-matmul NS on a GPU;
    # otherwise one iteration per distinct short side: fewer flops, for a CPU and for the Triton
    # kernels (one launch per side; a side over NS_TRITON_MAX, when triton_ns is forced, takes the
    # batched-matmul form). The traces and both scalings run once per group on its stacked, padded
    # Gram matrices (padding adds nothing to a trace): one kernel each for all its weights, forward
    # and backward, instead of one per weight (the CPU proxy ``atlas_step_ops.py --atlas-config
    # quad_chunk``: 92 -> 77 operations a chunk; the Quad-Hybrid's muon_chunk layer at 8 x 2048 in
    # CUDA graphs on an H100, 2026-12-06, one process: 68.9 -> 68.3 ms forward+backward).
    Rws: list[Tensor] = [Gs[0]] * len(Gs)  # per weight: R_t w_t / ||S_t||_F [N, R, m, m]
    groups = [list(range(len(Gs)))] if pad_ns else [[j for j in range(len(Gs)) if Gs[j].shape[-1] == m]
                                                    for m in dict.fromkeys(G.shape[-1] for G in Gs)]
    for js in groups:
        M = max(Gs[j].shape[-1] for j in js)
        Gp = torch.cat([_ns_pad(Gs[j].flatten(0, -3), M) for j in js])
        inv = 1.0 / (Gp.diagonal(dim1=-2, dim2=-1).sum(-1) + 1e-14)  # 1 / (tr G + eps²) = 1 / (||S||_F² + eps²)
        A = Gp * inv[:, None, None]
        if not (triton_ns and M <= NS_TRITON_MAX):
            Rg = ns_gram_factor(A, ns_steps)
        elif _ns_save_fwd(ns_chunk) and A.requires_grad and _ns_saved_bwd(_ns_side(M)):  # the backward reads them
            Rg = atlas_ns_gram_save(A, ns_steps)[0]
        else:
            Rg = atlas_ns_gram(A, ns_steps)
        Rg = Rg * (wu.reshape(-1).repeat(len(js)) * inv.sqrt())[:, None, None]
        for j, Rj in zip(js, Rg.split(N * R)):
            m = Gs[j].shape[-1]
            Rws[j] = Rj.view(N, R, M, M)[..., :m, :m]
    new_p, new_m = [], []
    # Σ_t w_t R_t Y_t as one matmul: R_t is symmetric (a polynomial in G_t), so the
    # [m, (t, r)] left factor is the transposed [(t, r), m] view of the scaled R
    lefts = [Rw.reshape(N, R * Rw.shape[-1], Rw.shape[-1]).mT for Rw in Rws]
    upds = iter(_bmms([(left, X.reshape(N, left.shape[-1], -1)) for left, X in zip(lefts, Xs) if X is not None],
                      bmm32, group))  # left [N, m, R m]
    for W, S0, L, (_, b), S, X, Rw, left in zip(params, mom, Lt, fac, Ss, Xs, Rws, lefts):
        o, n = W.shape[-2:]
        if X is None:  # factored
            upd = torch.baddbmm(torch.bmm((Rw * lam4).sum(1), S0), torch.bmm(left, L.reshape(N, R * o, Cp)), b)
            new_m.append(torch.baddbmm(lam[:, -1, None, None] * S0, L[:, -1], b))
        else:
            upd = next(upds)
            upd = upd.mT if o > n else upd
            new_m.append(S[:, -1].contiguous())
        new_p.append(kp * W - upd)
    res = tuple(new_p), tuple(end_m if ns_chunk else new_m)
    return (*res, y) if n_q else res


#: the chunk step's batched matmuls (its default, direct form's) on CUDA: "bmm32" (``kernels.bmm32``'s
#: Triton kernel: three TF32 tensor-core products of split operands per matmul, float32 accuracy;
#: its backward the same kernel) or "cublas" (``torch.bmm`` / ``baddbmm`` in float32: cuBLAS's
#: CUDA-core kernels with 32 x 32 tiles at these shapes). With TF32 allowed (``hymba train --tf32``)
#: the GEMMs stay cuBLAS's, in TF32 as asked; before sm_80 (no TF32 tensor cores) and on a CPU
#: always torch's. Measured on an H100
#: (2026-12-05, ``mixers.py --atlas-paths fast_combo_cublas_graphed fast_graphed --atlas-config
#: quad_chunk``, then named otherwise; the Quad-Hybrid's muon_chunk layer at 8 x 2048 in CUDA graphs, one process):
#: 127.7 ms forward+backward with cuBLAS, 115.3 with bmm32; so bmm32
BMM = "bmm32"

#: with bmm32: the memory's weights' products of one phase of the chunk step (their momenta, Gram
#: matrices, updates; forward and backward) in one grouped launch (``kernels.bmm32.bmm_f32_group``)
#: instead of one launch per weight: at the Quad-Hybrid's shape 3 products of 32-64 programs each,
#: which fill a third of an H100's SMs one by one. On by default (it applies only where bmm32 does):
#: the Quad-Hybrid's muon_chunk layer at 8 x 2048 in CUDA graphs 102.0 -> 92.3 ms forward+backward
#: (H100, 2026-12-05 evening, ``mixers.py --atlas-paths fast_graphed fast_group_graphed``, one
#: process, before this default); its GPU test (``test_atlas_fast_path_on_cuda_with_bmm32``: eager
#: and compiled step against float64) passed there. Since (not yet timed), the memory MLP's products
#: go through the grouped op too: its first layer and linear residual, which both read the keys, in
#: one launch, the others as groups of one, so that each one's backward is one launch for both
#: gradients (``hymba::bmm_f32``'s backward is two)
GROUP_GEMMS = True

#: with grouped GEMMs: a problem of few output tiles and a long K loop split over several programs
#: per tile (``kernels.bmm32.split_plan``; forward and backward): at the Quad-Hybrid's shape the Gram
#: matrices, the memory MLP's first layer and the backward's gradients of the momenta's left factors
#: reduce over the 560 feature columns into one tile per memory row (the Gram launch: 96 programs of
#: <= 18 K steps -> 256 of <= 6). Measured on an H100 (2026-12-06, the Quad-Hybrid's muon_chunk
#: layer at 8 x 2048 in CUDA graphs, one process, ``mixers.py --atlas-paths fast_graphed
#: fast_splitk_graphed`` before this default): 68.9 -> 67.7 ms forward+backward; with the stacked
#: Newton-Schulz scalings too 66.8 against 68.8 (the d 2048 layer: 90.3 -> 89.6); its GPU tests
#: (``test_atlas_fast_path_on_cuda_with_split_k``, ``test_bmm_kernel_on_cuda``) passed there
SPLIT_K = True


def _bmm(a: Tensor, b: Tensor, bmm32: bool, group: bool = False) -> Tensor:
    """a @ b batched; ``group`` (with bmm32): as a grouped op of one product, whose backward is then
    one launch for both gradients (``hymba::bmm_f32``'s is two)."""
    if bmm32 and group:
        return bmm_f32_group([a], [b], split_k=SPLIT_K)[0]
    return bmm_f32(a, b) if bmm32 else torch.bmm(a, b)


def _baddbmm(c: Tensor, a: Tensor, b: Tensor, bmm32: bool) -> Tensor:
    return c + bmm_f32(a, b) if bmm32 else torch.baddbmm(c, a, b)


def _bmms(pairs: list[tuple[Tensor, Tensor]], bmm32: bool, group: bool) -> list[Tensor]:
    """``_bmm`` of every pair; with ``group`` (and bmm32) one grouped launch per ``GROUP_MAX`` pairs."""
    if bmm32 and group:
        return list(bmm_f32_group([a for a, _ in pairs], [b for _, b in pairs], split_k=SPLIT_K))
    return [_bmm(a, b, bmm32) for a, b in pairs]


def _grams(Xs: list[Tensor], bmm32: bool, group: bool) -> list[Tensor]:
    """X Xᵀ for every X [N, R, m, n]."""
    if not bmm32:
        return [torch.matmul(X, X.mT) for X in Xs]
    flat = [X.flatten(0, 1) for X in Xs]
    return [G.view(*X.shape[:-1], X.shape[-2]) for G, X in zip(_bmms([(f, f.mT) for f in flat], bmm32, group), Xs)]


def _factor_gram(o: int, n: int, C: int, Cp: int) -> bool:
    """Whether the factored Gram / update of ``_chunk_step`` (a wide weight [o, n], C tokens, C'
    gradient factors) takes fewer multiply-adds than forming every token's momentum."""
    direct = C * o * Cp * n + 2 * C * o * o * n  # S_t, X_t X_tᵀ, Σ_t R_t X_t
    factored = C * o * Cp * Cp + 3 * C * o * o * Cp + Cp * Cp * n + 3 * Cp * o * n + 2 * o * o * n
    return factored < direct


def _chunk_steps(
    params: tuple[Tensor, ...], mom: tuple[Tensor, ...], K: Tensor, V: Tensor, gam: Tensor, mix: Tensor,
    lam: Tensor, wu: Tensor, keep: Tensor, ns_steps: int, muon: bool, pad_ns: bool, triton_ns: bool,
    factor: bool | None, ns_chunk: bool = False, bmm32: bool = False, group: bool = False, n_q: int = 0,
) -> tuple[list[tuple[Tensor, ...]], ...]:
    """``K.shape[0]`` consecutive chunk steps (the per-chunk arguments stacked on dim 0): the
    weights and momentum after each (and with ``n_q``, each chunk's retrieval). Compiled as one
    graph (``CHUNKS_PER_CALL``): one call's host overhead and one autograd node per group of
    chunks, fusion across chunk borders."""
    Ws, Ss, ys = [], [], []
    for i in range(K.shape[0]):
        out = _chunk_step(params, mom, K[i], V[i], gam[i], mix[i], lam[i], wu[i], keep[i], ns_steps, muon,
                          pad_ns, triton_ns, factor, ns_chunk, bmm32, group, n_q)
        params, mom = out[:2]
        Ws.append(params)
        Ss.append(mom)
        ys.extend(out[2:])
    return (Ws, Ss, ys) if n_q else (Ws, Ss)


#: Inductor options of the compiled chunk step, by name (``INDUCTOR``): "default" (Inductor's own);
#: "combo" (``combo_kernels``: independent kernels of the step, e.g. the same element-wise work on
#: the memory's weights, horizontally fused into one launch); "gemm" (``max_autotune_gemm`` with
#: Triton templates next to cuBLAS: benchmarked GEMM kernels with their neighbours' element-wise work
#: fused in; compiles for minutes; not measured); "combo_gemm" both. The step is launch-bound (~136
#: kernels a chunk at the Quad-Hybrid's shape). Measured on an H100 (2026-12-05, the Quad-Hybrid's
#: muon_chunk layer at 8 x 2048 in CUDA graphs, one process, cuBLAS GEMMs): 133.1 ms forward+backward
#: with "default", 127.8 with "combo" (tested equal to the reference on CUDA then). But with the
#: padded Newton-Schulz launch (``PAD_NS``, muon_chunk's default since) the step compiled with combo
#: kernels gave wrong results on the same H100 (2026-12-05 evening, ``test_fast_path_on_cuda_muon_chunk``:
#: gradients 2-6 relative off the float64 reference, end weights 1.7e-2; default Inductor and eager
#: within tolerance), cause not found. So "default"; combo stays a benchmark setting, and under it
#: ``PAD_NS``'s default keeps one launch per side (the form that passed)
INDUCTOR_OPTIONS: dict[str, dict[str, object]] = {
    "default": {},
    "combo": {"combo_kernels": True},
    "gemm": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
    "combo_gemm": {"combo_kernels": True, "max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
    # combo kernels restricted, to find what went wrong (``atlas_check.py --inductor``): element-wise
    # kernels only / kernels of one size only
    "combo_pointwise": {"combo_kernels": True, "combo_kernels_pointwise_only": True},
    "combo_same_size": {"combo_kernels": True, "combo_kernel_allow_mixed_sizes": 0},
    # Programmatic Dependent Launch (Inductor emits it for sm_90 on, nothing before): each Inductor
    # kernel launched so that it may start while its predecessor finishes; it waits
    # (griddepcontrol.wait) before its first access to what the previous kernel writes, and every
    # kernel waits before it lets its own successor start, so an earlier kernel's results are
    # complete by then too; our Triton GEMM and Newton-Schulz kernels launch as before. Off by
    # default in PyTorch. Measured on an H100 (2026-12-05 night, the Quad-Hybrid's muon_chunk layer
    # at 8 x 2048 in CUDA graphs, one process, ``mixers.py --atlas-paths fast_graphed fast_pdl_graphed``
    # before this default): 88.2 -> 85.5 ms forward+backward; ``test_fast_path_on_cuda_muon_chunk[pdl]``
    # (compiled step against float64) passed there
    "pdl": {"triton.enable_pdl": True},
}
#: the chunk step's Inductor options (a name of ``INDUCTOR_OPTIONS``): "pdl" (see there; on a CPU or
#: before sm_90 it is Inductor's defaults)
INDUCTOR = "pdl"


#: the muon_chunk chunk step as ten Triton launches, five a direction, its backward written by hand
#: (``kernels.atlas_fused``) where it applies (``atlas_fused.applies``: depth-2 memory, retrieval in
#: the step, float32, sides <= 64) on CUDA: True = there (default since 2026-12-06), False = never (the
#: compiled step). Checked once per shape against the eager step (``_fused``); a disagreement or a
#: failed launch is said once and the unfused (compiled) step runs from then on. Measured on an H100
#: (2026-12-06, fused and unfused in one process each): one chunk step forward+backward in a CUDA graph
#: (``benchmarks/atlas_fused_bench.py``) 522.7 us against 604.9 at the Quad-Hybrid's memory (32 rows),
#: 227.7 against 437.5 at the d 2048 layer's (64 rows); the d 2048 layer (B 4 x 4096, CUDA graphs,
#: ``mixers.py --atlas-paths fast_unfused_graphed fast_graphed --atlas-config bench_chunk``) 47.4 ms
#: against 90.1, 6.95x a graphed gdn layer's 6.83; the Quad-Hybrid recipe's step 78.27 ms (91.25 before
#: backward 1 went back to the forward's tiles and only 1 / tr G was kept). A first form, one program per
#: row and direction, was 268 / 1,574 us a chunk forward / forward+backward (H100)
FUSED_STEP = True

#: why the fused chunk step is off in this process (it disagreed with the eager step, or failed)
fused_error: str | None = None


def _fused(args: tuple, fallback):  # noqa: ANN001, ANN202
    """``atlas_fused.fused_chunk_step(*args)``, checked at its first call per shape against the eager
    step like a compiled step (``_first_call_disagreement``; not inside a CUDA-graph capture); if they
    disagree or the kernels fail, that is said once and ``fallback(*args)`` runs from then on."""
    global fused_error
    from .atlas_fused import fused_chunk_step  # here: atlas_fused's kernels call this module's Triton helpers

    if fused_error is None:
        try:
            why = _first_call_disagreement(fused_chunk_step, _chunk_step, args)
            if why is not None:
                raise RuntimeError(why)
            return fused_chunk_step(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a Triton compile / launch failure or the disagreement
            fused_error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            warnings.warn(f"atlas fast path: the fused chunk step is off ({fused_error}); the unfused step "
                          "runs from now on", stacklevel=2)
    return fallback(*args)


#: the fast path's module settings a benchmark may change for a run (``settings``): name -> the
#: values it takes (a tuple of choices, or ``int`` for a positive integer)
SETTINGS: dict[str, tuple | type] = {
    "COMPILE_CHUNK_STEP": (True, False), "TRITON_NS": (True, False), "CHUNKS_PER_CALL": int,
    "NS_TRITON_PRECISION": ("tf32x3_split", "tf32x3", "tf32", "ieee", "bf16x3", "bf16x6"),
    "FACTOR_GRAM": (None, True, False),
    "TRITON_NS_SPLIT": (True, False), "NS_BWD_SAVED": (True, False), "NS_TRITON_MAX": (16, 32, 64),
    "INDUCTOR": tuple(INDUCTOR_OPTIONS), "BMM": ("cublas", "bmm32"), "PAD_NS": (None, True, False),
    "CHECK_COMPILED_STEP": (True, False), "GROUP_GEMMS": (True, False), "SPLIT_K": (True, False),
    "NS_WARPS": (None, 2, 4, 8), "NS_BWD_TRANS": ("load", "store", "regs"), "RETRIEVE_IN_STEP": (True, False),
    "NS_SAVE_FWD": (None, True, False), "FUSED_STEP": (True, False),
}


def parse_setting(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` (a benchmark's command line) -> (NAME, value) for a name of ``SETTINGS``:
    booleans as true / false (or 1 / 0 where the setting is a switch), None as none, integers
    as digits. ValueError (one line) for anything else."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    if not sep or name not in SETTINGS:
        raise ValueError(f"{text!r}: expected NAME=VALUE with NAME one of {', '.join(SETTINGS)}")
    low = raw.lower()
    value: object = {"true": True, "false": False, "none": None}.get(low, int(raw) if raw.isdigit() else raw)
    switch = SETTINGS[name] is not int and True in SETTINGS[name]
    if switch and low in ("0", "1"):
        value = low == "1"
    if not _setting_ok(name, value):
        allowed = SETTINGS[name]
        want = "a positive integer" if allowed is int else " / ".join(str(c).lower() for c in allowed)
        raise ValueError(f"{text!r}: {name} takes {want}")
    return name, value


def _setting_ok(name: str, value: object) -> bool:
    allowed = SETTINGS.get(name)
    if allowed is int:
        return type(value) is int and value >= 1
    return allowed is not None and any(type(value) is type(c) and value == c for c in allowed)


@contextlib.contextmanager
def settings(**values: object) -> Iterator[None]:
    """The fast path's module settings (names of ``SETTINGS``) set to ``values`` for the block,
    restored after it; a name or value outside ``SETTINGS`` is a ValueError, nothing set. The
    dispatch probes' results (CUDA's and the CPU's) are dropped on the way in and out: they
    checked the fast path as the settings then were (a setting may change which kernels the
    probe's problem runs)."""
    for name, v in values.items():
        if not _setting_ok(name, v):
            raise ValueError(f"atlas setting {name}={v!r}: not one of {SETTINGS.get(name, tuple(SETTINGS))}")
    old = {name: globals()[name] for name in values}
    globals().update(values)
    for name in FAST_PATHS:
        dispatch.forget(name)
    try:
        yield
    finally:
        globals().update(old)
        for name in FAST_PATHS:
            dispatch.forget(name)


#: why torch.compile of the chunk step failed in this process (then the step runs eagerly)
compile_error: str | None = None


#: shapes / settings beyond torch.compile's recompile limit met in this process (they run eagerly)
recompile_limit_hits = 0


#: check each compiled chunk step against the eager one at its first call (``_step_disagreement``)
CHECK_COMPILED_STEP = True

#: compiled chunk steps checked so far, by compiled function, grad mode and arguments' shapes /
#: strides / static values: None = they agreed, else how far they were apart
_STEP_CHECKED: dict[tuple, str | None] = {}

#: that check's limits, ``max_rel_err`` per tensor of the compiled step against the eager one, both
#: in float32: results, input gradients. A correct compile differs by float32 rounding (Inductor
#: fuses and reorders element-wise work; the GEMMs and Newton-Schulz are the same ops); the
#: combo-kernel miscompile found on an H100 (2026-12-05, see ``INDUCTOR``) by 2-6 in gradients
STEP_CHECK_TOL = (2e-3, 2e-2)


def _step_key(compiled, args: tuple) -> tuple:  # noqa: ANN001
    """What picks the compiled graph of a chunk-step call: the grad mode, every argument's shape /
    strides / dtype / device / requires_grad, the static values. Built at every chunk call (eager
    mode), so by hand: the step's arguments nest one level (the weights' and momenta's tuples);
    ``tree_leaves`` took 24 us a call, this 10."""
    sig = [(t.shape, t.stride(), t.dtype, t.device, t.requires_grad) if isinstance(t, Tensor) else t
           for a in args for t in (a if isinstance(a, tuple) else (a,))]
    return (compiled, torch.is_grad_enabled(), *sig)


def _step_disagreement(compiled, eager, args: tuple) -> str | None:  # noqa: ANN001
    """How far ``compiled(*args)`` is from ``eager(*args)`` (None: within ``STEP_CHECK_TOL``),
    results and, with grad mode on, the gradients of every input that requires one for the same
    random cotangents. The inputs are the call's own (detached: the same shapes, strides and
    requires_grad, so the compiled graph is the one the call runs), but for the momenta
    (``args[1]``), drawn at random: the first chunk's are zero, whose singular Gram matrices make
    the gradient through Newton-Schulz ill-conditioned (see ``probe_errors``), which would make
    float32 rounding look like a disagreement."""
    g = torch.Generator().manual_seed(0)

    detach = lambda t: t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t  # noqa: E731

    def fresh(t: Tensor) -> Tensor:
        r = torch.empty_like(t)  # the same strides for a dense layout
        if r.stride() != t.stride():  # an overlapping one (expanded): the call's own values
            return detach(t)
        r.copy_(0.3 * torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1]))
        return r.requires_grad_(t.requires_grad)

    ins = torch.utils._pytree.tree_map(detach, args)
    ins = (ins[0], tuple(fresh(m) for m in args[1]), *ins[2:])
    wrt = [t for t in torch.utils._pytree.tree_leaves(ins) if isinstance(t, Tensor) and t.requires_grad]
    runs, cots = [], None
    for fn in (compiled, eager):
        outs = [o for o in torch.utils._pytree.tree_leaves(fn(*ins)) if isinstance(o, Tensor)]
        cots = cots or [torch.randn(o.shape, generator=g).to(o) for o in outs]
        grads = []
        if torch.is_grad_enabled() and wrt:
            loss = sum((o * c).sum() for o, c in zip(outs, cots) if o.requires_grad)
            grads = [torch.zeros_like(w) if d is None else d
                     for w, d in zip(wrt, torch.autograd.grad(loss, wrt, allow_unused=True))]
        runs.append((outs, grads))
    err_out = max((max_rel_err(a, b) for a, b in zip(runs[0][0], runs[1][0])), default=0.0)
    err_grad = max((max_rel_err(a, b) for a, b in zip(runs[0][1], runs[1][1])), default=0.0)
    if err_out <= STEP_CHECK_TOL[0] and err_grad <= STEP_CHECK_TOL[1]:  # NaN fails
        return None
    return f"results {err_out:.2g}, gradients {err_grad:.2g} off the eager step"


def _first_call_disagreement(step, eager, args: tuple) -> str | None:  # noqa: ANN001
    """At ``step``'s first call for these arguments' shapes / settings (``_step_key``): how far it is
    from ``eager`` (``_step_disagreement``), remembered; None after that, where they agreed, with
    ``CHECK_COMPILED_STEP`` off, and inside a CUDA-graph capture or an outer torch.compile (where
    no extra work may run)."""
    if not CHECK_COMPILED_STEP or dispatch.capturing() or torch.compiler.is_compiling():
        return None
    key = _step_key(step, args)
    if key not in _STEP_CHECKED:
        with dispatch.side_check():  # (inside a checkpointed block's forward: core/recompute.py)
            _STEP_CHECKED[key] = _step_disagreement(step, eager, args)
        return _STEP_CHECKED[key]
    return None


def _guarded(compiled, eager, *args):  # noqa: ANN001, ANN002, ANN202
    """``compiled(*args)``; if that fails (no working compiler or Inductor backend here), warn
    once, keep the reason in ``compile_error`` and run ``eager`` from then on. A call past
    torch.compile's recompile limit (more distinct shapes / settings than it keeps graphs for:
    training, evaluation and generation batch sizes in one process) runs eagerly by itself, said
    once; the shapes compiled before stay compiled. Out-of-memory errors are raised. Each compiled
    graph's first call is checked against the eager step (``CHECK_COMPILED_STEP``; not inside a
    CUDA-graph capture or an outer torch.compile, where no extra work may run): if they disagree,
    that is said once and the step runs eagerly from then on, as for a failed compile."""
    global compile_error, recompile_limit_hits
    if compile_error is None:
        try:
            why = _first_call_disagreement(compiled, eager, args)
            if why is not None:
                compile_error = f"the compiled chunk step disagrees with the eager one ({why})"
                warnings.warn(f"atlas fast path: {compile_error}; the step runs eagerly from now on", stacklevel=2)
                return eager(*args)
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            recompile_limit_hits += 1
            if recompile_limit_hits == 1:
                warnings.warn("atlas fast path: torch.compile's recompile limit reached for the chunk step "
                              "(torch._dynamo.config.recompile_limit); new shapes run it eagerly", stacklevel=2)
            return eager(*args)
        except Exception as e:  # noqa: BLE001 - torch.compile failures come in many types
            compile_error = f"{type(e).__name__}: {str(e)[:300]}"
            warnings.warn(f"atlas fast path: torch.compile of the chunk step failed ({compile_error}); "
                          "the step runs eagerly from now on", stacklevel=2)
    return eager(*args)


@functools.cache
def _compile(fn, inductor: str):  # noqa: ANN001, ANN202
    """``fn`` under torch.compile with the options of ``inductor`` that this PyTorch's Inductor has
    (an option it lacks is left out rather than failing the compile, which would run the step eagerly)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options=inductor_options(inductor) or None)


def inductor_options(inductor: str) -> dict[str, object]:
    """``INDUCTOR_OPTIONS[inductor]`` less the options this PyTorch's Inductor config lacks (a
    dotted name, ``triton.enable_pdl``, is looked up through its sections)."""
    import torch._inductor.config as inductor_config

    def known(name: str) -> bool:
        node: object = inductor_config
        for part in name.split("."):
            if not hasattr(node, part):
                return False
            node = getattr(node, part)
        return True

    return {k: v for k, v in INDUCTOR_OPTIONS[inductor].items() if known(k)}


def _compiled_chunk_step():  # noqa: ANN202
    return _compile(_chunk_step, INDUCTOR)


def _compiled_chunk_steps():  # noqa: ANN202
    return _compile(_chunk_steps, INDUCTOR)


def _atlas_memory_fast(
    qf: Tensor, kf: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, log_theta: Tensor, log_alpha: Tensor,
    params: Sequence[Tensor], mom: Sequence[Tensor] | None, *, chunk_size: int, window: int, ns_steps: int,
    muon: bool, n_valid: Tensor | None, return_state: bool, snapshots: Sequence[int], compile: bool | None = None,
    pad_ns: bool | None = None, triton_ns: bool | None = None, factor: bool | None = None, ns_chunk: bool = False,
    bmm32: bool | None = None,
) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None,
           dict[int, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]]:
    """``_atlas_memory`` (same arguments and results) by the fast path: gate coefficients of
    every chunk first, then the chunk loop over ``_chunk_step`` (compiled when ``compile``,
    default ``COMPILE_CHUNK_STEP``; each step retrieves its chunk's queries, ``RETRIEVE_IN_STEP``),
    then retrieval of what follows the last update (else of all chunks at once). Runs with autocast
    off (the memory is computed in float32 whatever the surrounding autocast says).
    ``triton_ns`` (default: where the Triton kernels apply) / ``pad_ns`` (default: on CUDA
    without them) choose the Newton-Schulz kernels and layout, ``factor`` the factored Gram
    matrices (default ``FACTOR_GRAM``), ``bmm32`` the GEMMs through ``kernels.bmm32`` (default: ``BMM``
    on CUDA in float32 without TF32) (tests set them)."""
    with torch.autocast(qf.device.type, enabled=False):
        return _atlas_memory_fast_body(
            qf, kf, v, gamma, eta, log_theta, log_alpha, params, mom, chunk_size=chunk_size, window=window,
            ns_steps=ns_steps, muon=muon, n_valid=n_valid, return_state=return_state, snapshots=snapshots,
            compile=compile, pad_ns=pad_ns, triton_ns=triton_ns, factor=factor, ns_chunk=ns_chunk, bmm32=bmm32)


def _atlas_memory_fast_body(
    qf: Tensor, kf: Tensor, v: Tensor, gamma: Tensor, eta: Tensor, log_theta: Tensor, log_alpha: Tensor,
    params: Sequence[Tensor], mom: Sequence[Tensor] | None, *, chunk_size: int, window: int, ns_steps: int,
    muon: bool, n_valid: Tensor | None, return_state: bool, snapshots: Sequence[int], compile: bool | None,
    pad_ns: bool | None, triton_ns: bool | None, factor: bool | None, ns_chunk: bool = False,
    bmm32: bool | None = None,
) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None,
           dict[int, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]]:
    N, T, Fd = qf.shape
    C, c = chunk_size, window
    Cp = C + c - 1
    ct = torch.float64 if qf.dtype == torch.float64 else torch.float32
    out_dtype, state_dtype = qf.dtype, params[0].dtype
    qf, kf, v, gamma, eta, log_theta, log_alpha = (t.to(ct) for t in (qf, kf, v, gamma, eta, log_theta, log_alpha))
    params = tuple(p.to(ct) for p in params)
    mom = tuple(torch.zeros_like(p) for p in params) if mom is None else tuple(m.to(ct) for m in mom)
    pad = (-T) % C
    n_chunks = (T + pad) // C
    n_upd = T // C if return_state else min(T // C, n_chunks - 1)  # chunks whose update is used
    Ws, Ss, ys = [params], [mom], []
    retrieve = RETRIEVE_IN_STEP and n_upd > 0
    if n_upd:
        U, dev = n_upd, qf.device
        idx = (torch.arange(U, device=dev)[:, None] * C + torch.arange(Cp, device=dev)[None]).view(-1)
        per_chunk = lambda t: t.index_select(1, idx).view(N, U, Cp, *t.shape[2:]).transpose(0, 1).contiguous()  # noqa: E731
        Kc, Vc, Gc = per_chunk(kf), per_chunk(v), per_chunk(gamma)  # [U, N, C', ...]
        if retrieve:  # each chunk's queries after its keys: [U, N, C' + C, F]
            Kc = torch.cat([Kc, qf[:, : U * C].view(N, U, C, Fd).transpose(0, 1)], 2)
        lth = log_theta[:, : U * C].view(N, U, C)
        la = log_alpha[:, : U * C].view(N, U, C).cumsum(-1)
        mix = _decay_matrix(lth) @ _window_matrix(C, c, dev, ct)  # [N, U, C, C']
        lam = lth.cumsum(-1).exp()  # Π_{s<=t} θ_s
        wu = eta[:, : U * C].view(N, U, C) * (la[..., -1:] - la).exp()  # η_t Π_{s>t} α_s
        keep = la[..., -1].exp()  # Π_t α_t
        if n_valid is not None:  # a row's incomplete chunk is an identity step
            ok = (n_valid[:, None] >= C * torch.arange(1, U + 1, device=dev)[None]).to(ct)  # [N, U]
            mix, wu = mix * ok[..., None, None], wu * ok[..., None]
            lam, keep = lam * ok[..., None] + (1 - ok[..., None]), keep * ok + (1 - ok)
        if not muon:  # rows: the new momentum S_{C-1}; the update Σ_t wu_t S_t
            mix = torch.stack([mix[..., -1, :], (wu[..., None] * mix).sum(-2)], dim=-2)
            lam = torch.stack([lam[..., -1], (wu * lam).sum(-1)], dim=-1)
        elif ns_chunk:  # rows: Σ_t wu_t S_t (NS5's one input), the new momentum; its weight Σ_t wu_t
            mix = torch.stack([(wu[..., None] * mix).sum(-2), mix[..., -1, :]], dim=-2)
            lam = torch.stack([(wu * lam).sum(-1), lam[..., -1]], dim=-1)
            wu = wu.sum(-1, keepdim=True)
        mix, lam, wu, keep = (t.transpose(0, 1).contiguous() for t in (mix, lam, wu, keep))
        compiled = COMPILE_CHUNK_STEP if compile is None else compile
        step = _compiled_chunk_step() if compiled else _chunk_step
        group = max(1, CHUNKS_PER_CALL) if compiled else 1
        if triton_ns is None:
            triton_ns = _use_triton_ns(params, ct)
        triton_ns = muon and triton_ns
        if pad_ns is None:  # one padded batch where launches cost more than the padding's flops
            pad_ns = _pad_ns(qf.is_cuda, triton_ns, muon and ns_chunk)
        if bmm32 is None:  # TF32 allowed (hymba train --tf32): cuBLAS's TF32 GEMMs, as asked
            bmm32 = (BMM == "bmm32" and qf.is_cuda and ct == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
                     and torch.cuda.get_device_capability(qf.device)[0] >= 8)  # TF32 tensor cores: sm_80 on
        static = (ns_steps, muon, pad_ns, triton_ns, FACTOR_GRAM if factor is None else factor, muon and ns_chunk,
                  bmm32, bmm32 and GROUP_GEMMS, C if retrieve else 0)
        from . import atlas_fused  # here: its kernels call this module's Triton helpers

        fused = (FUSED_STEP and (qf.is_cuda or INTERPRET)  # INTERPRET: Triton's CPU interpreter
                 and atlas_fused.applies(params, Cp, static[8], ns_steps, muon, ns_chunk, static[4]))
        if fused:  # one chunk a call (its ten launches, five a direction)
            group = 1
        # groups of chunks per compiled call, then single chunks; each call's inputs are pieces of
        # one split / unbind, whose backward concatenates / stacks the pieces' gradients once
        # (indexing each chunk out of the stacked tensors gave every chunk a zero-filled gradient of
        # the whole stack, summed in turn: quadratic in the chunks, 32 ms of a Quad-Hybrid ATLAS
        # step on an H200; a split into pieces of one chunk, each then indexed, still cost a
        # zero-fill and a copy per input and chunk in the backward: 14 kernels a chunk)
        n_multi = U // group * group if group > 1 else 0
        per_step = (Kc, Vc, Gc, mix, lam, wu, keep)
        heads, tails = zip(*(t.split([n_multi, U - n_multi]) for t in per_step)) if n_multi else ((), per_step)
        for piece in zip(*(t.split(group) for t in heads)):  # several chunks per compiled call
            out = _guarded(_compiled_chunk_steps(), _chunk_steps, Ws[-1], Ss[-1], *piece, *static)
            Ws.extend(out[0])
            Ss.extend(out[1])
            ys.extend(out[2] if retrieve else ())
        unfused = functools.partial(_guarded, step, _chunk_step) if compiled else step
        for piece in zip(*(t.unbind(0) for t in tails)):  # one chunk per call
            args = (Ws[-1], Ss[-1], *piece, *static)
            out = _fused(args, unfused) if fused else unfused(*args)
            Ws.append(out[0])
            Ss.append(out[1])
            ys.extend(out[2:])
    if ys:  # the chunks with an update retrieved in their steps, the rest (one chunk's weights) here
        y = torch.stack(ys, 1).flatten(1, 2)
        if n_upd * C < T:
            y = torch.cat([y, memory_apply(Ws[n_upd], qf[:, n_upd * C:])], 1)
        y = y.to(out_dtype)
    else:  # retrieval with each chunk's start weights, all chunks at once
        q = F.pad(qf, (0, 0, 0, pad)).view(N, n_chunks, C, Fd).transpose(0, 1)  # [n_chunks, N, C, F]
        starts = [Ws[min(n, n_upd)] for n in range(n_chunks)]
        y = memory_apply([torch.stack(ws) for ws in zip(*starts)], q)  # [n_chunks, N, C, D]
        y = y.transpose(0, 1).reshape(N, n_chunks * C, -1)[:, :T].to(out_dtype)
    cast = lambda ts: tuple(t.to(state_dtype) for t in ts)  # noqa: E731
    snaps = {n: (cast(Ws[min(n, n_upd)]), cast(Ss[min(n, n_upd)])) for n in snapshots}
    if not return_state:
        return y, None, None, snaps
    return y, cast(Ws[-1]), cast(Ss[-1]), snaps


def probe_errors(device: str = "cuda", ns_chunk: bool = False, **fast_kwargs: object) -> list[float]:
    """The fast path on ``device`` (float32; by default its eager chunk step with the Triton NS
    kernels where they apply, so that no compiled graph is specialised to these shapes; tests and
    ``benchmarks/atlas_check.py`` pass ``compile`` / ``triton_ns`` / ``pad_ns``) against the
    reference on the CPU (float64) on one small problem -- Muon with a window and a deep memory,
    n_valid rows: the relative error of each result, in the order output, end weights, end
    momenta, then the gradient of every input (7 inputs, then the 4 weights). ``ns_chunk``: the
    muon_chunk form on both sides.

    The memory starts from random momenta, so that every Gram matrix has full rank. From zero
    momenta the first chunks' Gram matrices are singular, and the gradient through Newton-Schulz
    there is ill-conditioned: float64 autograd through the float32 forward's iterates is itself
    2.4e-2 from the float64 reference (1e-2 from a correct kernel or not was then rounding luck:
    the saved-iterate backward's symmetric form, since replaced, measured 1.8e-2, the recomputing
    one 2.3e-3, both as accurate per call). From these momenta that floor is 6.5e-3 and every
    backward is within 3e-3 (CPU)."""
    g = torch.Generator().manual_seed(0)
    N, T, C, c, d, hid, p = 3, 21, 4, 3, 4, 6, 2
    coef = torch.tensor([1.0, 1 / math.sqrt(2)])
    Fd = feature_dim(d, p)
    ins = [poly_features(F.normalize(torch.randn(N, T, d, generator=g), dim=-1), coef),
           poly_features(F.normalize(torch.randn(N, T + c - 1, d, generator=g), dim=-1), coef),
           F.normalize(torch.randn(N, T + c - 1, d, generator=g), dim=-1), torch.rand(N, T + c - 1, generator=g),
           0.1 * torch.rand(N, T, generator=g), F.logsigmoid(torch.randn(N, T, generator=g)),
           F.logsigmoid(torch.randn(N, T, generator=g) + 3)]
    shapes = [(d, Fd), (hid, Fd), (hid, hid), (d, hid)]
    ws = [torch.randn(N, *s, generator=g) / math.sqrt(s[1]) for s in shapes]
    moms = [0.3 * torch.randn(N, *s, generator=g) / math.sqrt(s[1]) for s in shapes]
    ins[3][:, : c - 1] = 0.0
    n_valid = torch.tensor([T, 9, 16])
    res, seeds = [], None
    for impl, dev, dt in ((_atlas_memory_fast, device, torch.float32), (_atlas_memory, "cpu", torch.float64)):
        ts = [t.to(dev, dt).requires_grad_() for t in ins + ws]
        kw = {"compile": False, **fast_kwargs} if impl is _atlas_memory_fast else {}
        mom = [m.to(dev, dt) for m in moms]
        y, W, S, _ = impl(*ts[:7], ts[7:], mom, chunk_size=C, window=c, ns_steps=5, muon=True, ns_chunk=ns_chunk,
                          n_valid=n_valid.to(dev), return_state=True, snapshots=(), **kw)
        outs = [y, *W, *S]
        seeds = seeds or [torch.randn(o.shape, generator=g) for o in outs]
        grads = torch.autograd.grad(sum((o * s.to(dev, dt)).sum() for o, s in zip(outs, seeds)), ts)
        res.append(outs + list(grads))
    return [max_rel_err(a, b) for a, b in zip(*res)]


def _probe(device: str) -> None:
    """``probe_errors`` on ``device`` (CUDA: as dispatched there; the CPU: the eager chunk step,
    Newton-Schulz as batched matmuls): the outputs and end state within 1e-3, the gradients within
    1e-2 (float32 vs float64; on a CPU: <= 1.4e-4 and 2.9e-3 with either Triton backward kernel in
    the interpreter, 3.1e-3 without them). The compiled step is checked by the tests (GPU and
    CPU). The Triton Newton-Schulz kernels are checked per padded side at the first call that
    needs that side (``_ns_triton_works``)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    for i, err in enumerate(probe_errors(device)):
        if not err < (1e-3 if i < 9 else 1e-2):
            raise RuntimeError(f"atlas fast path on {device} differs from the reference (result {i}: rel {err:.3g})")


#: the fast path's name on the CPU (``hymba info``; ``HYMBA_KERNELS=reference`` turns it off too)
CPU_FAST = "atlas_cpu"
#: the names the fast path is registered under, one per device type
FAST_PATHS = ("atlas", CPU_FAST)

fast_path(CPU_FAST, probe=functools.partial(_probe, "cpu"), device="cpu",
          doc="the same closed-form chunk step on the CPU, eager, Newton-Schulz on the Gram matrices as batched "
              "matmuls (a Quad-Hybrid training step on a CPU 1.9x faster than on the reference, 6.1x with "
              "muon_chunk)")
fast_path("atlas", probe=functools.partial(_probe, "cuda"),
          doc="closed-form chunk step (rank-1 per-token gradients, one mixing matmul for window + momentum, "
              "NS5 on Gram matrices in Triton kernels, retrieval in the step) under torch.compile")
