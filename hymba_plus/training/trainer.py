"""The training loop behind ``hymba train``.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences on every
process; the loss of each micro-batch is ``out.loss`` (next-token cross entropy plus the
model's auxiliary losses, e.g. MoE balancing); the next-token objective computes it without
``[B, T, V]`` logits (``return_logits=False``: fused linear + cross entropy,
``kernels/linear_ce.py``) unless ``--distill`` reads them, while evaluations run the LM head
(accuracy and the objectives' metrics read logits).

The step trains the mean over every loss item of its micro-batches and processes, not the mean
of their means (HF transformers' ``num_items_in_batch`` / ``average_tokens_across_devices``,
torchtitan's global token count): the micro-batches are read first, each one's items counted
from its labels (``Objective.train_items``: scored next-token targets, block diffusion's scored
tokens, forecasting's observed targets; rows for ladir, whose loss sums means over other
denominators), the count summed over processes (one all-reduce, more than one process only),
and micro-batch i backpropagates ``loss_i * items_i * world / total`` (FSDP2 averages the
processes' gradients), as ``loss_i / div_i`` (``_loss_shares``). The auxiliary losses (MoE
balance and z losses; with ``--distill`` the KL term too, a mean over every position) keep the
weight ``1 / grad_accum``: their own gradient output. Nothing is read on the host; a CUDA-graph
step gets the weights as the gradient outputs of its captured loss and aux loss. With as many
items everywhere (packed text, the built-in tasks, ``grad_accum`` 1) ``div_i`` is exactly
``grad_accum``: the gradients and the logged loss are bit for bit those of the mean over
micro-batches. A micro-batch with nothing to score weighs nothing; a step with nothing to score
is a non-finite loss. The logged ``loss`` is the step's loss as trained. Router training
(``--train-only routers``) keeps equal weights: its focal loss is weighted by classes drawn from
each micro-batch's searched routes, known only after the search, no plain mean over items. Then: global
gradient-norm clipping, the optimizer step (Muon + AdamW, ``optim.py``), the learning
rate from the schedule (``schedule.py``), ``update_bias()`` on every module that has
one (aux-loss-free MoE balancing), and MoE's global-batch balance counts zeroed
(``balance_loss: global_batch``: f over the step's micro-batches and processes). bf16 autocast on CUDA (``precision: auto``).

Records (rank 0): progress on stderr (``progress.py``: a live bar on a terminal, a plain line
every ~10 s elsewhere), ``OUT/metrics.jsonl`` (one JSON
object per optimizer step; eval metrics on eval steps; MoE routing stats when the model
reports them), ``OUT/loss.png`` redrawn at every eval (one warning line if it cannot be: the run goes
on), ``OUT/step-N/`` checkpoints
(``checkpoint.py``), with ``--log-to`` every row mirrored to TensorBoard (``OUT/tb``) / W&B
(``tracking.py``: flushed at each checkpoint, closed at the end), and a final summary line. A fresh
run moves an earlier run's metrics, plot and ``tb`` aside (``metrics.jsonl.1``, ...; an ``--out``
with checkpoints needs ``--resume``).

Resume (``--resume``): the newest intact checkpoint (corrupt newer ones are skipped with a
warning, and kept) gives the weights, the optimizer state, the step, the data position and
the RNG states, so the resumed run produces the same losses as one that never stopped
(``tests/test_training.py`` checks it bitwise on CPU). ``--resume`` on a folder without a
checkpoint is an error (a mistyped ``--out``); ``--resume auto`` starts from scratch then.
A resumed run with another ``--steps`` or other schedule settings re-plans its schedule from
the current learning rate (``schedule.py``: no second warm-up) and says so in one line; a
finished run resumed with the same ``--steps`` has nothing to do.

Interrupts (``signals.py``): the first SIGINT / SIGTERM finishes the current step, writes a
checkpoint if a step ran since the last one and raises ``TrainInterrupted`` (``hymba train``
exits 130 with the command that resumes); a second one aborts at once. In the run's last step it
writes the checkpoint, then runs the final evaluation and ends as a finished run.

Train-only modes (``--train-only``, ``routes.py``): ``routers`` freezes everything but the
Dr.LLM layer routers, switches the routes on (``enable_routes``, saved with the weights) and
trains them each step on the routes a length-aware beam search finds for the batch with the
frozen model (no grad), with a forward teacher-forced on those routes and the focal loss of
the routers' logits (``loss`` is that focal loss; ``lm_loss`` / ``accuracy`` of the searched
routes and of all-execute are logged beside it). ``branches`` freezes everything but the
MoDr branches and trains them with the LM loss (only their balancing bias is updated). The
optimizer holds the trainable parameters only; checkpoints hold every weight and the mode,
which a plain ``--resume`` keeps; resuming with another mode starts a new phase (a fresh
optimizer, the schedule from the peak lr without warm-up). Outside router training the
model trains at full depth: routers that are on are overridden with all-execute routes. When
the routers are on, evals report the routed model and, on the same batches, all-execute
(``eval_*_all_execute``) and the mean layer applications (``eval_applications``).

Training mode (``--mode``, ``RunOptions.mode``): ``auto`` (the default) runs the fastest mode
verified for the run. On CUDA that is the training forward+backward replayed from CUDA graphs
(``cuda_graph.py``) where the run allows it (one process, no ``--train-only`` / ``--distill``,
Dr.LLM routers off, an objective whose step ``GraphedStep`` captures whole: next token, MTP,
block diffusion, forecasting; not LaDiR) and the capture works and gives the eager loss on the
first batch (within ``GRAPH_LOSS_RTOL``); otherwise eager, and one
line says which mode runs and why. On the CPU ``auto`` is eager, silently. ``eager``,
``cuda-graph`` (``--cuda-graph``; a capture that fails is an error) and ``compile``
(``--compile`` / ``--compile-mode``) are explicit; ``compile`` compiles the model's forward (next
token, MTP) or, for an objective whose step runs the model's parts, its ``core`` past the noise
draws (block diffusion, forecasting; ``Objective.compile_step``); training and evaluation run the
same compiled function (LaDiR refuses it: ``eager_because``). The mode that ran is in every
``metrics.jsonl`` row (``mode``) and in the summary line.

Bad input (data, task, ``--out``) leaves nothing behind: a folder that setup created is
removed again when setup fails. A non-finite loss or gradient norm stops the run with a
``TrainError`` before the optimizer step; no checkpoint is written then. The host reads a step's
numbers (loss, gradient norm, routing statistics) in one transfer after clipping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..components.etd_router import EXECUTE, REPEAT, SKIP
from ..components.moe import reset_step_loads
from ..core.config import brief, first_line
from ..core.recipe import Recipe
from ..models.lm import HybridLM
from ..objectives import objective_class
from . import checkpoint as ckpt_mod
from . import distributed as dist_mod
from . import routes as routes_mod
from .config import TrainConfig, builtin_task, validate
from .cuda_graph import CaptureError, GradAccumulator, GraphedOptimizer, GraphedStep, reset_balancing_counts
from .data import TextStream, open_stream
from .mixed import MasterWeights, compute_weights
from .optim import build_optimizer, clip_grad_norm_, set_lr
from .progress import Progress
from .schedule import Schedule
from .signals import StopRequest
from .tracking import TB_DIR, ExperimentLog, LoggerError, MissingPackage, check_available, parse_targets, run_config


class TrainError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable output folder): one line."""


class TrainUsageError(TrainError):
    """A flag's value or flags together that the run cannot take (``--cuda-graph`` without CUDA, with
    ``--train-only``; ``--stop-after`` past ``--steps``; a ``--device`` this machine lacks): one line;
    ``hymba train`` exits 2 on it, as on its own usage errors."""


class TrainInterrupted(Exception):
    """The run stopped at a signal after saving what a checkpoint can keep (exit 130)."""

    def __init__(self, step: int, checkpoint: Path | None, resume_command: str):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted at step {step}; resume with: {resume_command}")


RESUME_MODES = ("no", "yes", "auto")
#: --mode: auto = CUDA graphs where eligible and verified, else eager (CPU: eager)
TRAIN_MODES = ("auto", "eager", "cuda-graph", "compile")
#: auto mode keeps CUDA graphs when the first batch's graphed loss is within this relative
#: distance of its eager loss: the graph replays the same kernels, so only the order of
#: floating-point reductions may differ (bf16 autocast: about one bf16 ulp of the loss)
GRAPH_LOSS_RTOL = {"bf16": 5e-3, "fp32": 1e-4}


@dataclass
class RunOptions:
    out: Path
    resume: bool | str = False  # False / "no"; True / "yes": a checkpoint must exist; "auto": if there is one
    device: str | None = None
    mode: str = "auto"  # TRAIN_MODES: auto | eager | cuda-graph | compile (the module docstring)
    compile: str | None = None  # torch.compile mode (default | reduce-overhead | max-autotune | ...): mode compile
    cuda_graph: bool = False  # alias of mode "cuda-graph": replay the training step from CUDA graphs (cuda_graph.py)
    stop_after: int | None = None  # end this run at this step (the schedule keeps cfg.steps)
    time_limit: float | None = None  # end this run (eval + checkpoint) once this many seconds have passed
    progress: bool = True
    progress_interval: float = 10.0  # seconds between plain progress lines (no terminal)
    recipe_name: str = "the recipe"
    overrides: dict[str, Any] = field(default_factory=dict)  # flags given on the command line
    log: Callable[[str], None] | None = None
    # --train-only: "routers" | "branches" | "all"; None = the checkpoint's mode (a fresh run: all)
    train_only: str | None = None
    # router training (--train-only routers): the route search of training/routes.py; None: a resumed
    # run's own setting, else routes.SEARCH_DEFAULTS (saved with the run, so a resume searches alike)
    route_beam: int | None = None
    route_length_penalty: float | None = None
    route_tolerance: float | None = None  # nats per row above all-execute's loss a target route may cost
    route_max_rows: int | None = None  # rows per forward of the search (None: one call per slot)
    distill: Path | None = None  # --distill: the teacher checkpoint (training/distill.py)
    init: Path | None = None  # a checkpoint whose weights a fresh run starts from (RECIPE given as a folder)
    sets: tuple[str, ...] = ()  # hymba train's --set KEY=VALUE recipe overrides, as given (the resume command's)
    # a data stream to train on instead of opening ``cfg.data`` (``hymba bench``: random token ids,
    # ``training/bench.RandomTokens``); it needs ``train(indices)``, ``description``, ``tokenizer`` (None)
    stream: Any = None

    def train_mode(self) -> tuple[str, str | None]:
        """(the requested training mode, the torch.compile mode or None) from ``mode`` and its
        aliases ``cuda_graph`` / ``compile``; ValueError (one line) when they disagree."""
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"--mode {self.mode}: not one of {', '.join(TRAIN_MODES)}")
        if self.cuda_graph and self.compile is not None:
            raise ValueError("--cuda-graph: use it instead of --compile / --compile-mode, not with them")
        alias = "cuda-graph" if self.cuda_graph else "compile" if self.compile is not None else None
        if alias is not None and self.mode not in ("auto", alias):
            raise ValueError(f"--mode {self.mode}: not with --{alias}")
        mode = alias or self.mode
        return mode, ((self.compile or "default") if mode == "compile" else None)

    @property
    def resume_mode(self) -> str:
        mode = ("yes" if self.resume else "no") if isinstance(self.resume, bool) else self.resume
        if mode not in RESUME_MODES:
            raise ValueError(f"resume: {self.resume!r} is not one of {RESUME_MODES}")
        return mode

    def resume_command(self, checkpoint: Path | None = None) -> str:
        """The command that resumes the run. A recipe given as a checkpoint folder of the run itself
        (``OUT/step-N``) may be gone by then (``--keep-last``): ``checkpoint``, the run's newest, names the
        recipe instead (its recipe.yaml is the run's). The ``--set`` overrides follow the recipe, but those of
        ``train`` settings: a resumed run takes them from its checkpoint (``hymba train`` refuses one that differs)."""
        import shlex

        recipe = self.recipe_name
        if checkpoint is not None and Path(recipe).absolute().parent == Path(self.out).absolute():
            recipe = str(checkpoint)
        from ..core.recipe import parse_overrides  # (the sets were parsed when the recipe loaded: no error here)

        sets = "".join(f" --set {shlex.quote(s)}" for s, o in zip(self.sets, parse_overrides(list(self.sets)))
                       if o.key.split(".")[0] != "train")
        return f"hymba train {shlex.quote(recipe)}{sets} --out {shlex.quote(str(self.out))} --resume"


