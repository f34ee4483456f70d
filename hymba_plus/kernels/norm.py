"""RMSNorm op (Zhang & Sennrich 2019, arXiv 1910.07467, Eq. 4)::

    y = x / sqrt(mean_j x_j^2 + eps) * scale

over the last dim, computed in float32 (float64 for float64 inputs) and returned in x's dtype.

Reference (any device): the float32 formula above, several elementwise kernels and a
reduction. Fast path (``rms_norm``, CUDA): PyTorch's fused RMSNorm kernel
(``aten::_fused_rms_norm``, one kernel forward and one backward, float32 accumulation). It
needs one dtype for x and scale, so it runs in the wider one: bf16 activations with float32
master weights (autocast) run in float32 between two casts, and the scale is never rounded
to bf16. The probe checks on the GPU that the fused kernel is the one
that runs (its autograd node) and that it matches the reference.

Gated RMSNorm (Gated DeltaNet's output stage, arXiv 2412.06464; also ATLAS's)::

    y = rms_norm(x, scale) * SiLU(gate),    scale = 1 + w (zero-centered) or w

Reference (``gated_rms_norm_ref``): ``rms_norm`` above (result in x's dtype), then the gate in
float32, returned in x's dtype -- about seven elementwise kernels. Fast path
(``gated_rms_norm``, CUDA, inference only: no input needs a gradient): ONE own Triton kernel
per call (``_gated_rms_norm_kernel``, one row of the last dim per program), which reproduces
the reference's roundings: the scale ``1 + w`` added in float32 (``norm_scale``), float32
normalisation, the normalised value rounded to x's dtype before the gate,
PyTorch's SiLU formula in float32 (``kernels._triton.silu_f32``). Only the sum of squares is
reduced in another order than PyTorch's (round-off). Fixed launch config from the shape (CUDA
graphs: no autotuning, no host sync).

Training (any input needs a gradient; ``_GatedRMSNormFn``): the forward is the same (the Triton
kernel where the fast path is on, else the reference without autograd) and keeps only x, the
gate and the weight; the backward recomputes the normalisation in float32 and writes the three
gradients by the closed form of the formula above (the RMSNorm gradient ``rstd (dxh - xh
mean(dxh xh))``, ``d gate = dy y SiLU'(gate)``, ``d scale = sum dxh' xh``). Where the forward ran
the kernel, the backward is ONE own Triton kernel too (``_gated_rms_norm_bwd_kernel``: each
program walks a strided set of rows, writes their dx and d gate and accumulates its part of the
weight gradient in float32, [programs, D], 16 programs per SM) plus one small sum over the
programs for dw; elsewhere (CPU, float64, fast path off) it is the PyTorch closed form
(``gated_rms_norm_bwd_ref``, float64 for float64 inputs, ~20 elementwise kernels over
[.., D] float32 on a GPU), which is also the reference the kernel is checked against.
Autograd through the reference would keep the float32 copies of the normalised value, the gate
and its SiLU instead -- three [.., D] float32 tensors per call (96 MiB each for the side-by-side
gdn row's output norm at batch 8 x 2048, where x and the gate kept in bf16 are 48 MiB each: ~5.6
GiB less over its 24 layers by this count) -- and run ~7 kernels forward. The closed form treats the forward's
rounding of the normalised value to x's dtype as the identity (round-off in 16 bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from ._triton import sigmoid_f32, silu_f32, triton

if triton is not None:
    import triton.language as tl

FAST = "rms_norm"
GATED = "gated_rms_norm"
_GATED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm_ref(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    ct = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * scale.to(ct)).to(x.dtype)


def _rms_norm_fused(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    """The fused kernel in the wider of the two dtypes (it needs one dtype for both): bf16
    activations with a float32 scale (master weights under autocast) run in float32, so the
    scale is never rounded to bf16 -- the reference's arithmetic, in one kernel plus casts."""
    ct = torch.promote_types(x.dtype, scale.dtype)
    return F.rms_norm(x.to(ct), (x.shape[-1],), scale.to(ct), eps).to(x.dtype)


