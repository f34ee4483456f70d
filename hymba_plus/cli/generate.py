"""``hymba generate CKPT --prompt TEXT``: sample from a checkpoint (a ``save_pretrained``
folder or a ``hymba train`` ``OUT/step-N``; given ``OUT`` itself, its newest checkpoint).

Text is encoded and decoded with the tokenizer saved in the checkpoint
(``tokenizer.json``): bytes for text models, token ids (``--prompt "3 17 200"``) for
models trained on the built-in tasks. One prompt streams its tokens to the terminal as
they come; several ``--prompt`` are generated as one batch (left padding + attention
mask, through the same cache) and printed one per line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UsageError, UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder (or a training --out folder)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: 64, or what fits in max_seq_len)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="ar", help="decoding mode the model supports (default: ar)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    p.add_argument("--no-stream", action="store_true", help="print the whole completion at the end")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, or the newest ``step-N`` inside a training output folder."""
    from ..training.checkpoint import latest

    if not path.exists():
        raise UserError(f"{path}: no such checkpoint folder")
    if path.is_dir() and not (path / "recipe.yaml").exists():
        newest = latest(path)
        if newest is not None:
            return newest
    return path


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:  # `hymba generate ... | head`: the reader left, which is fine
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..models.lm import CheckpointError, from_pretrained
    from ..training.distributed import pick_device
    from ..training.tokenizer import StreamDecoder, TokenizerError, for_checkpoint

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1]")
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ckpt = resolve_checkpoint(Path(args.checkpoint))
    try:
        model = from_pretrained(ckpt, device=device)
        tok = for_checkpoint(ckpt, model.config.vocab_size)
    except (CheckpointError, TokenizerError) as e:
        raise UserError(str(e)) from None
    model.eval()
    V = model.config.vocab_size
    if tok.vocab_size > V:
        raise UserError(f"{ckpt / 'tokenizer.json'}: {tok.vocab_size} tokens but the model has vocab_size {V}")
    prompts = []
    for text in args.prompt:
        try:
            ids = tok.encode(text)
        except TokenizerError as e:
            raise UserError(f"--prompt {text!r}: {e}") from None
        if not ids:
            raise UserError(f"--prompt {text!r}: empty after tokenization")
        prompts.append(ids)
    T = max(len(p) for p in prompts)
    max_len = model.config.max_seq_len
    if T >= max_len:
        raise UserError(f"--prompt: {T} tokens, longer than the model's max_seq_len ({max_len}) allows")
    if args.max_new_tokens is None:
        args.max_new_tokens = min(64, max_len - T)
    if T + args.max_new_tokens > max_len:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: prompt ({T} tokens) + new tokens exceed the "
                        f"model's max_seq_len ({max_len}); use at most {max_len - T}")
    B = len(prompts)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        input_ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    gen = torch.Generator(device=device).manual_seed(args.seed)
    stream = B == 1 and not args.no_stream
    decoder = StreamDecoder(tok)

    started = []

    def streamer(nxt: torch.Tensor) -> None:
        if not started:  # the prompt is echoed once generation is known to run
            started.append(True)
            sys.stdout.write(tok.decode(prompts[0]))
        text = decoder.push(int(nxt[0]))
        if text:
            sys.stdout.write(text)
        sys.stdout.flush()
    try:
        out = model.generate(
            input_ids.to(device), max_new_tokens=args.max_new_tokens, mode=args.mode,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            attention_mask=mask.to(device) if bool((mask == 0).any()) else None,
            eos_token_id=tok.eos_id, generator=gen, streamer=streamer if stream else None,
        )
    except ValueError as e:
        msg = str(e).splitlines()[0]
        flag = "--mode" if "mode" in msg else "--max-new-tokens"
        raise UserError(f"{flag}: {msg}") from None
    if stream:
        sys.stdout.write(decoder.flush() + "\n")
        return 0
    for i, p in enumerate(prompts):
        new = out[i, T:].tolist()
        if tok.eos_id is not None and tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        text = tok.decode(p) + tok.decode(new)
        print(text if B == 1 else f"[{i}] {text}")
    return 0
