"""Causal self-attention of a whole sequence (the training / prefill case), softmax(QK^T/sqrt(d)) V
with a causal mask (Vaswani et al. 2017, Eq. 1).

Reference (any device): ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``
with PyTorch's default backend order (on CUDA: FlashAttention-2, then memory-efficient, then
math). Fast path (``cudnn_attention``, CUDA): the same call with cuDNN's fused attention
(``SDPBackend.CUDNN_ATTENTION``, cuDNN 9's Hopper flash kernels) put first in the backend order;
inputs cuDNN cannot take (a head dim it lacks, GQA it does not support in this PyTorch) fall
through to the default order, so the fast path never fails a call that the reference runs.
The probe checks on the GPU that SDPA picks cuDNN under that order (its autograd node) for a
causal bf16 forward + backward, and that it matches the math backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import dispatch

FAST = "cudnn_attention"
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


def _probe() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 200, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3))
    gy = torch.randn(2, 4, 200, 64, generator=g).to("cuda", torch.bfloat16)
    with sdpa_kernel(_CUDNN_FIRST, set_priority=True):  # what causal_attention runs
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if "Cudnn" not in type(y.grad_fn).__name__:
        raise RuntimeError(f"SDPA did not pick cuDNN first (autograd node {type(y.grad_fn).__name__})")
    got = (y, *torch.autograd.grad(y, (q, k, v), gy))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    want = (ref, *torch.autograd.grad(ref, (q, k, v), gy.float()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = dispatch.max_rel_err(a, b)
        if err > 2e-2:
            raise RuntimeError(f"cuDNN attention's {name} differs from the math backend ({err:.2e})")


dispatch.fast_path(FAST, probe=_probe, doc="cuDNN fused attention (SDPA's cuDNN backend first), causal fwd + bwd")


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, enable_gqa: bool = False) -> Tensor:
    """q [B, H, T, D], k / v [B, Hkv, T, D] -> causal attention [B, H, T, D]."""
    if not dispatch.tracing(q) and dispatch.use_fast(FAST, q, k, v):
        with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