def _probe() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    g = torch.Generator().manual_seed(0)
    for xdt, sdt in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        x = torch.randn(3, 5, 96, generator=g).to("cuda", xdt).requires_grad_()
        s = (1 + 0.1 * torch.randn(96, generator=g)).to("cuda", sdt).requires_grad_()
        y = _rms_norm_fused(x, s, 1e-6)
        node = y.grad_fn if xdt == sdt else y.grad_fn.next_functions[0][0]  # under the cast back
        if "FusedRmsNorm" not in type(node).__name__:
            raise RuntimeError(f"F.rms_norm is not the fused kernel here (autograd node {type(node).__name__})")
        ref = rms_norm_ref(x, s, 1e-6)
        gy = torch.randn_like(y)
        got = (y, *torch.autograd.grad(y, (x, s), gy))
        want = (ref, *torch.autograd.grad(ref, (x, s), gy))
        tol = 2e-2 if torch.bfloat16 in (xdt, sdt) else 1e-5
        for a, b in zip(got, want):
            err = dispatch.max_rel_err(a, b)
            if err > tol:
                raise RuntimeError(f"fused rms_norm differs from the reference ({xdt}, scale {sdt}: {err:.2e})")


dispatch.fast_path(FAST, probe=_probe, doc="PyTorch fused RMSNorm kernel (aten::_fused_rms_norm), fwd + bwd")


