"""SwiGLU's activation on a fused gate-up projection (Shazeer 2020, "GLU Variants Improve
Transformer", Eq. 6): ``gu = [x W_gate | x W_up]`` (gate columns first) ->
``SiLU(gu[..., :h]) * gu[..., h:]``.

Reference (any device): ``F.silu(gate) * up`` on the two halves -- in 16-bit, SiLU in float32
rounded to the input's dtype, then the product; autograd keeps both halves and its backward
writes two gradients that a concatenation turns into the projection's.

Fast path (``swiglu``, CUDA): Liger-Kernel's ``LigerFusedGateUpSiLUMulFunction`` (Triton, one
row per program): one kernel forward reads both halves of the fused tensor through a column
offset and writes the product (SiLU in float32 rounded to the input's dtype, as the reference);
one kernel backward recomputes SiLU and writes d gate and d up straight into one
``[..., 2h]`` gradient, so no concatenation. The probe compares it with the reference on the
GPU, forward and backward, bf16 and float32.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

FAST = "swiglu"


def swiglu_ref(gu: Tensor) -> Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def swiglu_liger(gu: Tensor) -> Tensor:
    fn = importlib.import_module("liger_kernel.ops.swiglu").LigerFusedGateUpSiLUMulFunction
    # on 2-D rows: liger-kernel 0.8.5's backward returns the gradient flattened to [N, 2h]
    return fn.apply(gu.reshape(-1, gu.shape[-1])).view(*gu.shape[:-1], gu.shape[-1] // 2)


def _probe() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    g = torch.Generator().manual_seed(0)
    for dt, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        gu = (2 * torch.randn(3, 7, 2 * 300, generator=g)).to("cuda", dt).requires_grad_()
        dy = torch.randn(3, 7, 300, generator=g).to("cuda", dt)
        got = [swiglu_liger(gu)]
        got.append(torch.autograd.grad(got[0], gu, dy)[0])
        want = [swiglu_ref(gu)]
        want.append(torch.autograd.grad(want[0], gu, dy)[0])
        for a, b in zip(got, want):
            err = dispatch.max_rel_err(a, b)
            if a.dtype != b.dtype or err > tol:
                raise RuntimeError(f"Liger's fused SwiGLU differs from the reference ({dt}: {err:.2e})")


dispatch.fast_path(FAST, probe=_probe, doc="Liger-Kernel fused gate-up SwiGLU (Triton), fwd + bwd")


def swiglu(gu: Tensor) -> Tensor:
    """``SiLU(gate) * up`` of a fused ``[..., 2h]`` gate-up tensor (gate first) -> ``[..., h]``."""
    if gu.dtype != torch.float64 and not dispatch.tracing(gu) and dispatch.use_fast(FAST, gu):
        return swiglu_liger(gu)
    return swiglu_ref(gu)
