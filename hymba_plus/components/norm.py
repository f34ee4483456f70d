"""RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467), zero-centered (Qwen3-Next / Gemma style) and gated (Gated DeltaNet output).

Zero-centered RMSNorm stores ``w`` and scales by ``(1 + w)``, so the weight starts at zero
and weight decay pulls the scale towards 1 instead of 0 (Qwen3-Next). The plain form
scales by ``w`` initialised to 1.

Gated RMSNorm (Gated DeltaNet, arXiv 2412.06464, output stage): ``RMSNorm(o) * SiLU(z)``
(``kernels.norm.gated_rms_norm``: one Triton kernel on CUDA when no gradient is needed, as in
decoding; the float32 reference otherwise).

``RMSNorm.add(x, y, out_dtype)``: the pre-norm block's residual add and the next norm in one op,
``(x + y, RMSNorm(x + y))``, the norm returned in the dtype its consumer's GEMMs run in
(``kernels.add_norm``: one Triton kernel forward and one backward on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.add_norm import add_rms_norm
from ..kernels.norm import gated_rms_norm, norm_scale, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = True):
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def scale(self) -> Tensor:
        return norm_scale(self.weight, self.zero_centered)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale(), self.eps)  # kernels.norm: float32 math, fused on CUDA

    def add(self, x: Tensor, y: Tensor | None = None, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(s, h)``: the residual ``s = x + y`` (x without y) and ``h = self(s)`` in ``out_dtype``
        (default s's dtype), in one op (``kernels.add_norm.add_rms_norm``)."""
        return add_rms_norm(x, y, self.weight, self.eps, self.zero_centered, out_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, zero_centered={self.zero_centered}"


class GatedRMSNorm(RMSNorm):
    """``RMSNorm(x) * SiLU(gate)`` over the last dim (per head when x is [..., H, D])."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # type: ignore[override]
        return gated_rms_norm(x, gate, self.weight, self.eps, self.zero_centered)