@dataclass
class Summary:
    steps: int
    total: int
    start_step: int
    final_loss: float
    eval: dict[str, float]
    tokens_per_s: float  # training steps only (not evals, checkpoints, plots), after the run's first step
    seconds: float
    checkpoint: Path | None
    out: Path
    note: str | None = None  # a run with nothing to do says why instead
    mode: str = "eager"  # the training mode that ran (eager | cuda-graph | compile)

    def line(self) -> str:
        if self.note is not None:
            return self.note
        ev = " ".join(f"{k} {_fmt(v)}" for k, v in self.eval.items())
        ck = f", checkpoint {self.checkpoint}" if self.checkpoint else ""
        resumed = f" (resumed at {self.start_step})" if self.start_step else ""
        of = f" of {self.total}" if self.steps < self.total else ""
        return (f"done: {self.steps}{of} steps{resumed} in {self.seconds:.1f}s, loss {self.final_loss:.4f}"
                f"{', ' + ev if ev else ''}, {self.tokens_per_s:,.0f} tokens/s ({self.mode}){ck}")


def _rate(steps: int, tokens_per_step: int, seconds: float, warm: list[float]) -> float:
    """Training tokens/s of a run: without its warm-up steps (``warm``: their seconds) when there
    are more steps than those. The first step pays one-time costs (Triton compiles and autotuning,
    CUDA-graph warm-up), and so does the step that captures the optimizer step's CUDA graph
    (``_graphed_opt_step``, the second); leaving them out lets short runs in different modes
    compare."""
    if steps > len(warm) and seconds > sum(warm):
        return (steps - len(warm)) * tokens_per_step / (seconds - sum(warm))
    return steps * tokens_per_step / max(seconds, 1e-9)


def _fmt(v: float) -> str:
    """An eval number on the log and summary lines; ``n/a`` for NaN (nothing was scored: e.g. no
    observed forecast target; ``metrics.jsonl`` keeps JSON's ``NaN``)."""
    if math.isnan(v):
        return "n/a"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


# --------------------------------------------------------------------------- helpers


def first_missing(path: Path) -> Path | None:
    """The outermost folder that creating ``path`` would create (None if it exists)."""
    missing = None
    p = path.absolute()
    while not p.exists():
        missing = p
        if p.parent == p:
            break
        p = p.parent
    return missing


