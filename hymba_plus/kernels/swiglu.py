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

``swiglu_linear(gu, down)`` is ``down(swiglu(gu))`` that keeps only ``gu`` (and the weight) for the
backward and recomputes the activation there, as flash-linear-attention's ``SwiGLULinear`` does
(its ``fuse_swiglu``): autograd would otherwise keep the ``[..., h]`` product for the down
projection's weight gradient too -- ``B * T * h`` 16-bit values per MLP layer (92 MB at batch
8 x 2048, h 2816) -- for one extra elementwise pass in the backward. The activation and its
backward are ``swiglu``'s (Liger's kernels on CUDA, the reference elsewhere); the GEMMs are
cuBLAS's in autocast's dtype, as ``nn.Linear`` under autocast. Under ``torch.compile`` it is the
composed product (Inductor's partitioner chooses what to keep or recompute; the hand-written
backward's ``autograd.grad`` cannot be traced).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class _SwiGLULinear(torch.autograd.Function):
    """``y = SiLU(g) * u @ W^T + b`` saving ``gu`` and ``W``; the backward recomputes the product."""

    @staticmethod
    def forward(ctx, gu: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # noqa: ANN001
        with torch.no_grad():
            h = swiglu(gu)
        ctx.save_for_backward(gu, w)
        return F.linear(h, w, b)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        gu, w = ctx.saved_tensors
        with torch.enable_grad():
            gu_ = gu.detach().requires_grad_()
            h = swiglu(gu_)  # the forward's product again (its backward: swiglu's, below)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = dy2.t() @ h.detach().reshape(-1, h.shape[-1]) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.needs_input_grad[2] else None  # False for a None bias
        dgu = None
        if ctx.needs_input_grad[0]:
            dgu, = torch.autograd.grad(h, gu_, dy @ w)
        return dgu, dw, db


def swiglu_linear(gu: Tensor, down: nn.Linear) -> Tensor:
    """``down(swiglu(gu))`` keeping ``gu`` instead of the activation for the backward (see the
    module docstring). The weight (and bias) is cast to autocast's dtype as ``nn.Linear`` would
    be; the product runs with autocast off in that dtype."""
    dt = dispatch.autocast_dtype(gu)
    w = down.weight.to(dt)
    b = None if down.bias is None else down.bias.to(dt)
    with torch.autocast(gu.device.type, enabled=False):
        if dispatch.tracing(gu):  # torch.compile: the composed product, whose activation Inductor's partitioner
            # may recompute itself (the hand-written backward's autograd.grad broke the graph at every MLP: Dynamo
            # then compiled block by block, hit its recompile limit and left the later blocks eager)
            return F.linear(swiglu(gu.to(dt)), w, b)
        return _SwiGLULinear.apply(gu.to(dt), w, b)
