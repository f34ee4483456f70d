"""``hymba tokenizer train DATA --vocab-size N --out tokenizer.json``: a byte-level BPE trained with the
``tokenizers`` library (``training.tokenizer.train_bpe``) on the files ``hymba prepare`` reads (text, JSON
Lines, Parquet; plain or compressed: ``training/readers.py``), for ``hymba prepare --tokenizer`` and
``hymba train --tokenizer``. A command of its own, not a ``prepare`` flag: its output is one file, kept
and reused (trained on a sample, used to prepare the whole corpus or several), and its flags are not
``prepare``'s; ``ACTION`` leaves room for more (one today)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UsageError, UserError, add_text_field_argument, int_in, path_text, write_output

_positive = int_in(1, name="positive int")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on text data (tokenizers' BpeTrainer)",
                       description="train a byte-level BPE (GPT-2's scheme) on a file or folder of text, JSON Lines "
                                   "or Parquet, as hymba prepare reads them; its end token is <|endoftext|> (id 0)")
    t.add_argument("data", type=path_text, metavar="DATA",
                   help="a file or a folder of files: text, JSON Lines (.jsonl / .json) or Parquet; .gz / .zst: "
                        "compressed")
    t.add_argument("--vocab-size", type=_positive, required=True, metavar="N",
                   help="the vocabulary's size: the 256 bytes, the special tokens and the merges learnt")
    t.add_argument("--out", type=path_text, required=True, help="the tokenizer JSON file to write")
    add_text_field_argument(t)
    t.add_argument("--min-frequency", type=_positive, default=2, metavar="N",
                   help="merge only pairs seen at least N times (default 2)")
    t.add_argument("--special-tokens", nargs="+", default=[], metavar="TOKEN",
                   help="special tokens after <|endoftext|> (ids 1, 2, ...): never split, never merged into")
    t.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from ..training import readers
    from ..training import tokenizer as tokmod
    from ..training.data import DataError, list_sources

    specials = list(args.special_tokens)
    for s in specials:
        if not s:
            raise UsageError("--special-tokens: an empty token")
        if s in tokmod.END_TOKENS:
            raise UsageError(f"--special-tokens {s}: an end token (hymba's tokenizers end documents with the first of "
                             f"{', '.join(tokmod.END_TOKENS)} they hold; this one's is {tokmod.END_TOKEN}, id 0)")
    dup = next((s for i, s in enumerate(specials) if s in specials[:i]), None)
    if dup is not None:
        raise UsageError(f"--special-tokens {dup}: given twice")
    least = 256 + 1 + len(specials)
    if args.vocab_size < least:
        raise UsageError(f"--vocab-size {args.vocab_size}: must be at least {least} (the 256 bytes and "
                         f"{1 + len(specials)} special token(s))")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out}: a folder; name the tokenizer JSON file to write")
    if out.exists() and not args.force:
        raise UserError(f"--out {args.out}: already exists (use --force to replace it)")
    try:
        files = [f for f in list_sources(args.data) if f.resolve() != out.resolve()]
        if not files:
            raise DataError(f"{args.data}: no text besides --out {args.out}")

        seen = [0]

        def texts():  # noqa: ANN202 - a generator of the documents
            for f in files:
                for t in readers.texts(f, args.text_field):
                    seen[0] += len(t)
                    yield t

        text = tokmod.train_bpe(texts(), args.vocab_size, args.min_frequency, tuple(specials),
                                progress=sys.stderr.isatty())
        if not seen[0]:
            raise DataError(f"{args.data}: empty (no text)")
    except (DataError, tokmod.TokenizerError) as e:
        raise UserError(str(e)) from None
    tok = tokmod.from_json(text, args.out)
    write_output(out, text, "--out")
    fewer = "" if tok.vocab_size == args.vocab_size else f" (the text has no more pairs seen {args.min_frequency}+ times)"
    print(f"{args.out}: a byte-level BPE of {tok.vocab_size:,} tokens{fewer} from {len(files)} file(s); "
          f"end token {tokmod.END_TOKEN} (id {tok.eos_id})")
    return 0
