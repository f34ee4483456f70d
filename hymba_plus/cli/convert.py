"""``hymba convert SRC OUT``: HF <-> hymba_plus checkpoints (``hymba_plus.convert``).

The direction comes from SRC: a folder with ``config.json`` (an HF model) is imported, one
with ``recipe.yaml`` (a hymba_plus checkpoint) is exported. ``--hybridize RECIPE`` turns either
into a hybrid checkpoint of RECIPE, initialised from the source's weights. Every problem is
one line and a non-zero exit; OUT is written all at once or not at all, and never overwritten.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import UsageError, UserError, path_text, seed_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (f"{p.description or ''}. SRC with config.json (HF Llama / Qwen3 / Qwen3-MoE / Qwen3-Next) is "
                     "imported; SRC with recipe.yaml (a hymba_plus checkpoint) is exported to an HF folder.")
    p.add_argument("src", type=path_text, metavar="SRC", help="an HF model folder, or a hymba_plus checkpoint folder")
    p.add_argument("out", type=path_text, metavar="OUT", help="output folder (must not exist, or be empty)")
    p.add_argument("--hybridize", type=path_text, metavar="RECIPE",
                   help="write a hybrid of RECIPE instead: kept layers, embeddings, norms and MLPs copied, replaced "
                        "attention layers initialised from the attention weights (see README)")
    p.add_argument("--architecture", help="export: the HF class to write (default: the simplest that expresses the "
                                          "recipe)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="export: shard the weights (e.g. 5GB, 500MB)")
    p.add_argument("--name", help="import: the recipe's name (default: SRC's folder name)")
    p.add_argument("--no-tokenizer", action="store_true", help="import without tokenizer.json")
    p.add_argument("--seed", type=seed_int, help="hybridize: seed of the freshly initialised tensors (default 0)")
    p.add_argument("--no-attention-init", action="store_true",
                   help="hybridize: replaced mixers start fresh instead of from the attention weights (ablation)")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-shard-size {text}: expected a size such as 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    n = int(float(m.group(1)) * mult)
    if n < 1:
        raise UsageError(f"--max-shard-size {text}: must be positive")
    return n


def run(args: argparse.Namespace) -> int:
    from ..convert import ConvertError, ConvertOptionError, export_hf, hybridize, import_hf
    from ..core.recipe import RecipeError

    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise UserError(f"{src}: no such folder")
    is_hf, is_ours = (src / "config.json").is_file(), (src / "recipe.yaml").is_file()
    if not is_hf and not is_ours:
        raise UserError(f"{src}: neither an HF model folder (config.json) nor a hymba_plus checkpoint (recipe.yaml)")
    shard = parse_size(args.max_shard_size) if args.max_shard_size else None
    given = [f for f, v in (("--architecture", args.architecture), ("--max-shard-size", shard), ("--name", args.name),
                            ("--no-tokenizer", args.no_tokenizer)) if v]
    if args.hybridize and given:
        raise UsageError(f"{given[0]}: not with --hybridize")
    if not args.hybridize and (args.no_attention_init or args.seed is not None):
        raise UsageError("--no-attention-init / --seed: only with --hybridize")
    try:
        if args.hybridize:
            for line in hybridize(src, out, args.hybridize, seed=args.seed or 0,
                                  attention_init=not args.no_attention_init):
                print(line)
            what = f"hybrid of {src} ({args.hybridize})"
        elif is_ours:
            if args.name or args.no_tokenizer:
                raise UsageError("--name / --no-tokenizer: only when importing (SRC has config.json)")
            export_hf(src, out, architecture=args.architecture, max_shard_bytes=shard,
                      log=lambda line: print(line, file=sys.stderr))
            what = "HF folder"
        else:
            if args.architecture or shard:
                raise UsageError("--architecture / --max-shard-size: only when exporting (SRC has recipe.yaml)")
            import_hf(src, out, name=args.name, tokenizer=not args.no_tokenizer)
            what = "hymba_plus checkpoint"
    except ConvertOptionError as e:  # an option's value the conversion cannot take: usage
        raise UsageError(str(e).splitlines()[0]) from None
    except (ConvertError, RecipeError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    print(f"wrote {what}: {out}")
    return 0
