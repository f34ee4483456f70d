"""The supported HF families, by architecture name, and the choice of family for an export."""

from __future__ import annotations

from typing import Any

from .family import Family
from .llama import Llama
from .loader import ConvertError, ConvertOptionError
from .qwen3 import Qwen3
from .qwen3_moe import Qwen3Moe
from .qwen3_next import Qwen3Next

FAMILIES: dict[str, Family] = {f.architecture: f for f in (Llama(), Qwen3(), Qwen3Moe(), Qwen3Next())}
BY_MODEL_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES.values()}


def family_of_config(data: dict[str, Any], source: str) -> Family:
    """The family of an HF ``config.json`` (``architectures[0]``, else ``model_type``)."""
    arch = data.get("architectures")
    if isinstance(arch, list) and arch:
        fam = FAMILIES.get(arch[0]) if isinstance(arch[0], str) else None
        if fam is None:
            raise ConvertError(f"{source}: architectures: {arch[0]!r} is not supported "
                               f"(supported: {', '.join(FAMILIES)})")
        return fam
    mt = data.get("model_type")
    fam = BY_MODEL_TYPE.get(mt) if isinstance(mt, str) else None
    if fam is None:
        raise ConvertError(f"{source}: model_type: {data.get('model_type')!r} is not supported "
                           f"(supported: {', '.join(BY_MODEL_TYPE)})")
    return fam


def family_for_recipe(recipe: Any, architecture: str | None = None) -> Family:
    """The HF family an export writes: the one asked for, else the simplest that has every
    feature the recipe uses (gdn, an output gate or a shared expert: Qwen3-Next; MoE:
    Qwen3-MoE; q/k norms: Qwen3; else Llama)."""
    if architecture is not None:
        if architecture not in FAMILIES:
            raise ConvertOptionError(f"--architecture {architecture}: not supported (supported: {', '.join(FAMILIES)})")
        return FAMILIES[architecture]
    mixers = {s.mixer for s in recipe.layers}
    ffns = {s.ffn for s in recipe.layers}
    attn = recipe.component("gated_attn") if "gated_attn" in mixers else None
    moe = recipe.component("moe") if "moe" in ffns else None
    if "gdn" in mixers or (attn is not None and attn.output_gate) or (moe is not None and moe.n_shared):
        return FAMILIES["Qwen3NextForCausalLM"]
    if moe is not None:
        return FAMILIES["Qwen3MoeForCausalLM"]
    if attn is not None and attn.qk_norm:
        return FAMILIES["Qwen3ForCausalLM"]
    return FAMILIES["LlamaForCausalLM"]
