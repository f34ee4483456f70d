"""``hymba train RECIPE``: train a model from a recipe (see hymba_plus/training/trainer.py).

Defaults come from the recipe's optional ``train:`` section (else ``TrainConfig``'s defaults,
which ``--help`` shows); flags override them (and, with ``--resume``, override the settings
saved in the checkpoint). Under
``torchrun --nproc-per-node N -m hymba_plus train ...`` the same command trains with
FSDP2 over N processes.

``--mode`` picks how the training step runs: ``auto`` (the default) replays it from CUDA
graphs on a GPU where the run allows it and the first batch's graphed loss matches the eager
one, else eager (one line says which and why; on the CPU: eager, silently); ``eager``,
``cuda-graph`` and ``compile`` force one (``--cuda-graph``, ``--compile`` and ``--compile-mode``
are aliases).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from . import (
    UsageError,
    UserError,
    add_set_argument,
    add_text_field_argument,
    check_sets,
    finite_float,
    load_recipe_with_sets,
    path_text,
    seed_int,
)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TRAIN_MODES = ("auto", "eager", "cuda-graph", "compile")  # training/trainer.py's TRAIN_MODES

#: the widest route search: its batch forwards per micro-batch grow with the beam (training/routes.py)
MAX_ROUTE_BEAM = 64

#: flags (dests) a forecast run does not read: its windows are objective.context + horizon values of a
#: series (training/series.py), split by time, no tokens, no built-in task
NOT_FORECAST = ("seq_len", "tokenizer", "text_field", "val_frac", "mqar_pairs", "copy_tokens", "khop_hops", "khop_nodes",
                "chain_steps", "chain_values")

#: flag dest -> TrainConfig field
_FIELDS = {
    "steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "grad_accum": "grad_accum",
    "lr": "lr", "muon_lr": "muon_lr", "weight_decay": "weight_decay", "optimizer": "optimizer",
    "schedule": "schedule", "warmup": "warmup_steps", "grad_clip": "grad_clip", "precision": "precision",
    "tf32": "tf32", "fsdp_param_dtype": "fsdp_param_dtype", "param_dtype": "param_dtype",
    "seed": "seed", "data": "data", "tokenizer": "tokenizer", "text_field": "text_field", "eval_every": "eval_every",
    "eval_batches": "eval_batches", "save_every": "save_every", "keep_last": "keep_last",
    "mqar_pairs": "mqar_pairs", "copy_tokens": "copy_tokens", "val_frac": "val_frac",
    "khop_hops": "khop_hops", "khop_nodes": "khop_nodes", "ladir_stage": "ladir_stage",
    "chain_steps": "chain_steps", "chain_values": "chain_values", "activation_checkpoint": "activation_checkpoint",
    "log_to": "log_to",
}


def _default(field: str) -> str:
    """``(default: V)`` of a TrainConfig field, for --help."""
    from ..training.config import TrainConfig

    v = {f.name: f.default for f in dataclasses.fields(TrainConfig)}[field]
    if v is None:
        return ""
    return f" (default: {v:g})" if isinstance(v, float) else f" (default: {v})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (f"{p.description or ''}. Settings come from the recipe's train: section where it has one, "
                     "else the defaults shown; flags override both (and, with --resume, the checkpoint's).")
    p.add_argument("recipe", type=path_text, metavar="RECIPE", help="recipe YAML file, or a checkpoint folder: its recipe, starting "
                                                    "from its weights (e.g. one `hymba convert --hybridize` wrote)")
    add_set_argument(p)  # (a checkpoint folder: only what keeps its weights' shapes; --resume: what keeps its recipe)
    p.add_argument("--distill", type=path_text, metavar="TEACHER_CKPT",
                   help="also learn the teacher checkpoint's logits (KL); weights in the recipe's train.distill "
                        "section (kl_weight, ce_weight, temperature; default 1, 1, 1)")
    p.add_argument("--out", type=path_text, help="output folder for checkpoints, metrics.jsonl, loss.png (default: runs/NAME)")
    p.add_argument("--data", type=path_text, help="built-in task (mqar, selective_copy, parity, khop), a text file or folder, or a "
                                  "folder written by `hymba prepare` (default: mqar); objective ladir: chain_arith, "
                                  "chain_pointer or a JSONL file of {question, reasoning, answer} (default: "
                                  "chain_arith); forecast recipes: a series CSV (timestamp column, then numeric columns) or "
                                  "synthetic (the default)")
    p.add_argument("--tokenizer", type=path_text, help="a `tokenizers` JSON file for text and reasoning data (default: bytes)")
    add_text_field_argument(p, default=None)  # (prepare's; unset: a resumed run's is its checkpoint's)
    p.add_argument("--mqar-pairs", type=int, help="mqar: key/value pairs per sequence (default: min(seq_len / 4, vocab_size / 2 - 1))")
    p.add_argument("--copy-tokens", type=int, help="selective_copy: tokens to copy (default: seq_len / 8)")
    p.add_argument("--khop-hops", type=int, help="khop: pointers followed per query")
    p.add_argument("--ladir-stage", choices=("vae", "flow", "joint"),
                   help="objective ladir: train the VAE (and the LM), the flow denoiser, or both")
    p.add_argument("--chain-steps", type=int,
                   help="chain_arith: operations per question; chain_pointer: hops (default: 3)")
    p.add_argument("--chain-values", type=int,
                   help="chain_arith: the modulus (default: 10); chain_pointer: nodes of the cycle (default: 8)")
    p.add_argument("--khop-nodes", type=int,
                   help="khop: nodes of the cycle (default: min(vocab_size - 3, (seq_len - 1) / 5))")
    p.add_argument("--val-frac", type=finite_float, help="text or a reasoning JSONL file: held-out fraction for evaluation")
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), default="no", metavar="auto",
                   help="continue from the newest intact checkpoint in --out (an error when there is none); "
                        "--resume auto starts from scratch when there is none (for job scripts)")
    p.add_argument("--steps", type=int, help="optimizer steps of the run (the schedule's length)")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="end this run at STEP with a checkpoint, keeping the schedule of --steps (resume later)")
    p.add_argument("--time-limit", type=finite_float, metavar="SECONDS",
                   help="end this run with an eval and a checkpoint once SECONDS have passed (resume later)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=finite_float, help="AdamW learning rate")
    p.add_argument("--muon-lr", type=finite_float, help="Muon learning rate")
    p.add_argument("--weight-decay", type=finite_float)
    p.add_argument("--optimizer", choices=("muon", "adamw"))
    p.add_argument("--schedule", choices=("cosine", "wsd", "constant"))
    p.add_argument("--warmup", type=int, help="warmup steps")
    p.add_argument("--grad-clip", type=finite_float, help="max gradient norm (0 = off)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="auto = bf16 autocast on CUDA")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="float32 matmuls on CUDA in TF32 (~1e-3 relative): those outside bf16 autocast, e.g. "
                        "--precision fp32 runs and the ATLAS memory's GEMMs; --no-tf32 keeps float32 accuracy")
    p.add_argument("--fsdp-param-dtype", choices=("float32", "bfloat16"),
                   help="under torchrun (FSDP2): bfloat16 = bf16 all-gathered parameters, float32 gradient reduce "
                        "(torchtitan's mixed precision; needs bf16 precision); float32 (default) = autocast only")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"),
                   help="bfloat16 = the GEMM weights held in bf16 with float32 master copies for the optimizer "
                        "(one process; under torchrun the same as --fsdp-param-dtype bfloat16); needs bf16 precision")
    p.add_argument("--activation-checkpoint", type=int, metavar="N",
                   help="recompute every N-th block's activations in the backward instead of keeping them "
                        "(1: every block; 0: off, the default): less memory, about one more forward of those blocks")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-last", type=int, help="checkpoints to keep")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (and at the end)")
    p.add_argument("--eval-batches", type=int, help="batches per evaluation")
    p.add_argument("--seed", type=seed_int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--mode", choices=TRAIN_MODES, default=None,
                   help="how the training step runs. auto (default): on CUDA, replayed from CUDA graphs when the "
                        "run allows it (one process, no --train-only / --distill, Dr.LLM routers off, an objective "
                        "whose step is captured whole: next token, MTP, block diffusion, forecasting; not LaDiR) "
                        "and the capture gives the eager loss on the first batch, else eager, "
                        "with one line saying which and why; on the CPU, eager. eager: plain PyTorch. cuda-graph: "
                        "CUDA graphs, an error when they cannot be captured (= --cuda-graph). compile: "
                        "torch.compile (= --compile). The mode that ran is in metrics.jsonl and the summary")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (= --mode compile)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode (implies --mode compile); reduce-overhead replays CUDA graphs, which "
                        "removes the launch overhead of many small kernels (an MoE layer on an H100: 4.3 -> 2.9 ms)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="= --mode cuda-graph: capture the training forward+backward in CUDA graphs and replay them "
                        "(eager kernels, no launch overhead; one CUDA process, not with --compile), an error when "
                        "the capture fails: an MoE layer on an H100 4.3 -> 2.4 ms")
    p.add_argument("--train-only", choices=("routers", "branches", "all"), default=None,
                   help="routers: train only the Dr.LLM layer routers on searched routes, the rest frozen; "
                        "branches: only the MoDr branches (LM loss); all: everything (default: the resumed "
                        "checkpoint's mode, else all; another mode than the checkpoint's starts a new phase)")
    p.add_argument("--route-beam", type=int, metavar="N",
                   help="router training: beam width of the route search (default: 4; --resume: the run's)")
    p.add_argument("--route-tolerance", type=finite_float, metavar="NATS",
                   help="router training: how much loss per row above all-execute's a target route may cost; "
                        "smaller keeps accuracy, larger skips more (default: 0.02; --resume: the run's)")
    p.add_argument("--log-to", metavar="TARGETS",
                   help="also log every metrics.jsonl row to tensorboard (OUT/tb), wandb (OUT/wandb; WANDB_MODE, "
                        "WANDB_PROJECT) or both: tensorboard,wandb (needs pip install 'hymba_plus[log]'); none: "
                        "neither (default: none)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on a terminal, no progress lines without one")
    p.add_argument("--progress-interval", type=finite_float, default=10.0, metavar="SECONDS",
                   help="seconds between progress lines when stderr is not a terminal (default: 10)")
    for action in p._actions:  # every train setting shows its default
        field = _FIELDS.get(action.dest)
        if field is not None and action.help is not argparse.SUPPRESS:
            action.help = (action.help or field.replace("_", " ")) + _default(field)


def _check_sets_against_checkpoints(args: argparse.Namespace, recipe, init: Path | None, out: Path) -> None:  # noqa: ANN001
    """``--set`` where a checkpoint's weights are read (README, "A recipe", Overrides), each refused as one usage
    line naming the ``--set``: from a checkpoint folder given as RECIPE (``init``) only overrides that keep the
    shapes of its weights; resuming (``--resume``, a checkpoint in ``out``) only those that keep its recipe's
    model, components, objective and ladir (what ``checkpoint.check_recipe`` compares) and its ``train``
    settings, which a resumed run takes from the checkpoint (its flags change them: a ``--set train.KEY`` whose
    flag is given too is not checked, the flag sets it)."""
    from collections.abc import Mapping

    from ..core.recipe import RecipeError, load_recipe, parse_overrides
    from ..models.lm import CheckpointError
    from ..training import checkpoint as ckpt_mod

    if not args.sets:
        return
    sets = list(zip(args.sets, parse_overrides(args.sets)))
    model_sets = [(t, o) for t, o in sets if o.key.split(".")[0] not in ("train", "name")]
    flags = " ".join(o.flag for _, o in model_sets)  # (as the recipe's errors name them: escaped, cut)
    if init is not None and model_sets:
        import torch

        from ..models.lm import HybridLM

        try:
            with torch.device("meta"):
                shapes = [{k: list(v.shape) for k, v in HybridLM(r).state_dict().items()}
                          for r in (load_recipe(init / "recipe.yaml"), recipe)]
        except Exception:  # noqa: BLE001 - a recipe that cannot build: the run reports it, as without --set
            shapes = None
        if shapes is not None and shapes[0] != shapes[1]:
            saved, now = shapes
            key = next(k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
            raise UsageError(f"{flags}: changes the weights of the checkpoint {init} the run starts from ({key}: "
                             f"{saved.get(key, 'absent')} there, {now.get(key, 'absent')} with the --set); set only "
                             "what keeps their shapes, or train from a recipe file")
    if args.resume == "no" or not ckpt_mod.list_checkpoints(out):
        return
    try:
        found = ckpt_mod.find_resumable(out)
        if found is None:
            return
        ckpt, state = found
        saved_recipe = load_recipe(ckpt / "recipe.yaml")
    except CheckpointError as e:
        raise UserError(str(e)) from None
    except RecipeError as e:
        raise UserError(e.errors[0]) from None
    if ckpt_mod.recipe_difference(saved_recipe, recipe):  # the --set behind it (else the trainer names the file's)
        there, here = saved_recipe.to_dict(), recipe.to_dict()
        culprits = [(o.flag, o.key, _at(there, o.key), _at(here, o.key)) for _, o in model_sets
                    if _at(there, o.key) != _at(here, o.key)]
        if culprits:
            _, key, a, b = culprits[0]
            raise UsageError(f"{' '.join(flag for flag, *_ in culprits)}: the checkpoint {ckpt} being resumed "
                             f"was trained with another recipe ({key}: {a!r} there, {b!r} with the --set): a resumed "
                             "run keeps its checkpoint's model; drop the --set, or start a new run in another --out")
    train_sets = [(t, o) for t, o in sets if o.key.split(".")[0] == "train"]
    if not train_sets or recipe.train is None:
        return
    from ..training.trainer import saved_train_config

    try:
        saved_cfg = saved_train_config(state, ckpt, recipe)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    flag_of = {field: dest for dest, field in _FIELDS.items()}
    flagged = {field for dest, field in _FIELDS.items() if getattr(args, dest) is not None}
    for _, o in train_sets:
        fields = [o.key.split(".")[1]] if o.key != "train" else list(o.value) if isinstance(o.value, Mapping) else []
        for f in fields:
            if f in flagged:  # its flag sets it (over the checkpoint's, as over a recipe's): the --set changes nothing
                continue
            if hasattr(saved_cfg, f) and getattr(recipe.train, f) != getattr(saved_cfg, f):
                how = (f"change it with --{flag_of[f].replace('_', '-')}" if f in flag_of
                       else "it stays the checkpoint's on a resume")
                raise UsageError(f"{o.flag}: a resumed run takes its train settings from its checkpoint {ckpt} "
                                 f"({f} {getattr(saved_cfg, f)!r} there); {how}")


def _at(d: Any, key: str) -> Any:
    """The value at a key path of a recipe's ``to_dict()``, list items ``KEY[N]`` too (None where it has none)."""
    import re

    for part in re.findall(r"\[\d+\]|[^.\[]+", key):
        if part.startswith("["):
            i = int(part[1:-1])
            d = d[i] if isinstance(d, (list, tuple)) and i < len(d) else None
        elif isinstance(d, dict):
            d = d.get(part)
        else:
            return None
    return d


