"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 6):
``FFN(x) = (SiLU(x W1) * x W3) W2``. Registered as the ``mlp`` channel mixer. When training,
``x W1`` and ``x W3`` are one GEMM (``kernels.linear``) and the activation runs on its fused
output (``kernels.swiglu``: Liger's fused kernel on CUDA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cache import StepContext
from ..core.config import spec
from ..core.registry import register
from ..kernels.linear import fusable, fused_linear
from ..kernels.swiglu import swiglu


@dataclass(frozen=True)
class MLPConfig:
    d_hidden: int | None = spec(None, min=1, doc="default: 8/3 d_model rounded up to 64")
    bias: bool = False

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

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> Tensor:
        if fusable(self.w_gate, self.w_up):  # training: one GEMM, then SwiGLU on the fused output
            return self.w_down(swiglu(fused_linear(x, self.w_gate, self.w_up)))
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
