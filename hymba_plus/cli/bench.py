"""``hymba bench RECIPE``: training-step, prefill and decode throughput of a recipe's model on one device.

The model is built from the recipe with random weights and trained on random token ids of its vocabulary
(LaDiR: its default reasoning task; forecasting: the synthetic series): no data files. Each number is the
median over ``--steps`` timed calls after ``--warmup`` untimed ones, between CUDA events with the device
synchronised on a GPU (``training/bench.py`` says what each phase runs). The training step is ``hymba
train``'s own (the objective's loss, the recipe's optimizer, bf16 autocast on CUDA, ``--mode``); prefill and
decode run with the weights in ``--dtype``. Prints a table; ``--json FILE`` writes the same as JSON (replaced
if it exists, written only once every phase has run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from . import (
    UsageError,
    UserError,
    add_set_argument,
    check_sets,
    load_recipe_with_sets,
    output_file,
    path_text,
    write_output,
)
from .check import emit
from .generate import add_decoder_arguments, check_decoder_values, decoder_flags, decoder_options, modes_taking
from .train import TRAIN_MODES

DTYPES = ("float32", "bfloat16")

#: hymba generate's ``--steps`` (denoising / Euler steps) here: bench's ``--steps`` counts timed calls
DECODE_STEPS = "--decode-steps"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.bench import CALL_MEASURED, DECODE_MODES, DEFAULT_RUN, DEFAULT_SHAPE

    (cb, cs), (gb, gs) = DEFAULT_SHAPE["cpu"], DEFAULT_SHAPE["cuda"]
    (csteps, cwarm, cnew), (gsteps, gwarm, gnew) = DEFAULT_RUN["cpu"], DEFAULT_RUN["cuda"]
    p.description = (f"{p.description or ''}. Random weights and random token ids (no data files); each number the "
                     "median over --steps timed calls after --warmup untimed ones.")
    p.add_argument("recipe", type=path_text, metavar="RECIPE", help="a recipe file")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--batch", type=int, help="sequences per step (default: the recipe's train.batch_size where set, "
                                             f"else {cb} on the CPU, {gb} on CUDA)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence, the prefill length and the decode prompt "
                                               "(default: the recipe's train.seq_len where set, else "
                                               f"{cs} on the CPU, {gs} on CUDA, at most max_seq_len; not for "
                                               "forecast recipes)")
    p.add_argument("--steps", type=int, help=f"timed calls per phase (default: {csteps} on the CPU, {gsteps} on CUDA)")
    p.add_argument("--warmup", type=int, help=f"untimed calls before them (default: {cwarm} on the CPU, {gwarm} on "
                                              "CUDA; on CUDA the optimizer step's graph is captured at the second "
                                              "step)")
    p.add_argument("--mode", choices=TRAIN_MODES, default="auto",
                   help="how the training step runs, as hymba train --mode (default: auto)")
    p.add_argument("--decode-tokens", type=int, metavar="N",
                   help=f"new tokens per timed generate call, >= 2 (default: {cnew} on the CPU, {gnew} on CUDA; at "
                        "most max_seq_len - 1, the prompt shortened to fit; not for forecast recipes)")
    p.add_argument("--decode-mode", metavar="MODE",
                   help=f"the decoder decode times, generate's mode: {', '.join(DECODE_MODES)} (default: ar; "
                        "block_diffusion: models trained with that objective, mtp: with model.mtp, ladir: with a "
                        "ladir section; speculative needs a draft model: not here). Greedy; ms per step as "
                        f"(t(N) - t(1)) / (N - 1), but {', '.join(CALL_MEASURED)}: ms per new token of the whole "
                        "call; the decoder's stats in the table and the JSON")
    # the decoders' own settings, hymba generate's flags for the same modes (its --steps: --decode-steps here)
    add_decoder_arguments(p, steps_flag=DECODE_STEPS)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the weights' dtype for prefill and decode (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--json", type=path_text, metavar="FILE",
                   help="also write the results as JSON to FILE (replaced if it exists; with --set: its overrides, "
                        "and the recipe's hash, in recipe_overrides and recipe_hash)")
    add_set_argument(p)


def mode_flag(message: str) -> str:
    """A trainer's message with hymba train's aliases ``--cuda-graph`` / ``--compile``, which hymba bench does
    not have, written as the flag it has: ``--mode cuda-graph`` / ``--mode compile``."""
    return re.sub(r"--(cuda-graph|compile)(?![\w-])", r"--mode \1", message)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.recipe import RecipeError
    from ..models.generation import reserved_positions
    from ..models.lm import CheckpointError
    from ..training.bench import (
        DECODE_MODES,
        BenchSettings,
        bench_recipe,
        decode_mode_problem,
        decode_options_problem,
        decode_prompt,
        default_settings,
        format_report,
        on_cuda,
    )
    from ..training.data import DataError
    from ..training.distributed import pick_device
    from ..training.trainer import TrainError, TrainUsageError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("one process: run it without torchrun")
    check_sets(args)
    try:
        device = str(pick_device(args.device))
    except ValueError as e:
        raise UsageError(str(e)) from None
    for flag, v, lo in (("--batch", args.batch, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                        ("--seq-len", args.seq_len, 2), ("--decode-tokens", args.decode_tokens, 2)):
        if v is not None and v < lo:
            raise UsageError(f"{flag} {v}: must be >= {lo}")
    mode = args.decode_mode or "ar"
    if mode == "speculative":
        raise UsageError("--decode-mode speculative: needs a draft model, a second checkpoint (hymba generate "
                         "--mode speculative --draft); hymba bench times the recipe's one model")
    if mode not in DECODE_MODES:
        raise UsageError(f"--decode-mode {mode}: expected {', '.join(DECODE_MODES[:-1])} or {DECODE_MODES[-1]}")
    for flag, option, value in decoder_flags(args, DECODE_STEPS):  # generate's checks, --decode-mode for --mode
        modes = [m for m in modes_taking(option) if m in DECODE_MODES]
        if value is not None and mode not in modes:
            raise UsageError(f"{flag}: only for --decode-mode {' or '.join(modes)}")
    check_decoder_values(args, DECODE_STEPS)
    options = decoder_options(args, DECODE_STEPS)
    out = output_file(args.json)
    try:
        recipe = load_recipe_with_sets(Path(args.recipe), args)  # a file (a str that is no path would be read as YAML text)
    except RecipeError as e:
        more = f" (and {len(e.errors) - 1} more: hymba check lists them)" if len(e.errors) > 1 else ""
        raise UserError(" ".join(e.errors[0].split()) + more) from None
    d = default_settings(recipe, device)
    forecast = recipe.model.vocab_size is None
    if forecast and args.seq_len is not None:
        raise UsageError(f"--seq-len {args.seq_len}: does not apply to objective forecast (windows of "
                         "objective.context values)")
    if forecast and args.decode_tokens is not None:
        raise UsageError(f"--decode-tokens {args.decode_tokens}: does not apply to objective forecast (it generates "
                         "no tokens: decode is skipped)")
    if forecast and args.decode_mode is not None:
        raise UsageError(f"--decode-mode {mode}: does not apply to objective forecast (it generates no tokens: "
                         "decode is skipped)")
    seq_len = args.seq_len if args.seq_len is not None else d["seq_len"]
    limit = recipe.model.max_seq_len
    if not forecast and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len}: must be <= the recipe's max_seq_len ({limit})" if args.seq_len else
                         f"the recipe's train.seq_len {seq_len} exceeds its max_seq_len ({limit}): pass --seq-len")
    reserved = reserved_positions(recipe, mode)  # e.g. LaDiR's memory slots take positions too
    room = limit - 1 - reserved
    new = args.decode_tokens if args.decode_tokens is not None else min(d["decode_tokens"], max(room, 2))
    if not forecast and new > room:
        raise UsageError(f"--decode-tokens {new}: must be <= max_seq_len - 1 ({limit - 1}: a prompt of one token "
                         "at least)" if not reserved else f"--decode-tokens {new}: must be <= max_seq_len - 1 - "
                         f"{reserved} ({room}: a prompt of one token at least, and {reserved} positions for "
                         f"--decode-mode {mode})")
    why = None if forecast else decode_mode_problem(recipe, mode, decode_prompt(recipe, seq_len, new, reserved))
    if why is not None:  # before anything is timed
        raise UsageError(f"--decode-mode {mode}: {args.recipe}: {why}")
    problem = None if forecast else decode_options_problem(recipe, mode, options)
    if problem is not None:
        option, why = problem
        raise UsageError(f"{next(f for f, o, _ in decoder_flags(args, DECODE_STEPS) if o == option)}: {why}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda(device) else "float32"))
    settings = BenchSettings(device=device, batch=args.batch or d["batch"], seq_len=seq_len,
                             steps=args.steps or d["steps"], warmup=d["warmup"] if args.warmup is None else args.warmup,
                             mode=args.mode, decode_tokens=new, dtype=dtype, decode_mode=mode,
                             decode_options=options)
    try:
        report = bench_recipe(recipe, settings, recipe_name=args.recipe)
    except TrainUsageError as e:  # e.g. --mode cuda-graph on the CPU, or --mode compile for LaDiR
        raise UsageError(mode_flag(str(e))) from None
    except (TrainError, DataError, CheckpointError) as e:
        raise UserError(str(e)) from None
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory on {device} at batch {settings.batch}"
                        + (f" x seq_len {seq_len}" if seq_len else "") + ": lower --batch or --seq-len") from None
    if args.sets:  # what was timed is not the file's recipe: the JSON says which
        report["recipe_overrides"], report["recipe_hash"] = list(args.sets), recipe.hash()
    if out is not None:  # first: a closed pipe (exit 141 at the table) keeps what was measured
        write_output(out, json.dumps(report, indent=1) + "\n", "--json")
    emit(format_report(report))  # (a closed pipe: exit 141, quietly, as hymba check and info)
    if out is not None:
        emit(f"wrote {out}")
    return 0
