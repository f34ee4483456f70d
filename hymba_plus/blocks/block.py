"""The residual block: ``x + mixer(norm(x))`` then ``x + ffn(norm(x))`` (pre-norm,
zero-centered RMSNorm as in Qwen3-Next). Either sublayer may be absent (``-`` / ``+none``).

Each residual add runs inside the next norm (``RMSNorm.add``: one kernel forward and one
backward on CUDA): the mixer's output is added in the ffn's norm, and in a plain stack the ffn's
output in the next block's first norm (``forward(pending=, defer=)``); both norms return their
output in the dtype the sublayer's GEMMs run in (autocast's bf16 while the residual stream stays
float32), so no separate add and cast kernels run between the sublayers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..components.norm import RMSNorm
from ..core import registry
from ..core.cache import LayerState, StepContext
from ..core.pattern import LayerSpec
from ..core.two_stream import recurrent_two_stream
from ..kernels.dispatch import autocast_dtype


class Block(nn.Module):
    def __init__(self, spec: LayerSpec, recipe, layer_idx: int):  # noqa: ANN001 - Recipe
        super().__init__()
        m = recipe.model
        self.spec = spec
        self.layer_idx = layer_idx
        kw = dict(d_model=m.d_model, model=m, layer_idx=layer_idx, recipe=recipe)
        self.mixer = None
        if spec.mixer != "none":
            self.norm1 = RMSNorm(m.d_model, m.norm.eps, m.norm.zero_centered)
            self.mixer = registry.build(spec.mixer, recipe.component(spec.mixer), **kw)
        self.ffn = None
        if spec.ffn != "none":
            self.norm2 = RMSNorm(m.d_model, m.norm.eps, m.norm.zero_centered)
            self.ffn = registry.build(spec.ffn, recipe.component(spec.ffn), **kw)
        self.drop = nn.Dropout(m.dropout) if m.dropout > 0 else nn.Identity()

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LayerState | None:
        if self.mixer is None:
            return None
        return self.mixer.init_state(batch_size, device, dtype)

    def forward(self, x: Tensor, ctx: StepContext, state: LayerState | None = None, *,
                pending: Tensor | None = None, defer: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """The block on the residual stream ``x`` (``x + pending`` when ``pending``, the previous
        block's last branch output, is given: it is added inside this block's first norm).
        ``defer=True`` returns ``(x, y)``: the residual stream and this block's last branch output,
        not yet added (``models.etd.PlainStack`` chains blocks so, so every residual add runs
        inside the next norm's kernel); otherwise ``x + y``."""
        ctx.layer_idx = self.layer_idx
        # the sublayers' input dtype: autocast casts a float32 activation at the first GEMM anyway
        cdt = autocast_dtype(x) if x.dtype == torch.float32 else x.dtype
        y = pending  # a branch output not yet added to the residual stream
        if self.mixer is not None:
            x, h = self.norm1.add(x, y, cdt)  # x + y and the mixer's norm in one op
            if ctx.two_stream is not None and hasattr(self.mixer, "boundary_forward"):
                y = recurrent_two_stream(self.mixer, h, ctx)  # block diffusion: core/two_stream.py
            else:
                y = self.mixer(h, ctx, state)
            y = self.drop(y)
        if self.ffn is not None:
            x, h = self.norm2.add(x, y, cdt)  # x + y and the ffn's norm in one op
            y = self.drop(self.ffn(h, ctx))
        if defer:
            return x, y
        return x if y is None else x + y
