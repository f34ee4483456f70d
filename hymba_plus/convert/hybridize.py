"""Hybridize: start a hybrid from a pretrained attention model (``hymba convert SRC OUT
--hybridize RECIPE``).

The target recipe has the source's width, vocabulary and layer count; its pattern names,
per layer, the mixer: the source's own ``gated_attn`` (kept), ``gdn`` or ``mamba3``
(replaced), or ``-`` (dropped). Everything else -- embeddings, meta tokens, head, final
norm, every layer's norms and channel mixer (MLP / MoE) and the kept attention layers -- is
copied and must have the source's shapes. The modules beside the layers are copied where the
hybrid has the source's settings, else start fresh (a line says so): the multi-token prediction
modules (same ``model.mtp`` depth and block, and that block's components), an objective's own
weights (block diffusion's [MASK] embedding, a forecast head: same ``objective``), ETD's controller (same
``model.etd``, ``etd_router`` and think layers, whose projections its adapters attach to) and
LaDiR's modules (same ``ladir``).

A replaced mixer starts from the attention weights it replaces where the maths allows,
reading linear attention as attention without the softmax (Mamba-in-the-Llama, Wang et al.
2024, arXiv 2408.15237 §3; Jet-Nemotron, arXiv 2508.15884): query -> the recurrence's read
vector, key -> its write key, value -> its written value, output projection -> output
projection. Precisely (H query heads, Hkv key/value heads of dim D):

* ``gdn`` (h key heads of dk, hv value heads of dv): ``qkv_proj``'s q rows of key head i <-
  ``q_proj`` head ``i*H//h``, its k rows <- ``k_proj`` head ``i*Hkv//h`` (when dk = D); its v
  rows of value head j <- ``v_proj`` head ``j*Hkv//hv`` (when dv = D); ``out_proj`` <- ``o_proj``
  (when hv = H and dv = D, so value head j feeds the columns attention head j fed); the short
  conv starts as the identity (current-token tap 1, others 0), so q, k, v are SiLU of the
  attention projections. Fresh (the component's own init): ``z_proj`` (SiLU output gate),
  ``a_proj``, ``b_proj``, ``A_log``, ``dt_bias``, the gated norm.
* ``mamba3`` (SISO, d_inner = H_m * P, G groups of state size N): in ``in_proj``, x (the
  SSM input, value's role) of head j <- ``v_proj`` head ``j*Hkv//H_m`` (when P = D), B (write
  key) of group g <- ``k_proj`` head ``g*Hkv//G`` and C (read query) of group g <- ``q_proj``
  head ``g*H//G`` (when N = D); ``out_proj`` <- ``o_proj`` (when H_m = H and P = D). Fresh:
  z, dd_dt, dd_A, trap, angles rows, biases, D, norms.

The q/k norms, RoPE, the output gate and the biases (``attention_bias``) of the replaced attention
have no counterpart and are dropped; a ``kv_share`` consumer has no k/v projections (it reuses its partner's), so
only what its q and o projections give is copied. ``hybridize`` returns one line per replaced layer saying what was copied,
and one per module beside the layers that starts fresh.
The checkpoint is written in float32, whatever the source's dtype (the hybrid is built in float32
and the copied weights are cast into it). Memory: the source's state and the hybrid are both held (unlike import and export, which
stream), so hybridizing needs about twice the model's size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.recipe import Recipe, RecipeError, load_recipe
from ..models.lm import GENERATION_CONFIG
from ..training.tokenizer import TokenizerError, side_files
from .loader import ConvertError
from .staging import check_output, staged


def _source(src: Path) -> tuple[Recipe, dict[str, Tensor], str | None]:
    """(recipe, state, tokenizer JSON) of a hymba_plus checkpoint or an HF folder."""
    if (src / "recipe.yaml").is_file():
        from ..models.lm import CheckpointError, from_pretrained

        try:
            model = from_pretrained(src)
        except CheckpointError as e:
            raise ConvertError(str(e)) from None
        tok = src / "tokenizer.json"
        return model.recipe, model.state_dict(), tok.read_text(encoding="utf-8") if tok.is_file() else None
    from .importer import read_hf

    return read_hf(src, tokenizer=(src / "tokenizer.json").is_file())


def _heads(w: Tensor, n: int, d: int, idx: list[int]) -> Tensor:
    """Rows of the heads ``idx`` of a [n*d, ...] projection."""
    return w.reshape(n, d, *w.shape[1:])[idx].reshape(len(idx) * d, *w.shape[1:])


def init_gdn(mixer: Any, attn: dict[str, Tensor], H: int, Hkv: int, D: int) -> list[str]:
    """Initialise a ``GatedDeltaNet`` from attention weights (see the module docstring)."""
    h, hv, dk, dv = mixer.h, mixer.hv, mixer.dk, mixer.dv
    done = []
    with torch.no_grad():
        w = mixer.qkv_proj.weight
        if dk == D:
            w[: h * dk] = _heads(attn["q_proj.weight"], H, D, [i * H // h for i in range(h)])
            done.append("q<-q_proj")
        if dk == D and "k_proj.weight" in attn:  # (a kv_share consumer has no k/v projections)
            w[h * dk: 2 * h * dk] = _heads(attn["k_proj.weight"], Hkv, D, [i * Hkv // h for i in range(h)])
            done.append("k<-k_proj")
        if dv == D and "v_proj.weight" in attn:
            w[2 * h * dk:] = _heads(attn["v_proj.weight"], Hkv, D, [j * Hkv // hv for j in range(hv)])
            done.append("v<-v_proj")
        if hv == H and dv == D:
            mixer.out_proj.weight.copy_(attn["o_proj.weight"])
            done.append("out_proj<-o_proj")
        if done and mixer.conv_weight is not None:
            mixer.conv_weight.zero_()
            mixer.conv_weight[:, -1] = 1.0
            done.append("conv=identity")
    return done


def init_mamba3(mixer: Any, attn: dict[str, Tensor], H: int, Hkv: int, D: int) -> list[str]:
    """Initialise a (SISO) ``Mamba3`` from attention weights (see the module docstring)."""
    if mixer.R != 1:
        return []
    Hm, P, G, N = mixer.H, mixer.P, mixer.G, mixer.N
    z, x, B, C = (sum(mixer.splits[:i]) for i in range(4))
    done = []
    with torch.no_grad():
        w = mixer.in_proj.weight
        if P == D and "v_proj.weight" in attn:  # (a kv_share consumer has no k/v projections)
            w[x: x + Hm * P] = _heads(attn["v_proj.weight"], Hkv, D, [j * Hkv // Hm for j in range(Hm)])
            done.append("x<-v_proj")
        if N == D and "k_proj.weight" in attn:
            w[B: B + G * N] = _heads(attn["k_proj.weight"], Hkv, D, [g * Hkv // G for g in range(G)])
            done.append("B<-k_proj")
        if N == D:
            w[C: C + G * N] = _heads(attn["q_proj.weight"], H, D, [g * H // G for g in range(G)])
            done.append("C<-q_proj")
        if Hm == H and P == D:
            mixer.out_proj.weight.copy_(attn["o_proj.weight"])
            done.append("out_proj<-o_proj")
    del z
    return done


INIT = {"gdn": init_gdn, "mamba3": init_mamba3}

#: settings of a copied component that change what its weights compute (the rest -- loss
#: coefficients, capacity, chunk sizes -- may differ); a component not named: all of them but
#: those FREE names
SAME = {"gated_attn": None, "mlp": None, "gdn": None, "mamba3": None,
        "moe": ("n_experts", "top_k", "n_shared", "d_expert", "d_shared", "score", "norm_topk")}
#: settings of how a component computes, not what (chunk lengths, activation recomputation)
FREE = {"gdn": ("chunk_size",), "mamba3": ("chunk_size",), "mlp": ("recompute_act",)}


def _show(v: Any) -> str:
    import dataclasses

    return str(dataclasses.asdict(v)) if dataclasses.is_dataclass(v) else repr(v)


def _with_uses(target: Recipe, names: set[str]) -> set[str]:
    """``names`` and what those components build inside themselves (hymba's SSM heads)."""
    out = set(names)
    for name in sorted(names):
        out |= set(getattr(target.component(name), "uses", tuple)())
    return out


def _component_difference(source: Recipe, target: Recipe, names: set[str]) -> str | None:
    """The first setting (``SAME``) of the components ``names`` in which ``target`` differs from
    ``source``, as ``components.NAME.FIELD: TARGET'S differs from the source's SOURCE'S``; None: same."""
    import dataclasses

    for name in sorted(names):
        a, b = source.component(name), target.component(name)
        if a is None:  # (none: no settings)
            continue
        fields = SAME.get(name) or [f.name for f in dataclasses.fields(a) if f.name not in FREE.get(name, ())]
        for f in fields:
            if getattr(a, f) != getattr(b, f):
                return (f"components.{name}.{f}: {_show(getattr(b, f))} differs from the source's "
                        f"{_show(getattr(a, f))}")
    return None


def _check_same_components(source: Recipe, target: Recipe, where: str) -> None:
    """Components whose weights are copied (the kept mixers, every channel mixer, the SSM a kept
    hymba layer builds) must compute the same thing: the first setting that differs is one line."""
    copied = set()
    for s, t in zip(source.layers, target.layers):
        copied.add(t.ffn)
        if s.mixer == t.mixer:
            copied.add(t.mixer)
    diff = _component_difference(source, target, _with_uses(target, copied))
    if diff is not None:
        raise ConvertError(f"{where}: {diff} (its weights are copied)")


def _section_settings(recipe: Recipe, section: str) -> list[tuple[str, Any]]:
    """(recipe key, value) pairs that decide what the weights under the state-dict prefix
    ``section.`` mean: they are the source's only where the hybrid's pairs equal the source's
    (a value None: the recipe has no such module)."""
    from ..core.pattern import parse_pattern

    m = recipe.model
    if section == "mtp":  # the modules' count and block (its weight is a loss coefficient)
        return [("model.mtp", None)] if m.mtp is None else [
            ("model.mtp.depth", m.mtp.depth), ("model.mtp.block", parse_pattern(m.mtp.block, m.ffn)[0].token())]
    if section == "objective":  # its own weights (block diffusion's [MASK] embedding, a forecast head)
        return [("objective", recipe.objective)]
    if section == "etd_router":  # the controller, and the think blocks its adapters attach to
        if m.etd is None:
            return [("model.etd", None)]
        think = recipe.layers[m.etd.encoder_layers: m.etd.encoder_layers + m.etd.think_layers]
        return [("model.etd", m.etd), ("components.etd_router", recipe.component("etd_router")),
                ("model.block_pattern (think layers)", " | ".join(s.token() for s in think))]
    if section == "ladir":
        return [("ladir", recipe.ladir)]
    return [(section, None)]  # (a module not listed here: never copied)


def _section_difference(source: Recipe, target: Recipe, section: str) -> str | None:
    """Why the weights under ``section.`` cannot be the source's (None: they can)."""
    import dataclasses

    from ..core.pattern import parse_pattern

    for (key, a), (_, b) in zip(_section_settings(source, section), _section_settings(target, section)):
        if a is None:
            return f"the source has no {key}"
        if a != b:
            if dataclasses.is_dataclass(a) and type(a) is type(b):  # name the first setting that differs
                key, a, b = next(((f"{key}.{f.name}", getattr(a, f.name), getattr(b, f.name))
                                  for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)),
                                 (key, a, b))
            return f"{key}: {_show(b)} differs from the source's {_show(a)}"
    if section == "mtp":  # and the components its block builds
        spec = parse_pattern(target.model.mtp.block, target.model.ffn)[0]
        return _component_difference(source, target, _with_uses(target, {spec.mixer, spec.ffn} - {"none"}))
    return None


