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
series' last part), the field of JSON Lines / Parquet text (``--text-field``: the checkpoint's
``train.text_field``, unset ``text``; refused where no text is read, a built-in task, reasoning data, a series;
token shards: the field they were made from, as ``hymba train``), ``--batch-size``, ``--seq-len``, ``--seed`` and the batches (``train.eval_batches`` times the run's
processes, which each evaluated that many;
``--batches all``: every held-out row once). With the defaults, the numbers equal the ones the run
logged at the checkpoint's step (``metrics.jsonl``), on a device of the same kind (the run's
``precision``: ``auto`` is bf16 autocast on CUDA, float32 on the CPU). Text is tokenized with the checkpoint's
``tokenizer.json`` into a temporary folder (``hymba prepare`` it once for a large corpus).

Prints a table; ``--json FILE`` also writes it as one JSON object (written whole or not at all,
replacing an existing file, as ``generate --out``).

``--tasks t1,t2`` runs EleutherAI's lm-evaluation-harness instead (``training/harness.py``'s ``HymbaLM``,
the optional ``lm_eval`` package: ``pip install 'hymba_plus[eval]'``): the harness's tasks (names, glob
patterns, task YAML files; ``--include-path DIR`` adds a folder of task YAMLs, which are looked up first:
when it holds every named task the harness's own ~15k task configs are not indexed), ``--num-fewshot K``,
``--limit N`` (examples per task; a fraction below 1: that part of each task), ``--batch-size B`` (rows per
forward, default 8), ``--dtype``; it prints the harness's table and ``--json FILE`` writes its results
JSON. The held-out flags (``--data``, ``--text-field``, ``--seq-len``, ``--batches``, ``--seed``) mean nothing there and the
harness's mean nothing without ``--tasks``: either is refused (exit 2). A task config lm_eval cannot load
(its template, a ``!function``, its data set) is one input line (exit 1), not lm_eval's traceback.
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

from . import UsageError, UserError, add_text_field_argument, int_in, output_file, path_text, seed_int, write_output
from .check import emit

#: the oldest lm_eval whose API ``--tasks`` and ``training/harness.py`` read (``lm_eval.tasks._yaml_loader``,
#: ``TaskManager.load``, ``models.utils.normalize_gen_kwargs``: 0.4.12); pyproject's ``eval`` / ``dev`` extras
#: require it
LM_EVAL_MIN = "0.4.12"

#: flag dest -> TrainConfig field, for the flags that override the checkpoint's settings
_FIELDS = {"data": "data", "batch_size": "batch_size", "seq_len": "seq_len", "seed": "seed", "text_field": "text_field"}


def batches_arg(text: str) -> int | str:
    """argparse type of ``--batches``: a count >= 1, or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return int_in(1)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or all)") from None


def tasks_arg(text: str) -> list[str]:
    """argparse type of ``--tasks``: comma-separated task names (none empty)."""
    names = [t.strip() for t in text.split(",")]
    if not names or any(not t for t in names):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated task names, none empty")
    return names


#: argparse type of ``--num-fewshot``: an integer >= 0
fewshot_arg = int_in(0, name="fewshot_arg")


def limit_arg(text: str) -> int | float:
    """argparse type of ``--limit``: an integer >= 1 (examples per task) or a fraction in (0, 1) (the harness's
    meaning of a limit below 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of examples >= 1, or a fraction in (0, 1)") from None
    if not math.isfinite(v) or v <= 0 or (v >= 1 and not v.is_integer()):
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or a fraction in (0, 1), got {text}")
    return int(v) if v >= 1 else v


#: flags of one mode: held-out only (dest -> flag), and the harness's (``--tasks`` mode) only
HELD_OUT_ONLY = {"data": "--data", "seq_len": "--seq-len", "batches": "--batches", "seed": "--seed",
                 "text_field": "--text-field"}
HARNESS_ONLY = {"num_fewshot": "--num-fewshot", "limit": "--limit", "include_path": "--include-path",
                "dtype": "--dtype"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (f"{p.description or ''}. Settings default to those the checkpoint was trained with, so "
                     "the numbers match the run's logged eval at that step.")
    p.add_argument("checkpoint", type=path_text, metavar="CKPT",
                   help="checkpoint folder, or a training --out folder (its newest intact step-N)")
    p.add_argument("--data", type=path_text, default=None, metavar="PATH|TASK",
                   help="a built-in task, a text file or folder, a `hymba prepare` folder, a reasoning task or "
                        "JSONL file (ladir), a series CSV (forecast) (default: the checkpoint's training data)")
    add_text_field_argument(p, default=None)  # (train's and prepare's; unset: the checkpoint's field)
    p._actions[-1].help = p._actions[-1].help.replace("(default text)", "(default: the checkpoint's, else text; "
                                                      "shards: the field they were made from)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default: the checkpoint's; with --tasks 8)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence: the windows of text, a task's length (default: the checkpoint's)")
    p.add_argument("--batches", type=batches_arg, default=None, metavar="N|all",
                   help="batches to evaluate, or all: every held-out row once (default: the checkpoint's "
                        "train.eval_batches times its run's processes, as its run evaluated)")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="the seed a task's held-out samples are drawn from (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--json", type=path_text, default=None, metavar="FILE", help="also write the results as JSON")
    h = p.add_argument_group("lm-evaluation-harness (--tasks; needs lm_eval: pip install 'hymba_plus[eval]')")
    h.add_argument("--tasks", type=tasks_arg, default=None, metavar="T1,T2",
                   help="run the harness's tasks (names, glob patterns or task YAML files) instead of the held-out "
                        "evaluation")
    h.add_argument("--num-fewshot", type=fewshot_arg, default=None, metavar="K",
                   help="few-shot examples per prompt (default: each task's)")
    h.add_argument("--limit", type=limit_arg, default=None, metavar="N",
                   help="examples per task (a fraction below 1: that part of each task)")
    h.add_argument("--include-path", type=path_text, default=None, metavar="DIR",
                   help="a folder of task YAMLs, looked up before the harness's own")
    h.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="the weights' dtype for the harness (default float32; log-probabilities in float32)")


