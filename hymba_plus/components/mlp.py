"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 6):
``FFN(x) = (SiLU(x W1) * x W3) W2``. Registered as the ``mlp`` channel mixer. When training,
``x W1`` and ``x W3`` are one GEMM (``kernels.linear``) and the activation runs on its fused
output (``kernels.swiglu``: Liger's fused kernel on CUDA); with ``recompute_act`` (default) the
down projection keeps that fused output instead of the activation for the backward and recomputes
the activation there (``kernels.swiglu.swiglu_linear``, flash-linear-attention's ``fuse_swiglu``):
``B * T * d_hidden`` fewer 16-bit values kept per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cache import StepContext
from ..core.config import spec
from ..core.registry import register
from ..kernels.linear import fusable, fused_linear, plain
from ..kernels.swiglu import swiglu, swiglu_linear


@dataclass(frozen=True)
class MLPConfig:
    d_hidden: int | None = spec(None, min=1, doc="default: 8/3 d_model rounded up to 64")
    bias: bool = False
    recompute_act: bool | None = spec(None, doc="training: keep x W1 | x W3 instead of the SwiGLU product for "
                                      "the backward and recompute the product there (less activation memory, "
                                      "one more elementwise pass); unset = on")

    def hidden(self, d_model: int) -> int:
        return self.d_hidden or (int(8 * d_model / 3) + 63) // 64 * 64


@register("mlp", config=MLPConfig, kind="ffn")
class SwiGLU(nn.Module):
    def __init__(self, cfg: MLPConfig, *, d_model: int, **_: object):
        super().__init__()
        h = cfg.hidden(d_model)
        self.w_gate = nn.Linear(d_model, h, bias=cfg.bias)
        self.w_up = nn.Linear(d_model, h, bias=cfg.bias)
        self.w_down = nn.Linear(h, d_model, bias=cfg.bias)
        self.w_down.is_residual_out = True
        self.recompute_act = cfg.recompute_act is not False

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> Tensor:
        if fusable(self.w_gate, self.w_up):  # training: one GEMM, then SwiGLU on the fused output
            gu = fused_linear(x, self.w_gate, self.w_up)
            if self.recompute_act and torch.is_grad_enabled() and plain(self.w_down):
                return swiglu_linear(gu, self.w_down)
            return self.w_down(swiglu(gu))
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
