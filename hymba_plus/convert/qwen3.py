"""``Qwen3ForCausalLM``: Llama plus per-head RMSNorms on q and k (scaling by w, eps
``rms_norm_eps``), no MLP bias. Our ``gated_attn`` expresses them with ``qk_norm: true``,
``qk_norm_zero_centered: false`` and ``qk_norm_eps``."""

from __future__ import annotations

from .family import Family


class Qwen3(Family):
    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    qk_norm = True
    mlp_bias_key = None
    default_head_dim = 128  # Qwen3Config's
    default_kv_heads = 32
    default_max_len = 32768
