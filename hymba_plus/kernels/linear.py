"""Several projections of one input as ONE GEMM: ``[x W_1^T | ... | x W_n^T] = x [W_1; ...; W_n]^T``.

A layer that projects the same activation several times (attention's q / k / v / output gate,
SwiGLU's gate and up) pays, per projection, a GEMM launch, under autocast a cast of the
(float32 residual-stream) input to bf16, and in the backward a cast of its input gradient
back plus a float32 add. With autograd on, ``project`` concatenates the weights (and biases)
instead -- the weights are d x d, the activations N x d with N >> d in training -- and runs one
GEMM: one input cast, one wider GEMM forward, one ``dx`` GEMM (float32 accumulation over every
projection) and one ``dW`` GEMM backward. The modules and their parameters stay as they are
(checkpoints, converters, Muon's per-matrix updates, FSDP2 sharding see no change).

Without autograd (decoding, evaluation) the weights' concatenation would be a copy of every
weight per step for a backward that never happens, so each projection runs on its own. A
module with forward hooks (an ETD router's LoRA branches attach to ``nn.Linear`` this way) also
runs on its own, so its hooks see their call. Both ways compute the same products; the
fused one differs only by round-off (float32 accumulation order, one rounding of ``dx``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fusable(*mods: nn.Linear) -> bool:
    """One GEMM for these projections? Autograd on, plain ``nn.Linear`` without hooks, biases
    all present or all absent, one input width."""
    if not torch.is_grad_enabled() or len(mods) < 2:
        return False
    if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in mods):
        return False
    return len({m.bias is None for m in mods}) == 1 and len({m.in_features for m in mods}) == 1


def fused_linear(x: Tensor, *mods: nn.Linear) -> Tensor:
    """``torch.cat([m(x) for m in mods], -1)`` as one GEMM over the concatenated weights (for
    ``fusable`` modules: it runs no hooks)."""
    w = torch.cat([m.weight for m in mods])
    b = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
    return F.linear(x, w, b)


def project(x: Tensor, *mods: nn.Linear) -> tuple[Tensor, ...]:
    """``tuple(m(x) for m in mods)``, as one GEMM where ``fusable``."""
    if not fusable(*mods):
        return tuple(m(x) for m in mods)
    return fused_linear(x, *mods).split([m.out_features for m in mods], dim=-1)
