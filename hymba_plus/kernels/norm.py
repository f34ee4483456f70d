"""RMSNorm op (Zhang & Sennrich 2019, arXiv 1910.07467, Eq. 4)::

    y = x / sqrt(mean_j x_j^2 + eps) * scale

over the last dim, computed in float32 (float64 for float64 inputs) and returned in x's dtype.

Reference (any device): the float32 formula above, several elementwise kernels and a
reduction. Fast path (``rms_norm``, CUDA): PyTorch's fused RMSNorm kernel
(``aten::_fused_rms_norm``, one kernel forward and one backward, float32 accumulation), used
where ``scale`` already has x's dtype (the kernel's requirement): bf16 models and float32.
Under bf16 autocast with float32 master weights the reference runs. The probe checks on the GPU that the fused kernel is the one
that runs (its autograd node) and that it matches the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

FAST = "rms_norm"


def rms_norm_ref(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    ct = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * scale.to(ct)).to(x.dtype)


def _rms_norm_fused(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), scale.to(x.dtype), eps)


def _probe() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    g = torch.Generator().manual_seed(0)
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(3, 5, 96, generator=g).to("cuda", dt).requires_grad_()
        s = (1 + 0.1 * torch.randn(96, generator=g)).to("cuda", dt).requires_grad_()
        y = _rms_norm_fused(x, s, 1e-6)
        if "FusedRmsNorm" not in type(y.grad_fn).__name__:
            raise RuntimeError(f"F.rms_norm is not the fused kernel here (autograd node {type(y.grad_fn).__name__})")
        ref = rms_norm_ref(x, s, 1e-6)
        gy = torch.randn_like(y)
        got = (y, *torch.autograd.grad(y, (x, s), gy))
        want = (ref, *torch.autograd.grad(ref, (x, s), gy))
        tol = 2e-2 if dt == torch.bfloat16 else 1e-5
        for a, b in zip(got, want):
            err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
            if err > tol:
                raise RuntimeError(f"fused rms_norm differs from the reference ({dt}: {err:.2e})")


dispatch.fast_path(FAST, probe=_probe, doc="PyTorch fused RMSNorm kernel (aten::_fused_rms_norm), fwd + bwd")


def rms_norm(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * scale`` in float32, returned in x's dtype.

    The fused kernel takes the scale in x's dtype, so it is used only where the scale already
    has it (a bf16 model, or float32): with float32 master weights under bf16 autocast the
    reference keeps the float32 scale, whose small updates a bf16 copy would round away."""
    if x.dtype != torch.float64 and scale.dtype == x.dtype and dispatch.use_fast(FAST, x, scale):
        return _rms_norm_fused(x, scale, eps)
    return rms_norm_ref(x, scale, eps)
