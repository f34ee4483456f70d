"""Mamba-3 state-space scan: exponential-trapezoidal update, data-dependent rotary
(complex) state, MIMO rank R.

Paper: Lahoti, Li, Chen, Wang, Bick, Kolter, Dao, Gu, "Mamba-3: Improved Sequence Modeling
using State Space Principles", arXiv 2603.15569 (2026). Parameterisation as in the official
module ``mamba_ssm/modules/mamba3.py`` (state-spaces/mamba).

What is computed (per head; ``N`` state size, ``P`` head dim, ``R`` MIMO rank, ``K`` rotary
angles, K <= N/2):

* Exponential-trapezoidal discretisation (paper §3, "exponential-trapezoidal discretization";
  the generalised trapezoid rule):
  with ``alpha_t = exp(Δ_t A_t)``, ``lambda_t = sigmoid(trap_t)``::

      h_t = alpha_t h_{t-1} + beta_t B_{t-1} x_{t-1}^T + gamma_t B_t x_t^T
      beta_t  = (1 - lambda_t) Δ_t alpha_t,     gamma_t = lambda_t Δ_t

  (``lambda = 1`` is Mamba-2's exponential-Euler rule). ``A_t <= -A_floor`` and ``Δ_t`` are
  data dependent (``A_t = -softplus(.)``, ``Δ_t = softplus(. + dt_bias)``).
* Complex state as rotations (paper §3, "complex-valued SSM": the complex-to-real SSM
  equivalence and the data-dependent RoPE equivalence, the "RoPE trick"): pairing state dims
  into complex numbers, the complex diagonal transition ``exp(Δ_t (A_t - i ω_t))`` with
  ``ω_t = π tanh(θ_t)`` equals the real scalar decay ``alpha_t`` on a state whose inputs and
  readouts are rotated by the cumulative angle ``Θ_t = Σ_{s<=t} Δ_s ω_s`` (kept mod 2π):
  ``B_t, C_t -> R(Θ_t) B_t, R(Θ_t) C_t`` with 2x2 block rotations over the first ``K`` pairs
  (the rest of the state stays real), and the scalar-decay scan above runs on the rotated
  ``B, C`` (the trapezoid's beta term carries the same complex decay). Pairing is
  "interleaved" (dims 2i, 2i+1: the official SISO kernel) or "half" (dims i, i + N/2: the
  official MIMO kernel). tests/test_mamba3.py checks this against a complex128 recurrence.
* MIMO (paper §3, "multi-input, multi-output"): ``x_{t,r} = x_t ⊙ W^x_r``; the state takes
  ``Σ_r B_{t,r} x_{t,r}^T``; each rank reads ``y_{t,r} = h_t^T C_{t,r} + D x_{t,r}``, is gated by ``SiLU(z_t ⊙ W^z_r)`` and the
  ranks are summed with ``W^o_r``. R = 1 (no W's) is SISO: ``y_t = (h_t^T C_t + D x_t) ⊙ SiLU(z_t)``.
* B and C carry learned per-head (per-rank) biases added after their RMSNorm (the module does
  the norm; the bias is an argument here because the fast kernels fuse it).

Carried state (constant size): ``h [B,H,N,P]``, the previous token's rotated ``B`` (``k``,
``[B,H,R,N]``), its ``x`` (``v``, ``[B,H,P]``) and the cumulative angle ``theta [B,H,K]``: that is
exactly what the trapezoid (previous token) and the rotation (angle sum) need.

Paths
-----
* ``mamba3_step`` — the exact per-token recurrence (decode; ``mamba3_recurrent`` loops it over
  T and is only the test oracle).
* ``mamba3_chunked`` — reference chunked (SSD) form, pure PyTorch, runs anywhere: within a
  chunk a masked decay matrix ``exp(segsum(Δ A))`` times the trapezoid weights
  (``gamma_s`` on the diagonal, ``gamma_s + (1 - lambda_{s+1}) Δ_{s+1}`` below it) multiplies the
  rotated ``C B^T`` scores; only the state is carried over a Python loop over chunks. The
  trapezoid term that crosses a chunk boundary is folded into the chunk's initial state
  (``h + (1 - lambda_{c0}) Δ_{c0} k_prev v_prev^T``). ``return_starts=True`` also returns the
  carry at every chunk start (block diffusion's block-start states).
* ``mamba3`` — dispatch. Fast paths (both from the ``mamba-ssm`` package, 2.3.x on PyPI, which
  ships the official Mamba-3 kernels; ``fla-core`` 0.6.0 has no Mamba-3 kernel):

  - ``"mamba3"``: Triton SISO kernel
    ``mamba_ssm.ops.triton.mamba3.mamba3_siso_combined.mamba3_siso_combined(Q, K, V, ADT, DT,
    Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
    return_final_states=False, cu_seqlens=None)`` — forward + backward, initial and final
    states. Used for R = 1, 16-bit inputs (its wrapper casts Q/K/V/Z/Trap/Angles to bf16, so
    float32 inputs stay on the exact reference), power-of-two N and P, even K >= 2, CUDA
    compute capability >= 9 (it builds TMA descriptors). Padding (``lengths``) is handled by
    zeroing Δ at inert slots; the previous-token memory is re-gathered at the last real token.
  - ``"mamba3_mimo"``: TileLang MIMO kernel
    ``mamba_ssm.ops.tilelang.mamba3.mamba3_mimo.mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias,
    K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size, rotary_dim_divisor, dtype,
    return_state=False, cu_seqlens=None)`` — it takes no initial state and its final state is
    not differentiable, so it is used only for R > 1, 16-bit inputs, no cache and no padding
    (the training forward), "half" pairing, K = N/2 or N/4.

  Reference only: the decode step (T = 1), chunked prefill into a cache for R > 1, every
  float32/float64 computation, and every CPU computation. The ``mamba_ssm`` CuTe decode step
  (``mamba3_step_fn``) is not used.
"""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