def hybridize(src: str | Path, out: str | Path, recipe: Any, *, seed: int = 0, attention_init: bool = True) -> list[str]:
    """Write the hybrid checkpoint ``out`` of ``recipe`` from the source model ``src`` (a
    hymba_plus checkpoint or an HF folder); returns one line per replaced layer, and one per
    module beside the layers (MTP, the objective's, ETD's controller, LaDiR) that starts fresh.
    ``attention_init=False``: replaced mixers keep their own fresh init (the ablation)."""
    from ..models.lm import HybridLM, write_safetensors

    src, out = Path(src), Path(out)
    check_output(out)
    try:
        target = load_recipe(recipe)
    except RecipeError as e:
        raise ConvertError(e.errors[0]) from None
    where = f"{recipe}" if isinstance(recipe, (str, Path)) else "recipe"
    source, state, tok = _source(src)
    sm, tm = source.model, target.model
    for key in ("d_model", "vocab_size", "tie_embeddings", "meta_tokens", "norm"):
        if getattr(sm, key) != getattr(tm, key):
            raise ConvertError(f"{where}: model.{key}: {_show(getattr(tm, key))} differs from the source's "
                               f"{_show(getattr(sm, key))} (copied weights keep their meaning only with the same)")
    if len(source.layers) != len(target.layers):
        raise ConvertError(f"{where}: model.block_pattern: {len(target.layers)} layers, the source has "
                           f"{len(source.layers)}")
    for i, (s, t) in enumerate(zip(source.layers, target.layers)):  # before the component checks, which
        if s.ffn != t.ffn:  # would compare a channel mixer the source does not have with its defaults
            raise ConvertError(f"{where}: model.block_pattern: layer {i} ({t.token()}): channel mixer {t.ffn} "
                               f"differs from the source's {s.ffn} (MLPs and MoEs are copied)")
    _check_same_components(source, target, where)
    torch.manual_seed(seed)
    model = HybridLM(target)
    own = model.state_dict()
    lines: list[str] = []
    a = source.component("gated_attn")
    H, Hkv, D = a.n_heads, a.kv_heads(), a.dim(sm.d_model)

    def copy(prefix_ours: str, prefix_src: str, what: str) -> None:
        keys = [k for k in own if k.startswith(prefix_ours)]
        for k in keys:
            s = prefix_src + k[len(prefix_ours):]
            if s not in state or state[s].shape != own[k].shape:
                raise ConvertError(f"{where}: {what}: {k} does not match the source ({s} "
                                   f"{'missing' if s not in state else list(state[s].shape)} vs {list(own[k].shape)})")
            own[k].copy_(state[s])

    with torch.no_grad():
        for k in ("embed.weight", "meta", "norm.weight", "lm_head.weight"):
            if k in own and k in state:
                own[k].copy_(state[k])
        for i, (s, t) in enumerate(zip(source.layers, target.layers)):
            token = f"layer {i} ({t.token()})"
            copy(f"blocks.{i}.norm2.", f"blocks.{i}.norm2.", token)
            copy(f"blocks.{i}.ffn.", f"blocks.{i}.ffn.", token)
            if t.mixer == "none":
                continue
            copy(f"blocks.{i}.norm1.", f"blocks.{i}.norm1.", token)
            if t.mixer == s.mixer:
                copy(f"blocks.{i}.mixer.", f"blocks.{i}.mixer.", token)
                continue
            if s.mixer != "gated_attn" or t.mixer not in INIT:
                raise ConvertError(f"{where}: model.block_pattern: {token}: cannot start {t.mixer} from the "
                                   f"source's {s.mixer} (attention -> gdn or mamba3, or keep the layer)")
            attn = {k[len(f"blocks.{i}.mixer."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.mixer.")}
            done = INIT[t.mixer](model.blocks[i].mixer, attn, H, Hkv, D) if attention_init else []
            lines.append(f"layer {i}: attention -> {t.mixer}: {', '.join(done) if done else 'all fresh'}")
        # the modules beside the layers (MTP, the objective's, ETD's controller, LaDiR): the source's where
        # the hybrid has the same settings, else fresh and said
        for section in sorted({k.split(".")[0] for k in own} - {"embed", "meta", "norm", "lm_head", "blocks"}):
            why = _section_difference(source, target, section)
            if why is None:
                copy(f"{section}.", f"{section}.", section)
            else:
                lines.append(f"{section}: fresh ({why})")
    model.load_state_dict(own)
    try:
        sides = side_files(src) if tok is not None else {}
    except TokenizerError as e:
        raise ConvertError(str(e)) from None
    with staged(out) as tmp:
        state_out = {k: v.contiguous() for k, v in model.state_dict().items()}
        if tm.tie_embeddings:
            state_out.pop("lm_head.weight", None)
        write_safetensors(state_out, tmp / "model.safetensors",
                          metadata={"recipe_hash": target.hash(), "format": "hymba_plus", "hybridized_from": src.name})
        (tmp / "recipe.yaml").write_text(target.to_yaml(), encoding="utf-8")
        if tok is not None:
            (tmp / "tokenizer.json").write_text(tok, encoding="utf-8")
            for fname, text in sides.items():  # its special tokens, chat template
                (tmp / fname).write_text(text, encoding="utf-8")
        eos = _end_ids(src, target.model.vocab_size)
        if eos is not None:  # the source's end ids (hymba generate reads them), as an import writes them
            (tmp / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")
    return lines


def _end_ids(src: Path, vocab_size: int) -> int | list[int] | None:
    """The end-of-sequence ids of a hymba_plus checkpoint (its generation_config.json) or an HF folder."""
    if (src / "recipe.yaml").is_file():
        from ..models.lm import CheckpointError, generation_config

        try:
            return generation_config(src, vocab_size).get("eos_token_id")
        except CheckpointError as e:
            raise ConvertError(str(e)) from None
    from .importer import hf_end_ids

    return hf_end_ids(src, vocab_size)