def check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written there (TrainError naming --out)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _autocast(cfg: TrainConfig, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast where the config asks for it; ``cache=False`` for CUDA-graph capture."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


#: statistics that count (MoE assignments per expert, dropped assignments): summed over a step's
#: micro-batches; the other 0-/1-D float statistics are averaged
COUNT_STATS = ("tokens_per_expert", "dropped")


def _combined(k: str, v: Any) -> bool:
    """Is statistic ``k`` combined over micro-batches (a 0-/1-D float or a count), not the last one's?"""
    return isinstance(v, torch.Tensor) and v.dim() <= 1 and (v.is_floating_point() or k.endswith(COUNT_STATS))


def _snapshot_stats(stats: dict | None) -> dict | None:
    """A micro-batch's statistics, the combined ones copied (a CUDA-graph replay overwrites its outputs)."""
    return None if stats is None else {k: v.detach().to(torch.float64, copy=True) if _combined(k, v) else v
                                       for k, v in stats.items()}


def _step_stats(micro: list[dict | None]) -> dict | None:
    """A step's statistics from its micro-batches' (``--grad-accum``, ``_snapshot_stats``): counts
    summed, the other 0-/1-D float statistics averaged, anything else the last micro-batch's
    (per-row tensors such as routes)."""
    last = micro[-1]
    if last is None:
        return None
    out = dict(last)
    for k, v in last.items():
        if _combined(k, v):
            total = sum(d[k] for d in micro if d is not None and k in d)
            out[k] = total if k.endswith(COUNT_STATS) else total / len(micro)
    return out


def _reduce_stats(row: dict[str, Any], info: Any) -> dict[str, Any]:
    """A step's routing statistics over every rank (FSDP2): counts (``COUNT_STATS``) summed, the
    other numbers averaged. Ranks whose statistics differ in their keys or sizes (a layer that ran on
    one rank only) keep their own: first one all-reduce agrees on that (max of the signature and of
    its negation), then one reduces the values."""
    if not info.enabled:
        return row
    keys = sorted(k for k, v in row.items() if isinstance(v, (int, float, list)) and not isinstance(v, bool))
    flat = [float(x) for k in keys for x in (row[k] if isinstance(row[k], list) else [row[k]])]
    sig = float(zlib.crc32(";".join(f"{k}:{len(row[k]) if isinstance(row[k], list) else 1}" for k in keys).encode()))
    agree = dist_mod.all_reduce([len(flat), sig, -len(flat), -sig], info, op="max")
    if agree[0] != -agree[2] or agree[1] != -agree[3] or not flat:
        return row
    total = iter(dist_mod.all_reduce(flat, info, op="sum"))
    out = dict(row)
    for k in keys:
        n = len(row[k]) if isinstance(row[k], list) else 1
        vals = [next(total) / (1 if k.endswith(COUNT_STATS) else info.world) for _ in range(n)]
        out[k] = [round(v, 6) for v in vals] if isinstance(row[k], list) else vals[0]
    return out


def _read_step(values: list[torch.Tensor | None], stats: dict | None) -> tuple[list[float | None], dict[str, Any]]:
    """The host's one read of a training step: the 0-d ``values`` (None stays None) and the
    JSON-friendly routing statistics (scalars as floats, short vectors as lists rounded to 6
    digits), copied together in one transfer, so the step waits for the device once."""
    read: dict[int | str, torch.Tensor] = {i: v for i, v in enumerate(values) if v is not None}
    plain: dict[str, Any] = {}
    for k, v in (stats or {}).items():
        if isinstance(v, torch.Tensor) and (v.numel() == 1 or (v.dim() == 1 and v.numel() <= 64)):
            read[k] = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            plain[k] = float(v)
    parts = [v.detach().reshape(-1) for v in read.values()]
    dev = next((t.device for t in parts if t.device.type != "cpu"), torch.device("cpu"))
    flat = iter(torch.cat([t.to(dev, torch.float64) for t in parts]).tolist() if parts else [])
    got = {k: [next(flat) for _ in range(v.numel())] for k, v in read.items()}
    out = [got[i][0] if i in got else None for i in range(len(values))]
    listed = {k: ([round(x, 6) for x in g] if read[k].numel() != 1 else g[0]) for k, g in got.items()
              if isinstance(k, str)}
    return out, {**listed, **plain}


def read_metrics(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(row, dict) and isinstance(row.get("step"), int) and (upto is None or row["step"] <= upto):
                rows.append(row)
    return rows


def plot_metrics(rows: list[dict[str, Any]], path: Path, title: str = "", chance: float | None = None) -> None:
    """``loss.png``: train (and eval) loss, and the eval metric (with the task's chance
    level when known), against the step."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(rows, title, chance)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:  # (a failed replace left the temporary file behind)
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def metrics_figure(rows: list[dict[str, Any]], title: str = "", chance: float | None = None) -> Any:
    """The figure of ``loss.png``. The loss axis is logarithmic with plain tick labels
    (``3``, ``4``, ``5.6``, not ``5.6×10^0``), major and minor alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):  # LogFormatter picks which ticks get a label; the label is plain
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    steps = [r["step"] for r in rows]
    ev = [r for r in rows if "eval_loss" in r]
    metric = next((k for k in ("eval_accuracy", "eval_mase") if any(k in r for r in ev)), "eval_ppl")
    fig, axes = plt.subplots(1, 2 if ev else 1, figsize=(10 if ev else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in rows], lw=1, label="train loss")
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", ms=3, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.grid(alpha=0.3)
    ax.legend()
    if ev:
        ax2 = axes[0, 1]
        ax2.plot([r["step"] for r in ev], [r.get(metric, float("nan")) for r in ev], "o-", ms=3, color="C2")
        if metric == "eval_mase" and "eval_snaive_mase" in ev[-1]:
            ax2.axhline(ev[-1]["eval_snaive_mase"], ls="--", color="gray", lw=1, label="seasonal naive")
            ax2.legend(loc="upper right")
        ax2.set_xlabel("step")
        ax2.set_ylabel(metric.replace("eval_", "eval "))
        if metric == "eval_accuracy":
            ax2.set_ylim(0, 1)
            if chance is not None:
                ax2.axhline(chance, ls="--", color="gray", lw=1, label=f"chance {chance:.3f}")
                ax2.legend(loc="lower right")
        ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the loop


def _rng_kept(dev: torch.device) -> contextlib.AbstractContextManager:
    """The CPU's and ``dev``'s random states restored on exit (``torch.random.fork_rng``): what the
    capture's warm-up and the auto mode's check draw (dropout) does not move the run's streams."""
    cuda = dev.type == "cuda"
    return torch.random.fork_rng(devices=[dev.index if dev.index is not None else torch.cuda.current_device()]
                                 if cuda else [], device_type="cuda")


def saved_train_config(state: dict[str, Any], ckpt: Path, recipe: Recipe) -> TrainConfig:
    """The ``TrainConfig`` a checkpoint's trainer state (``state``, of ``ckpt``) was trained with, typed as a
    recipe's ``train:`` section is (a ``CheckpointError`` naming the file and key otherwise); a tokenizer
    saved with a built-in task (which reads none) dropped."""
    saved = state.get("train_config")
    if not isinstance(saved, dict):
        raise ckpt_mod.CheckpointError(f"{ckpt / ckpt_mod.STATE_FILE}: no train_config")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    # typed as a recipe's train: section is (a wrong type was a traceback in the run, or ran silently)
    from ..core.recipe import _Errors, _to_dataclass

    errs = _Errors("", None)
    base = _to_dataclass(TrainConfig, saved, "train_config.", errs)
    if base is None:  # (the line of the message: "<recipe>:1: key: ...", meaningless in JSON)
        raise ckpt_mod.CheckpointError(f"{ckpt / ckpt_mod.STATE_FILE}: {errs.items[0].split(': ', 1)[1]}")
    if base.tokenizer is not None and builtin_task(base, recipe.model) is not None:
        base = dataclasses.replace(base, tokenizer=None)  # saved, unread, before validate refused it
    return base


@dataclass
class HeldOut:
    """What ``evaluate_held_out`` measured: the metrics (``eval_*``, as the run logs them), the batches
    it ran, the distinct held-out rows they held (examples, windows), their input tokens (0 for a
    forecaster's numeric windows and for reasoning examples, whose rows are padded) and the items ``eval_loss`` is the mean over (``Objective.eval_weight``
    summed: scored next-token targets, masked tokens, observed forecast targets, LaDiR's examples)."""

    metrics: dict[str, float]
    batches: int
    rows: int
    tokens: int
    items: float


def eval_batch_count(requested: int | None, n_eval: int | None, batch_size: int, world: int = 1) -> int:
    """Batches of an evaluation: ``requested`` (``train.eval_batches``), never more than the held-out
    rows ``n_eval`` need (a last batch wraps around); ``requested`` None: every held-out row once."""
    if n_eval is None:
        if requested is None:
            raise ValueError("an unbounded held-out set has no last batch")
        return requested
    need = math.ceil(n_eval / (batch_size * world))
    return max(1, need if requested is None else min(requested, need))


def all_execute_routes(model: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """Routes [batch_size, slots] that execute every slot (the routers' all-execute baseline)."""
    return torch.full((batch_size, len(model.structure.slots)), EXECUTE, dtype=torch.long, device=device)


@torch.no_grad()
def evaluate_held_out(model: Any, fwd: Any, stream: Any, cfg: TrainConfig, info: Any, n_batches: int | None,
                      step: int | None = None, routing: bool = False, compiled: bool = False) -> HeldOut:
    """The held-out evaluation of ``Trainer.evaluate`` (its docstring says what it measures) and of
    ``hymba eval``: ``n_batches`` batches of ``cfg.batch_size`` held-out rows of ``stream`` (capped by
    ``eval_batch_count``; None: all of them), each through ``model.objective.eval_batch`` under the
    run's autocast, batch k of rank r starting at held-out row ``(k * world + r) * batch_size`` (the
    row index seeds an objective's noise); ``routing``: the model's Dr.LLM routers decide its routes,
    and the batches are also evaluated all-execute; ``compiled``: ``fwd`` is a torch.compile'd step."""
    dev = info.device
    objective = model.objective
    model.eval()
    objective.eval_begin(step)
    B = cfg.batch_size
    n_batches = eval_batch_count(n_batches, stream.n_eval(), B, info.world)
    runs = [""] + (["_all_execute"] if routing else [])
    sums = {r: [0.0, 0, 0, 0.0] for r in runs}  # loss x rows, correct, scored, applications per row
    extra: dict[str, float] = {}  # the objective's own metric sums (eval_sums), of the first run
    rows = 0.0  # the weight of the batches' losses: the items they scored (the objective's eval_weight:
    # next token, the scored next-token targets; forecast, the observed targets; ladir, the distinct rows)
    seen = [0.0, 0.0]  # distinct rows and their input tokens
    for k in range(n_batches):
        start = (k * info.world + info.rank) * B
        batch = stream.eval(range(start, start + B))
        # a batch that wraps around the held-out set: its repeats are not scored
        ids, labels = batch.input_ids.to(dev), batch.scored_labels().to(dev)
        seen[0] += batch.rows
        seen[1] += batch.rows * ids.shape[1] if batch.segments is None and not ids.is_floating_point() else 0
        w = 0.0
        for run in runs:
            kw = {"routes": all_execute_routes(model, ids.shape[0], dev)} if run else {}
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            with _autocast(cfg, dev):
                loss, c, t, out = model.run(objective.eval_batch, fwd, model, ids, labels, seed=start, batch=batch,
                                            **kw)
            if not run:
                for key, v in objective.eval_sums(out).items():
                    extra[key] = extra.get(key, 0.0) + v
                w = objective.eval_weight(out, ids, labels, batch)
            acc = sums[run]
            acc[0] += loss * w if w else 0.0  # (a batch that scored nothing: NaN or 0 loss, no weight)
            acc[1], acc[2] = acc[1] + c, acc[2] + t
            if len(runs) > 1:
                apps = model.structure.applications(out.stats["etd/routes"], routes_mod.default_iterations(model),
                                                    out.stats["etd/route_reached"])
                acc[3] += float(apps.float().mean())
        rows += w
    keys = sorted(extra)
    flat = dist_mod.all_reduce([v for r in runs for v in sums[r]] + [extra[k] for k in keys] + [rows, *seen], info,
                               op="sum")
    rows, seen = flat[-3], flat[-2:]
    extra = dict(zip(keys, flat[4 * len(runs):-3]))
    res: dict[str, float] = {}
    for i, run in enumerate(runs):
        loss_sum, correct, total, apps = flat[4 * i: 4 * i + 4]
        eval_loss = loss_sum / rows if rows > 0 else float("nan")  # (nothing scored: no loss, not 0)
        res[f"eval_loss{run}"] = eval_loss
        if stream.metric == "accuracy":
            res[f"eval_accuracy{run}"] = correct / max(total, 1)
        elif stream.metric == "ppl":
            res[f"eval_ppl{run}"] = math.exp(min(eval_loss, 50.0))
        if len(runs) > 1:
            res[f"eval_applications{run}"] = apps / (n_batches * info.world)
    if keys:  # e.g. forecast: mse, mae, mase, crps and the seasonal-naive baseline's
        res.update({f"eval_{k}": v for k, v in objective.eval_results(extra).items()})
    res.update(objective.eval_end(extra))  # e.g. block diffusion's searched clip range
    return HeldOut(res, n_batches, int(seen[0]), int(seen[1]), rows)


class Trainer:
    def __init__(self, recipe: Recipe, cfg: TrainConfig, opts: RunOptions):
        self.recipe = recipe
        self.cfg = cfg
        self.opts = opts
        self.out = Path(opts.out)
        self.masters: MasterWeights | None = None  # --param-dtype bfloat16 on one process (setup)
        self.plot_failed = False  # loss.png could not be drawn (said once: _plot)

    def log(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self.opts.log is not None:
            self.opts.log(msg)
        elif getattr(self, "progress", None) is not None:
            self.progress.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything before the first step. A folder this created is removed again when it
        fails (bad data, task, checkpoint or --out leave nothing behind)."""
        try:
            self.info = dist_mod.init(self.opts.device)
        except ValueError as e:  # (pick_device: --device names no device of this machine)
            raise TrainUsageError(str(e)) from None
        if self.info.device.type == "cuda":  # (pick_device: always indexed) one process on cuda:N too, not only
            # torchrun's (distributed.init): the CUDA graphs' side stream and pool, synchronize() and other
            # current-device work (cuda_graph.py) went to device 0; the caller's device back after the run
            self.cuda_device_before = torch.cuda.current_device()
            torch.cuda.set_device(self.info.device)
        # process-wide, like autocast's dtype: set for the run, the caller's setting back after it (``run``)
        self.tf32_before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = bool(self.cfg.tf32)
        created = first_missing(self.out) if self.info.is_main else None
        try:
            self._setup()
        except BaseException:
            if created is not None and created.is_dir():
                shutil.rmtree(created, ignore_errors=True)
            raise

    def _check_data(self, stream: Any, state: dict | None) -> None:
        """The data against the run it resumes (or the checkpoint it starts from): ``open_stream`` calls it
        before a re-made text cache replaces OUT/data, so a refused resume keeps the cache it trained on."""
        now = stream.state()
        if state is not None and state.get("data", {}).get("kind") != now["kind"]:
            raise TrainError(f"--data {self.cfg.data}: the checkpoint {self.resume_from} was trained on "
                             f"{state.get('data', {}).get('kind')} data")
        start = self.resume_from if self.resume_from is not None else self.opts.init
        if start is not None and isinstance(stream, TextStream) and (Path(start) / "tokenizer.json").is_file():
            # text tokenized otherwise than the weights were trained on (e.g. bytes, the --tokenizer default, for
            # an imported model) trains on the wrong ids and saves checkpoints with the data's tokenizer
            from .tokenizer import load_file

            theirs = load_file(Path(start) / "tokenizer.json")
            if theirs.kind != "ids" and theirs.to_json() != stream.tokenizer.to_json():
                raise TrainError(f"--data {self.cfg.data}: tokenized with another tokenizer ({stream.tokenizer.kind}) "
                                 f"than the checkpoint {start} was trained with: pass --tokenizer "
                                 f"{Path(start) / 'tokenizer.json'} (text), or data prepared with it")
        if state is not None:  # the same data cut the same way: another split would train on held-out windows
            saved = state.get("data", {})
            # what the stream keeps or says of a checkpoint from an earlier version (the text order, the held-out set)
            said = stream.resumed(saved)
            if said:
                self.log(f"--data {self.cfg.data}: the checkpoint {self.resume_from} {said}")
                now = stream.state()
            diff = next((k for k in now if k not in ("kind", "path", "source", "params", "heldout") and k in saved
                         and saved[k] != now[k]), None)
            # a task's settings (a curriculum): those it reads now (an earlier version's state held every task's)
            old = saved.get("params") if isinstance(saved.get("params"), dict) else {}
            changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in now.get("params", {}).items()
                                if k in old and old[k] != v)
            if changed:
                self.log(f"--data {self.cfg.data}: task settings changed since {self.resume_from}: {changed} (the "
                         "stream goes on with the new ones)")
            # digests: a series file of as many steps with other numbers; as many tokens, other ones (another
            # folder, a same-length edit of the text)
            digest = {"values": ("other values", "digest", "the same series"),
                      "content": ("other data", "content digest", "the data it was trained on")}.get(diff)
            was = (state.get("train_config") or {}).get("seed")
            # another field of the same JSON Lines / Parquet files (unset is text): other tokens, as a rule another
            # count of them (tokens, n_train differ before the content digest does)
            field = (state.get("train_config") or {}).get("text_field")
            field = "text" if field is None else field
            if (diff in ("tokens", "n_train", "content") and field != ("text" if self.cfg.text_field is None
                                                                        else self.cfg.text_field)
                    and getattr(getattr(stream, "shards", None), "index", {}).get("text_field") is not None):
                digest = ("other data", {"content": "content digest"}.get(diff, diff),
                          f"--text-field {field} (the field it read)")
            if digest is not None:
                what, name, fix = digest
                if diff == "values" and saved.get("source") == now.get("source") == "synthetic" and was != self.cfg.seed:
                    fix = f"--seed {was} (the synthetic series is drawn from the seed)"
                raise TrainError(f"--data {self.cfg.data}: the checkpoint {self.resume_from} was trained on {what} "
                                 f"({name} {saved[diff]} there, {now[diff]} now): resume with {fix}, or start a new run")
            if diff is not None:
                # a built-in task (its name differs): --data alone (--val-frac is refused with a task, and its
                # --seq-len may change on a resume); a text or file: the flags that cut its split
                fix = (f"the same --data ({saved[diff]})" if diff == "name" else
                       "the same --data, --seq-len and --val-frac")
                raise TrainError(f"--data {self.cfg.data}: the checkpoint {self.resume_from} was trained on another "
                                 f"{'task' if diff in ('name', 'params') else 'split'} of it ({diff} "
                                 f"{brief(saved[diff], 60)} there, {brief(now[diff], 60)} now): resume with "
                                 f"{fix}, or start a new run")
            # the seed draws the data order and a task's examples (the rest of the run's random streams come
            # from the checkpoint): another one changed them silently; said, as changed task settings are
            if isinstance(was, int) and was != self.cfg.seed:
                self.log(f"--seed {self.cfg.seed}: the checkpoint {self.resume_from} was trained with seed {was}: the "
                         "data order (a task's examples) changes from here (the weights and random states go on from "
                         "the checkpoint)")

    def _setup(self) -> None:
        opts = self.opts
        try:
            self.requested, self.compile_mode = opts.train_mode()
        except ValueError as e:
            raise TrainUsageError(str(e)) from None
        self.run_mode = "eager"
        if self.out.exists() and not self.out.is_dir():
            raise TrainError(f"--out {self.out}: exists and is not a folder")
        mode = opts.resume_mode
        found = ckpt_mod.list_checkpoints(self.out)
        if found and mode == "no":
            raise TrainError(f"--out {self.out}: already holds checkpoints (newest {found[-1][1].name}); "
                             "pass --resume to continue it, or choose another --out")
        broken = ckpt_mod.incomplete_checkpoints(self.out) if not found else []
        if broken:  # a fresh start would write over them and over the run's metrics
            raise TrainError(f"--out {self.out}: {broken[-1].name} has no {ckpt_mod.STATE_FILE} (a damaged checkpoint, "
                             "not resumable): move it away, or choose another --out")
        self.objective_cls = objective_class(self.recipe)
        self.resume_from, state = None, None
        if mode != "no":
            res = ckpt_mod.find_resumable(self.out, warn=self.log)
            if res is not None:
                self.resume_from, state = res
                saved = ckpt_mod.check_recipe(self.resume_from, self.recipe, opts.recipe_name)
                # its settings are the checkpoint's (``_resumed_config``), so is the train section its
                # checkpoints save: the run's recipe, whatever --set train.X the resuming command dropped
                self.recipe = dataclasses.replace(self.recipe, train=saved.train)
            elif mode == "yes":
                where = "does not exist" if not self.out.exists() else "holds no checkpoint"
                raise TrainError(f"--resume: {self.out} {where} (a mistyped --out?); use --resume auto to start "
                                 "from scratch when there is no checkpoint")
            else:
                self.log(f"--resume auto: no checkpoint in {self.out}: starting from scratch")
                # (hymba train leaves the recipe's settings unchecked where --out holds checkpoints)
                validate(self.cfg, self.recipe.model, opts.overrides, opts.recipe_name,
                         default_data=self.objective_cls.default_data)
        self.start_step, self.samples, self.tokens_seen = 0, 0, 0
        self.schedule = Schedule.of(self.cfg)
        self.nothing_to_do: str | None = None
        # --train-only: sticky (a plain --resume continues the checkpoint's mode); another mode
        # than the checkpoint's starts a new phase (fresh optimizer, schedule from the peak lr)
        saved_mode = str(state.get("train_only") or "all") if state is not None else None
        self.mode = opts.train_only or saved_mode or "all"
        problem = routes_mod.train_only_problem(self.recipe, self.mode)
        if problem is not None:
            raise TrainError(problem)
        if self.mode != "all" and self.requested == "cuda-graph":
            raise TrainUsageError(f"--cuda-graph: not with --train-only {self.mode} (it captures the full training step)")
        self.new_phase = state is not None and saved_mode != self.mode
        if self.cfg.data is None:  # neither --data nor train.data: the objective's default (mqar, synthetic)
            self.cfg = dataclasses.replace(self.cfg, data=self.objective_cls.default_data)
        self.phase_change: str | None = None
        self.replan_note: str | None = None
        if state is not None:
            saved_cfg, self.cfg = self._resumed_config(state)
            # a changed setting that picks which parameters the objective trains (ladir's stage): a new phase too
            self.phase_change = next((f for f in self.objective_cls.phase_settings
                                      if getattr(saved_cfg, f) != getattr(self.cfg, f)), None)
            self.new_phase = self.new_phase or self.phase_change is not None
            self.start_step = state["step"]
            saved_plan = state.get("schedule", {})
            before = (Schedule.from_dict(saved_plan) if "steps" in saved_plan else Schedule.of(saved_cfg))
            self.schedule = before.replan(Schedule.of(self.cfg), self.start_step)
            if self.new_phase:  # the new phase's plan: its first step at the peak lr (no warm-up), decaying to
                # --steps (the anchor's factor is that of step s0 - 1: the phase's first step is start_step)
                self.schedule = dataclasses.replace(Schedule.of(self.cfg), anchor=(self.start_step + 1, 1.0)
                                                    if self.start_step > 0 else None)
            elif not before.same_plan(self.schedule) and self.start_step < self.cfg.steps:
                # said after `resumed from` (below): a resume refused on the way (its data) re-plans nothing
                self.replan_note = before.describe_change(self.schedule, self.start_step, self.cfg.lr)
        cfg = self.cfg
        self.log_targets = parse_targets(cfg.log_to)  # (checked: validate)
        try:  # before anything is built or written: a missing package is one line
            given_as = ("--log-to" if "log_to" in opts.overrides else f"{opts.recipe_name}: train.log_to"
                        if state is None else f"{self.resume_from / ckpt_mod.STATE_FILE}: train_config.log_to")
            check_available(self.log_targets, given_as)
        except MissingPackage as e:
            raise TrainError(str(e)) from None
        if opts.stop_after is not None and opts.stop_after > cfg.steps:
            raise TrainUsageError(f"--stop-after {opts.stop_after}: must be <= --steps ({cfg.steps})")
        stop = opts.stop_after if opts.stop_after is not None else cfg.steps
        if self.start_step >= stop:
            until = f"--stop-after {stop}" if opts.stop_after is not None else f"{cfg.steps}"
            self.nothing_to_do = (f"already at step {self.start_step} of {until}: nothing to do"
                                  + ("" if opts.stop_after is not None else " (pass a larger --steps to go on)"))
            return
        if self.info.is_main:  # the main rank alone makes --out (and removes it again if setup fails; other
            # ranks creating it too left an empty folder behind, or failed writing into one just removed)
            check_writable(self.out)

        # the data first: a bad source fails before anything is built or written
        cache_dir = self.out / "data"
        # an objective that trains on question / reasoning / answer segments (ladir) reads reasoning data
        # an objective that forecasts numbers reads series (a CSV or the synthetic generator)
        stream_args = (cfg.data, cfg.seq_len, self.recipe.model.vocab_size, cfg.seed, cfg, cache_dir, cfg.tokenizer,
                       self.objective_cls.needs_segments, self.recipe.model.max_seq_len,
                       self.recipe.objective if self.objective_cls.needs_series else None,
                       self.objective_cls.segment_reserve(self.recipe))
        # (the checks of the data against a resumed checkpoint run before a re-made OUT/data replaces the old one)
        accept = functools.partial(self._check_data, state=state)
        if opts.stream is not None:  # (a fresh run's: nothing of a checkpoint's data to check it against)
            self.stream = opts.stream
        elif self.info.is_main:
            self.stream = open_stream(*stream_args, accept=accept)
        dist_mod.barrier(self.info)
        if not self.info.is_main and opts.stream is None:
            self.stream = open_stream(*stream_args, accept=accept)
        self.carried = self._carried_files()

        torch.manual_seed(cfg.seed)
        try:
            model = HybridLM(self.recipe)
        except (RuntimeError, MemoryError) as e:  # e.g. a vocabulary of 1e14: one line, not the allocator's trace
            raise TrainError(f"{opts.recipe_name}: the model cannot be built here ({brief(first_line(e), 160)}); "
                             f"`hymba info` gives its parameter count") from None
        if state is not None:
            assert self.resume_from is not None
            full = ckpt_mod.load_model_state(self.resume_from, self.recipe, opts.recipe_name)
            model.load_state_dict(full)
            self.samples = int(state["samples"])
            self.tokens_seen = int(state.get("tokens", 0))
        elif opts.init is not None:  # a fresh run from a checkpoint's weights (e.g. a hybridized model)
            from ..models.lm import from_pretrained

            model.load_state_dict(from_pretrained(opts.init).state_dict())
        if self.mode == "routers":  # router training switches the routes on (a buffer saved with the weights)
            model.etd_router.enable_routes()
        n_train, n_frozen = routes_mod.freeze(model, self.mode)
        router = getattr(model, "etd_router", None)
        self.routes_on = router is not None and bool(getattr(router, "routing", False))  # read once (no step syncs)
        model = model.to(self.info.device)
        if cfg.activation_checkpoint:
            model.set_activation_checkpointing(cfg.activation_checkpoint)
        bf16_flag = ("--param-dtype" if cfg.param_dtype == "bfloat16"
                     else "--fsdp-param-dtype" if self.info.enabled and cfg.fsdp_param_dtype == "bfloat16" else None)
        if bf16_flag is not None and not isinstance(_autocast(cfg, self.info.device), torch.autocast):
            flagged = any(k in opts.overrides for k in ("param_dtype", "fsdp_param_dtype", "precision"))
            raise (TrainUsageError if flagged else TrainError)(  # (flags that clash, or the recipe's train: section)
                f"{bf16_flag} bfloat16 needs bf16 precision (precision {cfg.precision} on "
                f"{self.info.device.type} is float32): add --precision bf16")
        if self.info.enabled:
            dist_mod.shard_model(model, self.info, torch.bfloat16 if bf16_flag else None)
            # every rank built the same model from cfg.seed; from here each draws its own noise (block
            # diffusion's levels and masks, LaDiR's latents, dropout), not a copy of rank 0's
            torch.manual_seed(cfg.seed + self.info.rank)
        self.model = model
        self.opt, self.split = build_optimizer(model, cfg)  # the trainable parameters only
        if self.resume_from is not None and not self.new_phase:
            ckpt_mod.load_optimizer(self.resume_from, model, self.opt, self.info)
        # one process, --param-dtype bfloat16: the GEMM weights switch to bf16 copies of themselves now,
        # after the optimizer state is loaded (in float32) and before a CUDA graph captures them
        self.masters = (MasterWeights(compute_weights(model)) if bf16_flag is not None and not self.info.enabled
                        else None)
        self.objective = model.objective  # its loss and metric (objectives/); the loop never asks which one
        if state is not None:  # what it learned besides its weights (block diffusion's searched clip range)
            self.objective.load_train_state(state.get("objective") or {})
        # the checkpoint was saved before its step's evaluation (an interrupt): the loop runs it first where
        # it changes how the objective trains (Objective.eval_trains)
        self.eval_pending = bool((state or {}).get("eval_pending"))
        self.teacher = None
        # the teacher: --distill, else the resumed run's (a plain --resume dropped it silently)
        self.distill_from = opts.distill if opts.distill is not None else (state or {}).get("distill")
        if self.distill_from is not None:
            from .config import DistillConfig
            from .distill import DistillError, load_teacher

            if self.requested == "cuda-graph" or self.mode != "all":
                raise TrainUsageError("--distill: not with --cuda-graph or --train-only")
            try:
                self.teacher = load_teacher(self.distill_from, model, self.info.device, cfg.seq_len,
                                            getattr(self.stream, "tokenizer", None))
            except DistillError as e:
                raise TrainError(str(e) + ("" if opts.distill is not None else
                                           " (the teacher of the resumed run: pass --distill to name it)")) from None
            d = cfg.distill or DistillConfig()
            whose = "" if opts.distill is not None else ", the resumed run's teacher"
            n = sum(p.numel() for p in self.teacher.parameters()) / 1e6
            self.log(f"distilling from {self.distill_from} ({n:.2f}M params{whose}): kl_weight {d.kl_weight:g}, "
                     f"ce_weight {d.ce_weight:g}, temperature {d.temperature:g}")
        elif cfg.distill is not None:  # the weights of a teacher never named (they trained on silently)
            d = cfg.distill
            self.log(f"note: {opts.recipe_name}: train.distill (kl_weight {d.kl_weight:g}, ce_weight {d.ce_weight:g}, "
                     f"temperature {d.temperature:g}) is unused: no teacher (--distill TEACHER_CKPT names one)")
        self.objective.configure(cfg)
        problem = self.objective.run_problem(cfg)
        if problem is not None:  # a flag's or a default's value (load_recipe refuses a train: section's)
            raise TrainUsageError(problem)
        why = {"compile": self.objective.eager_because, "cuda-graph": self.objective.graph_because}.get(self.requested)
        if why is not None:
            raise TrainUsageError(f"--{self.requested}: not available for the {self.objective.cfg.kind} objective ({why})")
        if self.requested == "compile" and cfg.activation_checkpoint:
            raise TrainUsageError("--activation-checkpoint: not with --compile (torch.compile cannot trace the hooks that "
                             "keep a recomputed block's second run from repeating its statistics and balancing "
                             "counts); use it with --mode eager, cuda-graph or auto")
        if self.requested == "cuda-graph" and self._routing():
            raise TrainUsageError("--cuda-graph: not while the Dr.LLM layer routers are on (the captured step has no "
                             "routes input; eager steps train at full depth with all-execute routes)")
        if self.resume_from is not None:  # the random streams last: what setup builds (the teacher's
            # initialisation) drew from them, which the uninterrupted run did before its first step
            ckpt_mod.load_rng(self.resume_from, self.info)
        self.fwd = model
        if self.compile_mode is not None:  # the model's forward, or the objective's step past its noise draws
            # (Objective.compile_step): training and evaluation both run it
            self.fwd = self.objective.compile_step(model, functools.partial(
                torch.compile, mode=None if self.compile_mode == "default" else self.compile_mode))
            self.run_mode = "compile"
        self.graphed = None
        self.graphed_opt: GraphedOptimizer | None = None  # the optimizer step in a CUDA graph (_graphed_opt_step)
        self._eager_opt_steps = 0
        self._said_opt_eager = False
        mode_line = None  # "training mode: ..." (CUDA graphs, or auto on CUDA)
        if self.requested == "cuda-graph":
            self.graphed = self._capture()
            self.run_mode = "cuda-graph"
            mode_line = (f"training mode: cuda-graph (forward+backward captured at batch {cfg.batch_size} x "
                         f"{cfg.seq_len})")
        elif self.requested == "auto" and self.info.device.type == "cuda":  # CPU: eager, silently
            self.graphed, why = self._auto_mode()
            self.run_mode = "cuda-graph" if self.graphed is not None else "eager"
            mode_line = f"training mode: {self.run_mode} ({why})"

        if self.resume_from is None and self.info.is_main:
            self._set_aside_earlier_metrics()
        self.rows = read_metrics(self.out / "metrics.jsonl", upto=self.start_step)
        if self.info.is_main:
            self._rewrite_metrics()
        n_params = sum(p.numel() for p in model.parameters())
        dev = self.info.device
        fsdp = "FSDP2" + (", bf16 parameters, float32 gradient reduce" if bf16_flag else "")
        where = f"{dev}" + (f" x{self.info.world} ({fsdp})" if self.info.enabled else "")
        if self.masters is not None:
            where += (f", bf16 weights with float32 masters ({len(self.masters.params)} tensors, "
                      f"{self.masters.numel() / 1e6:.2f}M params)")
        self.log(f"model {self.recipe.name}: {n_params / 1e6:.2f}M params, pattern {self.recipe.pattern}")
        self.log(f"data: {self.stream.description}")
        if getattr(self.stream, "note", None):  # e.g. a series too small for RevIN's eps (training.series)
            self.log(self.stream.note)
        if cfg.tf32:
            where += ", float32 matmuls in TF32" if dev.type == "cuda" else " (--tf32: CUDA only, no effect here)"
        warm = f"warmup {cfg.warmup_steps}"
        if cfg.warmup_steps > cfg.steps:  # e.g. the default 20 in a 10-step smoke run
            top = cfg.steps / cfg.warmup_steps
            warm += f" (longer than the run's {cfg.steps} steps: the lr rises to {top:.2f} of its peak {cfg.lr:.3g})"
        self.log(f"optimizer: {self.split.describe()}; schedule {cfg.schedule}, {warm}; device {where}")
        if cfg.activation_checkpoint:
            n = cfg.activation_checkpoint
            self.log("activation checkpointing: the activations of " + ("every block" if n == 1 else
                     f"one block application in {n}") + " recomputed in the backward")
        if mode_line is not None:
            self.log(mode_line)
        if self.resume_from is not None:
            self.log(f"resumed from {self.resume_from} (step {self.start_step})")
        if self.replan_note is not None:
            self.log(self.replan_note)
        if self.phase_change is not None:
            self.log(f"--{self.phase_change.replace('_', '-')} {getattr(cfg, self.phase_change)}: a new phase at "
                     f"step {self.start_step}: a fresh optimizer, lr from the peak {cfg.lr:.3g} (no warm-up) "
                     f"decaying to step {cfg.steps}")
        elif self.new_phase:
            self.log(f"--train-only {self.mode}: a new phase at step {self.start_step} (the checkpoint trained "
                     f"{saved_mode}): a fresh optimizer, lr from the peak {cfg.lr:.3g} (no warm-up) "
                     f"decaying to step {cfg.steps}")
        if self.mode != "all":
            what = {"routers": "the Dr.LLM layer routers", "branches": "the MoDr branches"}[self.mode]
            self.log(f"--train-only {self.mode}: training {what} ({n_train / 1e6:.3f}M params), "
                     f"{n_frozen / 1e6:.2f}M params frozen")
        saved_search = (state or {}).get("route_search") or {}
        self.route_search = {k: getattr(opts, f"route_{k}") if getattr(opts, f"route_{k}") is not None
                             else saved_search.get(k, default) for k, default in routes_mod.SEARCH_DEFAULTS.items()}
        if self.mode == "routers":
            rs = self.route_search
            n = len(routes_mod.used_slots(model, routes_mod.default_iterations(model)))
            self.log(f"route search: length-aware beam search, beam {rs['beam']}, {n} slots, length penalty "
                     f"{rs['length_penalty']:g}, tolerance {rs['tolerance']:g} nats: "
                     f"{routes_mod.search_budget(n, rs['beam'])} batch forwards per micro-batch (no grad), "
                     "then one teacher-forced forward")

    def _capture(self) -> GraphedStep:
        """Capture the training step in CUDA graphs (``--cuda-graph``), at the run's batch shape;
        any failure is a TrainError."""
        if self.compile_mode is not None:
            raise TrainUsageError("--cuda-graph: use it instead of --compile / --compile-mode, not with them")
        if self.info.enabled:
            raise TrainUsageError("--cuda-graph: one process only (FSDP2's collectives are not captured)")
        if self.info.device.type != "cuda":
            raise TrainUsageError(f"--cuda-graph needs a CUDA device (the model is on {self.info.device})")
        try:
            with _rng_kept(self.info.device):  # the warm-up passes' dropout draws: not the run's
                return self._graph_step()
        except CaptureError as e:
            raise TrainError(f"--cuda-graph: {e}") from None

    def _graph_step(self) -> GraphedStep:
        """The training step captured at the run's batch shape and dtypes (sample: the run's first
        micro-batch, token ids or a forecast's windows of numbers; the capture's passes step no
        optimizer); CaptureError when it cannot be."""
        cfg, dev = self.cfg, self.info.device
        batch = self.stream.train(self._micro_indices(0))
        self.model.train()
        return GraphedStep(self.model, batch.input_ids.to(dev), batch.labels.to(dev),
                           lambda: _autocast(cfg, dev, cache=False))

    def graph_ineligible(self) -> str | None:
        """Why ``auto`` cannot use CUDA graphs for this run (None: it may try)."""
        if self.info.enabled:
            return f"{self.info.world} processes: FSDP2's collectives are not captured"
        if self.compile_mode is not None:
            return "torch.compile"
        if self.mode != "all":
            return f"--train-only {self.mode}"
        if self.teacher is not None:
            return "--distill runs a teacher beside the step"
        if self.objective.graph_because is not None:
            return f"the {self.objective.cfg.kind} objective: {self.objective.graph_because}"
        if self._routing():
            return "the Dr.LLM layer routers are on"
        return None

    def _auto_mode(self) -> tuple[GraphedStep | None, str]:
        """``auto`` on CUDA: (the captured step, a note on its verification), or (None, why the
        run stays eager)."""
        why = self.graph_ineligible()
        if why is not None:
            return None, why
        cfg, dev = self.cfg, self.info.device
        batch = self.stream.train(self._micro_indices(0))  # the first step's first micro-batch
        ids, labels = batch.input_ids.to(dev), batch.labels.to(dev)
        graphed, failed = None, None
        try:
            # the random streams are left as they were (the run's first step draws what an eager
            # run's does, and a resumed run what the uninterrupted one did), and the eager and the
            # graphed check draw the same dropout masks (a replay reads the generator's state)
            with _rng_kept(dev):
                with _rng_kept(dev):
                    want = self._eager_loss(ids, labels, batch)  # a float: no autograd graph outlives it
                with _rng_kept(dev):
                    graphed = self._graph_step()
                got = self._graphed_loss(graphed, ids, labels)
        except CaptureError as e:
            failed = f"CUDA graph capture failed: {e}"
        except Exception as e:  # noqa: BLE001 - a failing replay or verification forward: eager it is
            failed = f"CUDA graph check failed: {type(e).__name__}: {first_line(e, empty='')[:200]}"
        finally:
            reset_balancing_counts(self.model)  # the counts of the verification forwards
        precision = "bf16" if isinstance(_autocast(cfg, dev), torch.autocast) else "fp32"
        rtol = GRAPH_LOSS_RTOL[precision]
        if failed is None and not (math.isfinite(got) and abs(got - want) <= rtol * max(1.0, abs(want))):
            failed = (f"CUDA graph not verified: its loss on the first batch {got:.6g} differs from the eager loss "
                      f"{want:.6g} by more than {rtol:g} ({precision})")
        if failed is not None:
            graphed = None  # its graphs and their memory pool go
            gc.collect()
            torch.cuda.empty_cache()
            return None, failed
        return graphed, (f"forward+backward captured at batch {cfg.batch_size} x {cfg.seq_len}; first batch's loss "
                         f"{got:.4f} graphed, {want:.4f} eager")

    def _eager_loss(self, ids: torch.Tensor, labels: torch.Tensor, batch: Any) -> float:
        """The loss of one eager training forward (with gradients, so the same kernels as a
        training step; no backward). Its output, and with it its autograd graph, is dropped
        before this returns: a graph kept alive breaks the capture that follows."""
        self.model.train()
        with _autocast(self.cfg, self.info.device):
            out = self.objective.train_forward(self.model, self.model, ids, labels, batch=batch)
        loss = float(out.loss.detach())
        del out
        return loss

    @staticmethod
    def _graphed_loss(graphed: GraphedStep, ids: torch.Tensor, labels: torch.Tensor) -> float:
        """The loss of one replay of the captured forward (no backward; the replay's outputs are
        static buffers that the next replay overwrites)."""
        loss_t, _, _ = graphed(ids, labels)
        loss = float(loss_t.detach())
        del loss_t
        return loss

    def _resumed_config(self, state: dict[str, Any]) -> tuple[TrainConfig, TrainConfig]:
        """(the config the checkpoint was trained with, that config with this run's flags)."""
        base = saved_train_config(state, self.resume_from, self.recipe)
        cfg = dataclasses.replace(base, **self.opts.overrides)
        validate(cfg, self.recipe.model, self.opts.overrides, str(self.resume_from / ckpt_mod.STATE_FILE),
                 section="train_config", default_data=self.objective_cls.default_data)  # (as its type errors: the key of that file, not the recipe's train.)
        return base, cfg

    def _set_aside_earlier_metrics(self) -> None:
        """A fresh run in an ``--out`` that holds an earlier run's ``metrics.jsonl`` / ``loss.png`` /
        TensorBoard folder ``tb`` but no checkpoint (that run failed before its first one; checkpoints
        need ``--resume``): move them aside with the next free number (``metrics.jsonl.1``, ``loss.png.1``,
        ``tb.1``) and say so, rather than write over them (or add to them). An empty ``metrics.jsonl``
        holds nothing: replaced."""
        tb = self.out / TB_DIR
        old = [p for p in (self.out / "metrics.jsonl", self.out / "loss.png")
               if p.is_file() and (p.name == "loss.png" or p.stat().st_size > 0)]
        old += [tb] if tb.is_dir() and any(tb.iterdir()) else []
        if not old:
            return
        n = 1
        while any((self.out / f"{name}.{n}").exists() for name in ("metrics.jsonl", "loss.png", TB_DIR)):
            n += 1
        for p in old:
            os.replace(p, p.with_name(f"{p.name}.{n}"))
        self.log(f"--out {self.out}: an earlier run's {' and '.join(p.name for p in old)} (no checkpoint) moved "
                 f"aside to {' and '.join(f'{p.name}.{n}' for p in old)}")

    def _rewrite_metrics(self) -> None:
        p = self.out / "metrics.jsonl"
        tmp = p.with_name(f".metrics.jsonl.tmp-{os.getpid()}")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            os.replace(tmp, p)
        except OSError as e:  # (e.g. a folder named metrics.jsonl: the error named the temporary file, left behind)
            tmp.unlink(missing_ok=True)
            raise TrainError(f"{p}: cannot be written ({e.strerror or e})") from None

    # ------------------------------------------------------------------ steps
    def _micro_indices(self, micro: int) -> range:
        B, W = self.cfg.batch_size, self.info.world
        start = self.samples + (micro * W + self.info.rank) * B
        return range(start, start + B)

    def _routing(self) -> bool:
        """Whether the model's Dr.LLM routers decide its routes (switched on by router training;
        read at setup)."""
        return getattr(self, "routes_on", False)

    def _all_execute(self, batch_size: int) -> torch.Tensor:
        return all_execute_routes(self.model, batch_size, self.info.device)

    def train_step(self, step: int) -> dict[str, Any]:
        if self.mode == "routers":
            return self._router_step(step)
        cfg, dev = self.cfg, self.info.device
        factor = self.schedule.factor(step)
        set_lr(self.opt, factor)
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        aux_sum = None
        stats, micro_stats = None, []
        acc = GradAccumulator() if self.graphed is not None and cfg.grad_accum > 1 else None
        # the step's micro-batches first (small: token ids), then each one's share of the step's loss
        batches = [self.stream.train(self._micro_indices(micro)) for micro in range(cfg.grad_accum)]
        moved = [(b.input_ids.to(dev), b.labels.to(dev)) for b in batches]
        div, corr, has_items = self._loss_shares([self.objective.train_items(ids, labels, b)
                                                  for b, (ids, labels) in zip(batches, moved)])
        for micro, (batch, (ids, labels)) in enumerate(zip(batches, moved)):
            if self.info.enabled and cfg.grad_accum > 1:
                self.model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            if self.compile_mode is not None:  # CUDA-graph modes: outputs of the previous step may be reused
                torch.compiler.cudagraph_mark_step_begin()
            if self.graphed is not None:
                loss_t, aux_t, stats = self.graphed(ids, labels)
                equal_t = aux_t  # (the captured step's aux loss keeps its autograd graph: cuda_graph._LossStep)
            else:
                # the base (and MoDr branches) train at full depth: routers that are on do not route here
                kw = {"routes": self._all_execute(ids.shape[0])} if self._routing() else {}
                if self.teacher is not None:  # the KL term reads the student's logits; otherwise the
                    kw["return_logits"] = True  # next-token loss is fused and no [B, T, V] logits exist
                with _autocast(cfg, dev):  # the objective's loss (objectives/); ids were validated at setup
                    out = self.model.run(self.objective.train_forward, self.fwd, self.model, ids, labels, batch=batch,
                                              **kw)
                loss_t, aux_t, stats = out.loss, out.aux_loss, out.stats
                equal_t = aux_t
                if self.teacher is not None:
                    from .distill import distill_loss

                    with _autocast(cfg, dev):
                        loss_t, kl_t, equal_t = distill_loss(out, self.teacher, ids, cfg.distill)
                    stats = {**(stats or {}), "distill/kl": kl_t}
                if "routes" in kw and stats is not None:
                    stats = {k: v for k, v in stats.items() if k != "etd/route_slots"}
            # loss_t * items * world / total: division by ``div`` (exactly grad_accum where every micro-batch
            # of every process has as many items, so then the gradients are bit for bit the mean's); the
            # part of the loss that stays a mean over micro-batches (aux losses, distillation's KL) gets
            # 1 / grad_accum in all (``corr``, exactly 0 then)
            d, c = div[micro].to(loss_t.dtype), corr[micro]
            if equal_t is not None and equal_t.requires_grad:
                torch.autograd.backward([loss_t / d, equal_t], [None, c.to(equal_t.dtype)])
            else:
                (loss_t / d).backward()
            if self.masters is not None:
                self.masters.collect()
            if acc is not None:
                acc.take(list(self.model.parameters()))
            # grad_accum x the step's loss as trained, so that as many items everywhere log the mean over the
            # micro-batches as before, bit for bit (a micro-batch with nothing to score has a NaN mean over
            # no items, which weighs nothing)
            loss_sum += torch.where(has_items[micro], loss_t.detach().double() * (cfg.grad_accum / div[micro]), 0.0)
            if equal_t is not None:
                loss_sum += equal_t.detach().double() * (corr[micro] * cfg.grad_accum)
            if aux_t is not None:
                a = aux_t.detach().double()
                aux_sum = a if aux_sum is None else aux_sum + a
            micro_stats.append(stats if cfg.grad_accum == 1 else _snapshot_stats(stats))
        if acc is not None:
            acc.restore()
        row = self._optimizer_step(step, loss_sum, factor, "loss", aux_sum,
                                   micro_stats[-1] if cfg.grad_accum == 1 else _step_stats(micro_stats))
        self._update_biases()
        return row

    def _loss_shares(self, items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(divisors, corrections, has items) [grad_accum] of a step's micro-batches from their loss
        items (``Objective.train_items``, device tensors), all on the device without a host read;
        the items summed over processes in one all-reduce (more than one process only). Micro-batch
        i backpropagates ``loss_i / div_i`` with ``div_i = total / (items_i * world)``: the sum over
        micro-batches and processes of ``loss_i * items_i / total``, the mean over every item of the
        step, once FSDP2 has averaged the processes' gradients (its reduce-scatter divides by the
        world size). ``corr_i = 1 / grad_accum - items_i * world / total`` brings the part of a loss
        that stays a per-micro-batch mean back to ``1 / grad_accum``. Counts in float64: with as many
        items everywhere ``div_i`` is exactly ``grad_accum`` and ``corr_i`` exactly 0, so the gradients
        are bit for bit those of the mean over micro-batches (``grad_accum`` 1, packed text)."""
        n = torch.stack([c.to(torch.float64) for c in items])
        total = dist_mod.all_reduce_sum(n.sum(), self.info)
        local = n * self.info.world
        div = total / local  # inf for a micro-batch with no item (its gradient: 0)
        corr = 1.0 / self.cfg.grad_accum - local / total
        # the whole step without an item: nothing to train (NaN loss, the run stops with a TrainError)
        return div, corr, (n > 0) | (total == 0)

    def _router_step(self, step: int) -> dict[str, Any]:
        """One step of router training (``--train-only routers``, ``routes.py``): per micro-batch
        the route search with the frozen model (no grad), then a forward teacher-forced on the
        searched routes and the focal loss of the routers' logits against them."""
        cfg, dev = self.cfg, self.info.device
        factor = self.schedule.factor(step)
        set_lr(self.opt, factor)
        self.model.eval()  # the frozen base is deterministic (no dropout, no balancing counts)
        gamma = self.model.etd_router.cfg.layer_router.focal_gamma
        balance = self.model.etd_router.cfg.layer_router.class_balance
        means = ("route_loss", "route_acc", "applications", "applications_all_execute", "lm_loss",
                 "lm_loss_all_execute", "route_skip", "route_repeat")
        counts = ("correct", "correct_all_execute", "scored")
        sums = dict.fromkeys(means + counts, 0.0)
        forwards = 0
        for micro in range(cfg.grad_accum):
            batch = self.stream.train(self._micro_indices(micro))
            ids, labels = batch.input_ids.to(dev), batch.labels.to(dev)
            if self.info.enabled and cfg.grad_accum > 1:
                self.model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with _autocast(cfg, dev):
                res = routes_mod.search_routes(self.model, ids, labels, **self.route_search)
                if self.compile_mode is not None:
                    torch.compiler.cudagraph_mark_step_begin()
                out = self.fwd(ids, routes=res.routes, check_inputs=False)
            loss_t, acc_t = routes_mod.route_targets_loss(out.stats, res.routes, gamma, balance, rows=res.count > 0)
            (loss_t / cfg.grad_accum).backward()
            if self.masters is not None:
                self.masters.collect()
            forwards += res.evaluations + 1
            tgt = res.routes[:, res.used]
            vals = {"route_loss": loss_t.detach(), "route_acc": acc_t, "applications": res.applications.float().mean(),
                    "applications_all_execute": res.base_applications.float().mean(),
                    "lm_loss": res.loss.mean(), "lm_loss_all_execute": res.base_loss.mean(),
                    "correct": res.correct.sum(), "correct_all_execute": res.base_correct.sum(),
                    "scored": res.count.sum(), "route_skip": (tgt == SKIP).float().mean(),
                    "route_repeat": (tgt == REPEAT).float().mean()}
            got = torch.stack([vals[k].double() for k in means + counts]).tolist()  # one host read
            for k, v in zip(means + counts, got):
                sums[k] += v / cfg.grad_accum if k in means else v
        keys = list(sums)
        reduced = dict(zip(keys, dist_mod.all_reduce([sums[k] for k in keys], self.info)))
        # loss: the objective trained here (the routers' focal loss); lm_loss: the task loss on the searched routes
        row = self._optimizer_step(step, reduced["route_loss"], factor, "route loss")
        for k in means:
            row[k] = reduced[k]
        if self.stream.metric == "accuracy":
            row["accuracy"] = reduced["correct"] / max(reduced["scored"], 1.0)
            row["accuracy_all_execute"] = reduced["correct_all_execute"] / max(reduced["scored"], 1.0)
        row["search_forwards"] = forwards  # batch-sized forwards per step (search + teacher-forced)
        return row

    def _optimizer_step(self, step: int, loss: float | torch.Tensor, factor: float, what: str,
                        aux: torch.Tensor | None = None, stats: dict | None = None) -> dict[str, Any]:
        """The end of every training step: global gradient clipping, then the loss and the gradient
        norm must be finite, then the optimizer step (replayed from its CUDA graph where one was
        captured, ``_graphed_opt_step``); returns the step's metrics row so far. ``loss`` and ``aux``
        may be device tensors summed over the ``grad_accum`` micro-steps: they, the norm and the
        routing statistics ``stats`` are read in one transfer (``_read_step``), so the host waits for
        the device once a step. Clipping a non-finite gradient leaves the weights as they were: the
        check comes before the optimizer step (with ``grad_clip`` 0 too: the norm is then taken and
        nothing is clipped)."""
        cfg = self.cfg
        with self._full_precision():  # --param-dtype bfloat16: the float32 masters and their gradients
            params = [p for p in self.model.parameters() if p.grad is not None]
            # grad_clip 0 clips nothing but still reads the norm: a non-finite gradient must stop the run
            norm = clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            tensors = [loss if isinstance(loss, torch.Tensor) else None, aux, norm]
            (loss_v, aux_v, gnorm), stat_row = _read_step(tensors, stats)
            stat_row = _reduce_stats(stat_row, self.info)
            if isinstance(loss, torch.Tensor):  # sums over the micro-steps (train_step's loss: weighted by their
                # items): the mean over them and the ranks
                sums = [loss_v / cfg.grad_accum] + ([aux_v / cfg.grad_accum] if aux is not None else [])
                loss, *aux_mean = dist_mod.all_reduce(sums, self.info)
                aux_v = aux_mean[0] if aux_mean else None
            if not math.isfinite(loss):
                raise TrainError(self._nonfinite(step, f"{what} is {loss}"))
            if gnorm is not None and not math.isfinite(gnorm):
                raise TrainError(self._nonfinite(step, f"gradient norm is {gnorm}"))
            if not self._graphed_opt_step(params):
                self.opt.step()
            elif not self.graphed_opt.replay():
                if not self._said_opt_eager:
                    self._said_opt_eager = True
                    self.log(f"optimizer step: eager at step {step + 1} (the parameters with gradients are not the "
                             "captured step's); so at every such step")
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.samples += cfg.batch_size * cfg.grad_accum * self.info.world
        row: dict[str, Any] = {"step": step + 1, "loss": loss, "lr": cfg.lr * factor}
        if self.split.muon or self.split.muon_stacked:
            row["muon_lr"] = cfg.muon_lr * factor
        if gnorm is not None:
            row["grad_norm"] = gnorm
        if aux_v is not None:
            row["aux_loss"] = aux_v
        # statistics are namespaced by who reports them (moe/..., etd/...); bare keys are MoE's
        row.update({k if "/" in k else f"moe/{k}": v for k, v in stat_row.items()})
        return row

    def _graphed_opt_step(self, params: list[torch.nn.Parameter]) -> bool:
        """Whether this step's optimizer update replays ``self.graphed_opt``. On one CUDA process, unless
        the run asked for ``--mode eager``, the optimizer step is captured in a CUDA graph at this
        process's second step (the first runs eagerly: its kernels' first use stays out of the
        capture), whether the forward+backward are graphed or eager (``auto`` falling back, an
        objective that runs eagerly, ``--mode compile``); a capture that fails says so once and the
        run steps eagerly. With ``--param-dtype bfloat16`` it is captured inside ``_full_precision``:
        the masters and their gradient sums it then reads and writes are the same tensors at every
        step (``MasterWeights``), and the bf16 copy after it stays eager."""
        allowed = (not self.info.enabled and self.requested != "eager"
                   and (self.graphed is not None or self.info.device.type == "cuda"))
        if self.graphed_opt is None and allowed and self._eager_opt_steps == 1:
            try:
                self.graphed_opt = GraphedOptimizer(self.opt, params)
                self.log("optimizer step: replayed from a CUDA graph (captured at this process's second step)")
            except CaptureError as e:
                self.log(f"optimizer step: eager ({e})")
        self._eager_opt_steps += self.graphed_opt is None
        return self.graphed_opt is not None

    def _full_precision(self) -> contextlib.AbstractContextManager:
        """The block in which the parameters are the float32 masters (``--param-dtype bfloat16``;
        training/mixed.py); a no-op otherwise."""
        return self.masters.full_precision() if self.masters is not None else contextlib.nullcontext()

    def _update_biases(self) -> None:
        """After a step of ``train_step`` (not router training, ``_router_step``, which runs the model in
        eval mode: it counts no load and changes no bias): call ``update_bias()`` (aux-loss-free MoE
        balancing) on every module that has one. Under FSDP the load a module counted (its ``load``
        buffer) is first summed over ranks, so every rank applies the same bias update. With
        ``--train-only branches`` only the etd_router's (MoDr balancing) runs: the frozen base's biases
        stay, its counts are dropped. The step's global-batch balance counts (MoE ``balance_loss:
        global_batch``) are zeroed here: the next step counts its own tokens."""
        reset_step_loads(self.model)
        for mod in self.model.modules():
            if mod is self.model or not callable(getattr(mod, "update_bias", None)):
                continue
            load = getattr(mod, "load", None)
            if self.mode == "branches" and mod is not getattr(self.model, "etd_router", None):
                if isinstance(load, torch.Tensor):
                    load.zero_()
                continue
            if self.info.enabled and isinstance(load, torch.Tensor):
                import torch.distributed as tdist

                tdist.all_reduce(load, op=tdist.ReduceOp.SUM)
            mod.update_bias()

    def _nonfinite(self, step: int, what: str) -> str:
        last = ckpt_mod.latest(self.out)
        keep = f"the last good checkpoint {last} is untouched" if last else "no checkpoint was written"
        return (f"step {step + 1}: {what}; stopping ({keep}). Try a lower --lr, more warmup "
                f"or a smaller grad_clip")

    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """Held-out loss and accuracy (or perplexity) of the model, teacher-forced over whole
        held-out sequences; ``eval_loss`` is the mean over every scored item (each batch's mean
        weighed by ``Objective.eval_weight``: its scored targets, LaDiR's distinct rows). When its
        Dr.LLM routers are on (router training switched them on) that is with the routes they
        decide, and the same batches are also evaluated
        all-execute (``*_all_execute``); ``eval_applications`` is the mean layer applications
        per sequence of the routed run. The routes are decided from the whole sequence (as in
        router training, and as Dr.LLM's code routes every forward); ``generate`` decides them
        from the prompt at the prefill, so where answers follow a prompt, a route here can
        differ from the one generation takes. ``step``: the training step it follows (the
        objective's ``eval_begin`` / ``eval_end`` around it: block diffusion's clip search)."""
        return evaluate_held_out(self.model, self.fwd, self.stream, self.cfg, self.info, self.cfg.eval_batches,
                                 step=step, routing=self._routing(), compiled=self.compile_mode is not None).metrics

    def save(self, step: int, eval_pending: bool = False) -> Path:
        """The checkpoint of step ``step``; ``eval_pending``: saved before the evaluation due at that
        step ran (an interrupt skipped it, or it follows the checkpoint), which a resume runs first
        where it changes how the objective trains (``Objective.eval_trains``)."""
        state = {
            "samples": self.samples, "tokens": self.tokens_seen, "world_size": self.info.world,
            "schedule": dict(self.schedule.to_dict(), lr_factor=self.schedule.factor(max(step - 1, 0))),
            "train_config": dataclasses.asdict(self.cfg), "data": self.stream.state(),
            "recipe_hash": self.recipe.hash(), "metrics": self.rows[-1] if self.rows else None,
            "train_only": self.mode,
            "distill": str(Path(self.distill_from).resolve()) if self.distill_from is not None else None,
            "route_search": self.route_search, "objective": self.objective.train_state(),
            "eval_pending": eval_pending,
        }
        tok = self.stream.tokenizer  # None for series: a forecast model reads numbers
        files = {**self.carried, "tokenizer.json": tok.to_json()} if tok is not None else {}
        with self._full_precision():  # checkpoints hold the float32 masters
            return ckpt_mod.save(self.out, step, self.model, self.opt, state, self.info, extra_files=files,
                                 keep_last=self.cfg.keep_last)

    def _carried_files(self) -> dict[str, str]:
        """The files a checkpoint of this run carries beside its tokenizer, as they came: the end ids
        (``generation_config.json``) of the checkpoint it started from (``--resume``, else a checkpoint
        given as the recipe, e.g. an imported or hybridized model), and transformers' tokenizer side
        files (``TOKENIZER_SIDE_FILES``: special tokens, chat template): the tokenizer's own (read
        beside ``--tokenizer``'s tokenizer.json, or kept in the shard index ``hymba prepare`` wrote),
        else that checkpoint's where its tokenizer.json is this run's tokenizer. Without end ids from
        that checkpoint, a stream whose examples end with an id its tokenizer does not name (``end_id``:
        the built-in reasoning tasks' EOS) writes them, so ``hymba generate`` stops there."""
        from ..models.lm import GENERATION_CONFIG, generation_config
        from .tokenizer import load_file, side_files

        tok = self.stream.tokenizer
        if tok is None:
            return {}
        start = self.resume_from if self.resume_from is not None else self.opts.init
        out: dict[str, str] = {}
        if start is not None and generation_config(start, self.recipe.model.vocab_size):  # (checked: ids in range)
            out[GENERATION_CONFIG] = (Path(start) / GENERATION_CONFIG).read_text(encoding="utf-8")
        elif getattr(self.stream, "end_id", None) is not None and getattr(tok, "eos_id", None) is None:
            out[GENERATION_CONFIG] = json.dumps({"eos_token_id": int(self.stream.end_id)}) + "\n"
        if getattr(tok, "files", None):
            return {**out, **tok.files}
        if (tok.kind == "tokenizers" and start is not None and (Path(start) / "tokenizer.json").is_file()
                and load_file(Path(start) / "tokenizer.json").to_json() == tok.to_json()):
            return {**out, **side_files(start)}
        return out

    # ------------------------------------------------------------------ run
    def run(self) -> Summary:
        try:
            self.setup()
            if self.nothing_to_do is not None:
                return Summary(steps=self.start_step, total=self.cfg.steps, start_step=self.start_step,
                               final_loss=float("nan"), eval={}, tokens_per_s=0.0, seconds=0.0,
                               checkpoint=self.resume_from, out=self.out, note=self.nothing_to_do)
            return self._loop()
        finally:
            self.close()

    def close(self) -> None:
        """What ``run`` puts back after the run, also where ``setup`` failed: the bf16 weights' float32
        masters into the model, the caller's TF32 setting and current CUDA device, the process group
        (``hymba bench`` calls it after the steps it times)."""
        if self.masters is not None:
            self.masters.release()  # the model handed on after the run holds its float32 weights
        if hasattr(self, "tf32_before"):
            torch.backends.cuda.matmul.allow_tf32 = self.tf32_before
        if hasattr(self, "cuda_device_before"):
            torch.cuda.set_device(self.cuda_device_before)
        if hasattr(self, "info"):
            info = self.info
            if info.enabled:  # the sharded model and optimizer state hold the process group: drop them
                vars(self).clear()  # now (a finished run is not used again), see distributed.shutdown
                self.info = info
            dist_mod.shutdown(info)

    def _plot(self) -> None:
        """Redraw ``loss.png``. A plot that cannot be drawn (a folder named loss.png, a full disk, a
        matplotlib error) is one line, once a run, and the run goes on: it killed the run before its
        final checkpoint was saved."""
        path = self.out / "loss.png"
        try:
            plot_metrics(self.rows, path, f"{self.recipe.name} ({self.cfg.data})", getattr(self.stream, "chance", None))
        except Exception as e:  # noqa: BLE001 - whatever the plot fails of, the checkpoints matter more
            if not self.plot_failed:
                self.plot_failed = True
                why = e.strerror if isinstance(e, OSError) and e.strerror else brief(str(e) or type(e).__name__, 120)
                self.log(f"warning: {path}: not drawn ({why}); the run goes on without it")

    def _stop_flags(self, t_run: float, stop: StopRequest) -> tuple[bool, bool]:
        """(out of time, stop requested by a signal), agreed by all ranks (one all-reduce)
        so every rank stops at the same step."""
        over = self.opts.time_limit is not None and time.perf_counter() - t_run >= self.opts.time_limit
        flags = [float(over), float(stop.requested is not None)]
        if self.info.enabled:
            flags = dist_mod.all_reduce(flags, self.info, op="sum")
        return flags[0] > 0, flags[1] > 0

    def _loop(self) -> Summary:
        cfg, info = self.cfg, self.info
        stop = self.opts.stop_after if self.opts.stop_after is not None else cfg.steps
        # tokens per sequence: the stream's (forecast: patch tokens per window), else seq_len
        tokens_per_step = cfg.batch_size * getattr(self.stream, "seq_len", cfg.seq_len) * cfg.grad_accum * info.world
        metrics_file = open(self.out / "metrics.jsonl", "a") if info.is_main else None
        self.progress = Progress(stop, self.start_step, enabled=info.is_main and self.opts.progress,
                                 interval=self.opts.progress_interval)
        t_run = time.perf_counter()
        train_seconds = 0.0
        rate = None
        last_eval: dict[str, float] = {}
        last_ckpt = None
        saved_step = self.start_step  # the step of the newest checkpoint of this run (or the resumed one)
        why = self.objective.eval_trains(self.start_step) if self.eval_pending else None
        if why is not None:  # the uninterrupted run evaluated here before its next step: so does this one
            self.log(f"step {self.start_step}: the checkpoint was saved before this step's evaluation (an interrupt), "
                     f"which {why}: it runs first")
            ev = self.evaluate(self.start_step)
            self.log(f"step {self.start_step}/{cfg.steps}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ev.items()))
        loss = float("nan")
        step = self.start_step
        warm: list[float] = []  # seconds of the run's first step and of the optimizer graph's capture (_rate)
        tracker: ExperimentLog | None = None
        ended = False
        try:
            if info.is_main and self.log_targets:  # --log-to (tracking.py): rank 0, as metrics.jsonl
                try:
                    tracker = ExperimentLog(self.out, self.log_targets, run_config(self.recipe, cfg), self.start_step,
                                            resumed=self.resume_from is not None)
                except LoggerError as e:
                    raise TrainError(str(e)) from None
            with StopRequest(say=self.log) as signals:
                for step in range(self.start_step, stop):
                    t0 = time.perf_counter()
                    # no synchronize after the step: its one read (``_optimizer_step``) already waited for
                    # this step's backward, so the host runs at most one optimizer step ahead of the device,
                    # and the device starts the next step while the host logs this one; the run's last
                    # optimizer step is waited for below
                    captured = self.graphed_opt is not None
                    row = self.train_step(step)
                    dt = time.perf_counter() - t0
                    train_seconds += dt
                    if not warm or (not captured and self.graphed_opt is not None):
                        warm.append(dt)
                    self.tokens_seen += tokens_per_step
                    tps = tokens_per_step / max(dt, 1e-9)
                    rate = tps if rate is None else 0.9 * rate + 0.1 * tps
                    row["tokens_per_s"] = tps
                    row["tokens"] = self.tokens_seen
                    row["mode"] = self.run_mode
                    n = step + 1
                    loss = row["loss"]
                    out_of_time, interrupted = self._stop_flags(t_run, signals)
                    last = n == stop or out_of_time
                    if interrupted and n == stop:  # a signal in the run's last step: the run ends here anyway;
                        # the checkpoint first (a scheduler's grace period), then the final evaluation, which an
                        # interrupt skipped for good (a --resume then had nothing to do)
                        last_ckpt, saved_step = self.save(n, eval_pending=True), n
                        interrupted = False
                        if tracker is not None:
                            tracker.flush()
                        self.log(f"{signals.requested} in the last step: saved step {n}; the final evaluation "
                                 "follows (another signal stops it)")
                    if (n % cfg.eval_every == 0 or last) and not interrupted:
                        last_eval = self.evaluate(n)
                        row.update(last_eval)
                        self.log(f"step {n}/{cfg.steps}: loss {loss:.4f}, "
                                 + ", ".join(f"{k} {_fmt(v)}" for k, v in last_eval.items()))
                    self.rows.append(row)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                    if tracker is not None:
                        tracker.log(row)
                    if "eval_loss" in row and info.is_main:
                        self._plot()
                    self.progress.update(n, loss, rate, row["lr"])
                    if (n % cfg.save_every == 0 or last or interrupted) and n > saved_step:
                        skipped = interrupted and (n % cfg.eval_every == 0 or last)  # (the evaluation above)
                        last_ckpt, saved_step = self.save(n, eval_pending=skipped), n
                        if tracker is not None:
                            tracker.flush()
                    if interrupted:
                        newest = last_ckpt or self.resume_from
                        raise TrainInterrupted(n, newest, self.opts.resume_command(newest))
                    if last:
                        if n < stop:
                            self.log(f"--time-limit {self.opts.time_limit:g}s reached at step {n}: stopping "
                                     f"(continue with --resume)")
                        break
            ended = True
        except TrainInterrupted:
            ended = True  # (a checkpoint was saved: the run stopped as asked)
            raise
        finally:
            self.progress.close()
            if metrics_file is not None:
                metrics_file.close()
            if tracker is not None:
                try:
                    tracker.close(failed=not ended)
                except Exception as e:  # noqa: BLE001 - the run's own error (propagating) is the one to say
                    if ended:
                        raise
                    why = e.strerror if isinstance(e, OSError) and e.strerror else brief(first_line(e), 120)
                    self.log(f"warning: --log-to: the logs were not closed cleanly ({why})")
        if info.device.type == "cuda":  # the last optimizer step's device time counts
            t0 = time.perf_counter()
            torch.cuda.synchronize(info.device)
            train_seconds += time.perf_counter() - t0
        seconds = time.perf_counter() - t_run
        reached = self.rows[-1]["step"] if self.rows and self.rows[-1]["step"] > self.start_step else self.start_step
        done = reached - self.start_step
        summary = Summary(steps=reached, total=cfg.steps, start_step=self.start_step, final_loss=loss, eval=last_eval,
                          tokens_per_s=_rate(done, tokens_per_step, train_seconds, warm), seconds=seconds,
                          checkpoint=last_ckpt or ckpt_mod.latest(self.out), out=self.out, mode=self.run_mode)
        return summary


def train(recipe: Recipe, cfg: TrainConfig, opts: RunOptions) -> Summary:
    return Trainer(recipe, cfg, opts).run()