def run(args: argparse.Namespace) -> int:
    from ..models.lm import CheckpointError, from_pretrained
    from ..objectives import objective_class
    from ..training import checkpoint as ckpt_mod
    from ..training.config import TrainConfig, TrainConfigError, builtin_task, validate
    from ..training.data import DataError, open_stream, shard_folder
    from ..training.distributed import DistInfo, pick_device
    from ..training.tasks import TaskError
    from ..training.tokenizer import TokenizerError, load_file
    from ..training.trainer import _fmt, evaluate_held_out, saved_train_config
    from .generate import resolve_checkpoint
    from .train import NOT_FORECAST

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # (each process would evaluate everything: as hymba bench)
        raise UsageError("one process: run it without torchrun")
    if args.tasks is not None:
        mixed = next((flag for dest, flag in HELD_OUT_ONLY.items() if getattr(args, dest) is not None), None)
        if mixed is not None:
            raise UsageError(f"{mixed}: a held-out evaluation flag, not for --tasks (the harness's tasks bring their "
                             "own data)")
        return run_harness(args)
    given = next((flag for dest, flag in HARNESS_ONLY.items() if getattr(args, dest) is not None), None)
    if given is not None:
        raise UsageError(f"{given}: only with --tasks (the lm-evaluation-harness)")
    for flag, v in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} {v}: must be >= 1")
    out_json = output_file(args.json)
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
    if "text_field" in overrides and cls.needs_segments:  # (as hymba train's)
        raise UsageError(f"--text-field {args.text_field}: the objective {kind} reads reasoning data (rows of "
                         "question, reasoning, answer), not text")
    cfg = dataclasses.replace(base, **overrides)
    if cfg.data is None:
        cfg = dataclasses.replace(cfg, data=cls.default_data)
    if cfg.tokenizer is not None and builtin_task(cfg, recipe.model) is not None:  # --data TASK: reads no tokenizer
        cfg = dataclasses.replace(cfg, tokenizer=None)
    if "text_field" not in overrides and cfg.text_field is not None and (
            builtin_task(cfg, recipe.model) is not None or shard_folder(Path(cfg.data))):
        cfg = dataclasses.replace(cfg, text_field=None)  # the run's field: --data TASK reads no text, shards are tokens
    # (a --text-field given: validate refuses it for a built-in task, open_stream one that is not the shards' field)
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


