"""The training loop behind ``hymba train``.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences on every
process; the loss of each micro-batch is ``out.loss`` (next-token cross entropy plus the
model's auxiliary losses, e.g. MoE balancing) divided by ``grad_accum``. Then: global
gradient-norm clipping, the optimizer step (Muon + AdamW, ``optim.py``), the learning
rate from the schedule (``schedule.py``), and ``update_bias()`` on every module that has
one (aux-loss-free MoE balancing). bf16 autocast on CUDA (``precision: auto``).

Records (rank 0): a tqdm bar (loss, tokens/s, ETA), ``OUT/metrics.jsonl`` (one JSON
object per optimizer step; eval metrics on eval steps; MoE routing stats when the model
reports them), ``OUT/loss.png`` redrawn at every eval, ``OUT/step-N/`` checkpoints
(``checkpoint.py``) and a final summary line.

Resume (``--resume``): the newest complete checkpoint gives the weights, the optimizer
state, the step, the data position and the RNG states, so the resumed run produces the
same losses as one that never stopped (``tests/test_training.py`` checks it bitwise on CPU).
A non-finite loss or gradient norm stops the run with a ``TrainError`` before the
optimizer step; no checkpoint is written then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.recipe import Recipe
from ..models.lm import HybridLM
from . import checkpoint as ckpt_mod
from . import distributed as dist_mod
from .config import TrainConfig, validate
from .cuda_graph import CaptureError, GradAccumulator, GraphedStep
from .data import open_stream
from .optim import build_optimizer, clip_grad_norm_, set_lr
from .schedule import from_config as lr_factor_of
from .tasks import masked_correct


class TrainError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable output folder): one line."""


@dataclass
class RunOptions:
    out: Path
    resume: bool = False
    device: str | None = None
    compile: str | None = None  # torch.compile mode (default | reduce-overhead | max-autotune | ...); None = eager
    cuda_graph: bool = False  # replay the training forward+backward from CUDA graphs (training/cuda_graph.py)
    stop_after: int | None = None  # end this run at this step (the schedule keeps cfg.steps)
    time_limit: float | None = None  # end this run (eval + checkpoint) once this many seconds have passed
    progress: bool = True
    recipe_name: str = "the recipe"
    overrides: dict[str, Any] = field(default_factory=dict)  # flags given on the command line
    log: Callable[[str], None] | None = None


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

    def line(self) -> str:
        ev = " ".join(f"{k} {_fmt(v)}" for k, v in self.eval.items())
        ck = f", checkpoint {self.checkpoint}" if self.checkpoint else ""
        resumed = f" (resumed at {self.start_step})" if self.start_step else ""
        of = f" of {self.total}" if self.steps < self.total else ""
        return (f"done: {self.steps}{of} steps{resumed} in {self.seconds:.1f}s, loss {self.final_loss:.4f}"
                f"{', ' + ev if ev else ''}, {self.tokens_per_s:,.0f} tokens/s{ck}")


def _rate(steps: int, tokens_per_step: int, seconds: float, first_seconds: float | None) -> float:
    """Training tokens/s of a run: without its first step when there are more (that one also
    pays one-time costs: Triton compiles and autotuning, CUDA-graph warm-up), so short runs
    in different modes compare."""
    if steps > 1 and first_seconds is not None and seconds > first_seconds:
        return (steps - 1) * tokens_per_step / (seconds - first_seconds)
    return steps * tokens_per_step / max(seconds, 1e-9)


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


# --------------------------------------------------------------------------- helpers


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


