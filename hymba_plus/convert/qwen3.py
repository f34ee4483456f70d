"""``Qwen3ForCausalLM``: Llama plus per-head RMSNorms on q and k (scaling by w, eps
``rms_norm_eps``), no MLP bias. Our ``gated_attn`` expresses them with ``qk_norm: true``,
``qk_norm_zero_centered: false`` and ``qk_norm_eps``. Sliding windows as Qwen3Config reads them
(``check_attention``): a config whose layers all attend in full imports, whatever
``use_sliding_window`` says."""

from __future__ import annotations

from .family import Family, HFConfig


class Qwen3(Family):
    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    qk_norm = True
    mlp_bias_key = None
    default_head_dim = 128  # Qwen3Config's
    default_kv_heads = 32
    default_max_len = 32768

    def check_attention(self, cfg: HFConfig) -> None:
        """Refuse sliding-window layers where transformers' Qwen3 has them: its ``layer_types``, which
        ``Qwen3Config`` makes, where config.json has none, from ``use_sliding_window`` (and a non-null
        ``sliding_window``, default 4096) and ``max_window_layers`` (default 28): layer i slides where
        i >= max_window_layers. ``use_sliding_window: true`` with ``max_window_layers >=
        num_hidden_layers`` slides no layer: imported as no window (it was refused)."""
        types = cfg.get("layer_types", None, list)
        if types is None:
            window = cfg.data.get("sliding_window", 4096) if cfg.get("use_sliding_window", False, bool) else None
            first = cfg.get("max_window_layers", 28, int)
            slides = window is not None and first < cfg.req("num_hidden_layers")
        else:
            slides = "sliding_attention" in types
        if slides:
            raise cfg.error("use_sliding_window", "sliding-window layers are not supported")
