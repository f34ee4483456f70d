"""``Qwen3NextForCausalLM``: ``layer_types`` alternate ``linear_attention`` (Gated DeltaNet,
our ``gdn``) and ``full_attention`` (gated attention, our ``gated_attn`` with
``output_gate: true``); each layer's channel mixer is an MoE with a gated shared expert or a
dense MLP (``mlp_only_layers``, ``decoder_sparse_step``).

Layout facts (``rules``): ``q_proj`` interleaves query and output gate per head;
``in_proj_qkvz`` / ``in_proj_ba`` are grouped per key head; ``conv1d.weight`` is [C, 1, K];
experts are stored transposed. Norms: block, final and q/k RMSNorms scale by 1 + w (as
ours by default), eps ``rms_norm_eps``; the gated DeltaNet output norm scales by w, which our
gdn expresses with ``norm_zero_centered: false``. MTP weights (``mtp.*``) are not imported.
"""

from __future__ import annotations

from typing import Any

from ..core.pattern import LayerSpec
from .family import Family, HFConfig
from .qwen3_moe import MoEMixin
from .rules import Rule, conv, gated_q, gdn_ba, gdn_qkvz, same, scale

MIXER_OF = {"linear_attention": "gdn", "full_attention": "gated_attn"}


class Qwen3Next(MoEMixin, Family):
    architecture = "Qwen3NextForCausalLM"
    model_type = "qwen3_next"
    norm_zero_centered = True
    qk_norm = True
    output_gate = True
    mlp_bias_key = None
    shared_expert = True
    ignore_prefixes = ("mtp.",)
    partial_rope = True
    default_norm_topk = True  # Qwen3NextConfig's
    default_experts, default_top_k, default_d_expert, default_d_shared = 512, 10, 512, 512  # Qwen3NextConfig's
    # linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim (Qwen3NextConfig's)
    default_linear = (16, 32, 128, 128)
    default_rotary_fraction = 0.25  # Qwen3NextConfig's
    default_head_dim = 256
    default_kv_heads = 2
    default_max_len = 32768

    def layers(self, cfg: HFConfig, comps: dict[str, Any]) -> list[LayerSpec]:
        n = cfg.req("num_hidden_layers")
        types = cfg.get("layer_types", None, list)
        if types is None:
            interval = cfg.get("full_attention_interval", 4, int, positive=True)
            types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
        if len(types) != n:
            raise cfg.error("layer_types", f"has {len(types)} entries for {n} layers")
        for t in types:
            if not isinstance(t, str) or t not in MIXER_OF:
                raise cfg.error("layer_types", f"unknown layer type {t!r} (known: {', '.join(MIXER_OF)})")
        mixers = [MIXER_OF[t] for t in types]
        if "gdn" in mixers:
            hk, hv, dk, dv = (cfg.get(k, v, int, positive=True) for k, v in zip(
                ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"),
                self.default_linear))
            comps["gdn"] = {"n_heads": hk, "head_dim": dk, "n_v_heads": hv, "expand_v": dv / dk,
                            "conv_size": cfg.get("linear_conv_kernel_dim", 4, int),
                            "norm_eps": cfg.get("rms_norm_eps", 1e-6, float), "norm_zero_centered": False}
        return self.moe_layers(cfg, comps, mixers)

    def mixer_rules(self, recipe: Any, mixer: str, p: str, h: str) -> list[Rule]:
        if mixer == "gdn":
            g = recipe.component("gdn")
            d = recipe.model.d_model
            hk, hv, dk, dv = g.n_heads, g.v_heads(), g.key_dim(d), g.value_dim(d)
            la = f"{h}.linear_attn"
            return [gdn_qkvz(p, la, hk, dk, hv, dv), gdn_ba(p, la, hk, hv), conv(f"{p}.conv_weight", f"{la}.conv1d.weight"),
                    same(f"{p}.A_log", f"{la}.A_log"), same(f"{p}.dt_bias", f"{la}.dt_bias"),
                    scale(f"{p}.norm.weight", f"{la}.norm.weight", g.norm_zero_centered is not False, False),
                    same(f"{p}.out_proj.weight", f"{la}.out_proj.weight")]
        a = recipe.component("gated_attn")
        d = a.dim(recipe.model.d_model)
        sa = f"{h}.self_attn"
        names = ["weight"] + (["bias"] if a.bias else [])
        out = [gated_q(p, sa, a.n_heads, d, w) for w in names]
        out += [same(f"{p}.{x}_proj.{w}", f"{sa}.{x}_proj.{w}") for x in ("k", "v", "o") for w in names]
        zc = a.qk_norm_zero_centered is not False
        out += [scale(f"{p}.{x}_norm.weight", f"{sa}.{x}_norm.weight", zc, True) for x in ("q", "k")]
        return out

    def mixers(self) -> set[str]:
        return {"gated_attn", "gdn"}

    def problems(self, recipe: Any) -> list[str]:
        out = super().problems(recipe) + self.moe_problems(recipe)
        if out or "gdn" not in {s.mixer for s in recipe.layers}:
            return out
        g = recipe.component("gdn")
        if not g.use_short_conv:
            out.append("components.gdn.use_short_conv: Qwen3-Next always has the short conv")
        if not g.delta_rule:
            out.append("components.gdn.delta_rule: the decay-only ablation has no HF equivalent")
        if g.norm_eps != recipe.model.norm.eps:
            out.append(f"components.gdn.norm_eps: {g.norm_eps:g} differs from model.norm.eps "
                       f"{recipe.model.norm.eps:g} (HF has one rms_norm_eps)")
        return out

    def hf_config(self, recipe: Any) -> dict[str, Any]:
        cfg = {**super().hf_config(recipe), **self.moe_config(recipe)}
        types = ["linear_attention" if s.mixer == "gdn" else "full_attention" for s in recipe.layers]
        cfg["layer_types"] = types
        cfg["partial_rotary_factor"] = recipe.component("gated_attn").rope.fraction
        cfg["rope_parameters"]["partial_rotary_factor"] = cfg["partial_rotary_factor"]
        g = recipe.component("gdn")
        d = recipe.model.d_model
        cfg.update(linear_num_key_heads=g.n_heads, linear_num_value_heads=g.v_heads(), linear_key_head_dim=g.key_dim(d),
                   linear_value_head_dim=g.value_dim(d), linear_conv_kernel_dim=g.conv_size)
        if "moe" not in {s.ffn for s in recipe.layers}:
            # HF builds a (unused) MoE block only where num_experts > 0; none here
            cfg.update(num_experts=0, num_experts_per_tok=1, moe_intermediate_size=1, shared_expert_intermediate_size=1)
        return cfg
