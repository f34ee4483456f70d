"""Export: a hymba_plus checkpoint whose recipe an HF architecture expresses -> an HF folder
(``config.json``, ``model.safetensors`` or shards with an index, ``generation_config.json``,
the tokenizer) that ``transformers`` loads with no missing or unexpected weights.

The family is the simplest one with every feature the recipe uses (``families``), or the one
asked for; a recipe it cannot express is refused with one line naming the first layer or
option (``Family.problems``). ``generation_config.json`` (and ``config.json``) name the end ids
``hymba generate`` stops at: the checkpoint's ``generation_config.json`` ``eos_token_id`` (an
import's), else its tokenizer's end token. Tensors are read memory-mapped from ``model.safetensors`` and
written shard by shard (``loader.ShardWriter``), experts in the per-expert layout HF
checkpoints are saved in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.recipe import RecipeError, load_recipe
from ..models.lm import GENERATION_CONFIG, CheckpointError, generation_config
from ..training.tokenizer import TokenizerError, side_files
from .families import family_for_recipe
from .importer import check_rules, meta_state
from .loader import ConvertError, ConvertOptionError, ShardedReader, ShardWriter, dtype_name
from .staging import check_output, staged


def export_hf(ckpt: str | Path, out: str | Path, *, architecture: str | None = None,
              max_shard_bytes: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Write the HF folder ``out`` for the hymba_plus checkpoint ``ckpt``; returns ``out``.
    ``log`` gets a note where the checkpoint's tokenizer is hymba's built-in one (bytes or ids),
    for which transformers has no file: it is not exported."""
    ckpt, out = Path(ckpt), Path(out)
    check_output(out)
    path = ckpt / "recipe.yaml"
    if not path.is_file():
        raise ConvertError(f"{path}: missing (not a hymba_plus checkpoint folder)")
    try:
        recipe = load_recipe(path)
    except RecipeError as e:
        raise ConvertError(e.errors[0]) from None
    fam = family_for_recipe(recipe, architecture)
    problems = fam.problems(recipe)
    if problems:  # (the class asked for: that option's value; the simplest that fits: the recipe's)
        raise (ConvertError if architecture is None else ConvertOptionError)(
            f"{path}: {problems[0]} ({fam.architecture} cannot express it)")
    reader = ShardedReader(ckpt)
    ours = meta_state(recipe)
    rules = fam.rules(recipe)
    check_rules(rules, ours)
    for k, t in ours.items():
        if k not in reader:
            raise ConvertError(f"{reader.source}: tensor {k!r} missing (recipe.yaml implies it)")
        if reader.shape(k) != tuple(t.shape):
            raise ConvertError(f"{reader.file(k)}: tensor {k!r} has shape {list(reader.shape(k))}, "
                               f"recipe.yaml implies {list(t.shape)}")
    for k in reader.keys():  # (a tensor the recipe does not use: from_pretrained refuses the checkpoint too)
        if k not in ours and not (k == "lm_head.weight" and recipe.model.tie_embeddings):
            raise ConvertError(f"{reader.file(k)}: tensor {k!r} is not used by the model recipe.yaml describes "
                               "(unexpected weight)")
    if recipe.model.tie_embeddings and "lm_head.weight" in reader and "embed.weight" in reader:
        head, emb = reader.get("lm_head.weight"), reader.get("embed.weight")
        if head.shape != emb.shape or not torch.equal(head, emb):  # (the export writes the embedding as the head)
            raise ConvertError(f"{ckpt / 'model.safetensors'}: holds an lm_head.weight that differs from embed.weight, "
                               "but recipe.yaml ties them (model.tie_embeddings: true)")
    for rule in rules:
        if not rule.theirs:  # a tensor HF lacks: it must be zero (MoE expert_bias)
            for k in rule.ours:
                if bool(reader.get(k).any()):
                    raise ConvertError(f"{ckpt / 'model.safetensors'}: {k} is nonzero ({fam.architecture} has no "
                                       "expert bias)")
    tok_text, tok_eos = None, None
    tok_path = ckpt / "tokenizer.json"
    if tok_path.is_file():
        from ..training.tokenizer import load_file

        try:
            tok = load_file(tok_path)
        except TokenizerError as e:
            raise ConvertError(str(e)) from None
        tok_text = tok.to_json() if tok.kind == "tokenizers" else None
        tok_eos = tok.eos_id if tok.eos_id is not None and tok.eos_id < recipe.model.vocab_size else None
        if tok_text is None and log is not None:
            log(f"note: {tok_path} is hymba's built-in {tok.kind} tokenizer, which transformers has no file for: "
                "not exported (importing this folder back needs --no-tokenizer)")
    try:
        gen = {"do_sample": False, **generation_config(ckpt, recipe.model.vocab_size)}
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    try:
        sides = side_files(ckpt) if tok_text is not None else {}
    except TokenizerError as e:
        raise ConvertError(str(e)) from None
    if "eos_token_id" not in gen and tok_eos is not None:  # hymba generate's end: the tokenizer's end token
        gen["eos_token_id"] = tok_eos
    cfg = fam.hf_config(recipe)
    if "eos_token_id" in gen:  # the end ids (an import's, or the tokenizer's); transformers reads both files
        cfg["eos_token_id"] = gen["eos_token_id"]
    dtype = None
    with staged(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, metadata={"format": "pt"})
        for rule in rules:
            if not rule.theirs:
                continue
            src = [reader.get(k) for k in rule.ours]
            for k, t in zip(rule.ours, src):  # (from_pretrained refuses them too; transformers would cast)
                if ours[k].is_floating_point() and not t.is_floating_point():
                    raise ConvertError(f"{ckpt / 'model.safetensors'}: tensor {k!r} is {dtype_name(t)}, not a "
                                       "floating-point weight")
            for name, t in zip(rule.theirs, rule.to_theirs(src)):
                writer.add(name, t)
                dtype = dtype or t.dtype
        writer.close()
        cfg["dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
        cfg["torch_dtype"] = cfg["dtype"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        if tok_text is not None:
            (tmp / "tokenizer.json").write_text(tok_text, encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(
                json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
            for fname, data in sides.items():  # an imported model's, as they came
                (tmp / fname).write_text(data, encoding="utf-8")
    return out
