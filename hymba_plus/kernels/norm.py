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