def rms_norm(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * scale`` in float32, returned in x's dtype."""
    if x.dtype != torch.float64 and scale.dtype != torch.float64 and dispatch.use_fast(FAST, x, scale):
        return _rms_norm_fused(x, scale, eps)
    return rms_norm_ref(x, scale, eps)


def norm_scale(weight: Tensor, zero_centered: bool) -> Tensor:
    """The RMSNorm scale a stored weight stands for: ``1 + w`` (zero-centered) or ``w``.

    ``1 + w`` is added in float32 (float64 for a float64 weight), never in a 16-bit weight's dtype:
    bf16 spaces its numbers 2^-7 apart near 1, so ``1 + w`` rounded to bf16 would drop any |w| below
    ~0.004 -- the small scales a zero-centered norm exists to learn. HF's Qwen3-Next / Gemma norms
    add in float32 the same way (``1.0 + self.weight.float()``)."""
    return 1.0 + weight.to(torch.promote_types(weight.dtype, torch.float32)) if zero_centered else weight


def gated_rms_norm_ref(x: Tensor, gate: Tensor, weight: Tensor, eps: float, zero_centered: bool = True) -> Tensor:
    """``rms_norm(x, scale) * SiLU(gate)``: the norm in float32 returned in x's dtype, then the
    gate in float32 (float64 when any input is), the result in x's dtype."""
    y = rms_norm(x, norm_scale(weight, zero_centered), eps)
    cdt = dispatch.compute_dtype(y, gate)
    return (y.to(cdt) * F.silu(gate.to(cdt))).to(x.dtype)


if triton is not None:

    @triton.jit
    def _gated_rms_norm_kernel(x_ptr, g_ptr, w_ptr, o_ptr, D, eps, stride_x, GH, stride_g0, stride_g1, stride_o,
                               ZERO_CENTERED: tl.constexpr, BLOCK_D: tl.constexpr):
        """Row ``pid`` of x [N, D]: rms_norm(x) * scale rounded to x's dtype, times SiLU(gate);
        gate row n at ``(n // GH) * stride_g0 + (n % GH) * stride_g1`` (a gate [M, GH, D] that is
        a column slice of a wider projection needs no copy)."""
        n = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        x = tl.load(x_ptr + n * stride_x + d, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d, mask=m, other=0.0)
        if ZERO_CENTERED:  # ``norm_scale``: 1 + w in float32
            w = 1.0 + w.to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps)
        ty = o_ptr.dtype.element_ty
        y = (x * rstd * w.to(tl.float32)).to(ty).to(tl.float32)  # rms_norm's result, in x's dtype
        gt = tl.load(g_ptr + (n // GH) * stride_g0 + (n % GH) * stride_g1 + d, mask=m, other=0.0).to(tl.float32)
        tl.store(o_ptr + n * stride_o + d, (y * silu_f32(gt)).to(ty), mask=m)

    @triton.jit
    def _gated_rms_norm_bwd_kernel(x_ptr, g_ptr, w_ptr, do_ptr, dx_ptr, dg_ptr, dwp_ptr, N, D, eps, stride_x, GH,
                                   stride_g0, stride_g1, stride_do,
                                   ZERO_CENTERED: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DG: tl.constexpr,
                                   WRITE_DW: tl.constexpr, BLOCK_D: tl.constexpr):
        """The closed-form gradients of ``y = rms_norm(x) * scale * SiLU(gate)`` for rows ``pid,
        pid + P, pid + 2P, ...`` of x [N, D] (P programs), in float32 (``gated_rms_norm_bwd_ref``'s
        formulas, in its order): with ``rstd = 1 / sqrt(mean x^2 + eps)``, ``xh = x * rstd``,
        ``s = sigmoid(gate)`` and ``do`` the output gradient,
        ``dgate = do * xh * scale * s * (1 + gate * (1 - s))``, ``dy = do * gate * s``,
        ``dx = rstd * (dy * scale - xh * mean(dy * scale * xh))`` -- dx [N, D] and dgate [N, D]
        (contiguous) in their pointers' dtypes -- and the program's part of d weight (= d scale),
        ``sum over its rows of dy * xh``, as row ``pid`` of the float32 [P, D] partial sums. The gate is addressed as in the forward
        kernel (row n at ``(n // GH) * stride_g0 + (n % GH) * stride_g1``); the scale is
        ``1 + w`` in float32 (zero-centered) or w. WRITE_*: which outputs to store."""
        pid = tl.program_id(0)
        P = tl.num_programs(0)
        d = tl.arange(0, BLOCK_D)
        m = d < D
        w = tl.load(w_ptr + d, mask=m, other=0.0)
        if ZERO_CENTERED:  # ``norm_scale``: 1 + w in float32
            w = 1.0 + w.to(tl.float32)
        scale = w.to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        n = pid.to(tl.int64)  # the row, in int64 offsets
        for _ in range(pid, N, P):
            x = tl.load(x_ptr + n * stride_x + d, mask=m, other=0.0).to(tl.float32)
            gt = tl.load(g_ptr + (n // GH) * stride_g0 + (n % GH) * stride_g1 + d, mask=m, other=0.0).to(tl.float32)
            dd = tl.load(do_ptr + n * stride_do + d, mask=m, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps)
            xh = x * rstd
            sig = sigmoid_f32(gt)
            if WRITE_DG:
                dg = dd * (xh * scale) * sig * (1.0 + gt * (1.0 - sig))
                tl.store(dg_ptr + n * D + d, dg.to(dg_ptr.dtype.element_ty), mask=m)
            dy = dd * gt * sig  # through SiLU(gate)
            if WRITE_DW:
                dw += dy * xh
            if WRITE_DX:
                dxh = dy * scale
                dx = rstd * (dxh - xh * (tl.sum(dxh * xh, axis=0) / D))
                tl.store(dx_ptr + n * D + d, dx.to(dx_ptr.dtype.element_ty), mask=m)
            n += P
        if WRITE_DW:
            tl.store(dwp_ptr + pid * D + d, dw, mask=m)


def rows(t: Tensor, *lead: int) -> Tensor:
    """t as rows [N, *lead, D] with a unit last stride (a view where possible, else a copy): the
    layout the row-per-program norm kernels (here and ``kernels.add_norm``) read."""
    r = t.reshape(-1, *lead, t.shape[-1])
    return r if r.stride(-1) == 1 else r.contiguous()


def row_warps(block_d: int) -> int:
    """num_warps of a row-per-program norm kernel over rows of ``block_d`` (padded) elements."""
    return min(8, max(1, block_d // 256))


def _gated_rows(x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, int]:
    """x as rows [N, D] and the gate as [M, GH, D] (GH = its next-to-last dim; a view also for a
    column slice of a wider tensor), both with a unit last stride (copied only where needed)."""
    GH = gate.shape[-2] if gate.dim() >= 2 else 1
    return rows(x), rows(gate, GH), GH


def gated_rms_norm_triton(x: Tensor, gate: Tensor, weight: Tensor, eps: float, zero_centered: bool = True) -> Tensor:
    """The one-kernel gated RMSNorm (forward only): x, gate [..., D] (same shape), weight [D] ->
    [..., D] in x's dtype."""
    D = x.shape[-1]
    xs, gs, GH = _gated_rows(x, gate)
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    out = torch.empty(xs.shape, device=x.device, dtype=x.dtype)
    block_d = triton.next_power_of_2(D)
    if xs.shape[0]:
        _gated_rms_norm_kernel[(xs.shape[0],)](xs, gs, w, out, D, eps, xs.stride(0), GH, gs.stride(0), gs.stride(1),
                                               out.stride(0),
                                               ZERO_CENTERED=zero_centered, BLOCK_D=block_d,
                                               num_warps=row_warps(block_d), enable_fp_fusion=False)
    return out.view(x.shape)


def bwd_programs(n_rows: int, device: torch.device) -> int:
    """Programs of the backward kernel: 16 per SM on CUDA (each walks its strided rows and keeps
    one float32 partial sum of the weight gradient; 16 small programs per SM keep its loads in
    flight), 8 elsewhere (Triton's CPU interpreter); never more than the rows."""
    if device.type == "cuda":
        return max(1, min(n_rows, 16 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 8))


def gated_rms_norm_bwd_triton(x: Tensor, gate: Tensor, weight: Tensor, dout: Tensor, eps: float,
                              zero_centered: bool = True, needs: tuple[bool, bool, bool] = (True, True, True),
                              programs: int | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients (dx, d gate, d weight) of ``gated_rms_norm(x, gate, weight)`` for the output
    gradient ``dout``: one Triton kernel (dx in x's dtype, d gate in the gate's dtype and shape,
    both contiguous; float32 partial sums of d weight per program) and one sum of the partial sums
    (in weight's dtype). ``needs``: which of the three to compute (None for the others).
    ``programs`` overrides the number of programs (``bwd_programs``; tests)."""
    D = x.shape[-1]
    xs, gs, GH = _gated_rows(x, gate)
    ds = rows(dout)
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    N = xs.shape[0]
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if needs[0] else None
    dg = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype) if needs[1] else None
    if not N:
        dw = torch.zeros(weight.shape, device=weight.device, dtype=weight.dtype) if needs[2] else None
        return dx, dg, dw
    P = programs if programs is not None else bwd_programs(N, x.device)
    part = torch.empty(P, D, device=x.device, dtype=torch.float32) if needs[2] else None
    block_d = triton.next_power_of_2(D)
    # outputs not asked for: a dummy pointer (never written, its WRITE_* flag is off)
    _gated_rms_norm_bwd_kernel[(P,)](xs, gs, w, ds, xs if dx is None else dx, xs if dg is None else dg,
                                     xs if part is None else part, N, D, eps, xs.stride(0), GH, gs.stride(0),
                                     gs.stride(1), ds.stride(0),
                                     ZERO_CENTERED=zero_centered, WRITE_DX=dx is not None, WRITE_DG=dg is not None,
                                     WRITE_DW=part is not None, BLOCK_D=block_d,
                                     num_warps=row_warps(block_d), enable_fp_fusion=False)
    return dx, dg, None if part is None else part.sum(0).to(weight.dtype)


def gated_rms_norm_bwd_ref(x: Tensor, gate: Tensor, weight: Tensor, dout: Tensor, eps: float,
                           zero_centered: bool = True, needs: tuple[bool, bool, bool] = (True, True, True)
                           ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The closed-form gradients (dx, d gate, d weight) of ``gated_rms_norm(x, gate, weight)`` for
    the output gradient ``dout`` in PyTorch ops, float32 (float64 for float64 inputs); each in
    its input's dtype, None where ``needs`` says it is not needed (module docstring)."""
    cdt = dispatch.compute_dtype(x, gate, weight)
    xf = x.to(cdt)
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    xh = xf * rstd
    scale = norm_scale(weight, zero_centered).to(cdt)
    gf = gate.to(cdt)
    sig = torch.sigmoid(gf)
    d = dout.to(cdt)
    dgate = (d * (xh * scale) * sig * (1 + gf * (1 - sig))).to(gate.dtype) if needs[1] else None
    dy = d * gf * sig  # through SiLU(gate)
    dw = (dy * xh).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype) if needs[2] else None
    dx = None
    if needs[0]:
        dxh = dy * scale
        dx = (rstd * (dxh - xh * (dxh * xh).mean(-1, keepdim=True))).to(x.dtype)
    return dx, dgate, dw


def _probe_gated() -> None:
    if triton is None or not torch.cuda.is_available():
        raise RuntimeError("needs triton and a CUDA device")
    g = torch.Generator().manual_seed(0)
    for dt, wdt, D, zc in ((torch.bfloat16, torch.bfloat16, 128, True), (torch.float32, torch.float32, 96, False),
                           (torch.bfloat16, torch.float32, 300, True), (torch.bfloat16, torch.bfloat16, 96, False),
                           (torch.float32, torch.float32, 64, True)):
        x = torch.randn(3, 2, 4, D, generator=g).to("cuda", dt)
        wide = torch.randn(3, 2, 4 * D + 8, generator=g).to("cuda", dt)
        z = wide[..., 8:].view(3, 2, 4, D)  # a column slice of a wider tensor, as the decode engine's gate
        w = (0.1 * torch.randn(D, generator=g) + (0.0 if zc else 1.0)).to("cuda", wdt)
        dy = torch.randn(3, 2, 4, D, generator=g).to("cuda", dt)
        tol = 1e-5 if dt == torch.float32 else 1e-2
        err = dispatch.max_rel_err(gated_rms_norm_triton(x, z, w, 1e-6, zc), gated_rms_norm_ref(x, z, w, 1e-6, zc))
        if not err <= tol:
            raise RuntimeError(f"Triton gated RMSNorm differs from the reference ({dt}, weight {wdt}: {err:.2e})")
        want = gated_rms_norm_bwd_ref(x, z, w, dy, 1e-6, zc)
        for programs in (None, 5):  # one row per program; several rows per program
            got = gated_rms_norm_bwd_triton(x, z, w, dy, 1e-6, zc, programs=programs)
            for name, a, b in zip(("dx", "dgate", "dweight"), got, want):
                err = dispatch.max_rel_err(a, b)
                if a.dtype != b.dtype or a.shape != b.shape or not err <= tol:
                    raise RuntimeError(f"Triton gated RMSNorm backward differs from the closed form ({name}, {dt}, "
                                       f"weight {wdt}, zero_centered {zc}: {err:.2e}, {a.dtype} vs {b.dtype})")


dispatch.fast_path(GATED, probe=_probe_gated,
                   doc="own Triton kernels: gated RMSNorm forward in one launch; training: backward in one launch "
                       "+ a sum of per-program weight-gradient partials")


class _GatedRMSNormFn(torch.autograd.Function):
    """Gated RMSNorm keeping x, gate and weight for a closed-form backward (module docstring): the
    Triton backward kernel where the forward ran the Triton kernel, else (and for a backward
    that builds a graph: double backward) the PyTorch form."""

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor, weight: Tensor, eps: float, zero_centered: bool,  # noqa: ANN001
                fast: bool) -> Tensor:
        ctx.save_for_backward(x, gate, weight)
        ctx.eps, ctx.zero_centered, ctx.fast = eps, zero_centered, fast
        if fast:
            return gated_rms_norm_triton(x, gate, weight, eps, zero_centered)
        return gated_rms_norm_ref(x, gate, weight, eps, zero_centered)

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, gate, weight = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        # the kernel where the forward ran its kernel; the PyTorch form under create_graph (grad mode
        # on in a backward), which autograd can differentiate again
        fast = ctx.fast and not torch.is_grad_enabled()
        bwd = gated_rms_norm_bwd_triton if fast else gated_rms_norm_bwd_ref
        dx, dgate, dw = bwd(x, gate, weight, dout, ctx.eps, ctx.zero_centered, needs)
        return dx, dgate, dw, None, None, None


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float, zero_centered: bool = True) -> Tensor:
    """``rms_norm(x, 1 + w or w) * SiLU(gate)`` over the last dim, returned in x's dtype: one Triton
    kernel on CUDA (the forward, also when training), the reference elsewhere; with gradients, an
    autograd function that keeps x, gate and weight only (``_GatedRMSNormFn``)."""
    tensors = (x, gate, weight)
    if dispatch.tracing(x) or x.shape != gate.shape or weight.shape != x.shape[-1:]:
        return gated_rms_norm_ref(x, gate, weight, eps, zero_centered)  # (torch.compile fuses it itself)
    fast = all(t.dtype in _GATED_DTYPES for t in tensors) and dispatch.use_fast(GATED, *tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _GatedRMSNormFn.apply(x, gate, weight, eps, zero_centered, fast)
    if fast:
        return gated_rms_norm_triton(x, gate, weight, eps, zero_centered)
    return gated_rms_norm_ref(x, gate, weight, eps, zero_centered)