def run(args: argparse.Namespace) -> int:
    from ..core.recipe import RecipeError
    from ..models.lm import CheckpointError
    from ..objectives import objective_class
    from ..training import checkpoint as ckpt_mod
    from ..training.config import TrainConfig, TrainConfigError, validate
    from ..training.data import DataError
    from ..training.signals import EXIT_INTERRUPTED
    from ..training.tasks import TaskError
    from ..training.tokenizer import TokenizerError
    from ..training.trainer import RunOptions, TrainError, TrainInterrupted, TrainUsageError, train

    check_sets(args)
    init = None
    recipe_path = Path(args.recipe)
    if recipe_path.is_dir():  # a checkpoint folder: its recipe, starting from its weights
        if not (recipe_path / "recipe.yaml").is_file() or not (recipe_path / "model.safetensors").is_file():
            raise UserError(f"{recipe_path}: a folder, but not a checkpoint (recipe.yaml + model.safetensors)")
        init, recipe_path = recipe_path, recipe_path / "recipe.yaml"
    if args.distill is not None and not Path(args.distill).is_dir():
        raise UserError(f"--distill {args.distill}: no such checkpoint folder")
    try:
        recipe = load_recipe_with_sets(recipe_path, args)
    except RecipeError as e:  # one line (README, Exit codes): the first error, and how many more (as hymba bench)
        more = f" (and {len(e.errors) - 1} more: hymba check lists them)" if len(e.errors) > 1 else ""
        raise UserError(" ".join(e.errors[0].split("\n")) + more) from None
    overrides = {field: getattr(args, dest) for dest, field in _FIELDS.items() if getattr(args, dest) is not None}
    kind = recipe.objective.kind if recipe.objective is not None else "next_token"
    if args.ladir_stage is not None and kind != "ladir":  # (it was ignored silently)
        raise UsageError(f"--ladir-stage {args.ladir_stage}: only for objective ladir (the recipe's is {kind})")
    if args.text_field is not None and objective_class(recipe).needs_segments:  # (it was ignored silently)
        raise UsageError(f"--text-field {args.text_field}: the objective {kind} reads reasoning data (rows of "
                         "question, reasoning, answer), not text")
    field = recipe.train.text_field if recipe.train is not None else None
    if args.text_field is None and field is not None and objective_class(recipe).needs_segments:
        # the recipe's key (its data-reading rule waits for the effective data, and reasoning data is no
        # built-in next-token task: it trained without reading it)
        given = next((s for s in reversed(args.sets or []) if s.split("=", 1)[0].strip() == "train.text_field"), None)
        raise UserError(f"{f'--set {given}' if given else f'{recipe_path}: train.text_field: {field}'}: the objective "
                        f"{kind} reads reasoning data (rows of question, reasoning, answer), not text")
    if args.distill is not None and kind != "next_token":  # (training/distill.py refuses it too, as the API's)
        raise UsageError(f"--distill: only for next-token training (the recipe's objective is {kind}; it must be "
                         "next_token)")
    unread = next((d for d in NOT_FORECAST if getattr(args, d) is not None), None) if kind == "forecast" else None
    if unread is not None:  # (they were ignored silently)
        raise UsageError(f"--{unread.replace('_', '-')} {getattr(args, unread)}: does not apply to objective forecast "
                         "(windows of objective.context + horizon values, split by time)")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after {args.stop_after}: must be >= 1")
    if args.progress_interval < 0:
        raise UsageError(f"--progress-interval {args.progress_interval:g}: must be >= 0")
    if args.time_limit is not None and args.time_limit <= 0:
        raise UsageError(f"--time-limit {args.time_limit:g}: must be > 0")
    base = recipe.train if recipe.train is not None else TrainConfig()
    if args.out is None and (Path(recipe.name).name != recipe.name or recipe.name in (".", "..")):
        # (runs/../../x or an absolute name wrote outside runs/, runs/. into runs/ itself)
        raise UsageError(f"the recipe's name {recipe.name!r} is not a folder name for the default --out runs/NAME: "
                         "pass --out")
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    _check_sets_against_checkpoints(args, recipe, init, out)
    try:
        cfg = dataclasses.replace(base, **overrides)
        validate(cfg, recipe.model, overrides, args.recipe, default_data=objective_class(recipe).default_data)
    except TrainConfigError as e:
        # resuming, the checkpoint's settings take the recipe's place (the trainer checks them with the
        # flags): the recipe's own (or its defaults) must not stop the command a run prints to resume it
        if args.resume == "no" or not ckpt_mod.list_checkpoints(out):  # a flag's: usage; the recipe's: input
            raise (UsageError if e.flag is not None else UserError)(str(e)) from None
    compile_mode = args.compile_mode or ("default" if args.compile or args.mode == "compile" else None)
    if args.cuda_graph and compile_mode is not None:
        raise UsageError("--cuda-graph: use it instead of --compile / --compile-mode, not with them")
    alias = "cuda-graph" if args.cuda_graph else "compile" if args.compile or args.compile_mode else None
    if args.mode is not None and alias is not None and args.mode != alias:
        flag = "--cuda-graph" if args.cuda_graph else "--compile-mode" if args.compile_mode else "--compile"
        raise UsageError(f"--mode {args.mode}: not with {flag} (which means --mode {alias})")
    mode = alias or args.mode or "auto"
    from ..training.routes import train_only_problem

    if args.train_only is not None and train_only_problem(recipe, args.train_only):
        raise UsageError(train_only_problem(recipe, args.train_only))
    if args.route_beam is not None and not 1 <= args.route_beam <= MAX_ROUTE_BEAM:
        raise UsageError(f"--route-beam {args.route_beam}: must be in 1 .. {MAX_ROUTE_BEAM}")
    if args.route_tolerance is not None and args.route_tolerance < 0:
        raise UsageError(f"--route-tolerance {args.route_tolerance:g}: must be >= 0")
    opts = RunOptions(out=out, resume=args.resume, device=args.device, mode=mode, compile=compile_mode,
                      cuda_graph=mode == "cuda-graph",
                      stop_after=args.stop_after, time_limit=args.time_limit, progress=not args.no_progress,
                      progress_interval=args.progress_interval, recipe_name=args.recipe, overrides=overrides,
                      train_only=args.train_only, route_beam=args.route_beam,
                      route_tolerance=args.route_tolerance, init=init, sets=tuple(args.sets),
                      distill=Path(args.distill) if args.distill is not None else None)
    try:
        summary = train(recipe, cfg, opts)
    except TrainUsageError as e:  # flags the run cannot take, found once it has the model and device
        raise UsageError(str(e)) from None
    except TrainConfigError as e:  # resuming: the flags against the checkpoint's settings
        raise (UsageError if e.flag is not None else UserError)(str(e)) from None
    except TaskError as e:  # task settings the model cannot take: a flag's or the defaults' (usage), the recipe's (input)
        flagged = any(s in overrides for s in e.settings) or bool(e.settings) and all(
            getattr(cfg, s) is None for s in e.settings)
        raise (UsageError if flagged else UserError)(str(e)) from None
    except (TrainError, DataError, TokenizerError, CheckpointError) as e:
        raise UserError(str(e)) from None
    except TrainInterrupted as e:
        import os
        import sys

        if int(os.environ.get("RANK", "0")) == 0:
            print(f"hymba train: {e}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.line())
    return 0
