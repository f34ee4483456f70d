"""``hymba generate CKPT --prompt TEXT``: sample from a checkpoint (a ``save_pretrained``
folder or a ``hymba train`` ``OUT/step-N``; given ``OUT`` itself, its newest intact checkpoint).

Text is encoded and decoded with the tokenizer saved in the checkpoint
(``tokenizer.json``): bytes for text models, token ids (``--prompt "3 17 200"``) for
models trained on the built-in tasks. One prompt streams its tokens to the terminal as
they come; several ``--prompt`` are generated as one batch (left padding + attention
mask, through the same cache) and printed one per line.

A row ends at its first end-of-sequence token: ``--eos ID[,ID...]`` (or ``none``), else the
checkpoint's ``generation_config.json`` ``eos_token_id`` (one id or a list; ``hymba convert``
writes an imported HF model's there), else the tokenizer's end token (the ``eos_token`` of a
``tokenizer_config.json`` beside its ``tokenizer.json``, else the first of ``training.tokenizer.END_TOKENS``
in its vocabulary: ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``, ``[SEP]``, ...).

``--stop TEXT`` (repeatable; text tokenizers only): a row ends at the first occurrence of any stop
string in its generated text and is printed without it; the run ends once every row has stopped;
streamed, the last ``len(longest stop) - 1`` characters are held back until no stop string can end
there (``training.tokenizer.StopWatch``, the harness's ``generate_until`` rule). ``block_diffusion``
streams whole denoised blocks: it stops after the block that holds the stop string. A call so ended
prints the decoder's summary line (speculative, mtp, block diffusion, ladir) of what it ran up to the stop
(``generation.reporting``): the rounds or blocks done, the tokens they made (past the stop string too).

ETD checkpoints (``model.etd``) print, after generation and to stderr, one line per prompt
row: the think iterations used (ACT: also the mean over the prompt's tokens, meta tokens
included, at the prefill) and, when the model has Dr.LLM layer routers, the route the
prefill took (``ETDStack.describe_route``), e.g. ``etd: 3 think iterations (ACT: mean over
prompt tokens 2.40 of max 4); route: enc 0 execute, think 1@it0 repeat, ...``.
``--think-iterations N`` runs N think iterations (1..max_iterations), more or fewer than
the model was trained with (forward's ``think_iterations``).

``--mode block_diffusion`` (models trained with the ``block_diffusion`` objective) denoises
block by block (``--block-size``, ``--threshold``, ``--steps``; ``models/generation.py``)
and prints to stderr the forward passes, tokens per forward and denoising steps per block.
``--sampler``: ``confidence`` (default: the most confident positions first), or BD3-LM's ancestral
samplers over random positions on the model's noise schedule, ``ddpm`` (``--steps``: its time grid) or
``first_hitting`` (one position a step); those take no ``--threshold``, and their positions are drawn
(``--seed``) even at ``--temperature 0``.

``--mode speculative --draft DRAFT_CKPT [--k 4]``: lossless speculative decoding
(``models/generation.py``). The draft checkpoint (a folder or a training ``OUT``, as for
CKPT) must share the vocabulary (the same ``vocab_size``); the text goes through CKPT's
tokenizer. Each round the draft proposes ``--k`` tokens and the main model checks them in one
forward; the output is what ``--mode ar`` would give (greedy: token for token; sampling: the
same distribution). After generation one line goes to stderr: the draft's acceptance rate,
tokens per forward of the main model and the rounds, e.g. ``speculative: k 4, acceptance
rate 0.81 (52 of 64 drafts), 3.20 tokens per target forward (20 forwards, 4 of them
rollbacks), 16 rounds``.

``--mode mtp [--k N]`` (models with ``model.mtp``): self-speculative decoding, the model's own
MTP modules draft up to ``model.mtp.depth`` tokens per round (``models/mtp_decoding.py``);
the same guarantee and the same stderr line (``mtp: k 2, acceptance rate ...``).

``--mode ladir`` (models with a ``ladir`` section): latent reasoning before the answer
(``models/ladir_decoding.py``); one stderr line per prompt gives the denoising steps each
latent sample used and whether Prophet stopped it early (and the sampler's settings that guide it).
``--steps``, ``--samples``, ``--cfg-scale``, ``--diversity-scale``, ``--diversity-bandwidth``,
``--diversity-target``, ``--init-noise-scale`` and ``--prophet`` / ``--no-prophet`` override the recipe's
``ladir`` settings for this run
(each checked as the recipe's field; ``--cfg-scale`` != 1 needs ``ladir.cfg_dropout`` > 0).

``--mode forecast --data SERIES.csv`` (models trained with the ``forecast`` objective, which
read numbers, not text): writes the forecast CSV and a PNG plot (``cli/forecast.py``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from . import UsageError, UserError, finite_float, path_text, seed_int

#: --sampler's choices (``models/generation.py``'s ``SAMPLERS``; not imported here: ``hymba --help`` loads no torch)
SAMPLERS = ("confidence", "ddpm", "first_hitting")

#: --temperature when not given (a flag left at None, so that --mode forecast can refuse it)
DEFAULT_TEMPERATURE = 0.8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=path_text, metavar="CKPT", help="checkpoint folder (or a training --out folder)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); required but for "
                   "--mode forecast")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: 64, or what fits in max_seq_len)")
    p.add_argument("--temperature", type=finite_float, default=None,
                   help=f"sampling temperature (default {DEFAULT_TEMPERATURE:g}; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=finite_float, default=None,
                   help="sample among the most likely tokens whose probabilities sum to p, in (0, 1] (default: off)")
    p.add_argument("--min-p", type=finite_float, default=None,
                   help="min-p sampling: keep the tokens whose probability (after --temperature) is at least this "
                        "times the most likely token's, in [0, 1] (0: off; applied after --top-k and --top-p, as "
                        "HF's; default: off)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampling generator (default: 0)")
    p.add_argument("--mode", default="ar", help="decoding mode: ar (default), block_diffusion (models trained "
                   "with that objective), speculative (with --draft), mtp (models with model.mtp) or ladir "
                   "(models with a ladir section) or forecast (models trained with the forecast objective: --data)")
    p.add_argument("--draft", type=path_text, default=None, metavar="DRAFT_CKPT",
                   help="speculative: the draft model's checkpoint (same vocabulary)")
    add_decoder_arguments(p)
    p.add_argument("--engine", default=None, choices=("auto", "graph", "static", "dynamic"),
                   help="--mode ar: graph = each step replayed from a CUDA graph over static caches (CUDA), "
                        "static = static caches without the graph, dynamic = the growing cache; auto (default) "
                        "= graph on CUDA, dynamic elsewhere; the tokens are the same")
    p.add_argument("--eos", type=eos_arg, default=None, metavar="ID[,ID...]|none",
                   help="end-of-sequence token ids (a row ends at the first of any), or none; default: the "
                        "checkpoint's generation_config.json eos_token_id, else the tokenizer's end token")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    p.add_argument("--no-stream", action="store_true", help="print the whole completion at the end")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable): a row ends at the first occurrence of any in its generated text, "
                        "printed without it; the run ends once every row has (text tokenizers only)")
    p.add_argument("--data", type=path_text, default=None, metavar="SERIES.csv",
                   help="forecast: the series to forecast (a timestamp column, then one column per channel)")
    p.add_argument("--horizon", type=int, default=None,
                   help="forecast: steps to forecast after the data (default: the model's horizon; longer rolls "
                        "through the cache)")
    p.add_argument("--rolling", type=int, default=None, metavar="R",
                   help="forecast: also backtest at the last R patch boundaries whose whole horizon is in the data "
                        "(each origin forecast from its own window) and print MASE / CRPS next to seasonal naive")
    p.add_argument("--out", type=path_text, default=None, metavar="FILE.csv",
                   help="forecast: the forecast CSV (default: forecast.csv); the plot is FILE.png")
    p.add_argument("--think-iterations", type=int, default=None, metavar="N",
                   help="ETD models: think iterations to run, 1..max_iterations (default: the model's "
                        "iterations; with ACT halting max_iterations, each token halting on its own)")


def add_decoder_arguments(p: argparse.ArgumentParser, steps_flag: str = "--steps") -> None:
    """The flags of the decoders' own settings, each for the modes whose generator takes it (block_diffusion:
    ``--block-size``, ``--threshold``, ``--sampler``, ``--steps``; mtp and speculative: ``--k``; ladir: ``--steps``,
    ``--samples`` and the sampler's settings): ``hymba generate``'s, and ``hymba bench --decode-mode``'s, which
    names ``--steps`` ``steps_flag`` (its ``--steps`` counts timed calls). ``decoder_flags`` reads them back and
    ``check_decoder_values`` checks their values."""
    p.add_argument("--block-size", type=int, default=None,
                   help="block_diffusion: tokens per block (default: the model's training block size)")
    p.add_argument("--threshold", type=threshold_arg, default=None,
                   help="block_diffusion: unmask every token whose probability reaches this (at least one per "
                        f"step; >= 1: one per step), or none: the {steps_flag} schedule, the most confident "
                        "ceil(masked / steps left) a step (default: 0.9)")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="block_diffusion: confidence (default) unmasks the most confident positions first; ddpm "
                        "and first_hitting are BD3-LM's ancestral samplers, which reveal random positions on the "
                        "model's noise schedule (ddpm: each masked position with probability "
                        f"(alpha_s - alpha_t) / (1 - alpha_t) per step of {steps_flag}; first_hitting: one a step)")
    p.add_argument(steps_flag, type=int, default=None,
                   help="block_diffusion: at most this many denoising steps per block (default: the block size; "
                        "--sampler ddpm: the steps of its time grid, any number); "
                        "ladir: Euler steps of the latent flow (default: ladir.inference_steps)")
    p.add_argument("--k", type=int, default=None,
                   help="speculative: tokens the draft proposes per round (default: 4); mtp: drafts per round, "
                        "1..model.mtp.depth (default: the depth)")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="ladir: latent samples per question, 1..64 as ladir.samples (the answer is their "
                        "majority vote; default: ladir.samples)")
    p.add_argument("--cfg-scale", type=finite_float, default=None, metavar="W",
                   help="ladir: classifier-free guidance w >= 0 at every Euler step (1: unguided; w != 1 needs a "
                        "model trained with ladir.cfg_dropout > 0; default: ladir.cfg_scale)")
    p.add_argument("--diversity-scale", type=finite_float, default=None, metavar="GAMMA",
                   help="ladir: diversity guidance gamma >= 0 between a question's samples (0: off; acts with "
                        "--samples >= 2; default: ladir.diversity_scale)")
    p.add_argument("--diversity-bandwidth", type=finite_float, default=None, metavar="SIGMA",
                   help="ladir: the diversity kernel's sigma >= 0 (0: each step's median distance between the "
                        "samples; default: ladir.diversity_bandwidth)")
    p.add_argument("--diversity-target", default=None, choices=("estimate", "velocity"),
                   help="ladir: where the diversity kernel reads the samples: their estimates of z_1 or their "
                        "velocities (default: ladir.diversity_target)")
    p.add_argument("--init-noise-scale", type=finite_float, default=None, metavar="S",
                   help="ladir: std of the sampler's starting noise, > 0 (default: ladir.init_noise_scale)")
    p.add_argument("--prophet", action=argparse.BooleanOptionalAction, default=None,
                   help="ladir: Prophet's early exit from the denoising steps on or off (default: ladir.prophet.enabled)")


#: ``--threshold none``: no threshold (the steps schedule); None is "not given"
NO_THRESHOLD = "none"


def threshold_arg(text: str) -> float | str:
    """argparse type of ``--threshold``: a finite number, or ``none``."""
    return NO_THRESHOLD if text.strip().lower() == NO_THRESHOLD else finite_float(text)


def eos_arg(text: str) -> list[int] | str:
    """argparse type of ``--eos``: comma-separated token ids (range checked against the model later), or
    ``none``."""
    if text.strip().lower() == "none":
        return "none"
    try:
        ids = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: token ids separated by commas (e.g. 2 or 128001,128009), "
                                         "or none") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: token ids are >= 0")
    return ids


def end_ids(args: argparse.Namespace, ckpt: Path, tokenizer: Any, vocab_size: int) -> int | list[int] | None:
    """The end-of-sequence ids of this run: ``--eos``, else the checkpoint's ``generation_config.json``
    ``eos_token_id`` (an imported HF model's), else the tokenizer's end token (None: no end token)."""
    from ..models.lm import CheckpointError, generation_config

    if args.eos is not None:
        if args.eos == "none":
            return None
        bad = next((i for i in args.eos if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise UsageError(f"--eos {','.join(map(str, args.eos))}: token id {bad} is outside [0, {vocab_size})")
        return args.eos
    try:
        cfg = generation_config(ckpt, vocab_size)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    return cfg.get("eos_token_id", tokenizer.eos_id)


def mode_flags(args: argparse.Namespace) -> tuple[tuple[str, str, Any], ...]:
    """(flag, the decoders' option, its value or None) for the flags that only some modes take."""
    return (("--draft", "draft", args.draft), *decoder_flags(args)[:5], ("--engine", "engine", args.engine),
            *ladir_flags(args))


def decoder_flags(args: argparse.Namespace, steps_flag: str = "--steps") -> tuple[tuple[str, str, Any], ...]:
    """(flag, the decoders' option, its value or None) for ``add_decoder_arguments``' flags, ``--steps`` named
    ``steps_flag``: ``--k``, ``--block-size``, ``--threshold``, ``--sampler``, ``--steps``, then ``ladir_flags``."""
    steps = getattr(args, steps_flag.removeprefix("--").replace("-", "_"))
    return (("--k", "k", args.k), ("--block-size", "block_size", args.block_size),
            ("--threshold", "threshold", args.threshold), ("--sampler", "sampler", args.sampler),
            (steps_flag, "steps", steps), *ladir_flags(args))


def decoder_options(args: argparse.Namespace, steps_flag: str = "--steps") -> dict[str, Any]:
    """generate's options from the given ``decoder_flags`` (``--threshold none``: None, the steps schedule)."""
    options = {opt: value for _, opt, value in decoder_flags(args, steps_flag) if value is not None}
    if options.get("threshold") == NO_THRESHOLD:
        options["threshold"] = None
    return options


def check_decoder_values(args: argparse.Namespace, steps_flag: str = "--steps") -> None:
    """``decoder_flags``' values as generate refuses them before loading anything (exit 2): counts >= 1,
    ``--samples`` within ladir.samples' range, the ladir sampler's numbers within theirs, ``--threshold`` > 0
    and only with the confidence sampler. What depends on the model (``--k`` past ``model.mtp.depth``,
    ``--cfg-scale`` without ``ladir.cfg_dropout``) is the decoder's own check."""
    from ..core.config import FLOAT_MAX
    from ..models.ladir_decoding import MAX_SAMPLES

    steps = getattr(args, steps_flag.removeprefix("--").replace("-", "_"))
    for flag, value in (("--k", args.k), ("--block-size", args.block_size), (steps_flag, steps)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1")
    if args.samples is not None and not 1 <= args.samples <= MAX_SAMPLES:
        raise UsageError(f"--samples {args.samples}: must be in 1..{MAX_SAMPLES} (as ladir.samples)")
    for flag, value, strict in (("--cfg-scale", args.cfg_scale, False),
                                ("--diversity-scale", args.diversity_scale, False),
                                ("--diversity-bandwidth", args.diversity_bandwidth, False),
                                ("--init-noise-scale", args.init_noise_scale, True)):
        if value is not None and (value <= 0 if strict else value < 0):
            raise UsageError(f"{flag} {value}: must be {'>' if strict else '>='} 0")
        if value is not None and value > FLOAT_MAX:  # (as a recipe's ladir field: the sampler computes in float32)
            raise UsageError(f"{flag} {value}: must be within float32's range (<= {FLOAT_MAX:.4g})")
    if args.threshold is not None and args.sampler not in (None, "confidence"):
        raise UsageError(f"--threshold: only for --sampler confidence (--sampler {args.sampler} reveals random "
                         "positions)")
    if isinstance(args.threshold, float) and args.threshold <= 0:
        raise UsageError(f"--threshold {args.threshold}: must be > 0, or none (the {steps_flag} schedule)")


def ladir_flags(args: argparse.Namespace) -> tuple[tuple[str, str, Any], ...]:
    """(flag, generate's option, its value or None) for the flags of ``--mode ladir`` alone: the latent
    samples and the sampler's settings (``components.ladir.SAMPLER_SETTINGS``), for this run only."""
    return (("--samples", "samples", args.samples), ("--cfg-scale", "cfg_scale", args.cfg_scale),
            ("--diversity-scale", "diversity_scale", args.diversity_scale),
            ("--diversity-bandwidth", "diversity_bandwidth", args.diversity_bandwidth),
            ("--diversity-target", "diversity_target", args.diversity_target),
            ("--init-noise-scale", "init_noise_scale", args.init_noise_scale),
            ("--prophet/--no-prophet", "prophet", args.prophet))


def modes_taking(option: str) -> list[str]:
    """The decoding modes whose generator takes ``option`` (``generation.GENERATORS``)."""
    import inspect

    from ..models.generation import GENERATORS

    return sorted(m for m, fn in GENERATORS.items() if option in inspect.signature(fn).parameters)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, or the newest intact ``step-N`` inside a training output folder
    (a corrupt newer one skipped with a warning, as ``hymba train --resume`` does)."""
    from ..training.checkpoint import CheckpointError, find_resumable

    if not path.exists():
        raise UserError(f"{path}: no such checkpoint folder")
    if path.is_dir() and not (path / "recipe.yaml").exists():
        try:
            found = find_resumable(path, warn=lambda line: print(line, file=sys.stderr), files=("model.safetensors",),
                                   state=False)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        if found is not None:
            return found[0]
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

    from ..models.generation import DraftError, end_tokens, reserved_positions
    from ..models.lm import CheckpointError, from_pretrained
    from ..training.distributed import pick_device
    from ..training.tokenizer import AllStopped, ByteTokenizer, StopWatch, StreamDecoder, TokenizerError, for_checkpoint

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        raise UsageError(f"--min-p {args.min_p}: must be in [0, 1]")
    if args.think_iterations is not None and args.think_iterations < 1:
        raise UsageError(f"--think-iterations {args.think_iterations}: must be >= 1")
    if args.stop is not None and not all(args.stop):
        raise UsageError("--stop: an empty stop string (it would end every row before its first token)")
    for flag, option, value in mode_flags(args):
        modes = modes_taking(option)
        if value is not None and args.mode not in modes:
            raise UsageError(f"{flag}: only for --mode {' or '.join(modes)}")
    check_decoder_values(args)
    if args.mode == "speculative" and args.draft is None:
        raise UsageError("--mode speculative needs --draft DRAFT_CKPT (the draft model's checkpoint)")
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    series_flags = [f for f, v in (("--data", args.data), ("--horizon", args.horizon), ("--rolling", args.rolling),
                                   ("--out", args.out)) if v is not None]
    if series_flags and args.mode != "forecast":
        raise UsageError(f"{series_flags[0]}: only for --mode forecast")
    token_flags = [f for f, v in (("--prompt", args.prompt), ("--max-new-tokens", args.max_new_tokens),
                                  ("--temperature", args.temperature),
                                  ("--top-k", args.top_k), ("--top-p", args.top_p), ("--min-p", args.min_p),
                                  ("--think-iterations", args.think_iterations), ("--eos", args.eos),
                                  ("--stop", args.stop)) if v is not None]
    if token_flags and args.mode == "forecast":
        raise UsageError(f"{token_flags[0]}: not for --mode forecast (it reads --data; --horizon sets the length)")
    if args.mode != "forecast" and not args.prompt:
        raise UsageError("--prompt TEXT is required (but for --mode forecast, which reads --data)")
    ckpt = resolve_checkpoint(Path(args.checkpoint))
    try:
        model = from_pretrained(ckpt, device=device)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    model.eval()
    # what the model reads decides the input: numbers (a series CSV) or text (prompts)
    if not model.objective.reads_tokens:
        if args.mode != "forecast":
            raise UsageError(f"{ckpt} is a {model.objective.cfg.kind} model (it reads numbers, not text): use "
                             "--mode forecast --data SERIES.csv")
        from .forecast import run_forecast

        return run_forecast(args, model, ckpt)
    if args.mode == "forecast":
        raise UsageError(f"--mode forecast: {ckpt} is a token model (objective "
                        f"{getattr(model.objective.cfg, 'kind', 'next_token')}), not a forecaster")
    try:
        tok = for_checkpoint(ckpt, model.config.vocab_size)
    except TokenizerError as e:
        raise UserError(str(e)) from None
    if args.stop is not None and tok.kind == "ids":
        raise UsageError(f"--stop: stop strings need a text tokenizer; {ckpt} reads token ids (no text to match)")
    if not (ckpt / "tokenizer.json").is_file():  # e.g. save_pretrained's folders; hymba train always writes one
        print(f"{ckpt}: no tokenizer.json: the prompt is read as "
              f"{'UTF-8 bytes' if isinstance(tok, ByteTokenizer) else 'token ids'}", file=sys.stderr)
    draft = None
    if args.mode == "speculative":
        try:
            draft_ckpt = resolve_checkpoint(Path(args.draft))
        except UserError as e:
            raise UserError(f"--draft: {e}") from None
        try:
            draft = from_pretrained(draft_ckpt, device=device)
        except CheckpointError as e:
            raise UserError(f"--draft: {e}") from None
        draft.eval()
        if draft.config.vocab_size is None:  # a forecaster: numbers in and out
            raise UserError(f"--draft {draft_ckpt}: a forecaster (objective forecast, no vocabulary) cannot draft "
                            "tokens")
        if draft.config.vocab_size != model.config.vocab_size:
            raise UserError(f"--draft {draft_ckpt}: vocab_size {draft.config.vocab_size} differs from {ckpt}'s "
                            f"vocab_size {model.config.vocab_size}; the draft must share the vocabulary")
    etd = model.config.etd
    if args.think_iterations is not None:
        if etd is None:
            raise UsageError(f"--think-iterations: {ckpt} is not an ETD model (its recipe has no model.etd)")
        if args.think_iterations > etd.cap:
            raise UsageError(f"--think-iterations {args.think_iterations}: the model holds states for at most "
                             f"{etd.cap} think iterations (model.etd.max_iterations)")
    given = [(flag, value) for flag, _, value in ladir_flags(args) if value is not None]
    if given and model.ladir is None:  # (--mode ladir: checked above)
        raise UsageError(f"{given[0][0]}: {ckpt} is not a LaDiR model (its recipe has no ladir section)")
    if args.cfg_scale is not None and args.cfg_scale != 1.0 and model.ladir.cfg.cfg_dropout == 0.0:
        raise UsageError(f"--cfg-scale {args.cfg_scale:g}: guides with the unconditional velocity, which the "
                         f"denoiser learns only with ladir.cfg_dropout > 0 (0 in {ckpt}'s recipe)")
    V = model.config.vocab_size
    if tok.vocab_size > V:
        raise UserError(f"{ckpt / 'tokenizer.json'}: {tok.vocab_size} tokens but the model has vocab_size {V}")
    eos = end_ids(args, ckpt, tok, V)
    prompts = []
    for text in args.prompt:
        try:
            ids = tok.encode(text)
        except TokenizerError as e:
            raise UsageError(f"--prompt {text!r}: {e}") from None
        if not ids:
            raise UsageError(f"--prompt {text!r}: empty after tokenization")
        prompts.append(ids)
    T = max(len(p) for p in prompts)
    reserved = reserved_positions(model.recipe, args.mode)  # e.g. ladir's memory slots take positions too
    max_len = model.config.max_seq_len - reserved
    room = f"max_seq_len ({model.config.max_seq_len}" + (f" less {reserved} for --mode {args.mode})" if reserved else ")")
    if T >= max_len:  # (a prompt that fills it leaves no room for a new token)
        raise UsageError(f"--prompt: {T} tokens, {'longer than' if T > max_len else 'as long as'} the model's {room} "
                        "allows: no room for a new token")
    if draft is not None and T >= draft.config.max_seq_len:  # (generate's message said: max_new_tokens <= 0)
        raise UserError(f"--draft {draft_ckpt}: its max_seq_len ({draft.config.max_seq_len}) leaves no room for a new "
                        f"token after the {T}-token prompt")
    if args.max_new_tokens is None:
        args.max_new_tokens = min(64, max_len - T)
        if draft is not None:  # the draft reads the whole sequence too
            args.max_new_tokens = max(min(args.max_new_tokens, draft.config.max_seq_len - T), 1)
    if T + args.max_new_tokens > max_len:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: prompt ({T} tokens) + new tokens exceed the "
                        f"model's {room}; use at most {max_len - T}")
    B = len(prompts)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        input_ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    gen = torch.Generator(device=device).manual_seed(args.seed)
    stream = B == 1 and not args.no_stream
    decoder = StreamDecoder(tok, prompts[0] if stream else ())  # the completion decoded after its prompt

    started = []

    ends = set(end_tokens(eos, "cpu").ids) if eos is not None else set()

    def streamer(nxt: torch.Tensor) -> None:
        if not started:  # the prompt is echoed once generation is known to run
            started.append(True)
            sys.stdout.write(decoder.flush())
        if int(nxt[0]) in ends:  # the end token is not printed (as --no-stream cuts the row before it)
            return
        text = decoder.push(int(nxt[0]))
        if text:
            sys.stdout.write(text)
        sys.stdout.flush()

    # --stop: every row's text watched (training.tokenizer.StopWatch, as the harness's generate_until); streamed,
    # row 0 is printed up to what no stop string can still cover; the call ends once every row has stopped
    watch = StopWatch(tok.decode, B, args.stop, ends, prefixes=prompts) if args.stop else None
    shown = [0]

    def stop_streamer(nxt: torch.Tensor) -> None:
        if stream and not started:
            started.append(True)
            sys.stdout.write(decoder.flush())
        over = watch.push(nxt)
        if stream:
            text = watch.shown(0)
            if len(text) > shown[0]:
                sys.stdout.write(text[shown[0]:])
                sys.stdout.flush()
                shown[0] = len(text)
        if over:
            raise AllStopped
    prefill: list = []  # (cache, stats) of the model's first call: generate's prefill
    hooks = []
    if etd is not None:
        hooks = watch_prefill(model, prefill, args.think_iterations)
    # the mode's own settings: each flag goes to the decoders that take it (checked above)
    options = {**decoder_options(args), **({"engine": args.engine} if args.engine is not None else {})}
    if draft is not None:
        options["draft"] = draft  # the loaded model, not its path
    stats: dict[str, Any] = {}
    # the decode engine's capture notice is printed below with the decoder's report, as one line
    warnings.filterwarnings("ignore", message="decode: the step could not be captured", category=RuntimeWarning)
    try:
        out = model.generate(
            input_ids.to(device), max_new_tokens=args.max_new_tokens, mode=args.mode,
            temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p,
            attention_mask=mask.to(device) if bool((mask == 0).any()) else None,
            eos_token_id=eos, generator=gen, streamer=stop_streamer if watch is not None else streamer if stream else None,
            stats=stats, **options,
        )
    except AllStopped:  # every row met a stop string (or its end token): the watch holds the tokens
        out = None
    except ValueError as e:
        msg = str(e).splitlines()[0]
        flag = next((f for k, f in (*((o, f) for f, o, _ in ladir_flags(args)),  # (ladir's option names first)
                                    ("every prompt", "--prompt"), ("draft model", "--draft"), ("k must", "--k"),
                                    ("block_size", "--block-size"), ("sampler must", "--sampler"),
                                    ("threshold", "--threshold"), ("steps", "--steps"), ("mode", "--mode"),
                                    ("think_iterations", "--think-iterations"), ("engine", "--engine"),
                                    ("eos_token_id", "--eos"), ("min_p", "--min-p"))
                     if k in msg),
                    "--max-new-tokens")
        # a flag's value the model cannot take (exit 2); a DraftError: the draft checkpoint's own limit (exit 1)
        raise (UserError if isinstance(e, DraftError) else UsageError)(f"{flag}: {msg}") from None
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        if stream:
            sys.stdout.write("\n")
        raise UserError(f"{ckpt}: the model's next-token probabilities are not finite (nan or inf logits: are its "
                        "weights finite?)") from None
    finally:
        for h in hooks:
            h.remove()
    if stream and watch is not None:
        sys.stdout.write(("" if started else decoder.flush()) + watch.completion(0)[shown[0]:] + "\n")
    elif stream:
        sys.stdout.write(decoder.flush() + "\n")
    else:
        for i, p in enumerate(prompts):
            if watch is not None:  # the row's text cut before its first stop string
                text = tok.decode(p) + watch.completion(i)
            else:
                new = out[i, T:].tolist()
                stop = next((j for j, t in enumerate(new) if t in ends), None)
                if stop is not None:
                    new = new[:stop]
                text = tok.decode(p + new)  # one sequence: decoded apart, SentencePiece / WordPiece lost the space
            print(text if B == 1 else f"[{i}] {text}")
    summary = stats.get("summary") or []  # the decoder's own report (models/generation.py)
    if stats.get("engine_notice"):  # a graph was asked for and could not be captured: say so
        summary = [*summary, stats["engine_notice"]]
    if summary:
        sys.stdout.flush()
    for i, line in enumerate(summary):
        print(line if len(summary) == 1 or B == 1 else f"[{i}] {line}", file=sys.stderr)
    if etd is not None and prefill:
        sys.stdout.flush()
        for i, line in enumerate(etd_lines(model, prefill[0], prompts, device)):
            print(line if B == 1 else f"[{i}] {line}", file=sys.stderr)
    return 0


def watch_prefill(model: Any, seen: list, think_iterations: int | None) -> list:
    """Forward hooks on an ETD model for one ``generate`` call: every forward gets
    ``think_iterations`` (when given), and the first call's (cache, stats) — the prefill,
    where the per-sequence decisions are taken — is appended to ``seen``. Returns the handles."""

    def pre(_mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if think_iterations is not None:
            kwargs = {**kwargs, "think_iterations": think_iterations}
        return args, kwargs

    def post(_mod: Any, _args: tuple, kwargs: dict, out: Any) -> None:
        if not seen:
            seen.append((kwargs.get("cache"), out.stats or {}))

    return [model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True)]


def etd_lines(model: Any, prefill: tuple, prompts: list[list[int]], device: Any) -> list[str]:
    """One ``etd: ...`` line per prompt row from generate's prefill: think iterations used (ACT:
    the mean over the row's prompt tokens) and, with layer routers, the route taken."""
    import torch

    cache, stats = prefill
    structure, etd = model.structure, model.config.etd
    if cache is not None and "iterations" in cache.extra:
        n_iter = int(cache.extra["iterations"])
    else:  # ETDStack's default
        n_iter = etd.cap if model.etd_router.halt is not None else etd.iterations
    routes = cache.extra.get("routes") if cache is not None else None
    if routes is None:
        routes = stats.get("etd/routes")
    act = model.etd_router.halt is not None
    its = f"{n_iter} think iteration{'s' if n_iter != 1 else ''}"
    # rows per prompt in the prefill: LaDiR prefills each question once per sample (row i * samples)
    stride = max(routes.shape[0] // len(prompts), 1) if routes is not None else 1
    lines = []
    for i, p in enumerate(prompts):
        if act:
            if len(prompts) == 1:
                mean = float(stats["etd/iterations"])
            else:  # the batch's statistic is a mean over all rows: this row alone, same route
                row = torch.tensor([p], device=device)
                with torch.no_grad():
                    st = model(row, think_iterations=n_iter,
                               routes=routes[i * stride:i * stride + 1] if routes is not None else None).stats
                mean = float(st["etd/iterations"])
            line = f"etd: {its} (ACT: mean over prompt tokens {mean:.2f} of max {etd.cap})"
        else:
            line = f"etd: {its} (fixed; trained with {etd.iterations}" + (
                f", max {etd.cap})" if etd.cap != etd.iterations else ")")
        if routes is not None:
            line += f"; route: {structure.describe_route(routes[i * stride], n_iter)}"
        lines.append(line)
    return lines
