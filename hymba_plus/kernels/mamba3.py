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
* ``mamba3_step`` — the exact per-token recurrence in PyTorch (the decode step's reference and
  the kernel's oracle; ``mamba3_recurrent`` loops it over T and is only the test oracle).
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

* ``mamba3_decode`` — the decode step (T = 1 with a carry; the layer's cached one-token call).
  Fast path ``"mamba3_step"`` (ours; issue #18: a captured decode step is bound by its kernel
  count, and the reference step is dozens of small kernels per layer): ``mamba3_step_triton``
  computes one token of ``mamba3_step`` in ONE Triton kernel (``_mamba3_step_kernel``), one
  program per (batch row, head, tile of the head dim P) with the state dim N in registers, all
  in float32:

  - the angle update ``Θ' = (Θ + π tanh(angles) Δ) mod 2π`` (``torch.remainder``'s fmod-based
    rule) and the "RoPE trick" rotation of C (q) and B (k), after their per-head biases, by
    ``Θ'`` (both pairings, any K <= N/2, grouped B/C shared by H / G heads);
  - the exponential-trapezoidal update (paper §3) of the ``[N, P-tile]`` block of h,
    ``h' = α h + β Σ_r k_prev,r v_prev,r^T + γ Σ_r kr_r vr_r^T`` with ``α = exp(ΔA)``,
    ``β = (1 - λ) Δ α``, ``γ = λ Δ``, ``λ = sigmoid(trap)`` and the MIMO up-projection
    ``v_r = x ⊙ W^x_r`` (R = 1: SISO);
  - the readout ``y_r = qr_r^T h'``, D skip, ``SiLU(z ⊙ W^z_r)`` gate and rank sum with
    ``W^o_r`` (``_finish``); a ``valid`` mask zeroes Δ and ΔA as the reference does and keeps the
    carried k, x of invalid rows (their carry is the old one, bit for bit).

  It returns y in x's dtype and a NEW float32 carry (nothing written in place), with libdevice's
  ``exp`` / ``tanh`` / ``sin`` / ``cos`` / ``fmod`` and no fused multiply-add
  (``kernels._triton``). The launch config is fixed by (N, P, R) (no autotuning, no host read), so
  the decode engine compiles it in its eager warm-up steps and captures it in its CUDA graph.
  Used for float16 / bfloat16 / float32 inputs, N <= 256, when no gradient is needed, eagerly;
  its probe compares it on the GPU with ``mamba3_step`` in float64 (SISO / MIMO R 2 and 4, both
  pairings, grouped heads, a valid mask). Checked in Triton's CPU interpreter and compiled for
  sm_90 offline; it has not run on a GPU yet. The ``mamba_ssm`` CuTe decode step
  (``mamba3_step_fn``) is not used: it needs the CUTLASS DSL, which the GPU machines here lack.

  Reference only: the decode step with gradients, float64 or on the CPU, chunked prefill into a
  cache for R > 1, every float32/float64 chunk, and every CPU computation.
"""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from ._triton import cos_f32, exp_f32, fmod_f32, next_pow2, sigmoid_f32, silu_f32, sin_f32, tanh_f32, triton

if triton is not None:
    import triton.language as tl

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
@dispatch.reference_math
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


@dispatch.reference_math
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


# ----------------------------------------------------------------------------- decode step kernel (ours)
STEP = "mamba3_step"
_STEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STEP_MAX_N = 256  # the state column [N] and an [N, BLOCK_P] tile of h live in registers

if triton is not None:

    @triton.jit
    def _rot_index(n, N, K, INTERLEAVED: tl.constexpr):
        """For state dims ``n``: rotated?, first element of its pair?, its angle index and its
        partner dim (``rotate``'s pairings: (2i, 2i+1) or (i, N//2 + i), i < K)."""
        if INTERLEAVED:
            rot = n < 2 * K
            first = (n % 2) == 0
            i = n // 2
            partner = tl.where(first, n + 1, n - 1)
        else:
            half = N // 2
            first = n < K
            second = (n >= half) & (n < half + K)
            rot = first | second
            i = tl.where(first, n, n - half)
            partner = tl.where(first, n + half, n - half)
        i = tl.where(rot, i, 0)
        partner = tl.where(rot, partner, n)
        return rot, first, i, partner

    @triton.jit
    def _angle(th_ptr, ang_ptr, i, m, dt, sa_k):
        """theta' = (theta + pi tanh(angle) dt) mod 2 pi, as ``torch.remainder`` (fmod, then + 2 pi
        where the result is negative), in the reference's order of operations."""
        th0 = tl.load(th_ptr + i, mask=m, other=0.0).to(tl.float32)
        an = tl.load(ang_ptr + i * sa_k, mask=m, other=0.0).to(tl.float32)
        th = th0 + (3.141592653589793 * tanh_f32(an)) * dt
        r = fmod_f32(th, 6.283185307179586)
        return tl.where((r != 0) & (r < 0), r + 6.283185307179586, r)

    @triton.jit
    def _rotated(ptr, bptr, n, partner, rot, first, c, s, mn, s_n):
        """(x + bias) rotated by the per-dim angle (cos c, sin s): x cos - x' sin for the first
        element of a pair, x' sin + x cos for the second, x elsewhere (x' the partner)."""
        x = tl.load(ptr + n * s_n, mask=mn, other=0.0).to(tl.float32) + tl.load(bptr + n, mask=mn, other=0.0).to(
            tl.float32)
        xp = tl.load(ptr + partner * s_n, mask=mn, other=0.0).to(tl.float32) + tl.load(
            bptr + partner, mask=mn, other=0.0).to(tl.float32)
        return tl.where(rot, tl.where(first, x * c - xp * s, xp * s + x * c), x)

    @triton.jit
    def _mamba3_step_kernel(
        q_ptr, k_ptr, v_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr, qb_ptr, kb_ptr,
        h_ptr, kc_ptr, vc_ptr, th_ptr, d_ptr, z_ptr, mv_ptr, mz_ptr, mo_ptr, valid_ptr,
        y_ptr, nh_ptr, nk_ptr, nv_ptr, nth_ptr,
        H, N, P, K, HPG,
        sq_b, sq_r, sq_g, sq_n, sk_b, sk_r, sk_g, sk_n, sv_b, sv_h, sv_p,
        sadt_b, sadt_h, sdt_b, sdt_h, str_b, str_h, sa_b, sa_h, sa_k, sz_b, sz_h, sz_p,
        R: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_MV: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, HAS_VALID: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One Mamba-3 token (Lahoti et al., arXiv 2603.15569, §3: the exponential-trapezoidal
        update on a state whose inputs / readouts are rotated by the cumulative data-dependent
        angle, the "RoPE trick"; ``mamba3_step`` is the reference) for row ``b``, head ``h`` and head dims
        ``[pt * BLOCK_P, ...)``: angle update, rotation of C (q) and B (k) with their biases,
        the exponential-trapezoidal update of the ``[N, BLOCK_P]`` tile of h for every rank,
        the readout, D skip, SiLU(z) gate and rank sum. The carried k and theta are written by
        the tile ``pt == 0``. Parameters and carries are contiguous; activations are strided."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        pt = tl.program_id(2)
        bh = b * H + h
        g = h // HPG
        n = tl.arange(0, BLOCK_N)
        mn = n < N
        p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = p < P

        dt = tl.load(dt_ptr + b * sdt_b + h * sdt_h).to(tl.float32)
        adt = tl.load(adt_ptr + b * sadt_b + h * sadt_h).to(tl.float32)
        if HAS_VALID:
            ok = tl.load(valid_ptr + b) != 0
            m = ok.to(tl.float32)
            dt = dt * m
            adt = adt * m
        lam = sigmoid_f32(tl.load(trap_ptr + b * str_b + h * str_h).to(tl.float32))
        alpha = exp_f32(adt)
        beta = ((1.0 - lam) * dt) * alpha
        gamma = lam * dt

        # the new angle per state dim (both elements of a pair compute the same value)
        rot, first, i, partner = _rot_index(n, N, K, INTERLEAVED)
        th = _angle(th_ptr + bh * K, ang_ptr + b * sa_b + h * sa_h, i, rot & mn, dt, sa_k)
        c = cos_f32(th)
        s = sin_f32(th)
        if pt == 0:  # the carried angle [K]
            kk = tl.arange(0, BLOCK_K)
            mk = kk < K
            thk = _angle(th_ptr + bh * K, ang_ptr + b * sa_b + h * sa_h, kk, mk, dt, sa_k)
            tl.store(nth_ptr + bh * K + kk, thk, mask=mk)

        # h' = alpha h + beta sum_r k_prev,r v_prev,r^T + gamma sum_r kr_r vr_r^T
        v = tl.load(v_ptr + b * sv_b + h * sv_h + p * sv_p, mask=mp, other=0.0).to(tl.float32)
        vprev0 = tl.load(vc_ptr + bh * P + p, mask=mp, other=0.0).to(tl.float32)
        s1 = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        for r in tl.static_range(R):
            kr = _rotated(k_ptr + b * sk_b + r * sk_r + g * sk_g, kb_ptr + (h * R + r) * N, n, partner, rot, first,
                          c, s, mn, sk_n)
            kprev = tl.load(kc_ptr + (bh * R + r) * N + n, mask=mn, other=0.0).to(tl.float32)
            vr = v
            vprev = vprev0
            if HAS_MV:
                mv = tl.load(mv_ptr + (h * R + r) * P + p, mask=mp, other=0.0).to(tl.float32)
                vr = v * mv
                vprev = vprev0 * mv
            s1 += kprev[:, None] * vprev[None, :]
            s2 += kr[:, None] * vr[None, :]
            if pt == 0:  # the carried k: this token's rotated B, or the old one on an invalid row
                if HAS_VALID:
                    kr = tl.where(ok, kr, kprev)
                tl.store(nk_ptr + (bh * R + r) * N + n, kr, mask=mn)
        hp = (h_ptr + bh * N * P) + n[:, None] * P + p[None, :]
        mnp = mn[:, None] & mp[None, :]
        h0 = tl.load(hp, mask=mnp, other=0.0).to(tl.float32)
        hn = alpha * h0 + beta * s1 + gamma * s2
        tl.store((nh_ptr + bh * N * P) + n[:, None] * P + p[None, :], hn, mask=mnp)
        if HAS_VALID:
            tl.store(nv_ptr + bh * P + p, tl.where(ok, v, vprev0), mask=mp)
        else:
            tl.store(nv_ptr + bh * P + p, v, mask=mp)

        # y = sum_r w_o,r * (qr_r^T h' + D vr_r) * SiLU(z w_z,r)   (``_finish``)
        if HAS_Z:
            z = tl.load(z_ptr + b * sz_b + h * sz_h + p * sz_p, mask=mp, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for r in tl.static_range(R):
            qr = _rotated(q_ptr + b * sq_b + r * sq_r + g * sq_g, qb_ptr + (h * R + r) * N, n, partner, rot, first,
                          c, s, mn, sq_n)
            y = tl.sum(qr[:, None] * hn, axis=0)
            if HAS_D:
                vr = v
                if HAS_MV:
                    vr = v * tl.load(mv_ptr + (h * R + r) * P + p, mask=mp, other=0.0).to(tl.float32)
                y = y + tl.load(d_ptr + h).to(tl.float32) * vr
            if HAS_Z:
                zr = z
                if HAS_MZ:
                    zr = z * tl.load(mz_ptr + (h * R + r) * P + p, mask=mp, other=0.0).to(tl.float32)
                y = y * silu_f32(zr)
            if HAS_MO:
                acc += y * tl.load(mo_ptr + (h * R + r) * P + p, mask=mp, other=0.0).to(tl.float32)
            else:
                acc = y
        tl.store(y_ptr + bh * P + p, acc.to(y_ptr.dtype.element_ty), mask=mp)


def step_launch_config(N: int, P: int, R: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_P, num_warps), fixed by the shapes: the whole state column in registers,
    P in tiles of at most 32 (16 for N <= 16) with an h tile of at most 4096 float32 values, one
    warp per 1024 of them. Chosen from ptxas's register reports for sm_90 (Triton 3.9): no spills
    for N in 8 .. 256, R in 1, 2, 4; wider P tiles or more warps per tile spilled at N 32-64."""
    block_n = next_pow2(N)
    block_p = min(next_pow2(P), 32 if block_n >= 32 else 16, max(1, 4096 // block_n))
    warps = max(1, block_n * block_p // 1024)
    if block_n <= 16 and R >= 4:
        warps = 2
    return block_n, block_p, warps


def mamba3_step_triton(
    q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor, angles: Tensor,
    q_bias: Tensor, k_bias: Tensor, carry: Mamba3Carry, *, D: Tensor | None = None, z: Tensor | None = None,
    mimo_v: Tensor | None = None, mimo_z: Tensor | None = None, mimo_o: Tensor | None = None,
    pairing: str = "interleaved", valid: Tensor | None = None,
) -> tuple[Tensor, Mamba3Carry]:
    """``mamba3_step`` as ONE Triton kernel (same arguments, same results: y [B,H,P] in v's
    dtype and a new float32 carry). Float16 / bfloat16 / float32 inputs, N <= ``STEP_MAX_N``,
    ``mimo_o`` given when R > 1. Activations may be strided views; parameters and the carry
    are made contiguous (no copy when they are)."""
    Bsz, R, G, N = q.shape
    H, P, K = v.shape[1], v.shape[2], angles.shape[-1]
    if pairing not in ("interleaved", "half"):
        raise ValueError(f"pairing must be 'interleaved' or 'half', got {pairing!r}")
    dev, f32 = v.device, torch.float32
    h0, kc, vc, th0 = (t.contiguous() for t in carry)
    qb, kb = q_bias.contiguous(), k_bias.contiguous()
    y = torch.empty(Bsz, H, P, device=dev, dtype=v.dtype)
    new = Mamba3Carry(torch.empty(Bsz, H, N, P, device=dev, dtype=f32), torch.empty(Bsz, H, R, N, device=dev, dtype=f32),
                      torch.empty(Bsz, H, P, device=dev, dtype=f32), torch.empty(Bsz, H, K, device=dev, dtype=f32))
    params = [None if t is None else t.contiguous() for t in (D, mimo_v, mimo_z, mimo_o)]
    zs = z.stride() if z is not None else (0, 0, 0)
    ang_s = angles.stride() if K else (0, 0, 0)
    block_n, block_p, warps = step_launch_config(N, P, R)
    grid = (Bsz, H, triton.cdiv(P, block_p))
    ph = lambda t: v if t is None else t  # noqa: E731 - placeholder pointer for an absent input
    _mamba3_step_kernel[grid](
        q, k, v, adt, dt, trap, angles if K else v, qb, kb,
        h0, kc, vc, th0 if K else v, ph(params[0]), ph(z), ph(params[1]), ph(params[2]), ph(params[3]),
        v if valid is None else valid.view(torch.uint8) if valid.dtype == torch.bool else valid,
        y, new.h, new.k, new.v, new.theta if K else y,
        H, N, P, K, H // G,
        *q.stride(), *k.stride(), *v.stride(), *adt.stride(), *dt.stride(), *trap.stride(), *ang_s, *zs,
        R=R, INTERLEAVED=pairing == "interleaved", HAS_D=D is not None, HAS_Z=z is not None,
        HAS_MV=mimo_v is not None, HAS_MZ=mimo_z is not None and z is not None, HAS_MO=mimo_o is not None,
        HAS_VALID=valid is not None, BLOCK_N=block_n, BLOCK_P=block_p,
        BLOCK_K=triton.next_power_of_2(max(K, 1)), num_warps=warps, enable_fp_fusion=False)
    return y, new


STEP_PROBE_CASES = (  # B, R, G, H, N, P, K, pairing, dtype, D/z, valid, mimo
    (3, 1, 2, 4, 32, 48, 8, "interleaved", torch.bfloat16, True, True, False),
    (2, 2, 1, 4, 64, 64, 32, "half", torch.float32, True, False, True),
    (3, 4, 2, 4, 16, 40, 4, "half", torch.bfloat16, False, True, True),
    (2, 1, 1, 2, 128, 64, 64, "interleaved", torch.float32, True, True, False),
)


def _probe_step() -> None:
    """The kernel on this GPU against ``mamba3_step`` in float64 on the GPU: y within one 16-bit
    rounding (2e-2 of the largest) or 1e-4 (float32), the new h, k, v to 1e-4, the angle's cos and
    sin to 1e-4; the carry of an invalid row bit-equal to the old one."""
    if triton is None or not torch.cuda.is_available():
        raise RuntimeError("needs triton and a CUDA device")
    g = torch.Generator().manual_seed(0)
    for B, R, G, H, N, P, K, pairing, dt_, dz, with_valid, mimo in STEP_PROBE_CASES:
        r = lambda *s: torch.randn(*s, generator=g).cuda()  # noqa: E731
        dt = F.softplus(r(B, H) - 1.0)
        ins = dict(q=r(B, R, G, N).to(dt_), k=r(B, R, G, N).to(dt_), v=r(B, H, P).to(dt_), adt=-dt * 0.7, dt=dt,
                   trap=r(B, H).to(dt_), angles=r(B, H, K).to(dt_), q_bias=r(H, R, N), k_bias=r(H, R, N))
        kw = dict(D=r(H), z=r(B, H, P).to(dt_)) if dz else {}
        if mimo:
            kw.update(mimo_v=r(H, R, P), mimo_z=r(H, R, P), mimo_o=r(H, R, P))
        carry = Mamba3Carry(r(B, H, N, P), r(B, H, R, N), r(B, H, P), r(B, H, K).remainder(TWO_PI))
        valid = (torch.arange(B) % 2 == 0).cuda() if with_valid else None
        y, new = mamba3_step_triton(**ins, carry=carry, pairing=pairing, valid=valid, **kw)
        d64 = lambda t: t.double() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
        y0, ref = mamba3_step(**{n_: d64(t) for n_, t in ins.items()}, carry=Mamba3Carry(*map(d64, carry)),
                              pairing=pairing, valid=valid, **{n_: d64(t) for n_, t in kw.items()})
        errs = {"y": dispatch.max_rel_err(y, y0), "h": dispatch.max_rel_err(new.h, ref.h),
                "k": dispatch.max_rel_err(new.k, ref.k), "v": dispatch.max_rel_err(new.v, ref.v),
                "cos": float((torch.cos(new.theta.double()) - torch.cos(ref.theta)).abs().max()),
                "sin": float((torch.sin(new.theta.double()) - torch.sin(ref.theta)).abs().max())}
        tol = {n_: 1e-4 for n_ in errs} | {"y": 2e-2 if dt_ != torch.float32 else 1e-4}
        bad = {n_: e for n_, e in errs.items() if not e <= tol[n_]}
        if valid is not None:
            inv = ~valid
            if not all(torch.equal(a[inv], b[inv]) for a, b in zip(new, carry)):
                bad["invalid row's carry changed"] = 1.0
        if bad:
            raise RuntimeError(f"mamba3_step kernel differs from the reference ({B, R, G, H, N, P, K, pairing, dt_}): "
                               f"{bad}")


dispatch.fast_path(STEP, probe=_probe_step,
                   doc="own Triton kernel: the Mamba-3 decode step (T == 1 with a carry) in one launch, inference")


def step_fast_ok(*tensors: Tensor | None, R: int, N: int, has_mimo_o: bool) -> bool:
    """The decode-step kernel applies: Triton present, every tensor float16 / bfloat16 / float32
    (a float64 computation stays exact on the reference), N <= ``STEP_MAX_N``, ``mimo_o`` given
    when R > 1 (the reference keeps a rank dim otherwise), no gradient needed (the kernel has no
    backward), eager, and on CUDA with the probe passed."""
    ts = [t for t in tensors if t is not None]
    if triton is None or N > STEP_MAX_N or (R > 1 and not has_mimo_o):
        return False
    if any(t.is_floating_point() and t.dtype not in _STEP_DTYPES for t in ts):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    return not dispatch.tracing(*ts) and dispatch.use_fast(STEP, *ts)


def mamba3_decode(
    q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor, angles: Tensor,
    q_bias: Tensor, k_bias: Tensor, carry: Mamba3Carry, *, D: Tensor | None = None, z: Tensor | None = None,
    mimo_v: Tensor | None = None, mimo_z: Tensor | None = None, mimo_o: Tensor | None = None,
    pairing: str = "interleaved", valid: Tensor | None = None,
) -> tuple[Tensor, Mamba3Carry]:
    """One decode token (``mamba3_step``'s contract): the ``mamba3_step`` kernel when
    ``step_fast_ok``, else the reference step (CPU, float64, gradients, tracing)."""
    if step_fast_ok(q, k, v, adt, dt, trap, angles, q_bias, k_bias, *carry, D, z, mimo_v, mimo_z, mimo_o, valid,
                    R=q.shape[1], N=q.shape[-1], has_mimo_o=mimo_o is not None):
        return mamba3_step_triton(q, k, v, adt, dt, trap, angles, q_bias, k_bias, carry, D=D, z=z, mimo_v=mimo_v,
                                  mimo_z=mimo_z, mimo_o=mimo_o, pairing=pairing, valid=valid)
    return mamba3_step(q, k, v, adt, dt, trap, angles, q_bias, k_bias, carry, D=D, z=z, mimo_v=mimo_v, mimo_z=mimo_z,
                       mimo_o=mimo_o, pairing=pairing, valid=valid)


# ----------------------------------------------------------------------------- chunked reference
@dispatch.reference_math
def mamba3_chunked(
    q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Tensor, angles: Tensor,
    q_bias: Tensor, k_bias: Tensor, carry: Mamba3Carry | None = None, *, D: Tensor | None = None,
    z: Tensor | None = None, mimo_v: Tensor | None = None, mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None, lengths: Tensor | None = None, chunk_size: int = 64,
    pairing: str = "interleaved", return_starts: bool = False, states_at: Tensor | None = None,
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

    ``states_at`` ([m] token counts in ``[0, T]``; not with ``return_starts``) also returns the
    carry after each of those many tokens, fields with a dim of m after the batch as above
    (a speculative verify chunk's states at every position, ``Mamba3.inner`` recording): h
    inside a chunk as its start state decayed plus the chunk's decay-matrix row, i.e.
    ``h_i = e^{cum_{i-1}} (h_start + fold) + sum_{s<i} M[i-1, s] k_s v_s^T`` (the same terms as
    the outputs; no loop over tokens), the previous-token k, v and angle sum gathered. With
    ``lengths``, counts past a row's real tokens give its state after them but for k, v, theta
    (inert tokens'); read only counts up to ``lengths[b]``.
    """
    Bsz, T, R, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    cdt = dispatch.compute_dtype(v)
    dev = v.device
    if return_starts and lengths is not None:
        raise ValueError("return_starts needs lengths=None (every slot real)")
    if return_starts and states_at is not None:
        raise ValueError("mamba3_chunked: return_starts or states_at, not both")
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
    M1 = M  # [B,H,c,L,L] before the rank repeat (states_at)
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
    if states_at is not None:
        at = states_at.to(device=dev, dtype=torch.long)
        n_st = at // L  # the chunk a count falls in (nc: the end, only for at == T == nc*L)
        n_in = n_st.clamp(max=nc - 1)
        i = at - n_st * L  # tokens of that chunk already taken
        t = (i - 1).clamp(min=0)
        Mrow = M1[:, :, n_in, t]  # [B,H,m,L]: row i-1 of the chunk's decay matrix
        h_in = (torch.einsum("bhms,bhmsrn,bhmsrp->bhmnp", Mrow, kc[:, :, n_in], vc[:, :, n_in])
                + torch.exp(cum[:, :, n_in, t])[..., None, None] * s0[:, :, n_in])
        h_at = torch.stack(h_starts + [h], dim=2)[:, :, n_st]  # i = 0: the carry at the chunk start
        h_at = torch.where((i > 0)[:, None, None], h_in, h_at).transpose(1, 2)  # [B,m,H,N,P]
        prev = (at - 1).clamp(min=0)
        first = (at == 0)[None, :, None, None]
        at_k = torch.where(first[..., None], carry.k.to(cdt)[:, None], kr[:, prev])  # [B,m,H,R,N]
        at_v = torch.where(first, carry.v.to(cdt)[:, None], v[:, prev].to(cdt))  # [B,m,H,P]
        at_th = torch.where(first, carry.theta.to(cdt)[:, None], theta[:, prev])  # [B,m,H,K]
        return out, Mamba3Carry(h, last_k, last_v, last_th), Mamba3Carry(h_at, at_k, at_v, at_th)
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