TWO_PI = 2.0 * math.pi


class Mamba3Carry(NamedTuple):
    """What one row carries between calls: h [B,H,N,P], k [B,H,R,N] (previous token's
    rotated B + bias), v [B,H,P] (previous token's x), theta [B,H,K] (cumulative angle)."""

    h: Tensor
    k: Tensor
    v: Tensor
    theta: Tensor


def zero_carry(batch: int, n_heads: int, state_size: int, head_dim: int, rank: int, n_angles: int,
               device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Mamba3Carry:
    z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
    return Mamba3Carry(z(batch, n_heads, state_size, head_dim), z(batch, n_heads, rank, state_size),
                       z(batch, n_heads, head_dim), z(batch, n_heads, n_angles))


# ----------------------------------------------------------------------------- helpers
def rotate(x: Tensor, cos: Tensor, sin: Tensor, pairing: str = "interleaved") -> Tensor:
    """Rotate the first K pairs of the last dim of ``x`` by the angles whose cos/sin are
    given ([..., K], broadcastable to x[..., :K]); the remaining dims pass through."""
    n, k = x.shape[-1], cos.shape[-1]
    if k == 0:
        return x
    if pairing == "interleaved":
        pairs = x[..., : 2 * k].unflatten(-1, (k, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return torch.cat([rot, x[..., 2 * k:]], dim=-1)
    if pairing == "half":
        half = n // 2
        a, b = x[..., :k], x[..., half: half + k]
        return torch.cat([a * cos - b * sin, x[..., k:half], a * sin + b * cos, x[..., half + k:]], dim=-1)
    raise ValueError(f"pairing must be 'interleaved' or 'half', got {pairing!r}")


def _heads(t: Tensor, n_heads: int) -> Tensor:
    """[..., R, G, N] -> [..., H, R, N] (head h reads group h // (H / G))."""
    g = t.shape[-2]
    return t.repeat_interleave(n_heads // g, dim=-2).transpose(-2, -3)


def _up(v: Tensor, mimo_v: Tensor | None) -> Tensor:
    """x [..., H, P] -> per-rank inputs [..., H, R, P]."""
    return v.unsqueeze(-2) if mimo_v is None else v.unsqueeze(-2) * mimo_v.to(v.dtype)


def _finish(y: Tensor, vr: Tensor, D: Tensor | None, z: Tensor | None, mimo_z: Tensor | None,
            mimo_o: Tensor | None) -> Tensor:
    """y, vr [..., H, R, P] -> [..., H, P]: D skip, SiLU(z) gate per rank, rank sum."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None, None] * vr
    if z is not None:
        zr = z.to(y.dtype).unsqueeze(-2)
        if mimo_z is not None:
            zr = zr * mimo_z.to(y.dtype)
        y = y * F.silu(zr)
    if mimo_o is not None:
        return (y * mimo_o.to(y.dtype)).sum(-2)
    return y.squeeze(-2)


# ----------------------------------------------------------------------------- step (decode, oracle)
def mamba3_step(
    q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor, angles: Tensor,
    q_bias: Tensor, k_bias: Tensor, carry: Mamba3Carry, *, D: Tensor | None = None, z: Tensor | None = None,
    mimo_v: Tensor | None = None, mimo_z: Tensor | None = None, mimo_o: Tensor | None = None,
    pairing: str = "interleaved", valid: Tensor | None = None,
) -> tuple[Tensor, Mamba3Carry]:
    """One token of the exact recurrence.

    q, k [B,R,G,N] (C and B after their norm, before bias); v [B,H,P] (x); adt = Δ·A,
    dt = Δ, trap (pre-sigmoid) [B,H]; angles [B,H,K] (pre-tanh); q_bias/k_bias [H,R,N];
    valid [B] bool (False: the row's state is left exactly as it was). Returns y [B,H,P].
    """
    cdt = dispatch.compute_dtype(v)
    H = v.shape[1]
    dt, adt = dt.to(cdt), adt.to(cdt)
    if valid is not None:
        m = valid.to(cdt)[:, None]
        dt, adt = dt * m, adt * m
    lam = torch.sigmoid(trap.to(cdt))
    theta = torch.remainder(carry.theta.to(cdt) + math.pi * torch.tanh(angles.to(cdt)) * dt[..., None], TWO_PI)
    cos, sin = torch.cos(theta)[:, :, None], torch.sin(theta)[:, :, None]
    qr = rotate(_heads(q.to(cdt), H) + q_bias.to(cdt), cos, sin, pairing)  # [B,H,R,N]
    kr = rotate(_heads(k.to(cdt), H) + k_bias.to(cdt), cos, sin, pairing)
    mv = None if mimo_v is None else mimo_v.to(cdt)
    vr = _up(v.to(cdt), mv)  # [B,H,R,P]
    vprev = _up(carry.v.to(cdt), mv)
    alpha = torch.exp(adt)[..., None, None]
    beta = ((1 - lam) * dt)[..., None, None] * alpha
    gamma = (lam * dt)[..., None, None]
    h = (alpha * carry.h.to(cdt)
         + beta * torch.einsum("bhrn,bhrp->bhnp", carry.k.to(cdt), vprev)
         + gamma * torch.einsum("bhrn,bhrp->bhnp", kr, vr))
    y = torch.einsum("bhrn,bhnp->bhrp", qr, h)
    out = _finish(y, vr, D, z, mimo_z, mimo_o)
    new_k, new_v = kr, v.to(cdt)
    if valid is not None:
        sel = valid[:, None, None]
        new_k = torch.where(sel[..., None], new_k, carry.k.to(cdt))
        new_v = torch.where(sel, new_v, carry.v.to(cdt))
    return out.to(v.dtype), Mamba3Carry(h, new_k, new_v, theta)


def mamba3_recurrent(
    q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor, angles: Tensor,
    q_bias: Tensor, k_bias: Tensor, carry: Mamba3Carry | None = None, *, lengths: Tensor | None = None,
    **kw,
) -> tuple[Tensor, Mamba3Carry]:
    """Token-by-token loop of ``mamba3_step`` over [B,T,...] inputs (test oracle only)."""
    Bsz, T = v.shape[:2]
    if carry is None:
        carry = zero_carry(Bsz, v.shape[2], q.shape[-1], v.shape[3], q.shape[2], angles.shape[-1],
                           v.device, dispatch.compute_dtype(v))
    z = kw.pop("z", None)
    ys = []
    for t in range(T):
        valid = None if lengths is None else (lengths > t)
        y, carry = mamba3_step(q[:, t], k[:, t], v[:, t], adt[:, t], dt[:, t], trap[:, t], angles[:, t],
                               q_bias, k_bias, carry, z=None if z is None else z[:, t], valid=valid, **kw)
        ys.append(y)
    return torch.stack(ys, 1), carry


# ----------------------------------------------------------------------------- chunked reference
def mamba3_chunked(
    q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor, angles: Tensor,
    q_bias: Tensor, k_bias: Tensor, carry: Mamba3Carry | None = None, *, D: Tensor | None = None,
    z: Tensor | None = None, mimo_v: Tensor | None = None, mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None, lengths: Tensor | None = None, chunk_size: int = 64,
    pairing: str = "interleaved", return_starts: bool = False,
) -> tuple[Tensor, Mamba3Carry] | tuple[Tensor, Mamba3Carry, Mamba3Carry]:
    """Chunked (SSD) form of the same recurrence; no loop over tokens.

    q, k [B,T,R,G,N]; v, z [B,T,H,P]; adt, dt, trap [B,T,H]; angles [B,T,H,K]; lengths [B]
    (real tokens first; inert slots get Δ = 0 so they leave the state untouched).
    Returns y [B,T,H,P] (v's dtype) and the carry after the last real token.

    ``return_starts=True`` (no ``lengths``) also returns the carry at every chunk start, a
    ``Mamba3Carry`` whose fields have a chunk dim after the batch (``h [B,c,H,N,P]``,
    ``k [B,c,H,R,N]``, ``v [B,c,H,P]``, ``theta [B,c,H,K]``): entry ``c`` is the carry after
    tokens ``[0, c*L)`` (``L = min(chunk_size, T)``; entry 0 is the input carry). Block
    diffusion (``Mamba3.boundary_forward``) takes the block starts from it.
    """
    Bsz, T, R, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    cdt = dispatch.compute_dtype(v)
    dev = v.device
    if return_starts and lengths is not None:
        raise ValueError("return_starts needs lengths=None (every slot real)")
    if carry is None:
        carry = zero_carry(Bsz, H, N, P, R, angles.shape[-1], dev, cdt)
    dt, adt = dt.to(cdt), adt.to(cdt)
    if lengths is not None:
        m = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).to(cdt)[..., None]
        dt, adt = dt * m, adt * m
    lam = torch.sigmoid(trap.to(cdt))
    gamma, w = lam * dt, (1 - lam) * dt  # [B,T,H]; beta_t = w_t * alpha_t

    # cumulative rotation angles, carried across calls
    dth = math.pi * torch.tanh(angles.to(cdt)) * dt[..., None]
    theta = torch.remainder(carry.theta.to(cdt)[:, None] + torch.cumsum(dth, dim=1), TWO_PI)  # [B,T,H,K]
    cos, sin = torch.cos(theta)[:, :, :, None], torch.sin(theta)[:, :, :, None]
    qr = rotate(_heads(q.to(cdt), H) + q_bias.to(cdt), cos, sin, pairing)  # [B,T,H,R,N]
    kr = rotate(_heads(k.to(cdt), H) + k_bias.to(cdt), cos, sin, pairing)
    mv = None if mimo_v is None else mimo_v.to(cdt)
    vr = _up(v.to(cdt), mv)  # [B,T,H,R,P]

    L = max(1, min(chunk_size, T))
    nc = -(-T // L)
    pad = nc * L - T

    def chunks(t: Tensor) -> Tensor:  # [B,T,H,*] -> [B,H,c,L,*]
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(Bsz, nc, L, *t.shape[2:]).transpose(1, 3).transpose(2, 3)

    qc, kc, vc = chunks(qr), chunks(kr), chunks(vr)  # [B,H,c,L,R,*]
    qf, kf, vf = (t.flatten(3, 4) for t in (qc, kc, vc))  # [B,H,c,L*R,*]: row (t, r)
    ac, gc, wc = chunks(adt), chunks(gamma), chunks(w)  # [B,H,c,L]
    cum = torch.cumsum(ac, dim=-1)
    w_next = torch.cat([wc[..., 1:], torch.zeros_like(wc[..., :1])], dim=-1)  # (1-lam_{s+1}) Δ_{s+1} in-chunk
    g_all = gc + w_next  # weight of token s once token s+1 has been taken too
    incl = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~incl, float("-inf"))
    # M[t, s] = exp(cum_t - cum_s) * (gamma_s + [s < t] w_{s+1}): trapezoid-weighted decay matrix
    M = torch.exp(seg) * g_all[..., None, :] - torch.diag_embed(w_next)
    if R > 1:
        M = M.repeat_interleave(R, dim=-1).repeat_interleave(R, dim=-2)
    y = ((qf @ kf.transpose(-1, -2)) * M) @ vf  # [B,H,c,L*R,P]

    # chunk-local end states, the trapezoid term crossing each chunk start, then the carry loop
    w_end = (torch.exp(cum[..., -1:] - cum) * g_all).repeat_interleave(R, dim=-1)  # [B,H,c,L*R]
    h_loc = (kf * w_end[..., None]).transpose(-1, -2) @ vf  # [B,H,c,N,P]
    k_prev = torch.cat([carry.k.to(cdt)[:, :, None], kc[:, :, :-1, -1]], dim=2)  # [B,H,c,R,N]
    v_prev = torch.cat([_up(carry.v.to(cdt), mv)[:, :, None], vc[:, :, :-1, -1]], dim=2)  # [B,H,c,R,P]
    fold = wc[..., 0, None, None] * (k_prev.transpose(-1, -2) @ v_prev)  # [B,H,c,N,P]
    a_chunk = torch.exp(cum[..., -1])[..., None, None]  # [B,H,c,1,1]
    h = carry.h.to(cdt)
    starts, h_starts = [], []
    for c in range(nc):
        h_starts.append(h)  # the carried state at this chunk start (before the trapezoid fold)
        s0 = h + fold[:, :, c]
        starts.append(s0)
        h = a_chunk[:, :, c] * s0 + h_loc[:, :, c]
    s0 = torch.stack(starts, dim=2)  # [B,H,c,N,P]
    y = y + (qf @ s0) * torch.exp(cum).repeat_interleave(R, dim=-1)[..., None]
    y = y.reshape(Bsz, H, nc * L, R, P)[:, :, :T].transpose(1, 2)  # [B,T,H,R,P]
    out = _finish(y, vr, D, z, mimo_z, mimo_o).to(v.dtype)

    # previous-token memory and angle at the last real token of every row
    if lengths is None:
        last_k, last_v, last_th = kr[:, -1], v[:, -1].to(cdt), theta[:, -1]
    else:
        idx = (lengths - 1).clamp(min=0)
        rows = torch.arange(Bsz, device=dev)
        has = (lengths > 0)
        last_k = torch.where(has[:, None, None, None], kr[rows, idx], carry.k.to(cdt))
        last_v = torch.where(has[:, None, None], v[rows, idx].to(cdt), carry.v.to(cdt))
        last_th = torch.where(has[:, None, None], theta[rows, idx], carry.theta.to(cdt))
    if not return_starts:
        return out, Mamba3Carry(h, last_k, last_v, last_th)
    # chunk c starts after token c*L - 1: its previous-token terms and angle sum, gathered
    prev = torch.arange(1, nc, device=dev) * L - 1
    st_k = torch.cat([carry.k.to(cdt)[:, None], kr[:, prev]], dim=1)  # [B,c,H,R,N]
    st_v = torch.cat([carry.v.to(cdt)[:, None], v[:, prev].to(cdt)], dim=1)  # [B,c,H,P]
    st_th = torch.cat([carry.theta.to(cdt)[:, None], theta[:, prev]], dim=1)  # [B,c,H,K]
    starts_c = Mamba3Carry(torch.stack(h_starts, dim=1), st_k, st_v, st_th)
    return out, Mamba3Carry(h, last_k, last_v, last_th), starts_c


# ----------------------------------------------------------------------------- fast paths
def _cuda_cc_at_least(major: int) -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < major:
        raise RuntimeError(f"needs a CUDA device of compute capability >= {major}.0")


def _probe_siso() -> object:
    _cuda_cc_at_least(9)
    return importlib.import_module("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined").mamba3_siso_combined


def _probe_mimo() -> object:
    _cuda_cc_at_least(9)
    return importlib.import_module("mamba_ssm.ops.tilelang.mamba3.mamba3_mimo").mamba3_mimo


def _probe_mimo_backward() -> None:
    """Compile and run the MIMO kernel's backward once on a small problem.

    Its TileLang backward does not compile on every TileLang release: mamba-ssm 2.3.2.post1
    with TileLang 0.1.15 stops in ``mamba_mimo_bwd_bwd_kernel`` with an InternalError
    ("ReduceOp cannot lower a layout ...", H100, 2026-11-23) while the forward compiles and
    matches the reference. A failure here keeps training on the reference path."""
    _probe_mimo()
    g = torch.Generator().manual_seed(0)
    B, T, R, H, N, P, K = 1, 32, 2, 2, 64, 64, 16  # shapes the forward is known to compile for
    r = lambda *s: torch.randn(*s, generator=g).cuda()  # noqa: E731
    dt = F.softplus(r(B, T, H) - 1.0)
    ins = dict(q=r(B, T, R, 1, N), k=r(B, T, R, 1, N), v=r(B, T, H, P), adt=-0.5 * dt, dt=dt, trap=r(B, T, H),
               angles=r(B, T, H, K), q_bias=r(H, R, N), k_bias=r(H, R, N))
    ins = {n: (t.bfloat16() if n in ("q", "k", "v") else t).requires_grad_() for n, t in ins.items()}
    y = mamba3_mimo_fast(**ins, D=r(H), z=r(B, T, H, P).bfloat16(), mimo_v=r(H, R, P) / R, mimo_z=r(H, R, P),
                         mimo_o=r(H, R, P) / R, chunk_size=64 // R)
    y.float().sum().backward()
    bad = [n for n, t in ins.items() if t.grad is None or not bool(torch.isfinite(t.grad).all())]
    if bad:
        raise RuntimeError(f"MIMO backward gave no finite gradient for {bad}")


dispatch.fast_path("mamba3", probe=_probe_siso,
                   doc="mamba-ssm Triton mamba3_siso_combined (Mamba-3 SISO, 16-bit, fwd+bwd, states)")
dispatch.fast_path("mamba3_mimo", probe=_probe_mimo,
                   doc="mamba-ssm TileLang mamba3_mimo forward (Mamba-3 MIMO, 16-bit, no cache, no gradient)")
dispatch.fast_path("mamba3_mimo_train", probe=_probe_mimo_backward,
                   doc="mamba-ssm TileLang mamba3_mimo forward+backward (probe compiles the backward once)")


_HALF = (torch.bfloat16, torch.float16)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def siso_fast_ok(v: Tensor, N: int, P: int, K: int, R: int, pairing: str) -> bool:
    return (R == 1 and pairing == "interleaved" and v.dtype in _HALF and _pow2(N) and _pow2(P)
            and K >= 2 and K % 2 == 0 and 2 * K <= N)


def mimo_fast_ok(v: Tensor, N: int, P: int, K: int, R: int, pairing: str) -> bool:
    return R > 1 and pairing == "half" and v.dtype in _HALF and K > 0 and N % 4 == 0 and K in (N // 2, N // 4)


def mamba3_siso_fast(
    q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor, angles: Tensor,
    q_bias: Tensor, k_bias: Tensor, carry: Mamba3Carry | None = None, *, D: Tensor | None = None,
    z: Tensor | None = None, lengths: Tensor | None = None, chunk_size: int = 64, need_state: bool = True,
    pairing: str = "interleaved",
) -> tuple[Tensor, Mamba3Carry | None]:
    """Same contract as ``mamba3_chunked`` for R = 1, on the mamba-ssm Triton kernel."""
    fn = _probe_siso()
    Bsz, T = v.shape[:2]
    dev = v.device
    dt, adt = dt.float(), adt.float()
    if lengths is not None:
        m = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).float()[..., None]
        dt, adt = dt * m, adt * m
    states = None
    if carry is not None:
        states = (carry.theta.float().contiguous(), carry.h.float().transpose(-1, -2).contiguous(),
                  carry.k[:, :, 0].float().contiguous(), carry.v.float().contiguous())
    res = fn(q[:, :, 0], k[:, :, 0], v, adt.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(),
             trap.transpose(1, 2).contiguous(), q_bias[:, 0].float().contiguous(), k_bias[:, 0].float().contiguous(),
             angles.float().contiguous(), D=None if D is None else D.float(), Z=z,
             Input_States=states, chunk_size=chunk_size, return_final_states=need_state)
    if not need_state:
        return res.to(v.dtype), None
    y, th, h, kf, vf = res
    new = Mamba3Carry(h.transpose(-1, -2).float(), kf[:, :, None].float(), vf.float(), th.float())
    if lengths is not None:  # inert slots left h and theta alone (Δ = 0); re-take k, v at the last real token
        H = v.shape[2]
        idx = (lengths - 1).clamp(min=0)
        rows = torch.arange(Bsz, device=dev)
        has = lengths > 0
        kb = _heads(k[rows, idx].float(), H) + k_bias.float()  # [B,H,1,N]
        kr = rotate(kb, torch.cos(new.theta)[:, :, None], torch.sin(new.theta)[:, :, None], pairing)
        prev = carry if carry is not None else zero_carry(Bsz, H, h.shape[-1], v.shape[-1], 1, th.shape[-1], dev)
        new = Mamba3Carry(new.h, torch.where(has[:, None, None, None], kr, prev.k.float()),
                          torch.where(has[:, None, None], v[rows, idx].float(), prev.v.float()), new.theta)
    return y.to(v.dtype), new


def mamba3_mimo_fast(
    q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor, angles: Tensor,
    q_bias: Tensor, k_bias: Tensor, *, D: Tensor, z: Tensor, mimo_v: Tensor, mimo_z: Tensor, mimo_o: Tensor,
    chunk_size: int = 64,
) -> Tensor:
    """Training forward (no initial state, no padding) on the mamba-ssm TileLang MIMO kernel."""
    fn = _probe_mimo()
    Bsz, T, R, G, N = q.shape
    K = angles.shape[-1]
    L = max(8, min(chunk_size, 64 // R))
    pad = (-T) % L
    if pad:  # zero Δ on the tail: those slots neither decay nor write the state; outputs dropped
        q, k, v, z = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (q, k, v, z))
        adt, dt, trap = (F.pad(t, (0, 0, 0, pad)) for t in (adt, dt, trap))
        angles = F.pad(angles, (0, 0, 0, 0, 0, pad))
    y = fn(q.contiguous(), k.contiguous(), v.contiguous(), adt.float().transpose(1, 2).contiguous(),
           dt.float().transpose(1, 2).contiguous(), trap.to(v.dtype).transpose(1, 2).contiguous(), q_bias.float(),
           k_bias.float(),
           mimo_v.float(), mimo_z.float(), mimo_o.float(), angles.float().contiguous(), D.float(), z.contiguous(),
           L, N // K, v.dtype)
    return y[:, :T].to(v.dtype)


def _mimo_path(*tensors: Tensor | None) -> str:
    """The MIMO fast path to ask for: forward only, or forward+backward when autograd records."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return "mamba3_mimo_train" if grad else "mamba3_mimo"


def mamba3(
    q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor, angles: Tensor,
    q_bias: Tensor, k_bias: Tensor, carry: Mamba3Carry | None = None, *, D: Tensor | None = None,
    z: Tensor | None = None, mimo_v: Tensor | None = None, mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None, lengths: Tensor | None = None, chunk_size: int = 64,
    pairing: str = "interleaved", need_state: bool = True,
) -> tuple[Tensor, Mamba3Carry | None]:
    """Mamba-3 scan over a chunk of tokens: a fast kernel when one applies, else the reference.

    Shapes as in ``mamba3_chunked``. ``need_state=False`` (no cache) lets a fast path skip
    the final state; the reference always returns it.
    """
    R, N = q.shape[2], q.shape[-1]
    P, K = v.shape[-1], angles.shape[-1]
    if siso_fast_ok(v, N, P, K, R, pairing) and dispatch.use_fast("mamba3", v):
        return mamba3_siso_fast(q, k, v, adt, dt, trap, angles, q_bias, k_bias, carry, D=D, z=z, lengths=lengths,
                                chunk_size=chunk_size, need_state=need_state, pairing=pairing)
    if (carry is None and lengths is None and not need_state and z is not None and D is not None
            and mimo_fast_ok(v, N, P, K, R, pairing)
            and dispatch.use_fast(_mimo_path(q, k, v, adt, dt, trap, angles, q_bias, k_bias, D, z, mimo_v, mimo_z,
                                             mimo_o), v)):
        return mamba3_mimo_fast(q, k, v, adt, dt, trap, angles, q_bias, k_bias, D=D, z=z, mimo_v=mimo_v,
                                mimo_z=mimo_z, mimo_o=mimo_o, chunk_size=chunk_size), None
    return mamba3_chunked(q, k, v, adt, dt, trap, angles, q_bias, k_bias, carry, D=D, z=z, mimo_v=mimo_v,
                          mimo_z=mimo_z, mimo_o=mimo_o, lengths=lengths, chunk_size=chunk_size, pairing=pairing)
