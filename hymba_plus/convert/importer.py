"""Import: an HF model folder -> a hymba_plus checkpoint (``recipe.yaml``, ``model.safetensors``,
``tokenizer.json``, ``generation_config.json`` with the end-of-sequence ids where the source names
them) that ``from_pretrained`` / ``hymba generate`` load.

Order of work (everything that can fail on bad input fails before anything is written):
1. ``config.json`` -> the family (``families``) -> a recipe, validated by ``load_recipe``;
2. the safetensors headers (``loader.ShardedReader``: index and shards present) against the
   shapes the recipe implies (``to_theirs`` on meta tensors): a missing, extra or mis-shaped
   tensor is one line;
3. ``tokenizer.json`` (required unless ``tokenizer=False``): a valid ``tokenizers`` file whose
   vocabulary fits ``vocab_size``;
4. the tensors, rule by rule (one layer's source tensors at a time, read memory-mapped) into
   the output state, written once to a staging folder renamed to ``out`` at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.config import read_json_object
from ..core.recipe import Recipe, RecipeError, load_recipe
from ..models.lm import GENERATION_CONFIG
from ..training.tokenizer import TokenizerError, side_files
from .families import family_of_config
from .family import Family, HFConfig
from .loader import ConvertError, ShardedReader, dtype_name
from .rules import Rule
from .staging import staged


def read_hf_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder")
    if not path.is_file():
        raise ConvertError(f"{path}: missing (an HF model folder has config.json)")
    return read_json_object(path, ConvertError)


def hf_end_ids(src: Path, vocab_size: int) -> int | list[int] | None:
    """The source model's end-of-sequence ids as transformers' ``generate`` takes them:
    ``generation_config.json``'s ``eos_token_id`` where that file exists (none if it names none),
    else ``config.json``'s (one id or a list; None: none). An id outside the vocabulary is refused
    (one line)."""
    from ..models.generation import check_eos

    for name in ("generation_config.json", "config.json"):
        path = src / name
        if not path.is_file():
            continue
        data = read_json_object(path, ConvertError)
        ids = data.get("eos_token_id")
        if ids is not None:
            try:
                check_eos(ids, vocab_size)
            except ValueError as e:
                raise ConvertError(f"{path}: eos_token_id: {e}") from None
        return ids  # (a generation_config.json without one: transformers generates without one too)
    return None


def hf_recipe(src: Path, name: str | None = None) -> tuple[Family, Recipe]:
    """The family and the validated recipe of an HF folder's ``config.json``."""
    data = read_hf_config(src)
    source = str(src / "config.json")
    if data.get("quantization_config"):
        q = data["quantization_config"]
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise ConvertError(f"{source}: quantization_config: a quantized checkpoint ({method}) is not supported; "
                           "import its unquantized weights")
    fam = family_of_config(data, source)
    rd = fam.recipe_dict(HFConfig(data, source), name or src.resolve().name or "imported")
    try:
        return fam, load_recipe(rd)
    except RecipeError as e:
        raise ConvertError(f"{source}: not expressible as a recipe: {e.errors[0]}") from None


def meta_state(recipe: Recipe) -> dict[str, Tensor]:
    """Our parameter and buffer shapes for ``recipe``, as meta tensors (no memory)."""
    from ..models.lm import HybridLM

    with torch.device("meta"):
        model = HybridLM(recipe)
    state = dict(model.state_dict())
    if recipe.model.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def check_rules(rules: list[Rule], ours: dict[str, Tensor]) -> None:
    """Every tensor of ours is produced by exactly one rule (a programming error otherwise)."""
    covered = [k for r in rules for k in r.ours]
    missing = sorted(set(ours) - set(covered))
    extra = sorted(set(covered) - set(ours))
    if missing or extra or len(covered) != len(set(covered)):
        raise AssertionError(f"conversion rules do not cover the model: missing {missing[:3]}, extra {extra[:3]}")


def expected_theirs(rule: Rule, ours: dict[str, Tensor]) -> list[Tensor]:
    return rule.to_theirs([ours[k] for k in rule.ours]) if rule.theirs else []


def check_tokenizer(path: Path, vocab_size: int) -> str:
    from ..training.tokenizer import load_file

    if not path.is_file():
        raise ConvertError(f"{path}: missing (pass --no-tokenizer to import the weights without one)")
    try:
        tok = load_file(path)
    except TokenizerError as e:
        raise ConvertError(str(e)) from None
    if tok.kind != "tokenizers":
        raise ConvertError(f"{path}: not a `tokenizers` JSON file")
    if tok.vocab_size > vocab_size:
        raise ConvertError(f"{path}: {tok.vocab_size} tokens but config.json vocab_size is {vocab_size} "
                           "(the tokenizer does not match the model)")
    return tok.to_json()


