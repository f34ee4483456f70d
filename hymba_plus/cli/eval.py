"""``hymba eval CKPT``: evaluate a checkpoint on held-out data, without training (as HF's
``Trainer.evaluate``, torchtitan's eval or lm-eval's perplexity tasks).

CKPT is a checkpoint folder (a ``hymba train`` ``OUT/step-N``, a ``save_pretrained`` or ``hymba convert``
folder) or a training ``OUT`` itself (its newest intact ``step-N``, as ``hymba generate`` resolves it).
The evaluation is the training run's own (``training/trainer.evaluate_held_out``, which
``Trainer.evaluate`` runs): the objective's ``eval_batch`` over batches of held-out rows, the loss the
mean over every scored item, and the metrics the run logs for that objective (``eval_loss``; next
token: ``eval_ppl`` on text, ``eval_accuracy`` on a built-in task; block diffusion: the NELBO bound and
its perplexity; forecast: MSE / MAE / MASE / CRPS and the seasonal-naive baseline's; LaDiR: its loss
and answer accuracy; routed ETD models also all-execute).

Its settings default to those the checkpoint was trained with (``trainer_state.json``'s
``train_config``; a folder without one: its recipe's ``train:`` section, else ``TrainConfig``'s
defaults): the data (``--data``: a built-in task, a text file or folder, token shards of ``hymba
prepare``, a reasoning task or JSONL file, a series CSV), its held-out split (the same rule as
training: a text's last ``val_frac`` of windows, a task's held-out samples drawn from the seed, a
series' last part), ``--batch-size``, ``--seq-len``, ``--seed`` and the batches (``train.eval_batches`` times the run's
processes, which each evaluated that many;
``--batches all``: every held-out row once). With the defaults, the numbers equal the ones the run
logged at the checkpoint's step (``metrics.jsonl``), on a device of the same kind (the run's
``precision``: ``auto`` is bf16 autocast on CUDA, float32 on the CPU). Text is tokenized with the checkpoint's
``tokenizer.json`` into a temporary folder (``hymba prepare`` it once for a large corpus).

Prints a table; ``--json FILE`` also writes it as one JSON object (written whole or not at all,
replacing an existing file, as ``generate --out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from . import UsageError, UserError, path_text, seed_int, write_output
from .check import emit

#: flag dest -> TrainConfig field, for the flags that override the checkpoint's settings
_FIELDS = {"data": "data", "batch_size": "batch_size", "seq_len": "seq_len", "seed": "seed"}


def batches_arg(text: str) -> int | str:
    """argparse type of ``--batches``: a count >= 1, or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of batches >= 1, or all") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or all), got {text}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (f"{p.description or ''}. Settings default to those the checkpoint was trained with, so "
                     "the numbers match the run's logged eval at that step.")
    p.add_argument("checkpoint", type=path_text, metavar="CKPT",
                   help="checkpoint folder, or a training --out folder (its newest intact step-N)")
    p.add_argument("--data", type=path_text, default=None, metavar="PATH|TASK",
                   help="a built-in task, a text file or folder, a `hymba prepare` folder, a reasoning task or "
                        "JSONL file (ladir), a series CSV (forecast) (default: the checkpoint's training data)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the checkpoint's)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence: the windows of text, a task's length (default: the checkpoint's)")
    p.add_argument("--batches", type=batches_arg, default=None, metavar="N|all",
                   help="batches to evaluate, or all: every held-out row once (default: the checkpoint's "
                        "train.eval_batches times its run's processes, as its run evaluated)")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="the seed a task's held-out samples are drawn from (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--json", type=path_text, default=None, metavar="FILE", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    from ..models.lm import CheckpointError, from_pretrained
    from ..objectives import objective_class
    from ..training import checkpoint as ckpt_mod
    from ..training.config import TrainConfig, TrainConfigError, builtin_task, validate
    from ..training.data import DataError, open_stream
    from ..training.distributed import DistInfo, pick_device
    from ..training.tasks import TaskError
    from ..training.tokenizer import TokenizerError, load_file
    from ..training.trainer import _fmt, evaluate_held_out, saved_train_config
    from .generate import resolve_checkpoint
    from .train import NOT_FORECAST

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # (each process would evaluate everything: as hymba bench)
        raise UsageError("one process: run it without torchrun")
    for flag, v in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} {v}: must be >= 1")
    out_json = Path(args.json) if args.json is not None else None
    if out_json is not None and (out_json.is_dir() or out_json.name in ("", ".", "..")):
        raise UsageError(f"--json {args.json}: expected a file name")
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ckpt = resolve_checkpoint(Path(args.checkpoint))
    try:
        model = from_pretrained(ckpt, device=device)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    recipe = model.recipe
    cls = objective_class(recipe)
    kind = getattr(model.objective.cfg, "kind", "next_token")
    state: dict[str, Any] = {}
    try:
        if (ckpt / ckpt_mod.STATE_FILE).is_file():  # a training checkpoint: the settings it was trained with
            state = ckpt_mod.read_state(ckpt)
            base, where, section = saved_train_config(state, ckpt, recipe), str(ckpt / ckpt_mod.STATE_FILE), \
                "train_config"
        else:
            base, where, section = recipe.train or TrainConfig(), str(ckpt / "recipe.yaml"), "train"
    except CheckpointError as e:
        raise UserError(str(e)) from None
    world = state.get("world_size", 1)  # the processes of the run that saved it (torchrun; read_state: a count)
    if world < 1:
        raise UserError(f"{ckpt / ckpt_mod.STATE_FILE}: world_size {world!r} is not a number of processes >= 1")
    overrides = {field: getattr(args, dest) for dest, field in _FIELDS.items() if getattr(args, dest) is not None}
    unread = next((d for d in NOT_FORECAST if d in overrides), None) if kind == "forecast" else None
    if unread is not None:
        raise UsageError(f"--{unread.replace('_', '-')} {overrides[unread]}: does not apply to objective forecast "
                         "(windows of objective.context + horizon values, split by time)")
    cfg = dataclasses.replace(base, **overrides)
    if cfg.data is None:
        cfg = dataclasses.replace(cfg, data=cls.default_data)
    if cfg.tokenizer is not None and builtin_task(cfg, recipe.model) is not None:  # --data TASK: reads no tokenizer
        cfg = dataclasses.replace(cfg, tokenizer=None)
    try:
        validate(cfg, recipe.model, overrides, where, section=section, default_data=cls.default_data)
    except TrainConfigError as e:
        raise (UsageError if e.flag is not None else UserError)(str(e)) from None
    model.objective.configure(cfg)
    problem = model.objective.run_problem(cfg)
    if problem is not None:
        flagged = any(k in problem for k in overrides)  # a flag's value (e.g. --seq-len), else the checkpoint's
        raise (UsageError if flagged else UserError)(problem)
    model.objective.load_train_state(state.get("objective") or {})
    saved_tok = ckpt / "tokenizer.json"
    tokenizer = cfg.tokenizer
    try:
        if cls.needs_series:
            tokenizer = None
        elif cls.needs_segments:  # reasoning data: the tokenizer it was trained with, as saved in the checkpoint
            tokenizer = str(saved_tok) if cfg.tokenizer is not None and saved_tok.is_file() else cfg.tokenizer
        elif builtin_task(cfg, recipe.model) is None:  # text or shards: tokenized as the model was trained
            tokenizer = str(saved_tok) if saved_tok.is_file() and load_file(saved_tok).kind != "ids" else None
        with tempfile.TemporaryDirectory(prefix="hymba-eval-") as tmp:  # text's token cache, this run only
            stream = open_stream(cfg.data, cfg.seq_len, recipe.model.vocab_size, cfg.seed, cfg, Path(tmp) / "data",
                                 tokenizer, cls.needs_segments, recipe.model.max_seq_len,
                                 recipe.objective if cls.needs_series else None, cls.segment_reserve(recipe))
            n_eval = stream.n_eval()
            if args.batches == "all" and n_eval is None:
                raise UsageError(f"--batches all: the held-out set of {cfg.data} has no end; give a number")
            router = getattr(model, "etd_router", None)
            # the run's W processes each evaluated eval_batches batches (rank r's k-th: rows from (k W + r) B):
            # W x eval_batches here, one process, are the same rows
            res = evaluate_held_out(model, model, stream, cfg, DistInfo(device=device),
                                    None if args.batches == "all" else args.batches or cfg.eval_batches * world,
                                    routing=bool(getattr(router, "routing", False)))
    except TaskError as e:  # a flag's value the task cannot take (usage), the checkpoint's (input)
        flagged = any(s in overrides for s in e.settings)
        raise (UsageError if flagged else UserError)(str(e)) from None
    except (DataError, TokenizerError) as e:
        raise UserError(str(e)) from None
    covered = min(res.batches * cfg.batch_size, n_eval) if n_eval is not None else res.batches * cfg.batch_size
    split = (f"held-out rows 0..{covered - 1}" + (f" of {n_eval}" if n_eval is not None else "")
             + (" (all)" if n_eval is not None and covered >= n_eval else ""))
    report = {
        "checkpoint": str(ckpt), "step": state.get("step"), "objective": kind, "data": cfg.data,
        "description": stream.description, "split": split, "heldout_rows": n_eval, "batches": res.batches,
        "batch_size": cfg.batch_size, "seq_len": None if cls.needs_series else cfg.seq_len, "seed": cfg.seed,
        "rows": res.rows, "tokens": res.tokens, "scored": res.items, "metrics": res.metrics,
    }
    lines = [("checkpoint", str(ckpt) + (f" (step {report['step']})" if report["step"] is not None else "")),
             ("objective", kind), ("data", stream.description), ("split", split),
             ("batches", f"{res.batches} x {cfg.batch_size}"),
             ("evaluated", f"{res.rows:,} rows" + (f", {res.tokens:,} tokens" if res.tokens else "")
              + f", {_count(res.items)} scored items")]
    lines += [(k, _fmt(v)) for k, v in res.metrics.items()]
    width = max(len(k) for k, _ in lines)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
    if out_json is not None:
        write_output(out_json, json.dumps(_jsonable(report), indent=1) + "\n", "--json")
    emit(text)  # (a closed pipe: exit 141, quietly, as hymba check and info)
    return 0


def _count(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.1f}"


def _jsonable(v: Any) -> Any:
    """NaN / inf as null (JSON has neither)."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
