"""Rotary position embedding op (RoPE, Su et al. 2021, arXiv 2104.09864, Eq. 34), in the
half-split ("NeoX") pairing, on the first ``2 R`` dims of each head::

    [x1, x2, x_pass] -> [x1 cos - x2 sin,  x2 cos + x1 sin,  x_pass]     (x1, x2: R dims each)

with per-token angles: ``cos``/``sin`` are [B, T, R] (positions come from the cache, so each
row may have its own). The rotation is computed in float32 (float64 for float64 inputs) and returned in x's dtype.

Reference (any device): the formula above in PyTorch (about ten elementwise kernels forward
and more backward over [B, T, H, D] in float32). Fast path (``rope``, CUDA, eager): one Triton
kernel per direction -- the backward is the same kernel rotating by the negative angle (the
rotation is orthogonal), and no gradient flows to cos/sin (they come from positions and
fixed frequencies).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch

try:  # Triton is optional: only the CUDA fast path uses it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = None

FAST = "rope"


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D]; cos, sin [B, T, R] (2R <= D) -> rotated x, float32 math."""
    r = cos.shape[-1]
    xr, xp = x[..., : 2 * r].to(torch.promote_types(x.dtype, torch.float32)), x[..., 2 * r :]
    x1, x2 = xr[..., :r], xr[..., r:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, o_ptr, H, R, P, stride_xn, stride_xh, stride_cn, stride_on, stride_oh,
                     SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)  # token (b * T + t)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        j = tl.arange(0, BLOCK_R)
        mh = h < H
        mr = j < R
        c = tl.load(cos_ptr + n * stride_cn + j, mask=mr, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + n * stride_cn + j, mask=mr, other=0.0).to(tl.float32) * SIGN
        m = mh[:, None] & mr[None, :]
        xrow = x_ptr + n * stride_xn + h[:, None] * stride_xh
        orow = o_ptr + n * stride_on + h[:, None] * stride_oh
        x1 = tl.load(xrow + j[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + R + j[None, :], mask=m, other=0.0).to(tl.float32)
        ty = o_ptr.dtype.element_ty
        tl.store(orow + j[None, :], (x1 * c[None, :] - x2 * s[None, :]).to(ty), mask=m)
        tl.store(orow + R + j[None, :], (x2 * c[None, :] + x1 * s[None, :]).to(ty), mask=m)
        if BLOCK_P > 0:  # the dims that do not rotate are copied
            p = tl.arange(0, BLOCK_P)
            mp = mh[:, None] & (p < P)[None, :]
            tl.store(orow + 2 * R + p[None, :], tl.load(xrow + 2 * R + p[None, :], mask=mp), mask=mp)


def _rope_triton(x: Tensor, cos: Tensor, sin: Tensor, sign: int) -> Tensor:
    """The fused kernel: x [B, T, H, D] -> rotated by ``sign`` x angle, new [B, T, H, D]."""
    B, T, H, D = x.shape
    R = cos.shape[-1]
    xs = x.reshape(B * T, H, D)
    if xs.stride(-1) != 1:
        xs = xs.contiguous()
    c, s = cos.reshape(B * T, R), sin.reshape(B * T, R)
    if c.stride(-1) != 1 or s.stride() != c.stride():
        c, s = c.contiguous(), s.contiguous()
    out = torch.empty(B * T, H, D, device=x.device, dtype=x.dtype)
    P = D - 2 * R
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // triton.next_power_of_2(D)))
    grid = (B * T, triton.cdiv(H, block_h))
    _rope_kernel[grid](xs, c, s, out, H, R, P, xs.stride(0), xs.stride(1), c.stride(0), out.stride(0), out.stride(1),
                       SIGN=sign, BLOCK_H=block_h, BLOCK_R=triton.next_power_of_2(R),
                       BLOCK_P=triton.next_power_of_2(P) if P else 0)
    return out.view(B, T, H, D)


class _RopeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(cos, sin)
        return _rope_triton(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, dy: Tensor):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        return _rope_triton(dy, cos, sin, -1), None, None


def _probe() -> None:
    if triton is None or not torch.cuda.is_available():
        raise RuntimeError("needs triton and a CUDA device")
    g = torch.Generator().manual_seed(0)
    for B, T, H, D, R in ((2, 7, 3, 64, 32), (1, 5, 16, 128, 16), (2, 3, 5, 96, 48)):
        x = torch.randn(B, T, H, D, generator=g).cuda().requires_grad_()
        ang = torch.randn(B, T, R, generator=g).cuda()
        cos, sin = ang.cos(), ang.sin()
        y = _RopeTriton.apply(x, cos, sin)
        ref = rope_ref(x, cos, sin)
        gy = torch.randn_like(y)
        gx, rx = torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ref, x, gy)[0]
        if not (torch.allclose(y, ref, atol=1e-5, rtol=1e-5) and torch.allclose(gx, rx, atol=1e-5, rtol=1e-5)):
            raise RuntimeError(f"Triton RoPE differs from the reference at {(B, T, H, D, R)}")


dispatch.fast_path(FAST, probe=_probe, doc="Triton fused RoPE (any per-token angles, partial rotation), fwd + bwd")


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of x [B, T, H, D] by per-token angles."""
    if x.dtype != torch.float64 and not dispatch.tracing(x) and dispatch.use_fast(FAST, x, cos, sin):
        return _RopeTriton.apply(x, cos, sin)
    return rope_ref(x, cos, sin)