def _scalar_stats(stats: dict | None) -> dict[str, Any]:
    """JSON-friendly routing statistics: scalars as floats, short vectors as lists."""
    out: dict[str, Any] = {}
    for k, v in (stats or {}).items():
        if isinstance(v, torch.Tensor):
            if v.numel() == 1:
                out[k] = float(v.detach().float())
            elif v.dim() == 1 and v.numel() <= 64:
                out[k] = [round(float(x), 6) for x in v.detach().float().cpu()]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    ev = [r for r in rows if "eval_loss" in r]
    metric = "eval_accuracy" if any("eval_accuracy" in r for r in ev) else "eval_ppl"
    fig, axes = plt.subplots(1, 2 if ev else 1, figsize=(10 if ev else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in rows], lw=1, label="train loss")
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", ms=3, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if ev:
        ax2 = axes[0, 1]
        ax2.plot([r["step"] for r in ev], [r.get(metric, float("nan")) for r in ev], "o-", ms=3, color="C2")
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, recipe: Recipe, cfg: TrainConfig, opts: RunOptions):
        self.recipe = recipe
        self.cfg = cfg
        self.opts = opts
        self.out = Path(opts.out)

    def log(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self.opts.log is not None:
            self.opts.log(msg)
            return
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        try:
            self.info = dist_mod.init(self.opts.device)
        except ValueError as e:
            raise TrainError(str(e)) from None
        check_writable(self.out)
        existing = ckpt_mod.latest(self.out)
        self.resume_from = existing if self.opts.resume else None
        if existing is not None and not self.opts.resume:
            raise TrainError(f"--out {self.out}: already holds checkpoints (newest {existing.name}); "
                             "pass --resume to continue it, or choose another --out")
        self.start_step, self.samples, self.tokens_seen = 0, 0, 0
        state = None
        if self.resume_from is not None:
            state = ckpt_mod.read_state(self.resume_from)
            self.cfg = self._resumed_config(state)
        elif self.opts.resume:
            self.log(f"no checkpoint in {self.out}: starting from scratch")
        cfg = self.cfg
        if self.opts.stop_after is not None and self.opts.stop_after > cfg.steps:
            raise TrainError(f"--stop-after {self.opts.stop_after}: must be <= --steps ({cfg.steps})")

        torch.manual_seed(cfg.seed)
        model = HybridLM(self.recipe)
        if state is not None:
            assert self.resume_from is not None
            full = ckpt_mod.load_model_state(self.resume_from, self.recipe, self.opts.recipe_name)
            model.load_state_dict(full)
            self.start_step = state["step"]
            self.samples = int(state["samples"])
            self.tokens_seen = int(state.get("tokens", 0))
        model = model.to(self.info.device)
        if self.info.enabled:
            dist_mod.shard_model(model, self.info)
        self.model = model
        self.opt, self.split = build_optimizer(model, cfg)
        if self.resume_from is not None:
            ckpt_mod.load_optimizer(self.resume_from, model, self.opt, self.info)
            ckpt_mod.load_rng(self.resume_from, self.info)
        self.fwd = model
        if self.opts.compile is not None:
            self.fwd = torch.compile(model, mode=None if self.opts.compile == "default" else self.opts.compile)
        self.graphed = None
        if self.opts.cuda_graph:
            self.graphed = self._capture()

        cache_dir = self.out / "data"
        if self.info.is_main:
            self.stream = open_stream(cfg.data, cfg.seq_len, self.recipe.model.vocab_size, cfg.seed, cfg,
                                      cache_dir, cfg.tokenizer)
        dist_mod.barrier(self.info)
        if not self.info.is_main:
            self.stream = open_stream(cfg.data, cfg.seq_len, self.recipe.model.vocab_size, cfg.seed, cfg,
                                      cache_dir, cfg.tokenizer)
        if state is not None and state.get("data", {}).get("kind") != self.stream.state()["kind"]:
            raise TrainError(f"--data {cfg.data}: the checkpoint {self.resume_from} was trained on "
                             f"{state.get('data', {}).get('kind')} data")
        self.rows = read_metrics(self.out / "metrics.jsonl", upto=self.start_step)
        if self.info.is_main:
            self._rewrite_metrics()
        n_params = sum(p.numel() for p in model.parameters())
        dev = self.info.device
        where = f"{dev}" + (f" x{self.info.world} (FSDP2)" if self.info.enabled else "")
        self.log(f"model {self.recipe.name}: {n_params / 1e6:.2f}M params, pattern {self.recipe.pattern}")
        self.log(f"data: {self.stream.description}")
        self.log(f"optimizer: {self.split.describe()}; schedule {cfg.schedule}, warmup {cfg.warmup_steps}; "
                 f"device {where}")
        if self.resume_from is not None:
            self.log(f"resumed from {self.resume_from} (step {self.start_step})")

    def _capture(self) -> GraphedStep:
        """Capture the training step in CUDA graphs (``--cuda-graph``), at the run's batch shape."""
        if self.opts.compile is not None:
            raise TrainError("--cuda-graph: use it instead of --compile / --compile-mode, not with them")
        if self.info.enabled:
            raise TrainError("--cuda-graph: one process only (FSDP2's collectives are not captured)")
        cfg, dev = self.cfg, self.info.device
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        ids = torch.randint(self.recipe.model.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g).to(dev)
        self.model.train()
        try:
            graphed = GraphedStep(self.model, ids, ids.clone(), lambda: _autocast(cfg, dev, cache=False))
        except CaptureError as e:
            raise TrainError(str(e)) from None
        self.log(f"cuda graph: training forward+backward captured at batch {cfg.batch_size} x {cfg.seq_len}")
        return graphed

    def _resumed_config(self, state: dict[str, Any]) -> TrainConfig:
        saved = state.get("train_config")
        if not isinstance(saved, dict):
            raise ckpt_mod.CheckpointError(f"{self.resume_from / ckpt_mod.STATE_FILE}: no train_config")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        try:
            base = TrainConfig(**{k: v for k, v in saved.items() if k in known})
        except TypeError as e:
            raise ckpt_mod.CheckpointError(f"{self.resume_from / ckpt_mod.STATE_FILE}: bad train_config ({e})") from None
        cfg = dataclasses.replace(base, **self.opts.overrides)
        validate(cfg, self.recipe.model, self.opts.overrides, str(self.resume_from / ckpt_mod.STATE_FILE))
        return cfg

    def _rewrite_metrics(self) -> None:
        p = self.out / "metrics.jsonl"
        tmp = p.with_name(f".metrics.jsonl.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, p)

    # ------------------------------------------------------------------ steps
    def _micro_indices(self, micro: int) -> range:
        B, W = self.cfg.batch_size, self.info.world
        start = self.samples + (micro * W + self.info.rank) * B
        return range(start, start + B)

    def train_step(self, step: int) -> dict[str, Any]:
        cfg, dev = self.cfg, self.info.device
        factor = lr_factor_of(cfg, step)
        set_lr(self.opt, factor)
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        aux_sum = None
        stats = None
        acc = GradAccumulator() if self.graphed is not None and cfg.grad_accum > 1 else None
        for micro in range(cfg.grad_accum):
            batch = self.stream.train(self._micro_indices(micro))
            ids, labels = batch.input_ids.to(dev), batch.labels.to(dev)
            if self.info.enabled and cfg.grad_accum > 1:
                self.model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            if self.opts.compile is not None:  # CUDA-graph modes: outputs of the previous step may be reused
                torch.compiler.cudagraph_mark_step_begin()
            if self.graphed is not None:
                loss_t, aux_t, stats = self.graphed(ids, labels)
            else:
                with _autocast(cfg, dev):
                    out = self.fwd(ids, labels=labels)
                loss_t, aux_t, stats = out.loss, out.aux_loss, out.stats
            (loss_t / cfg.grad_accum).backward()
            if acc is not None:
                acc.take(list(self.model.parameters()))
            loss_sum += loss_t.detach().double()
            if aux_t is not None:
                a = aux_t.detach().double()
                aux_sum = a if aux_sum is None else aux_sum + a
        if acc is not None:
            acc.restore()
        vals = [float(loss_sum) / cfg.grad_accum]
        if aux_sum is not None:
            vals.append(float(aux_sum) / cfg.grad_accum)
        vals = dist_mod.all_reduce(vals, self.info)
        loss = vals[0]
        if not math.isfinite(loss):
            raise TrainError(self._nonfinite(step, f"loss is {loss}"))
        params = [p for p in self.model.parameters() if p.grad is not None]
        gnorm = None
        if cfg.grad_clip > 0:
            gnorm = float(clip_grad_norm_(params, cfg.grad_clip))
            if not math.isfinite(gnorm):
                raise TrainError(self._nonfinite(step, f"gradient norm is {gnorm}"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._update_biases()
        self.samples += cfg.batch_size * cfg.grad_accum * self.info.world
        row: dict[str, Any] = {"step": step + 1, "loss": loss, "lr": cfg.lr * factor}
        if self.split.muon or self.split.muon_stacked:
            row["muon_lr"] = cfg.muon_lr * factor
        if gnorm is not None:
            row["grad_norm"] = gnorm
        if aux_sum is not None:
            row["aux_loss"] = vals[1]
        row.update({f"moe/{k}" if not k.startswith("moe") else k: v for k, v in _scalar_stats(stats).items()})
        return row

    def _update_biases(self) -> None:
        """Call ``update_bias()`` (aux-loss-free MoE balancing) on every module that has one.
        Under FSDP the load a module counted (its ``load`` buffer) is first summed over
        ranks, so every rank applies the same bias update."""
        for mod in self.model.modules():
            if mod is self.model or not callable(getattr(mod, "update_bias", None)):
                continue
            load = getattr(mod, "load", None)
            if self.info.enabled and isinstance(load, torch.Tensor):
                import torch.distributed as tdist

                tdist.all_reduce(load, op=tdist.ReduceOp.SUM)
            mod.update_bias()

    def _nonfinite(self, step: int, what: str) -> str:
        last = ckpt_mod.latest(self.out)
        keep = f"the last good checkpoint {last} is untouched" if last else "no checkpoint was written"
        return (f"step {step + 1}: {what}; stopping ({keep}). Try a lower --lr, more warmup "
                f"or a smaller grad_clip")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        cfg, dev, info = self.cfg, self.info.device, self.info
        self.model.eval()
        B = cfg.batch_size
        n_batches = cfg.eval_batches
        n_eval = self.stream.n_eval()
        if n_eval is not None:  # never more batches than held-out windows need
            n_batches = max(1, min(n_batches, math.ceil(n_eval / (B * info.world))))
        loss_sum, correct, total = 0.0, 0, 0
        for k in range(n_batches):
            start = (k * info.world + info.rank) * B
            batch = self.stream.eval(range(start, start + B))
            ids, labels = batch.input_ids.to(dev), batch.labels.to(dev)
            if self.opts.compile is not None:
                torch.compiler.cudagraph_mark_step_begin()
            with _autocast(cfg, dev):
                out = self.fwd(ids)
            loss_sum += float(HybridLM.lm_loss(out.logits, labels))
            c, t = masked_correct(out.logits, labels)
            correct, total = correct + c, total + t
        loss_sum, correct, total = dist_mod.all_reduce([loss_sum, correct, total], info, op="sum")
        eval_loss = loss_sum / (n_batches * info.world)
        res = {"eval_loss": eval_loss}
        if self.stream.metric == "accuracy":
            res["eval_accuracy"] = correct / max(total, 1)
        else:
            res["eval_ppl"] = math.exp(min(eval_loss, 50.0))
        return res

    def save(self, step: int) -> Path:
        state = {
            "samples": self.samples, "tokens": self.tokens_seen, "world_size": self.info.world,
            "schedule": {"kind": self.cfg.schedule, "lr_factor": lr_factor_of(self.cfg, max(step - 1, 0))},
            "train_config": dataclasses.asdict(self.cfg), "data": self.stream.state(),
            "recipe_hash": self.recipe.hash(), "metrics": self.rows[-1] if self.rows else None,
        }
        return ckpt_mod.save(self.out, step, self.model, self.opt, state, self.info,
                             extra_files={"tokenizer.json": self.stream.tokenizer.to_json()},
                             keep_last=self.cfg.keep_last)

    # ------------------------------------------------------------------ run
    def run(self) -> Summary:
        self.setup()
        try:
            return self._loop()
        finally:
            dist_mod.shutdown(self.info)

    def _out_of_time(self, t_run: float) -> bool:
        """``time_limit`` passed (on any rank: the ranks agree, so all stop at the same step)."""
        if self.opts.time_limit is None:
            return False
        over = float(time.perf_counter() - t_run >= self.opts.time_limit)
        if self.info.enabled:
            over = dist_mod.all_reduce([over], self.info, op="sum")[0]
        return over > 0

    def _loop(self) -> Summary:
        cfg, info = self.cfg, self.info
        stop = self.opts.stop_after if self.opts.stop_after is not None else cfg.steps
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world
        metrics_file = open(self.out / "metrics.jsonl", "a") if info.is_main else None
        bar = None
        if info.is_main and self.opts.progress:
            from tqdm import tqdm

            bar = tqdm(total=stop, initial=self.start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                       desc="train", disable=None)
        t_run = time.perf_counter()
        train_seconds = 0.0
        rate = None
        last_eval: dict[str, float] = {}
        last_ckpt = None
        loss = float("nan")
        step = self.start_step
        first_seconds = None  # the run's first step also pays kernel compiles and autotuning
        try:
            for step in range(self.start_step, stop):
                t0 = time.perf_counter()
                row = self.train_step(step)
                if info.device.type == "cuda":
                    torch.cuda.synchronize(info.device)
                dt = time.perf_counter() - t0
                train_seconds += dt
                if first_seconds is None:
                    first_seconds = dt
                self.tokens_seen += tokens_per_step
                tps = tokens_per_step / max(dt, 1e-9)
                rate = tps if rate is None else 0.9 * rate + 0.1 * tps
                row["tokens_per_s"] = tps
                row["tokens"] = self.tokens_seen
                n = step + 1
                loss = row["loss"]
                last = n == stop or self._out_of_time(t_run)
                if n % cfg.eval_every == 0 or last:
                    last_eval = self.evaluate()
                    row.update(last_eval)
                    self.log(f"step {n}/{cfg.steps}: loss {loss:.4f}, "
                             + ", ".join(f"{k} {_fmt(v)}" for k, v in last_eval.items()))
                self.rows.append(row)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if "eval_loss" in row and info.is_main:
                    plot_metrics(self.rows, self.out / "loss.png", f"{self.recipe.name} ({cfg.data})",
                                 getattr(self.stream, "chance", None))
                if bar is not None:
                    post = {"loss": f"{loss:.4f}", "tok/s": f"{rate:,.0f}"}
                    if "eval_accuracy" in last_eval:
                        post["acc"] = f"{last_eval['eval_accuracy']:.3f}"
                    elif "eval_ppl" in last_eval:
                        post["ppl"] = f"{last_eval['eval_ppl']:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if n % cfg.save_every == 0 or last:
                    last_ckpt = self.save(n)
                if last:
                    if n < stop:
                        self.log(f"--time-limit {self.opts.time_limit:g}s reached at step {n}: stopping "
                                 f"(continue with --resume)")
                    break
        finally:
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
        seconds = time.perf_counter() - t_run
        reached = self.rows[-1]["step"] if self.rows and self.rows[-1]["step"] > self.start_step else self.start_step
        done = reached - self.start_step
        summary = Summary(steps=reached, total=cfg.steps, start_step=self.start_step, final_loss=loss, eval=last_eval,
                          tokens_per_s=_rate(done, tokens_per_step, train_seconds, first_seconds), seconds=seconds,
                          checkpoint=last_ckpt or ckpt_mod.latest(self.out), out=self.out)
        return summary


def train(recipe: Recipe, cfg: TrainConfig, opts: RunOptions) -> Summary:
    return Trainer(recipe, cfg, opts).run()

