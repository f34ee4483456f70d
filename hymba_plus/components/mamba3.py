"""Mamba-3 token mixer (Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State
Space Principles", arXiv 2603.15569), laid out as the official ``mamba_ssm.modules.Mamba3``.

One ``in_proj`` (no bias, no short convolution) gives, per token::

    [z | x | B | C | dd_dt | dd_A | trap | angles]
     z, x: [H, P]   B, C: [R, G, N]   dd_dt, dd_A, trap: [H]   angles: [K]

    Δ_t = softplus(dd_dt + dt_bias)                    (dt_bias: inverse-softplus of U_log[dt_min, dt_max])
    A_t = -max(softplus(dd_A), A_floor)                (data-dependent, per head; or heavy_tail)
    λ_t = sigmoid(trap)                                (the trapezoid's mixing weight)
    B_t = RMSNorm(B) + B_bias,  C_t = RMSNorm(C) + C_bias     (per-head, per-rank biases, init 1)
    Θ_t = Θ_{t-1} + π tanh(angles_t) Δ_t               (data-dependent RoPE, shared over heads
                                                         before the per-head Δ)
    h_t = e^{Δ_t A_t} h_{t-1} + (1-λ_t) Δ_t e^{Δ_t A_t} R(Θ_{t-1}) B_{t-1} x_{t-1}^T + λ_t Δ_t R(Θ_t) B_t x_t^T
    y_t = (h_t^T R(Θ_t) C_t + D x_t) ⊙ SiLU(z_t)       (SISO; MIMO rank R: x, z up-projected
                                                         per rank, ranks summed)
    out = out_proj(y)

K = floor(N · rope_fraction / 2) angle pairs are rotated (the rest of the state is real).
The equations and the kernels (reference chunked/step scan, mamba-ssm fast paths) are in
``hymba_plus.kernels.mamba3``.

Following the official code, A is data dependent
(``-softplus(dd_A)`` floored at ``a_floor``, as in the paper and state-spaces/mamba's first
release; ``a_activation: heavy_tail`` takes the official code's later ``-heavy_tail(dd_A)``,
state-spaces/mamba#962, "Stabilize data-dependent A with heavy-tail activation"), so there is no
``A_log`` parameter and no A init range; ``reset_special`` initialises ``dt_bias``, the B/C biases, ``D`` and the MIMO weights.

State (``Mamba3State``): ``h [B,H,N,P]``, the previous real token's rotated B (``k [B,H,R,N]``)
and x (``v [B,H,P]``) that the trapezoid needs, and the cumulative angle (``theta [B,H,K]``).
Constant size. Inert (padding) slots get Δ = 0: no decay, no write, no rotation, and the
previous-token memory stays at the last real token. Decode (T = 1) runs the exact step
(``kernels.mamba3.mamba3_decode``: our one-kernel Triton step on CUDA when no gradient is
needed, the PyTorch reference ``mamba3_step`` elsewhere).

Block diffusion (``core.two_stream``): ``boundary_forward(x, ctx, block_size, offset)``
returns the ordinary forward output plus the state at every block start ``offset + j*bs``
as one ``Mamba3State`` of batch ``B*nb`` (row ``b*nb + j``), each equal to the state a cached
prefix forward leaves. It runs the reference chunked scan (first the ``offset`` tokens, then
the rest with chunks of ``gcd(chunk_size, bs)``) and takes h from its carries at chunk
starts, and the previous-token k, v and angle sum from the per-token tensors; no loop over
blocks beyond the scan's own chunk loop. ``boundary_inner`` is the same before ``out_proj``.

A speculative verify chunk (``StepContext.record``) runs the reference chunked scan with
``states_at = 0 .. T`` from the cache's carry and records the state after each position
(``LayerState.record_rows``), so ``HybridLM.rewind`` gathers each row's accepted state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cache import LayerState, StepContext
from ..core.config import spec
from ..core.registry import register
from ..kernels.dispatch import compute_dtype
from ..kernels.mamba3 import Mamba3Carry, mamba3, mamba3_chunked, mamba3_decode
from .norm import RMSNorm


def a_magnitude(x: Tensor, kind: str | None) -> Tensor:
    """|A_t| before the floor: ``softplus(x)``, or ``heavy_tail(x)`` = 1 + x for x >= 0 and
    1 / (1 - x) below (positive, continuous, differentiable at 0; its slow decay to 0 keeps |A|
    from vanishing as fast as softplus's exponential tail)."""
    if kind in (None, "softplus"):
        return F.softplus(x)
    return x.clamp_min(0) + 1.0 / (1.0 - x.clamp_max(0))


@dataclass(frozen=True)
class Mamba3Config:
    state_size: int = spec(32, min=2, doc="N, the SSM state size per head (d_state)")
    head_dim: int = spec(32, min=1, doc="P")
    expand: int = spec(2, min=1, doc="d_inner = expand * d_model")
    n_groups: int = spec(1, min=1, doc="B/C groups shared by heads")
    mimo_rank: int = spec(1, min=1, doc="R; 1 = SISO")
    rope_fraction: float = spec(0.5, min=0.0, max=1.0, doc="fraction of the state dims rotated")
    chunk_size: int = spec(64, min=1)
    dt_min: float = spec(0.001, gt=0.0)
    dt_max: float = spec(0.1, gt=0.0)
    dt_init_floor: float = spec(1e-4, gt=0.0)
    a_floor: float = spec(1e-4, min=0.0, doc="A_t <= -a_floor")
    # None is softplus (an unset field keeps existing recipes' hashes)
    a_activation: str | None = spec(None, choices=("softplus", "heavy_tail"),
                                    doc="A_t = -f(dd_A): softplus (default: the paper and the first release) or "
                                        "heavy_tail (the official code since June 2026: 1 + x for x >= 0, "
                                        "1 / (1 - x) below)")
    bc_norm_eps: float = spec(1e-5, gt=0.0)

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def inner_dim(self, d_model: int) -> int:
        """Width of ``Mamba3.inner``'s output (what ``hymba`` averages with its attention heads)."""
        return self.d_inner(d_model)

    def n_angles(self) -> int:
        return int(self.state_size * self.rope_fraction) // 2

    def check(self, model):  # noqa: ANN001
        d_inner = self.d_inner(model.d_model)
        if d_inner % self.head_dim:
            yield "head_dim", f"must divide expand * d_model ({d_inner}), got {self.head_dim}"
        elif (d_inner // self.head_dim) % self.n_groups:
            yield "n_groups", f"must divide the number of heads ({d_inner // self.head_dim}), got {self.n_groups}"
        if self.dt_min > self.dt_max:
            yield "dt_min", f"must be <= dt_max ({self.dt_max}), got {self.dt_min}"
        if self.rope_fraction > 0 and self.n_angles() < 1:
            yield "rope_fraction", "rotates fewer than 2 state dims; use 0 for a real-valued state"
        if self.mimo_rank > 1 and self.state_size % 2:
            yield "state_size", f"must be even with mimo_rank > 1 (half-split rotation), got {self.state_size}"


@dataclass
class Mamba3State(LayerState):
    """h [B,H,N,P]; k [B,H,R,N] and v [B,H,P]: the previous real token's rotated B and x;
    theta [B,H,K]: cumulative rotation angle (mod 2π)."""

    h: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    theta: Tensor | None = None

    def carry(self) -> Mamba3Carry:
        return Mamba3Carry(self.h, self.k, self.v, self.theta)

    def store(self, c: Mamba3Carry) -> None:
        dt = self.h.dtype
        self.h, self.k, self.v, self.theta = (t.to(dt) for t in c)


@register("mamba3", config=Mamba3Config, aliases=("M3",))
class Mamba3(nn.Module):
    #: a verify chunk records its states at every position (``inner``, ``StepContext.record``)
    records_states = True

    def __init__(self, cfg: Mamba3Config, *, d_model: int, **_: object):
        super().__init__()
        self.cfg = cfg
        self.d_inner = cfg.d_inner(d_model)
        self.P = cfg.head_dim
        self.H = self.d_inner // self.P
        self.N, self.R, self.G = cfg.state_size, cfg.mimo_rank, cfg.n_groups
        self.K = cfg.n_angles()
        self.pairing = "interleaved" if self.R == 1 else "half"  # as the official SISO / MIMO kernels
        bc = self.R * self.G * self.N
        self.splits = [self.d_inner, self.d_inner, bc, bc, self.H, self.H, self.H, self.K]
        self.in_proj = nn.Linear(d_model, sum(self.splits), bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.B_bias = nn.Parameter(torch.ones(self.H, self.R, self.N))
        self.C_bias = nn.Parameter(torch.ones(self.H, self.R, self.N))
        self.B_norm = RMSNorm(self.N, cfg.bc_norm_eps, zero_centered=False)
        self.C_norm = RMSNorm(self.N, cfg.bc_norm_eps, zero_centered=False)
        self.D = nn.Parameter(torch.ones(self.H))
        if self.R > 1:
            self.mimo_x = nn.Parameter(torch.empty(self.H, self.R, self.P))
            self.mimo_z = nn.Parameter(torch.empty(self.H, self.R, self.P))
            self.mimo_o = nn.Parameter(torch.empty(self.H, self.R, self.P))
        else:
            self.mimo_x = self.mimo_z = self.mimo_o = None
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.out_proj.is_residual_out = True
        for p in (self.dt_bias, self.D, self.B_bias, self.C_bias):  # biases (B, C: ones): no decay to 0
            p._no_weight_decay = True
        self.reset_special()

    def reset_special(self) -> None:
        c = self.cfg
        with torch.no_grad():
            u = torch.rand(self.H, device=self.dt_bias.device, dtype=torch.float32)
            dt = torch.exp(u * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min)).clamp(min=c.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.B_bias.fill_(1.0)
            self.C_bias.fill_(1.0)
            self.D.fill_(1.0)
            if self.R > 1:
                self.mimo_x.fill_(1.0 / self.R)
                self.mimo_z.fill_(1.0)
                self.mimo_o.fill_(1.0 / self.R)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Mamba3State:
        sd = compute_dtype(dtype)
        z = lambda *s: torch.zeros(batch_size, *s, device=device, dtype=sd)  # noqa: E731
        return Mamba3State(h=z(self.H, self.N, self.P), k=z(self.H, self.R, self.N), v=z(self.H, self.P),
                           theta=z(self.H, self.K))

    def _project(self, u: Tensor):
        Bsz, T, _ = u.shape
        z, x, Bm, Cm, dd_dt, dd_A, trap, ang = torch.split(self.in_proj(u), self.splits, dim=-1)
        z = z.reshape(Bsz, T, self.H, self.P)
        x = x.reshape(Bsz, T, self.H, self.P)
        Bm = self.B_norm(Bm.reshape(Bsz, T, self.R, self.G, self.N))
        Cm = self.C_norm(Cm.reshape(Bsz, T, self.R, self.G, self.N))
        cdt = compute_dtype(dd_dt)  # float32 for 16-bit models, float64 stays float64
        A = -a_magnitude(dd_A.to(cdt), self.cfg.a_activation).clamp(min=self.cfg.a_floor)
        dt = F.softplus(dd_dt.to(cdt) + self.dt_bias.to(cdt))
        angles = ang[:, :, None, :].expand(Bsz, T, self.H, self.K)
        return Cm, Bm, x, A * dt, dt, trap, angles, z

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32, *, n_meta: int = 0) -> int:
        """Bytes of one sequence's state (any length): h, k, v, theta in float32 (float64 for a
        float64 model), as ``init_state`` allocates them."""
        elem = 8 if dtype == torch.float64 else 4
        return elem * self.H * (self.N * self.P + self.R * self.N + self.P + self.K)

    def inner(self, u: Tensor, ctx: StepContext, state: Mamba3State | None = None) -> Tensor:
        """The gated SSM output before ``out_proj``: [B, T, d_inner]. Advances ``state``."""
        Bsz, T, _ = u.shape
        q, k, x, adt, dt, trap, angles, z = self._project(u)
        kw = dict(D=self.D, mimo_v=self.mimo_x, mimo_z=self.mimo_z, mimo_o=self.mimo_o, pairing=self.pairing)
        carry = state.carry() if state is not None else None
        if ctx.record and state is not None:  # a speculative verify chunk: the states at every position too
            y, new, at = mamba3_chunked(q, k, x, adt, dt, trap, angles, self.C_bias, self.B_bias, carry, z=z,
                                        lengths=ctx.lengths, chunk_size=self.cfg.chunk_size,
                                        states_at=torch.arange(T + 1, device=u.device), **kw)
            state.store(new)
            dt_s = state.h.dtype
            flat = [t.reshape(Bsz * (T + 1), *t.shape[2:]).to(dt_s) for t in at]
            state.record_rows(Mamba3State(h=flat[0], k=flat[1], v=flat[2], theta=flat[3]), T)
            return y.reshape(Bsz, T, self.d_inner).to(u.dtype)
        if T == 1 and state is not None:  # decode: the exact recurrence step (one Triton kernel on CUDA)
            valid = None if ctx.lengths is None else ctx.lengths > 0
            y, new = mamba3_decode(q[:, 0], k[:, 0], x[:, 0], adt[:, 0], dt[:, 0], trap[:, 0], angles[:, 0],
                                   self.C_bias, self.B_bias, carry, z=z[:, 0], valid=valid, **kw)
            y = y[:, None]
        else:
            y, new = mamba3(q, k, x, adt, dt, trap, angles, self.C_bias, self.B_bias, carry, z=z,
                            lengths=ctx.lengths, chunk_size=self.cfg.chunk_size, need_state=state is not None, **kw)
        if state is not None:
            state.store(new)
        return y.reshape(Bsz, T, self.d_inner).to(u.dtype)

    def forward(self, u: Tensor, ctx: StepContext, state: Mamba3State | None = None) -> Tensor:
        y = self.inner(u, ctx, state)
        return self.out_proj(y) if self.out_proj is not None else y

    def boundary_inner(self, u: Tensor, ctx: StepContext, block_size: int,
                       offset: int) -> tuple[Tensor, Mamba3State]:
        """``boundary_forward`` before ``out_proj``: ([B, T, d_inner], state of batch B*nb)
        (hymba's SSM heads use this)."""
        Bsz, T, _ = u.shape
        if ctx.lengths is not None:
            raise ValueError("boundary_forward takes no padding (ctx.lengths must be None)")
        nb = (T - offset) // block_size if block_size > 0 else 0
        if block_size < 1 or offset < 0 or nb < 1 or offset + nb * block_size != T:
            raise ValueError(f"need T = offset + nb * block_size with nb >= 1, got T={T}, "
                             f"offset={offset}, block_size={block_size}")
        q, k, x, adt, dt, trap, angles, z = self._project(u)
        st0 = self.init_state(Bsz, u.device, u.dtype)
        kw = dict(D=self.D, mimo_v=self.mimo_x, mimo_z=self.mimo_z, mimo_o=self.mimo_o, pairing=self.pairing)
        ins = (q, k, x, adt, dt, trap, angles, z)
        carry, ys = st0.carry(), []
        if offset:  # the first offset tokens (meta) alone: their end carry is block 0's start
            a = [t[:, :offset] for t in ins]
            y0, carry = mamba3_chunked(*a[:7], self.C_bias, self.B_bias, carry, z=a[7],
                                       chunk_size=self.cfg.chunk_size, **kw)
            ys.append(y0)
        L = math.gcd(self.cfg.chunk_size, block_size)  # chunks tile the blocks: block j starts chunk j*bs/L
        a = [t[:, offset:] for t in ins]
        y1, _, starts = mamba3_chunked(*a[:7], self.C_bias, self.B_bias, carry, z=a[7], chunk_size=L,
                                       return_starts=True, **kw)
        ys.append(y1)
        y = torch.cat(ys, dim=1) if offset else y1
        sel = slice(None, None, block_size // L)
        fields = [t[:, sel].reshape(Bsz * nb, *t.shape[2:]).to(st0.h.dtype) for t in starts]
        states = Mamba3State(h=fields[0], k=fields[1], v=fields[2], theta=fields[3])
        return y.reshape(Bsz, T, self.d_inner).to(u.dtype), states

    def boundary_forward(self, x: Tensor, ctx: StepContext, block_size: int,
                         offset: int) -> tuple[Tensor, Mamba3State]:
        """Block-diffusion clean pass (``core.two_stream``): the ordinary forward of ``x``
        ([B, T, D], no padding, T = offset + nb * block_size) and the cache state at every
        block start, as one ``Mamba3State`` of batch B*nb whose row ``b*nb + j`` is the state a
        cached forward of ``x[b, :offset + j*block_size]`` from ``init_state`` leaves (j = 0:
        after the first ``offset`` tokens; the init state if offset = 0).

        Runs the reference ``mamba3_chunked`` (the first ``offset`` tokens, then the rest from
        their carry with chunks of ``gcd(chunk_size, block_size)`` so that the chunk-start
        carries include every block start) even where ``forward`` would take a mamba-ssm fast
        kernel (16-bit CUDA): then y matches that forward only to the kernel's precision."""
        y, states = self.boundary_inner(x, ctx, block_size, offset)
        return (self.out_proj(y) if self.out_proj is not None else y), states