def run_harness(args: argparse.Namespace) -> int:
    """``hymba eval CKPT --tasks ...``: the lm-evaluation-harness on the checkpoint (module docstring)."""
    from ..training.distributed import pick_device
    from .generate import resolve_checkpoint

    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    out_json = output_file(args.json)
    include = Path(args.include_path) if args.include_path is not None else None
    if include is not None and not include.is_dir():
        raise UsageError(f"--include-path {args.include_path}: not a folder (of task YAML files)")
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ckpt = resolve_checkpoint(Path(args.checkpoint))
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--tasks runs EleutherAI's lm-evaluation-harness, which is not installed: pip install "
                        f"'hymba_plus[eval]' (or pip install 'lm_eval>={LM_EVAL_MIN}')") from None
    have = _lm_eval_version()
    if have is not None and _release(have) < _release(LM_EVAL_MIN):
        raise UserError(f"--tasks needs lm_eval>={LM_EVAL_MIN} (this is lm_eval {have}): pip install -U "
                        f"'lm_eval>={LM_EVAL_MIN}'")
    from ..training.harness import HymbaLM
    manager, tasks = _harness_tasks(args.tasks, include)
    try:
        lm = HymbaLM(pretrained=ckpt, device=str(device), batch_size=args.batch_size or 8,
                     dtype=args.dtype or "float32")
    except ValueError as e:  # (CheckpointError and TokenizerError are ValueErrors)
        raise UserError(str(e).splitlines()[0]) from None
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    try:
        results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                  task_manager=manager, log_samples=False)
    except (ValueError, KeyError, OSError, ConnectionError) as e:  # a task's data or settings, the model's limits
        raise UserError(f"lm_eval: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    results["hymba"] = {"checkpoint": str(ckpt), "max_seq_len": lm.max_seq_len, "truncated_contexts": lm.truncated}
    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    if lm.truncated:
        text += (f"\n{lm.truncated} request(s) longer than max_seq_len {lm.max_seq_len}: their contexts were cut "
                 "from the left")
    if out_json is not None:
        write_output(out_json, json.dumps(results, indent=1, default=handle_non_serializable) + "\n", "--json")
    emit(text.rstrip("\n"))
    return 0


def _harness_tasks(names: list[str], include: Path | None) -> tuple[Any, list[Any]]:
    """(the harness's ``TaskManager``, the tasks to run) for ``--tasks``: names and glob patterns matched
    against the index, ``.yaml`` paths loaded as task configs. With ``--include-path`` its folder is indexed
    alone first; the harness's own task configs (~15k, seconds to index) only when a name is not there. An
    unknown name or a missing file: one ``UsageError`` line."""
    import difflib

    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    class Manager(TaskManager):
        """lm_eval's ``TaskManager`` whose ``load`` (``simple_evaluate`` builds the tasks through it, after
        seeding) turns a task config it cannot build (a Jinja template, a ``!function`` that is not there,
        an ``output_type``, the data set) into one input line, rather than the loader's traceback."""

        def load(self, task_list: Any) -> Any:
            try:
                return super().load(task_list)
            except Exception as e:  # (jinja2's, yaml's, importlib's, datasets' and the loader's own types)
                first = str(e).splitlines()[0] if str(e).strip() else ""
                raise UserError(f"--tasks {','.join(names)}: lm_eval could not load the task ("
                                f"{type(e).__name__}{': ' + first if first else ''})") from None

    yamls = [n for n in names if n.endswith(".yaml")]
    for y in yamls:
        if not Path(y).is_file():
            raise UsageError(f"--tasks {y}: no such task YAML file")
    named = [n for n in names if not n.endswith(".yaml")]
    manager = Manager(include_path=str(include), include_defaults=False) if include is not None else None
    if manager is None or any(not manager.match_tasks([n]) for n in named):
        manager = Manager(include_path=str(include) if include is not None else None)
    tasks: list[Any] = []
    for n in names:
        if n.endswith(".yaml"):
            try:
                tasks.append(load_yaml(str(Path(n).absolute()), resolve_func=True))
            except Exception as e:  # (yaml's and the loader's own error types)
                raise UsageError(f"--tasks {n}: not a task YAML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            continue
        found = manager.match_tasks([n])
        if not found:
            near = difflib.get_close_matches(n, manager.all_tasks, n=3)
            raise UsageError(f"--tasks {n}: unknown task" + (f" (did you mean {', '.join(near)}?)" if near else "")
                             + "; `lm_eval ls tasks` lists them, --include-path DIR adds a folder of task YAMLs")
        tasks += [t for t in found if t not in tasks]
    return manager, tasks


def _lm_eval_version() -> str | None:
    """The installed lm_eval's version (its distribution's metadata; None when it has none)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _release(v: str) -> tuple[int, ...]:
    """The leading release numbers of a version text (``0.4.9.2`` -> (0, 4, 9, 2); ``0.4.13.dev1`` -> (0, 4, 13))."""
    nums = []
    for part in v.split("."):
        digits = part[:len(part) - len(part.lstrip("0123456789"))] if part else ""
        if not digits:
            break
        nums.append(int(digits))
        if digits != part:
            break
    return tuple(nums)


def _count(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.1f}"


def _jsonable(v: Any) -> Any:
    """NaN / inf as null (JSON has neither)."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
