"""``hymba prepare DATA --out SHARDS``: tokenize a file or folder of text, JSON Lines or Parquet (plain or
compressed: training/readers.py) into token shards
(uint16/uint32 ``.bin`` files + ``index.json``) that ``hymba train --data SHARDS`` reads
through ``numpy.memmap`` (hymba_plus/training/data.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UsageError, UserError, add_text_field_argument, path_text

#: the largest shard: its token buffer (4 bytes a token at most) is held in memory while it fills
MAX_SHARD_TOKENS = 1 << 28


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=path_text, metavar="DATA",
                   help="a file or a folder of files: text (a file is a document), JSON Lines (.jsonl / .json: a "
                        "document a line) or Parquet (.parquet: a document a row); .gz / .zst: compressed")
    p.add_argument("--out", type=path_text, required=True, help="folder to write the shards and index.json into")
    p.add_argument("--tokenizer", type=path_text, help="a `tokenizers` JSON file (default: bytes)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file (default 16M)")
    add_text_field_argument(p)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    from ..training import tokenizer as tokmod
    from ..training.data import DataError, prepare

    if not 1 <= args.shard_tokens <= MAX_SHARD_TOKENS:  # a shard is one buffer in memory while it fills
        raise UsageError(f"--shard-tokens {args.shard_tokens}: must be in 1 .. {MAX_SHARD_TOKENS:,}")
    src, dst = Path(args.data).resolve(), Path(args.out).resolve()
    if dst == src or dst in src.parents:  # (prepare refuses it too, as bad input: here arguments that clash)
        raise UsageError(f"{args.out}: holds the data {args.data} itself; choose an --out outside it")
    try:
        tok = tokmod.load_file(args.tokenizer) if args.tokenizer else tokmod.ByteTokenizer()
        if tok.kind == "tokenizers" and tok.eos_id is None:  # (documents then run into each other in training)
            print(f"note: {args.tokenizer} names no end token (a tokenizer_config.json eos_token beside it, or one "
                  f"of {', '.join(tokmod.END_TOKENS)}): documents follow each other without a separator",
                  file=sys.stderr)
        index = prepare(args.data, args.out, tok, shard_tokens=args.shard_tokens, force=args.force, progress=True,
                        text_field=args.text_field)
    except (DataError, tokmod.TokenizerError) as e:
        raise UserError(str(e)) from None
    print(f"{args.out}: {index['tokens']:,} tokens in {len(index['shards'])} shard(s) of {index['dtype']} "
          f"from {len(index['sources'])} file(s), vocab {index['vocab_size']}")
    return 0
