"""Residual add fused with the next pre-norm: ``s = x + y; h = RMSNorm(s)`` (Zhang & Sennrich 2019,
arXiv 1910.07467, Eq. 4), the pre-norm block's ``x + mixer(norm(x))`` then ``norm(x)`` of the
ffn sublayer (``blocks/block.py``), with the normalised value returned directly in the dtype its
consumer computes in (``out_dtype``: autocast's bf16 in mixed-precision training, where the
residual stream stays float32).

Reference (any device, ``add_rms_norm_ref``): ``s = x + y`` (PyTorch's promotion: float32 + bf16
-> float32), ``h = kernels.norm.rms_norm(s, 1 + w or w)`` (float32 math, result in s's dtype),
then ``h.to(out_dtype)`` -- under autocast that cast is the one the next GEMM would make anyway.
Without ``y`` it is the norm alone with the output cast (``s`` is then x).

Fast path (``add_rms_norm``, CUDA): ONE own Triton kernel forward (``_add_rms_norm_fwd_kernel``,
one row per program: the add, the sum of squares, the scaled row, both stores) instead of an add,
the norm and a cast; training wraps it in ``_AddRMSNormFn``, which keeps only s (the residual
output, which the next sublayer's add needs anyway) and the weight, and whose backward is ONE
own Triton kernel too (``_add_rms_norm_bwd_kernel``: 16 programs per SM, each walks its strided
rows) writing ``d s = d s_out + rstd (dh' - sh mean(dh' sh))`` (``dh' = dh * scale``, ``sh = s
rstd``) once as x's gradient and once as y's (each in its own dtype), plus a float32 partial sum
of ``d scale = sum dh sh`` per program and one sum over the programs. So one training step of a
pre-norm block reads and writes the [.., D] residual stream once per fused sublayer boundary
instead of in an add, a norm, a cast, their backward kernels, a gradient cast and the gradient
add. The roundings are the reference's: s rounded to its dtype before it is normalised, the
scale ``1 + w`` in float32, ``h`` rounded to s's dtype and then to ``out_dtype``; only
the sum of squares is reduced in another order (round-off). Launch configs are fixed by the
shape (CUDA graphs: no autotuning, no host sync). Under ``torch.compile`` the reference is traced
(Inductor fuses it itself).

Why not a library's kernel: fla's ``rms_norm(..., residual=, prenorm=True)`` fuses the add with a
float32 residual, but without a residual its output has the input's dtype (the pre-norm of the
first sublayer would still need the cast) and it is autotuned; Liger's fused add + RMSNorm
writes s and h in x's dtype (no float32 residual with a bf16 output).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from ._triton import triton
from .norm import bwd_programs, norm_scale, rms_norm, row_warps, rows

if triton is not None:
    import triton.language as tl

FAST = "add_rms_norm"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def add_rms_norm_ref(x: Tensor, y: Tensor | None, weight: Tensor, eps: float, zero_centered: bool = True,
                     out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(s, h)``: ``s = x + y`` (x without y), ``h = rms_norm(s, 1 + w or w)`` in ``out_dtype``
    (default s's dtype)."""
    s = x if y is None else x + y
    h = rms_norm(s, norm_scale(weight, zero_centered), eps)
    return s, h.to(out_dtype or s.dtype)


