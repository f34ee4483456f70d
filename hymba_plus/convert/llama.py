"""``LlamaForCausalLM``: pre-norm decoder, GQA attention with RoPE and no q/k norms, SwiGLU
MLP (optional ``mlp_bias``), RMSNorm scaling by w. Everything is the ``Family`` default."""

from __future__ import annotations

from .family import Family


class Llama(Family):
    architecture = "LlamaForCausalLM"
    model_type = "llama"
