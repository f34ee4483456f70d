"""``Qwen3MoeForCausalLM``: Qwen3 attention; layer i has a sparse MoE block unless it is in
``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0`` (then a dense MLP of
``intermediate_size``). Routing: softmax over ``num_experts``, top ``num_experts_per_tok``,
renormalised when ``norm_topk_prob``; no shared expert. Experts are stored transposed
relative to ours (``rules.experts``). The balancing loss is HF's pooled form
(``balance_loss: pooled``, ``aux_loss_coef`` = ``router_aux_loss_coef``, no z-loss)."""

from __future__ import annotations

from typing import Any

from ..core.pattern import LayerSpec
from .family import Family, HFConfig
from .qwen3 import Qwen3
from .rules import Rule, experts, same, zeros


class MoEMixin:
    """Routed experts (and, for Qwen3-Next, a gated shared expert) as our ``moe``."""

    shared_expert = False
    default_norm_topk = False  # norm_topk_prob when config.json has none (Qwen3MoeConfig's; Qwen3-Next: True)
    # num_experts, num_experts_per_tok, moe_intermediate_size where config.json has none (Qwen3MoeConfig's; Qwen3-Next
    # overrides them with Qwen3NextConfig's): a hand-written config without them builds HF's model of these sizes
    default_experts, default_top_k, default_d_expert = 128, 8, 768

    def moe_layers(self, cfg: HFConfig, comps: dict[str, Any], mixers: list[str]) -> list[LayerSpec]:
        if cfg.data.get("num_experts") is not None:  # (0: dense, as Qwen3-Next's export writes it)
            n_exp = cfg.get("num_experts", None, int)
        else:  # 5.x may write the latter
            n_exp = cfg.get("num_local_experts", self.default_experts, int)
        step = cfg.get("decoder_sparse_step", 1, int)
        only = cfg.get("mlp_only_layers", [], list) or []
        if step < 1:
            raise cfg.error("decoder_sparse_step", f"must be >= 1, got {step}")
        out = []
        for i, mixer in enumerate(mixers):
            sparse = n_exp > 0 and i not in only and (i + 1) % step == 0
            out.append(LayerSpec(mixer, "moe" if sparse else "mlp"))
        if any(s.ffn == "moe" for s in out):
            moe: dict[str, Any] = {
                "n_experts": n_exp, "top_k": cfg.get("num_experts_per_tok", self.default_top_k, int, positive=True),
                "d_expert": cfg.get("moe_intermediate_size", self.default_d_expert, int, positive=True),
                "score": "softmax",
                "norm_topk": cfg.get("norm_topk_prob", self.default_norm_topk, bool),
                "aux_loss_coef": cfg.get("router_aux_loss_coef", 0.001, float), "z_loss_coef": 0.0,
                "balance_loss": "pooled", "n_shared": 0}
            if self.shared_expert:
                d_shared = cfg.get("shared_expert_intermediate_size", self.default_d_shared, int)
                if d_shared < 1:
                    raise cfg.error("shared_expert_intermediate_size", f"must be >= 1, got {d_shared}")
                moe.update(n_shared=1, d_shared=d_shared)
            if moe["top_k"] == 1 and moe["norm_topk"]:  # HF weights the one expert 1, ours would by its p
                raise cfg.error("norm_topk_prob", "true with num_experts_per_tok 1 (every token's expert weighted 1, "
                                "its router untrained by the model loss) is not supported")
            comps["moe"] = moe
        return out

    def ffn_rules(self, recipe: Any, ffn: str, p: str, h: str, fused_experts: bool) -> list[Rule]:
        if ffn == "moe":
            return self.moe_rules(recipe, p, h, fused_experts)
        return super().ffn_rules(recipe, ffn, p, h, fused_experts)

    def ffns(self) -> set[str]:
        return {"mlp", "moe"}

    def moe_rules(self, recipe: Any, p: str, h: str, fused: bool) -> list[Rule]:
        c = recipe.component("moe")
        out = [same(f"{p}.router.weight", f"{h}.gate.weight"), *experts(p, h, c.n_experts, fused),
               zeros(f"{p}.expert_bias")]
        if c.n_shared:
            out += [same(f"{p}.shared.w_{x}.weight", f"{h}.shared_expert.{x}_proj.weight") for x in ("gate", "up", "down")]
            out.append(same(f"{p}.shared_gate.weight", f"{h}.shared_expert_gate.weight"))
        return out

    def moe_problems(self, recipe: Any) -> list[str]:
        if "moe" not in {s.ffn for s in recipe.layers}:
            return []
        c = recipe.component("moe")
        out = []
        if c.score != "softmax":
            out.append(f"components.moe.score: {c.score} routing is not expressible (softmax only)")
        if c.bias_update_rate > 0:
            out.append("components.moe.bias_update_rate: aux-loss-free bias balancing has no HF equivalent")
        if c.capacity_factor is not None:
            out.append("components.moe.capacity_factor: expert capacity has no HF equivalent")
        if self.shared_expert and c.n_shared == 0:
            out.append(f"components.moe.n_shared: {self.architecture} always has a shared expert")
        if not self.shared_expert and c.n_shared:
            out.append(f"components.moe.n_shared: {self.architecture} has no shared expert")
        return out

    def moe_config(self, recipe: Any) -> dict[str, Any]:
        ffns = [s.ffn for s in recipe.layers]
        if "moe" not in ffns:
            return {"num_experts": 0, "mlp_only_layers": list(range(len(ffns))), "decoder_sparse_step": 1}
        c = recipe.component("moe")
        d = recipe.model.d_model
        cfg = {"num_experts": c.n_experts, "num_experts_per_tok": c.top_k, "moe_intermediate_size": c.expert_hidden(d),
               "norm_topk_prob": c.norm_topk, "router_aux_loss_coef": c.aux_loss_coef, "decoder_sparse_step": 1,
               "mlp_only_layers": [i for i, f in enumerate(ffns) if f != "moe"], "output_router_logits": False}
        if self.shared_expert:
            cfg["shared_expert_intermediate_size"] = c.n_shared * c.shared_hidden(d)
        return cfg


class Qwen3Moe(MoEMixin, Qwen3):
    architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    default_head_dim = None  # Qwen3MoeConfig's: hidden_size / num_attention_heads
    default_kv_heads = 4
    # Qwen3MoeConfig has no layer_types / max_window_layers: use_sliding_window slides every layer
    check_attention = Family.check_attention

    def layers(self, cfg: HFConfig, comps: dict[str, Any]) -> list[LayerSpec]:
        return self.moe_layers(cfg, comps, ["gated_attn"] * cfg.req("num_hidden_layers"))

    def problems(self, recipe: Any) -> list[str]:
        return super().problems(recipe) + self.moe_problems(recipe)

    def hf_config(self, recipe: Any) -> dict[str, Any]:
        return {**super().hf_config(recipe), **self.moe_config(recipe)}