if triton is not None:

    @triton.jit
    def _add_rms_norm_fwd_kernel(x_ptr, y_ptr, w_ptr, s_ptr, h_ptr, D, eps, stride_x, stride_y,
                                 HAS_Y: tl.constexpr, ZERO_CENTERED: tl.constexpr, BLOCK_D: tl.constexpr):
        """Row ``pid`` of x [N, D] (+ y): s = x + y in float32 rounded to s's dtype (stored, [N, D]
        contiguous), then h = s * rstd * scale rounded to s's dtype and then to h's ([N, D])."""
        n = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        s = tl.load(x_ptr + n * stride_x + d, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            s = s + tl.load(y_ptr + n * stride_y + d, mask=m, other=0.0).to(tl.float32)
            s = s.to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + n * D + d, s, mask=m)
            s = s.to(tl.float32)
        w = tl.load(w_ptr + d, mask=m, other=0.0)
        if ZERO_CENTERED:  # ``norm.norm_scale``: 1 + w in float32
            w = 1.0 + w.to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(s * s, axis=0) / D + eps)
        h = (s * rstd * w.to(tl.float32)).to(s_ptr.dtype.element_ty)  # rms_norm's result, in s's dtype
        tl.store(h_ptr + n * D + d, h.to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _add_rms_norm_bwd_kernel(s_ptr, w_ptr, dh_ptr, ds_ptr, dx_ptr, dy_ptr, dwp_ptr, N, D, eps, stride_dh,
                                 stride_ds, HAS_DS: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr,
                                 WRITE_DW: tl.constexpr, ZERO_CENTERED: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows ``pid, pid + P, ...`` of s [N, D] (contiguous): with ``rstd = 1 / sqrt(mean s^2 +
        eps)``, ``sh = s rstd``, ``g = rstd (dh scale - sh mean(dh scale sh)) + ds`` in float32,
        stored as dx and dy ([N, D] contiguous, each in its pointer's dtype), and the program's
        part of d scale, ``sum over its rows of dh sh``, as row ``pid`` of the float32 [P, D]
        partial sums."""
        pid = tl.program_id(0)
        P = tl.num_programs(0)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        w = tl.load(w_ptr + d, mask=m, other=0.0)
        if ZERO_CENTERED:
            w = 1.0 + w.to(tl.float32)
        scale = w.to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        n = pid.to(tl.int64)
        for _ in range(pid, N, P):
            s = tl.load(s_ptr + n * D + d, mask=m, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + n * stride_dh + d, mask=m, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt_rn(tl.sum(s * s, axis=0) / D + eps)
            sh = s * rstd
            if WRITE_DW:
                dw += dh * sh
            dhs = dh * scale
            g = rstd * (dhs - sh * (tl.sum(dhs * sh, axis=0) / D))
            if HAS_DS:
                g += tl.load(ds_ptr + n * stride_ds + d, mask=m, other=0.0).to(tl.float32)
            if WRITE_DX:
                tl.store(dx_ptr + n * D + d, g.to(dx_ptr.dtype.element_ty), mask=m)
            if WRITE_DY:
                tl.store(dy_ptr + n * D + d, g.to(dy_ptr.dtype.element_ty), mask=m)
            n += P
        if WRITE_DW:
            tl.store(dwp_ptr + pid * D + d, dw, mask=m)


def add_rms_norm_triton(x: Tensor, y: Tensor | None, weight: Tensor, eps: float, zero_centered: bool = True,
                        out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """The one-kernel forward: ``(s, h)`` as ``add_rms_norm_ref`` (s is x itself without y)."""
    D = x.shape[-1]
    xs = rows(x)
    ys = None if y is None else rows(y)
    sdt = x.dtype if y is None else torch.promote_types(x.dtype, y.dtype)
    s = x if y is None else torch.empty(x.shape, device=x.device, dtype=sdt)
    h = torch.empty(x.shape, device=x.device, dtype=out_dtype or sdt)
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    block_d = triton.next_power_of_2(D)
    if xs.shape[0]:
        _add_rms_norm_fwd_kernel[(xs.shape[0],)](
            xs, xs if ys is None else ys, w, xs if y is None else s, h, D, eps, xs.stride(0),
            0 if ys is None else ys.stride(0), HAS_Y=y is not None, ZERO_CENTERED=zero_centered, BLOCK_D=block_d,
            num_warps=row_warps(block_d), enable_fp_fusion=False)
    return s, h


def add_rms_norm_bwd_triton(s: Tensor, weight: Tensor, dh: Tensor | None, ds: Tensor | None, eps: float,
                            zero_centered: bool, x_dtype: torch.dtype, y_dtype: torch.dtype | None,
                            needs: tuple[bool, bool, bool] = (True, True, True), programs: int | None = None
                            ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dy, d weight)`` of ``(s, h) = add_rms_norm(x, y, weight)`` for the gradients ``dh``
    of h and ``ds`` of s (either may be None: zero): one Triton kernel and one sum of the
    per-program partial sums. s must be contiguous. ``needs``: which of the three to compute
    (dy only where there is a y, ``y_dtype`` not None). ``programs`` overrides the number of
    programs (tests)."""
    D = s.shape[-1]
    N = s.numel() // D if D else 0
    dev = s.device
    dx = torch.empty(s.shape, device=dev, dtype=x_dtype) if needs[0] else None
    dy = torch.empty(s.shape, device=dev, dtype=y_dtype) if needs[1] and y_dtype is not None else None
    if dh is None:  # h unused: the norm passes no gradient, s's goes straight through
        g = torch.zeros(s.shape, device=dev, dtype=torch.float32) if ds is None else ds
        dw = torch.zeros(weight.shape, device=weight.device, dtype=weight.dtype) if needs[2] else None
        return (None if dx is None else dx.copy_(g)), (None if dy is None else dy.copy_(g)), dw
    if not N:
        return dx, dy, torch.zeros(weight.shape, device=weight.device, dtype=weight.dtype) if needs[2] else None
    dhs = rows(dh)
    dss = None if ds is None else rows(ds)
    P = programs if programs is not None else bwd_programs(N, dev)
    part = torch.empty(P, D, device=dev, dtype=torch.float32) if needs[2] else None
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    block_d = triton.next_power_of_2(D)
    dummy = s  # never written or read: its flag is off
    _add_rms_norm_bwd_kernel[(P,)](
        s, w, dhs, dummy if dss is None else dss, dummy if dx is None else dx, dummy if dy is None else dy,
        dummy if part is None else part, N, D, eps, dhs.stride(0), 0 if dss is None else dss.stride(0),
        HAS_DS=dss is not None, WRITE_DX=dx is not None, WRITE_DY=dy is not None, WRITE_DW=part is not None,
        ZERO_CENTERED=zero_centered, BLOCK_D=block_d, num_warps=row_warps(block_d), enable_fp_fusion=False)
    return dx, dy, None if part is None else part.sum(0).to(weight.dtype)


class _AddRMSNormFn(torch.autograd.Function):
    """``(s, h)`` (with y) or ``h`` (without) by the Triton kernels, keeping s and the weight only
    (module docstring). A backward that builds a graph (double backward) goes through the
    reference instead, recomputed from the saved s."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor | None, weight: Tensor, eps: float, zero_centered: bool,  # noqa: ANN001
                out_dtype: torch.dtype | None):
        s, h = add_rms_norm_triton(x, y, weight, eps, zero_centered, out_dtype)
        s = s if s.is_contiguous() else s.contiguous()
        ctx.save_for_backward(s, weight)
        ctx.eps, ctx.zero_centered = eps, zero_centered
        ctx.x_dtype, ctx.y_dtype = x.dtype, None if y is None else y.dtype
        return h if y is None else (s, h)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        s, weight = ctx.saved_tensors
        ds, dh = (None, grads[0]) if ctx.y_dtype is None else grads
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if torch.is_grad_enabled():  # create_graph: differentiable PyTorch ops
            s_ = s.detach().requires_grad_()
            w_ = weight.detach().requires_grad_()
            _, h = add_rms_norm_ref(s_, None, w_, ctx.eps, ctx.zero_centered, dh.dtype if dh is not None else None)
            gs, gw = torch.autograd.grad(h, (s_, w_), dh if dh is not None else torch.zeros_like(h),
                                         create_graph=True, allow_unused=True)
            g = gs if ds is None else gs + ds
            dx = g.to(ctx.x_dtype) if needs[0] else None
            dy = g.to(ctx.y_dtype) if needs[1] and ctx.y_dtype is not None else None
            dw = (gw if gw is not None else torch.zeros_like(weight)) if needs[2] else None
            return dx, dy, dw, None, None, None
        # x and y of one dtype get the same gradient tensor (as autograd's own add does): one store
        same = ctx.y_dtype == ctx.x_dtype and needs[0] and needs[1]
        dx, dy, dw = add_rms_norm_bwd_triton(s, weight, dh, ds, ctx.eps, ctx.zero_centered, ctx.x_dtype, ctx.y_dtype,
                                             (needs[0], needs[1] and not same, needs[2]))
        return dx, dx if same else dy, dw, None, None, None


def _probe() -> None:
    if triton is None or not torch.cuda.is_available():
        raise RuntimeError("needs triton and a CUDA device")
    g = torch.Generator().manual_seed(0)
    #        x dtype         y dtype (None: no add)  weight dtype   out dtype       D    zero-centered
    cases = ((torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, 1024, True),  # autocast training
             (torch.float32, None, torch.float32, torch.bfloat16, 96, False),  # the first sublayer's norm
             (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16, 300, True),  # bf16 model / decoding
             (torch.float32, torch.float32, torch.float32, torch.float32, 64, False))
    for xdt, ydt, wdt, odt, D, zc in cases:
        x = torch.randn(3, 5, D, generator=g).to("cuda", xdt).requires_grad_()
        y = None if ydt is None else torch.randn(3, 5, D, generator=g).to("cuda", ydt).requires_grad_()
        w = (0.1 * torch.randn(D, generator=g) + (0.0 if zc else 1.0)).to("cuda", wdt).requires_grad_()
        ins = [t for t in (x, y, w) if t is not None]
        out = _AddRMSNormFn.apply(x, y, w, 1e-6, zc, odt)
        s, h = (x, out) if y is None else out
        s0, h0 = add_rms_norm_ref(x, y, w, 1e-6, zc, odt)
        dh = torch.randn(h.shape, generator=g).to("cuda", odt)
        ds = torch.randn(s.shape, generator=g).to("cuda", s.dtype)
        outs, outs0 = ((h,), (h0,)) if y is None else ((s, h), (s0, h0))
        grads = (dh,) if y is None else (ds, dh)
        got = (*outs, *torch.autograd.grad(outs, ins, grads))
        want = (*outs0, *torch.autograd.grad(outs0, ins, grads))
        tol = 1e-5 if torch.bfloat16 not in (xdt, ydt, wdt, odt) else 2e-2
        for a, b in zip(got, want):
            err = dispatch.max_rel_err(a, b)
            if a.dtype != b.dtype or a.shape != b.shape or not err <= tol:
                raise RuntimeError(f"fused add + RMSNorm differs from the reference (x {xdt}, y {ydt}, weight {wdt}, "
                                   f"out {odt}: {err:.2e}, {a.dtype} vs {b.dtype})")


dispatch.fast_path(FAST, probe=_probe, doc="own Triton kernels: residual add + RMSNorm (+ cast to the compute "
                                           "dtype) in one launch forward, one backward + a weight-gradient sum")


def add_rms_norm(x: Tensor, y: Tensor | None, weight: Tensor, eps: float, zero_centered: bool = True,
                 out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(s, h)``: ``s = x + y`` (x itself without y) and ``h = rms_norm(s, 1 + w or w)`` in
    ``out_dtype`` (default s's dtype). One Triton kernel forward (and one backward, through
    ``_AddRMSNormFn``) on CUDA; ``add_rms_norm_ref`` elsewhere and under tracing."""
    tensors = (x, weight) if y is None else (x, y, weight)
    if (dispatch.tracing(*tensors) or (y is not None and y.shape != x.shape) or weight.shape != x.shape[-1:]
            or any(t.dtype not in _DTYPES for t in tensors) or (out_dtype is not None and out_dtype not in _DTYPES)
            or not dispatch.use_fast(FAST, *tensors)):
        return add_rms_norm_ref(x, y, weight, eps, zero_centered, out_dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out = _AddRMSNormFn.apply(x, y, weight, eps, zero_centered, out_dtype)
        return (x, out) if y is None else out
    return add_rms_norm_triton(x, y, weight, eps, zero_centered, out_dtype)