def plan(reader: ShardedReader, rules: list[Rule], ours: dict[str, Tensor], ignore: tuple[str, ...],
         allow_unused: tuple[str, ...] = ()) -> None:
    """Check every HF tensor the rules read exists with the implied shape, and no other is left."""
    used: set[str] = set()
    for rule in rules:
        for name, want in zip(rule.theirs, expected_theirs(rule, ours)):
            if name not in reader:
                raise ConvertError(f"{reader.source}: tensor {name!r} missing (config.json implies it)")
            got = reader.shape(name)
            if got != tuple(want.shape):
                raise ConvertError(f"{reader.file(name)}: tensor {name!r} has shape {list(got)} but config.json implies "
                                   f"{list(want.shape)}")
            used.add(name)
    for k in reader.keys():
        # (rotary_emb.inv_freq: a buffer transformers < 4.31 saved; computed from the config, not read)
        if k not in used and not k.startswith(ignore) and k not in allow_unused and not k.endswith(".rotary_emb.inv_freq"):
            raise ConvertError(f"{reader.file(k)}: tensor {k!r} is not used by the model config.json describes "
                               "(unexpected weight)")


def fused_experts(reader: ShardedReader) -> bool:
    """Whether the checkpoint stores experts fused as 3-D tensors (transformers 5 in-memory layout)."""
    return any(k.endswith(".experts.gate_up_proj") for k in reader.keys())


def load_state(reader: ShardedReader, rules: list[Rule], ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state from the HF tensors, rule by rule (only one rule's source tensors in memory)."""
    state: dict[str, Tensor] = {}
    for rule in rules:
        src = [reader.get(k) for k in rule.theirs] if rule.theirs else [ours[k] for k in rule.ours]
        for name, t in zip(rule.theirs, src):
            if not t.is_floating_point():  # (weights: a model saved with integer tensors is not one we can run)
                raise ConvertError(f"{reader.file(name)}: tensor {name!r} is {dtype_name(t)}, not a floating-point weight")
        for k, t in zip(rule.ours, rule.to_ours(src)):
            state[k] = t.contiguous()
        del src
    return state


def read_hf(src: Path, name: str | None = None, tokenizer: bool = True) -> tuple[Recipe, dict[str, Tensor], str | None]:
    """(recipe, our state, tokenizer JSON or None) of an HF folder, after every check."""
    _, recipe, state, tok = _read(src, name, tokenizer)
    return recipe, state, tok


def _read(src: Path, name: str | None, tokenizer: bool) -> tuple[Family, Recipe, dict[str, Tensor], str | None]:
    fam, recipe = hf_recipe(src, name)
    reader = ShardedReader(src)
    ours = meta_state(recipe)
    rules = fam.rules(recipe, fused_experts(reader))
    check_rules(rules, ours)
    tied_head = ("lm_head.weight",) if recipe.model.tie_embeddings else ()
    if tied_head and "lm_head.weight" in reader and "model.embed_tokens.weight" in reader and not torch.equal(
            reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        # transformers unties a stored head that differs from the embedding and uses it
        raise ConvertError(f"{src / 'config.json'}: tie_word_embeddings: true, but the checkpoint's lm_head.weight "
                           "differs from its embedding (transformers then unties them); set it to false to import both")
    plan(reader, rules, ours, fam.ignore_prefixes, tied_head)
    tok = check_tokenizer(src / "tokenizer.json", recipe.model.vocab_size) if tokenizer else None
    return fam, recipe, load_state(reader, rules, ours), tok


def import_hf(src: str | Path, out: str | Path, *, name: str | None = None, tokenizer: bool = True) -> Path:
    """Convert the HF folder ``src`` into the hymba_plus checkpoint folder ``out``; returns ``out``."""
    from ..models.lm import write_safetensors
    from .staging import check_output

    src, out = Path(src), Path(out)
    check_output(out)
    fam, recipe, state, tok = _read(src, name, tokenizer)
    eos = hf_end_ids(src, recipe.model.vocab_size)
    try:
        sides = side_files(src) if tok is not None else {}
    except TokenizerError as e:
        raise ConvertError(str(e)) from None
    arch = fam.architecture
    with staged(out) as tmp:
        write_safetensors(state, tmp / "model.safetensors",
                          metadata={"recipe_hash": recipe.hash(), "format": "hymba_plus", "converted_from": arch})
        (tmp / "recipe.yaml").write_text(f"# imported from {arch} ({src.resolve().name!r}) by hymba convert\n"
                                         + recipe.to_yaml(), encoding="utf-8")
        if tok is not None:
            (tmp / "tokenizer.json").write_text(tok, encoding="utf-8")
            for fname, data in sides.items():  # its special tokens, max length, chat template
                (tmp / fname).write_text(data, encoding="utf-8")
        if eos is not None:  # what ends generation (hymba generate reads it: models.lm.generation_config)
            (tmp / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")
    return out
