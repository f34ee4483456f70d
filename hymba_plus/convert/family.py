"""What every supported HF family shares: reading ``config.json`` strictly, the recipe of a
Llama-style decoder (embeddings, pre-norm blocks, GQA attention with RoPE, SwiGLU MLP, final
norm, head), its tensor rules, and the checks that a recipe is expressible on export.

A family subclass (``llama.py``, ``qwen3.py``, ``qwen3_moe.py``, ``qwen3_next.py``) says what
differs: its attention's q/k norms and output gate, its channel mixers, its layer types.
Each problem is one ``ConvertError`` line: ``config.json: key: what is wrong`` on import,
``recipe.yaml: key.path: what HF <class> cannot express`` on export.
"""

from __future__ import annotations

import math
from typing import Any

from ..core.pattern import LayerSpec, format_pattern
from .loader import ConvertError
from .rules import Rule, same, scale


class HFConfig:
    """``config.json`` as read: typed getters whose errors name the file and key."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data = data
        self.source = source

    def error(self, key: str, msg: str) -> ConvertError:
        return ConvertError(f"{self.source}: {key}: {msg}")

    def get(self, key: str, default: Any = None, kind: type | tuple = object, positive: bool = False) -> Any:
        """``config.json``'s ``key`` (``default`` where absent or null), checked to be of ``kind``
        (int, float, bool, list) and, with ``positive``, an integer >= 1 (a count or a width)."""
        v = self.data.get(key, default)
        if v is None:
            return default
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise self.error(key, f"must be an integer, got {v!r}")
        if positive and v < 1:
            raise self.error(key, f"must be >= 1, got {v!r}")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise self.error(key, f"must be a number, got {v!r}")
        if kind is bool and not isinstance(v, bool):
            raise self.error(key, f"must be true or false, got {v!r}")
        if kind is list and not isinstance(v, list):
            raise self.error(key, f"must be a list, got {v!r}")
        return float(v) if kind is float else v

    def req(self, key: str, kind: type = int) -> Any:
        """A required key: an integer >= 1 unless ``kind`` says otherwise."""
        if self.data.get(key) is None:
            raise self.error(key, "missing")
        return self.get(key, kind=kind, positive=kind is int)

    def _number(self, par: dict, key: str, default: float) -> float:
        """A number of the rope parameters (a one-line error otherwise)."""
        v = par.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(f"rope_parameters.{key}", f"must be a number, got {v!r}")
        return float(v)

    def rope(self, head_dim: int, partial: bool = False, default_fraction: float = 1.0) -> dict[str, Any]:
        """Our ``rope`` settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
        ``rope_scaling`` / ``partial_rotary_factor`` (transformers 4), read as transformers
        does: a ``rope_scaling`` replaces ``rope_parameters`` where both are given; the
        fraction of the head rotated only where the family rotates part of it (``partial``:
        Qwen3-Next, default ``default_fraction``; Llama and Qwen3 rotate the whole head
        whatever ``partial_rotary_factor`` says). Default, linear, llama3 and yarn RoPE (yarn as
        transformers computes it: its ``attention_factor`` from the factor, no DeepSeek ``mscale``,
        ``truncate`` on); another ``rope_type`` (dynamic, longrope) is refused."""
        rp = self.data.get("rope_parameters") or {}
        sc = self.data.get("rope_scaling") or {}
        if not isinstance(rp, dict) or not isinstance(sc, dict):
            raise self.error("rope_parameters" if not isinstance(rp, dict) else "rope_scaling", "must be a mapping")
        par = sc or rp  # transformers: rope_scaling, when given, is the rope parameters
        theta = par.get("rope_theta", self.data.get("rope_theta", rp.get("rope_theta", 10000.0)))
        if sc and rp.get("rope_theta") is not None and "rope_theta" not in sc and "rope_theta" not in self.data \
                and rp.get("rope_theta") != 10000.0:
            raise self.error("rope_parameters.rope_theta", f"{rp.get('rope_theta')!r} is dropped by transformers where "
                             "rope_scaling is given (it then uses 10000): put rope_theta into rope_scaling")
        frac = par.get("partial_rotary_factor", self.data.get("partial_rotary_factor", default_fraction))
        for key, v, zero_ok in (("rope_theta", theta, False), ("partial_rotary_factor", frac, True)):  # 0: no RoPE
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 or (zero_ok and v == 0)):
                raise self.error(key, f"must be a number {'>= 0' if zero_ok else '> 0'}, got {v!r}")
        if not partial:
            frac = 1.0
        kind = par.get("rope_type") or par.get("type") or "default"
        out: dict[str, Any] = {"theta": float(theta), "fraction": float(frac)}
        if kind in ("linear", "llama3", "yarn"):
            factor = par.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1:
                raise self.error("rope_parameters.factor", f"{kind} RoPE needs a factor >= 1, got {factor!r}")
            out["scaling"] = {"kind": kind, "factor": float(factor)}
        top_orig = self.data.get("original_max_position_embeddings")  # transformers prefers it to the rope dict's
        if kind == "llama3":
            orig = top_orig or par.get("original_max_position_embeddings", self.data.get("max_position_embeddings"))
            if not isinstance(orig, int) or orig < 1:
                raise self.error("rope_parameters.original_max_position_embeddings", f"llama3 RoPE needs it, got {orig!r}")
            out["scaling"].update(original_max_seq_len=orig, low_freq_factor=self._number(par, "low_freq_factor", 1.0),
                                  high_freq_factor=self._number(par, "high_freq_factor", 4.0))
        elif kind == "yarn":
            orig = top_orig or par.get("original_max_position_embeddings", self.data.get("max_position_embeddings"))
            if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
                raise self.error("rope_parameters.original_max_position_embeddings", f"yarn RoPE needs it, got {orig!r}")
            for key in ("mscale", "mscale_all_dim"):
                if par.get(key):
                    raise self.error(f"rope_parameters.{key}", "DeepSeek's yarn attention scaling is not supported")
            if par.get("truncate", True) is not True:
                raise self.error("rope_parameters.truncate", "only the truncated (default) yarn ramp is supported")
            fast, slow = par.get("beta_fast") or 32.0, par.get("beta_slow") or 1.0
            for key, v in (("beta_fast", fast), ("beta_slow", slow)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise self.error(f"rope_parameters.{key}", f"must be a number > 0, got {v!r}")
            att = par.get("attention_factor")
            if att is not None and abs(self._number(par, "attention_factor", 1.0) - (0.1 * math.log(float(factor)) + 1.0)) > 1e-9:
                raise self.error("rope_parameters.attention_factor", f"{att!r}: only the default 0.1 ln(factor) + 1 "
                                 "is supported")
            out["scaling"].update(original_max_seq_len=orig, beta_fast=float(fast), beta_slow=float(slow))
        elif kind not in ("default", "linear"):
            raise self.error("rope_parameters.rope_type", f"{kind!r} is not supported (default, linear, llama3 and "
                             "yarn RoPE only)")
        if int(head_dim * out["fraction"]) % 2:
            raise self.error("partial_rotary_factor", f"rotates an odd number of dims ({head_dim} x {frac})")
        return out


class Family:
    """A Llama-style decoder. Subclasses override the hooks below."""

    architecture = "LlamaForCausalLM"
    model_type = "llama"
    norm_zero_centered = False  # HF's block / final RMSNorm scales by w (Qwen3-Next: 1 + w)
    qk_norm = False
    output_gate = False
    partial_rope = False  # True: partial_rotary_factor rotates part of each head (HF: Qwen3-Next only)
    default_rotary_fraction = 1.0  # partial_rotary_factor when config.json has none
    # head_dim, num_key_value_heads and max_position_embeddings when config.json has none (the config
    # class's defaults; None: hidden_size / num_attention_heads, and every head)
    default_head_dim: int | None = None
    default_kv_heads: int | None = None
    default_max_len = 2048
    mlp_bias_key: str | None = "mlp_bias"  # config key of the MLP bias (None: the family has none)
    ignore_prefixes: tuple[str, ...] = ()  # HF tensors not imported (Qwen3-Next's MTP head)

    # ------------------------------------------------------------------ import
    def recipe_dict(self, cfg: HFConfig, name: str) -> dict[str, Any]:
        """The hymba_plus recipe (as a dict) of an HF config."""
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise cfg.error("hidden_act", f"{act!r} is not supported (SwiGLU with silu only)")
        d = cfg.req("hidden_size")
        n_heads = cfg.req("num_attention_heads")
        head_dim = cfg.get("head_dim", self.default_head_dim, int, positive=True) or d // n_heads
        eps = cfg.get("rms_norm_eps", 1e-6, float)
        # (an explicit null is every head, as the config classes read it)
        kv = self.default_kv_heads if "num_key_value_heads" not in cfg.data and self.default_kv_heads else n_heads
        attn: dict[str, Any] = {
            "n_heads": n_heads, "n_kv_heads": cfg.get("num_key_value_heads", kv, int, positive=True),
            "head_dim": head_dim,
            "qk_norm": self.qk_norm, "output_gate": self.output_gate,
            "rope": cfg.rope(head_dim, self.partial_rope, self.default_rotary_fraction),
            "bias": cfg.get("attention_bias", False, bool)}
        if self.qk_norm:
            attn["qk_norm_eps"] = eps
            attn["qk_norm_zero_centered"] = self.norm_zero_centered
        self.check_attention(cfg)
        comps: dict[str, Any] = {"gated_attn": attn,
                                 "mlp": {"d_hidden": cfg.req("intermediate_size"),
                                         "bias": cfg.get(self.mlp_bias_key, False, bool) if self.mlp_bias_key else False}}
        layers = self.layers(cfg, comps)
        sc = attn["rope"].get("scaling") or {}
        max_len = cfg.get("max_position_embeddings", self.default_max_len, int)
        if sc.get("kind") in ("yarn", "llama3"):  # the context the scaling extends to (Qwen's YaRN recipe keeps
            max_len = max(max_len, int(sc["factor"] * sc["original_max_seq_len"]))  # max_position_embeddings)
        model = {"vocab_size": cfg.req("vocab_size"), "d_model": d,
                 "max_seq_len": max_len,
                 "block_pattern": format_pattern(layers), "ffn": "mlp", "meta_tokens": 0,
                 "tie_embeddings": cfg.get("tie_word_embeddings", False, bool),
                 "norm": {"zero_centered": self.norm_zero_centered, "eps": eps},
                 "init_std": cfg.get("initializer_range", 0.02, float)}
        used = {s.mixer for s in layers} | {s.ffn for s in layers}
        return {"name": name, "model": model, "components": {k: v for k, v in comps.items() if k in used}}

    def check_attention(self, cfg: HFConfig) -> None:
        """Refuse attention options we cannot express (sliding windows)."""
        types = cfg.get("layer_types", []) or []
        if cfg.get("use_sliding_window", False) or "sliding_attention" in types:
            raise cfg.error("use_sliding_window", "sliding-window layers are not supported")

    def layers(self, cfg: HFConfig, comps: dict[str, Any]) -> list[LayerSpec]:
        """One LayerSpec per HF decoder layer (may add component sections to ``comps``)."""
        return [LayerSpec("gated_attn", "mlp") for _ in range(cfg.req("num_hidden_layers"))]

    # ------------------------------------------------------------------ tensors (both directions)
    def rules(self, recipe: Any, fused_experts: bool = False) -> list[Rule]:
        m = recipe.model
        hf_zc = self.norm_zero_centered
        out = [same("embed.weight", "model.embed_tokens.weight")]
        for i, spec in enumerate(recipe.layers):
            p, h = f"blocks.{i}", f"model.layers.{i}"
            out.append(scale(f"{p}.norm1.weight", f"{h}.input_layernorm.weight", m.norm.zero_centered, hf_zc))
            out += self.mixer_rules(recipe, spec.mixer, f"{p}.mixer", h)
            out.append(scale(f"{p}.norm2.weight", f"{h}.post_attention_layernorm.weight", m.norm.zero_centered, hf_zc))
            out += self.ffn_rules(recipe, spec.ffn, f"{p}.ffn", f"{h}.mlp", fused_experts)
        out.append(scale("norm.weight", "model.norm.weight", m.norm.zero_centered, hf_zc))
        if not m.tie_embeddings:
            out.append(same("lm_head.weight", "lm_head.weight"))
        return out

    def mixer_rules(self, recipe: Any, mixer: str, p: str, h: str) -> list[Rule]:
        a = recipe.component("gated_attn")
        h = f"{h}.self_attn"
        names = ["weight"] + (["bias"] if a.bias else [])
        out = []
        for w in names:
            out += [same(f"{p}.q_proj.{w}", f"{h}.q_proj.{w}")]
            out += [same(f"{p}.{x}_proj.{w}", f"{h}.{x}_proj.{w}") for x in ("k", "v", "o")]
        if a.qk_norm:
            zc = a.qk_norm_zero_centered is not False
            out += [scale(f"{p}.{x}_norm.weight", f"{h}.{x}_norm.weight", zc, self.norm_zero_centered)
                    for x in ("q", "k")]
        return out

    def ffn_rules(self, recipe: Any, ffn: str, p: str, h: str, fused_experts: bool) -> list[Rule]:
        names = ["weight"] + (["bias"] if recipe.component("mlp").bias else [])
        return [same(f"{p}.w_{x}.{w}", f"{h}.{x}_proj.{w}") for x in ("gate", "up", "down") for w in names]

    # ------------------------------------------------------------------ export
    def problems(self, recipe: Any) -> list[str]:
        """What stops this family from expressing ``recipe`` (key path: reason), first first."""
        m = recipe.model
        out = []
        for key, bad in (("model.meta_tokens", m.meta_tokens), ("model.etd", m.etd), ("model.mtp", m.mtp),
                         ("ladir", recipe.ladir), ("objective", recipe.objective)):
            if bad:
                out.append(f"{key}: {self.architecture} has no equivalent")
        allowed = self.mixers()
        for i, s in enumerate(recipe.layers):
            if s.mixer not in allowed:
                out.append(f"model.block_pattern: layer {i} ({s.token()}): mixer {s.mixer} is not expressible "
                           f"(only {', '.join(sorted(allowed))})")
            if s.ffn not in self.ffns():
                out.append(f"model.block_pattern: layer {i} ({s.token()}): channel mixer {s.ffn} is not expressible "
                           f"(only {', '.join(sorted(self.ffns()))})")
        if "mlp" in {s.ffn for s in recipe.layers} and recipe.component("mlp").bias and not self.mlp_bias_key:
            out.append(f"components.mlp.bias: {self.architecture} MLPs have no bias")
        if out or "gated_attn" not in {s.mixer for s in recipe.layers}:
            return out
        a = recipe.component("gated_attn")
        eps = m.norm.eps
        if a.window is not None:
            out.append("components.gated_attn.window: sliding windows are not exported")
        if a.kv_share:
            out.append("components.gated_attn.kv_share: cross-layer KV sharing has no HF equivalent")
        if a.qk_norm != self.qk_norm:
            out.append(f"components.gated_attn.qk_norm: {self.architecture} {'has' if self.qk_norm else 'has no'} "
                       "q/k norms")
        if a.output_gate != self.output_gate:
            out.append(f"components.gated_attn.output_gate: {self.architecture} "
                       f"{'has' if self.output_gate else 'has no'} attention output gate")
        if a.qk_norm and (a.qk_norm_eps or 1e-6) != eps:
            out.append(f"components.gated_attn.qk_norm_eps: {a.qk_norm_eps or 1e-6:g} differs from model.norm.eps "
                       f"{eps:g} (HF has one rms_norm_eps)")
        if a.rope.fraction != 1.0 and not self.partial_rope:
            out.append(f"components.gated_attn.rope.fraction: {a.rope.fraction:g}: {self.architecture} rotates the "
                       "whole head (transformers ignores partial_rotary_factor for it)")
        elif int(a.dim(m.d_model) * a.rope.fraction) % 2:
            out.append(f"components.gated_attn.rope.fraction: {a.rope.fraction:g} of head dim {a.dim(m.d_model)} is an "
                       "odd number of dims (we rotate one fewer; transformers rotates other ones)")
        sc = a.rope.scaling
        if sc is not None and sc.kind == "ntk" and sc.factor != 1.0:
            out.append("components.gated_attn.rope.scaling.kind: ntk scaling is not exported (linear, llama3 and "
                       "yarn only)")
        return out

    def mixers(self) -> set[str]:
        return {"gated_attn"}

    def ffns(self) -> set[str]:
        return {"mlp"}

    def hf_config(self, recipe: Any) -> dict[str, Any]:
        """``config.json`` of an expressible recipe (call ``problems`` first)."""
        m = recipe.model
        a = recipe.component("gated_attn")
        d = m.d_model
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": a.rope.theta}
        if a.rope.fraction != 1.0:
            rope["partial_rotary_factor"] = a.rope.fraction
        sc = a.rope.scaling
        if sc is not None and (sc.kind in ("linear", "llama3") or (sc.kind == "yarn" and sc.factor > 1.0)):
            rope.update(rope_type=sc.kind, factor=sc.factor)
        if sc is not None and sc.kind == "yarn" and sc.factor > 1.0:
            rope.update(original_max_position_embeddings=sc.original_max_seq_len, beta_fast=sc.beta_fast,
                        beta_slow=sc.beta_slow)
        if sc is not None and sc.kind == "llama3":
            low, high = sc.llama3_factors()
            rope.update(original_max_position_embeddings=sc.original_max_seq_len, low_freq_factor=low,
                        high_freq_factor=high)
        cfg = {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": m.vocab_size, "hidden_size": d,
            "intermediate_size": recipe.component("mlp").hidden(d),
            "num_hidden_layers": len(recipe.layers), "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.kv_heads(), "head_dim": a.dim(d), "hidden_act": "silu",
            "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm.eps,
            "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
            "attention_bias": a.bias, "attention_dropout": 0.0, "use_cache": True,
            # transformers 5 reads rope_parameters, 4.x rope_theta / rope_scaling / partial_rotary_factor
            "rope_parameters": rope, "rope_theta": a.rope.theta,
            "rope_scaling": None if rope["rope_type"] == "default" else {k: v for k, v in rope.items()
                                                                          if k not in ("rope_theta", "partial_rotary_factor")},
        }
        if a.rope.fraction != 1.0:
            cfg["partial_rotary_factor"] = a.rope.fraction
        if self.mlp_bias_key:
            cfg[self.mlp_bias_key] = recipe.component("mlp").bias
        return cfg
