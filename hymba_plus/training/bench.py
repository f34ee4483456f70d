"""Throughput of a recipe on one device (``hymba bench``), and the timing the benchmark scripts share.

Three measurements of a model built from the recipe (random weights, ``cfg.seed``), each the median over
timed calls after warm-up calls that are not timed, on a GPU between CUDA events recorded on the device's
current stream with the device synchronised after each call (``step_times``), on the CPU by
``time.perf_counter``:

1. the training step, ``Trainer.train_step`` itself (``trainer.py``): forward + backward of the objective's
   loss (next token, MTP, block diffusion, forecast, LaDiR), gradient clipping, the optimizer ``hymba train``
   builds for the recipe (``optim.build_optimizer``), under its precision rule (bf16 autocast on CUDA unless
   ``precision: fp32``) and its ``--mode`` (auto: CUDA graphs where they capture and agree; the optimizer step
   replayed from a CUDA graph from the second step, so on CUDA warm-up should be >= 2 steps); token
   objectives train on random token ids of the recipe's vocabulary (``RandomTokens``), LaDiR on its default
   reasoning task and forecasting on the synthetic series (no data files either way);
2. prefill: a forward without gradients of [batch, seq_len] random ids into a fresh cache, last logits only
   (what ``generate`` does before its first new token); forecasting: one ``forecast`` of [batch, context,
   channels] random values;
3. decode: ``model.generate`` greedy in ``--decode-mode`` (``DECODE_MODES``; ar, the default engine, by
   default), with the mode's options given (``BenchSettings.decode_options``: ``hymba generate``'s flags for it,
   e.g. MTP's ``k``, block diffusion's ``block_size`` / ``threshold`` / ``sampler`` / ``steps``) after a prompt
   of ``seq_len`` ids (shortened to fit ``max_seq_len``, less the positions the mode reserves: LaDiR's memory
   slots), timed with ``new`` and with 1 new tokens: ms per step = (t(new) - t(1)) / (new - 1), so prefill and the engine's one-time set-up (LaDiR: the latent sampling)
   do not count (``benchmarks/decode.py``'s measure; MTP: a step is one generated token on average over the
   rounds); block diffusion, whose forwards denoise whole blocks, is timed as the whole call instead: ms per
   generated token = t(new) / new, prompt prefill included (``CALL_MEASURED``). The decoder's own ``stats``
   (MTP: acceptance rate, tokens per trunk forward; block diffusion: tokens per forward, denoising steps per
   block; LaDiR: the Euler steps used) are those of the last timed call. Forecasting models generate no
   tokens and skip it.

Tokens are the positions the model runs: batch x seq_len x grad_accum for token data, the padded reasoning
examples for LaDiR, patch tokens (batch x channels x context / patch, channel-independent) for forecasting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..models.generation import reserved_positions
from .data import Batch

#: defaults where neither a flag nor the recipe's ``train:`` section sets them: (batch, seq_len) on the CPU
#: (a smoke run) and on CUDA (a realistic shape, seq_len capped at the recipe's ``max_seq_len``)
DEFAULT_SHAPE = {"cpu": (2, 64), "cuda": (8, 2048)}
#: (timed steps, warm-up steps, decode tokens) by device type
DEFAULT_RUN = {"cpu": (3, 1, 16), "cuda": (10, 3, 64)}
#: the ``generate`` modes ``hymba bench --decode-mode`` times: those of ``generation.GENERATORS`` that run with
#: the one model (``speculative`` needs a draft model; ``forecast`` generates no tokens)
DECODE_MODES = ("ar", "block_diffusion", "mtp", "ladir")
#: modes whose forward is not one token's step (a block per denoising pass): timed as the whole call
CALL_MEASURED = ("block_diffusion",)


def decode_mode_problem(recipe: Any, mode: str, prompt: int) -> str | None:
    """Why the recipe's model cannot ``generate(mode=mode)`` from a ``prompt``-token prompt (None: it can):
    the generators' own conditions (``models/generation.py``, ``mtp_decoding.py``, ``ladir_decoding.py``),
    read from the recipe, so that ``hymba bench`` refuses before it times anything."""
    kind = recipe.objective.kind if recipe.objective is not None else "next_token"
    if mode == "block_diffusion" and kind != "block_diffusion":
        return f"needs a model trained with the block_diffusion objective (the recipe's objective is {kind})"
    if mode == "mtp":
        if recipe.model.mtp is None:
            return "needs a model with MTP modules (the recipe has no model.mtp)"
        if prompt < recipe.model.mtp.depth:
            return (f"drafts {recipe.model.mtp.depth} tokens a round (model.mtp.depth) from a prompt of as many at "
                    f"least, got a {prompt}-token prompt: raise --seq-len or lower --decode-tokens")
    if mode == "ladir" and recipe.ladir is None:
        return "needs a model with latent reasoning (the recipe has no ladir section)"
    return None


def decode_options_problem(recipe: Any, mode: str, options: dict[str, Any]) -> tuple[str, str] | None:
    """(option, why) where the recipe's model cannot ``generate(mode=mode, **options)`` (None: it can): what the
    decoders check against the model (``mtp_decoding``'s ``k`` up to ``model.mtp.depth``, ``ladir_decoding``'s
    sampler settings by ``components.ladir.sampler_settings``, e.g. ``cfg_scale`` != 1 only with
    ``ladir.cfg_dropout``), read from the recipe, so that ``hymba bench`` refuses before it times anything."""
    if mode == "mtp" and options.get("k") is not None and options["k"] > recipe.model.mtp.depth:
        return "k", f"must be <= model.mtp.depth ({recipe.model.mtp.depth}), got {options['k']}"
    if mode == "ladir":
        from ..components.ladir import SAMPLER_SETTINGS, sampler_settings

        given = {k: v for k, v in options.items() if k in SAMPLER_SETTINGS}
        try:
            sampler_settings(recipe.ladir, **given)
        except ValueError as e:
            return next((k for k in given if str(e).startswith(k)), next(iter(given))), str(e)
    return None


def on_cuda(device: str | torch.device) -> bool:
    """Whether ``device`` ("cuda", "cuda:1", a torch.device) is a GPU: timed with a synchronize."""
    return torch.device(device).type == "cuda"


def step_times(fn: Callable[[], object], device: str | torch.device, warmup: int = 3, iters: int = 10) -> list[float]:
    """Milliseconds of each of ``iters`` calls of fn() after ``warmup`` untimed ones (CUDA events on a GPU,
    perf_counter on the CPU). On a GPU the events are recorded on ``device``'s current stream and ``device``
    is synchronised before the first timed call and after each one (``cuda:1`` while the current device is 0
    too: fn() launches on the stream of the device its tensors are on)."""
    for _ in range(warmup):
        fn()
    times = []
    if on_cuda(device):
        dev = torch.device(device)
        stream = torch.cuda.current_stream(dev)
        torch.cuda.synchronize(dev)
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(stream)
            fn()
            e.record(stream)
            torch.cuda.synchronize(dev)
            times.append(s.elapsed_time(e))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def median_ms(fn: Callable[[], object], device: str | torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() (``step_times``)."""
    return statistics.median(step_times(fn, device, warmup, iters))


def device_label(device: str | torch.device) -> str:
    """The GPU's name (of that index, ``cuda:1`` too), else the CPU's processor (``cpu`` where the platform
    does not say)."""
    return torch.cuda.get_device_name(torch.device(device)) if on_cuda(device) else platform.processor() or "cpu"


def decode_times(model: Any, ids: torch.Tensor, new: int, device: str | torch.device, warmup: int = 1,
                 iters: int = 3, per_call: bool = False, **gen_kw: Any) -> dict[str, Any]:
    """Greedy ``model.generate`` of ``new`` tokens after the prompt ``ids`` [B, T], and of 1: {prefill_ms
    (t(1)), total_ms (t(new)), engine (``stats['engine']``, where the decoder says), stats (the decoder's
    ``stats`` of the last call), measure, and ms_per_step and decode_tokens_per_s = B / step (measure
    ``step``), or note where t(new) <= t(1): steps below the timing noise}. ``per_call`` (a decoder whose
    forward is not one token's step): measure ``call``, ms_per_token = t(new) / new and decode_tokens_per_s =
    B x new / t(new) instead. Each time is the median of ``iters`` calls after ``warmup`` (the engine for the
    shape is made there). ``new`` >= 2."""
    stats: dict = {}

    def gen(n: int) -> None:
        model.generate(ids, max_new_tokens=n, stats=stats, **gen_kw)

    with torch.no_grad():
        t1 = median_ms(lambda: gen(1), device, warmup, iters)
        tn = median_ms(lambda: gen(new), device, warmup, iters)
    out: dict[str, Any] = {"prefill_ms": t1, "total_ms": tn, "measure": "call" if per_call else "step",
                           "stats": {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}}
    if stats.get("engine") is not None:
        out["engine"] = stats["engine"]
    if stats.get("engine_notice"):
        out["notice"] = stats["engine_notice"]
    if per_call:
        out["ms_per_token"] = tn / new
        out["decode_tokens_per_s"] = ids.shape[0] * new / tn * 1e3
    elif tn > t1:
        out["ms_per_step"] = step = (tn - t1) / (new - 1)
        out["decode_tokens_per_s"] = ids.shape[0] / step * 1e3
    else:  # a negative step time is noise, not a measurement
        out["note"] = (f"t(new) <= t(1) ({tn:.1f} <= {t1:.1f} ms): the decode steps are below the timing "
                       "noise; no step time (more new tokens or timed calls)")
    return out


class RandomTokens:
    """Training batches of random token ids in ``[0, vocab)`` ([rows, seq_len], labels = the ids: every next
    token scored), row ``i`` drawn from a generator seeded with (seed, i): the data ``hymba bench`` trains
    on (``RunOptions.stream``), which needs no file and fits any vocabulary and length."""

    metric = "ppl"
    tokenizer = None
    note = None

    def __init__(self, vocab: int, seq_len: int, seed: int = 0):
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed
        self.description = f"random token ids (vocab {vocab}, {seq_len} a row)"

    def train(self, indices: range) -> Batch:
        rows = [torch.randint(0, self.vocab, (self.seq_len,), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + i)) for i in indices]
        ids = torch.stack(rows)
        return Batch(ids, ids.clone())

    def state(self) -> dict[str, Any]:
        return {"kind": "random", "vocab": self.vocab, "seq_len": self.seq_len}


class _Counted:
    """A stream whose ``train`` batches' positions are added up (``tokens``): what a training step ran."""

    def __init__(self, inner: Any, positions: Callable[[Batch], int]):
        self.inner, self.positions, self.tokens = inner, positions, 0

    def train(self, indices: range) -> Batch:
        b = self.inner.train(indices)
        self.tokens += self.positions(b)
        return b

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclasses.dataclass
class BenchSettings:
    device: str  # cpu, cuda, cuda:N
    batch: int
    seq_len: int | None  # None: a forecast recipe (windows of objective.context values)
    steps: int
    warmup: int
    mode: str  # hymba train --mode
    decode_tokens: int
    dtype: torch.dtype  # the weights' dtype for prefill and decode
    decode_mode: str = "ar"  # generate's mode (DECODE_MODES)
    decode_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # generate's options for that mode
    phases: tuple[str, ...] = ("train", "prefill", "decode")


def default_settings(recipe: Any, device: str) -> dict[str, int | None]:
    """batch, seq_len, steps, warmup and decode_tokens where no flag gives them: the recipe's ``train:``
    batch_size / seq_len where it sets them (a value other than ``TrainConfig``'s default), else
    ``DEFAULT_SHAPE`` of the device type (seq_len capped at ``max_seq_len``; None for forecasting), and
    ``DEFAULT_RUN``'s."""
    from .config import TrainConfig

    kind = "cuda" if on_cuda(device) else "cpu"
    batch, seq_len = DEFAULT_SHAPE[kind]
    base, t = TrainConfig(), recipe.train
    if t is not None and t.batch_size != base.batch_size:
        batch = t.batch_size
    if t is not None and t.seq_len != base.seq_len:
        seq_len = t.seq_len
    elif recipe.model.max_seq_len is not None:
        seq_len = min(seq_len, recipe.model.max_seq_len)
    steps, warmup, new = DEFAULT_RUN[kind]
    return {"batch": batch, "seq_len": None if recipe.model.vocab_size is None else seq_len, "steps": steps,
            "warmup": warmup, "decode_tokens": new}


def _autocast_name(cfg: Any, device: torch.device) -> str:
    from .trainer import _autocast

    return "bf16 autocast" if isinstance(_autocast(cfg, device), torch.autocast) else "float32"


def bench_recipe(recipe: Any, s: BenchSettings, recipe_name: str = "the recipe",
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The report of ``hymba bench`` (the module docstring): {recipe, device, torch, params_total /
    params_active (``hymba info``'s count), settings, train, prefill, decode}; each phase a dict of its
    numbers, or {skipped: why}; ``train.log``: the lines the trainer's set-up said (model, optimizer, the
    training mode and why), unless ``log`` takes them. Raises what ``Trainer`` raises (TrainError,
    TrainUsageError, ...)."""
    from ..cli.info import describe
    from ..objectives import objective_class
    from .config import TrainConfig
    from .trainer import RunOptions, Trainer

    dev = torch.device(s.device)
    info = describe(recipe, seq_lens=(s.seq_len or 1,), probe=False)  # (the run probes what it uses)
    obj_cls = objective_class(recipe)
    kind = recipe.objective.kind if recipe.objective is not None else "next_token"
    report: dict[str, Any] = {
        "recipe": recipe.name, "source": str(recipe.source) if recipe.source else recipe_name,
        "objective": kind, "pattern": info["pattern_compact"],
        "device": device_label(dev), "device_type": dev.type, "torch": torch.__version__,
        "params_total": info["params_total"], "params_active": info["params_active"],
        "settings": {"batch": s.batch, "seq_len": s.seq_len, "steps": s.steps, "warmup": s.warmup, "mode": s.mode,
                     "decode_tokens": s.decode_tokens, "decode_mode": s.decode_mode,
                     "decode_options": dict(s.decode_options), "dtype": str(s.dtype).replace("torch.", "")},
    }
    base = recipe.train if recipe.train is not None else TrainConfig()
    over: dict[str, Any] = {"batch_size": s.batch, "steps": s.warmup + s.steps, "data": obj_cls.default_data}
    if s.seq_len is not None:
        over["seq_len"] = s.seq_len
    cfg = dataclasses.replace(base, **over)
    model = None
    if "train" in s.phases:
        if obj_cls.needs_series:  # patch tokens of the windows the model runs
            oc = recipe.objective
            per_row = oc.n_patches * (oc.channels if oc.channel_independent else 1)

            def positions(b: Batch) -> int:
                return b.input_ids.shape[0] * per_row
        else:
            def positions(b: Batch) -> int:
                return b.input_ids.numel()
        stream = None if obj_cls.needs_segments or obj_cls.needs_series else RandomTokens(
            recipe.model.vocab_size, cfg.seq_len, cfg.seed)
        with tempfile.TemporaryDirectory(prefix="hymba-bench-") as tmp:
            notes: list[str] = []
            opts = RunOptions(out=Path(tmp) / "run", device=s.device, mode=s.mode, progress=False,
                              recipe_name=recipe_name, log=(log or notes.append), stream=stream)
            trainer = Trainer(recipe, cfg, opts)
            try:
                if on_cuda(dev):
                    torch.cuda.reset_peak_memory_stats(dev)
                trainer.setup()
                counted = trainer.stream = _Counted(trainer.stream, positions)
                n = iter(range(s.warmup + s.steps))
                tokens: list[int] = []

                def step() -> None:
                    counted.tokens = 0
                    trainer.train_step(next(n))
                    tokens.append(counted.tokens)

                times = step_times(step, dev, s.warmup, s.steps)
                ms, tok = statistics.median(times), statistics.median(tokens[s.warmup:])
                tok = int(tok) if float(tok).is_integer() else tok  # (a count: the median of 2 steps is a mean)
                train = {"ms_per_step": ms, "tokens_per_step": tok, "tokens_per_s": tok / ms * 1e3,
                         "mode": trainer.run_mode, "precision": _autocast_name(trainer.cfg, dev),
                         "optimizer": trainer.split.describe(), "data": trainer.stream.description,
                         "grad_accum": trainer.cfg.grad_accum, "log": notes}
                if on_cuda(dev):
                    train["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
                report["train"] = train
                model = trainer.model
            finally:
                trainer.close()
            del trainer, counted  # (the optimizer's state, the captured graphs: not kept through prefill / decode)
            gc.collect()
    else:
        torch.manual_seed(cfg.seed)
        from ..models.lm import HybridLM

        model = HybridLM(recipe).to(dev)
    if on_cuda(dev):
        torch.cuda.empty_cache()
    model = model.to(dtype=s.dtype).eval()
    # cuda:N the current device meanwhile (the trainer made it so for its steps): the decode engine's CUDA-graph
    # capture and the calls that take no device act on the current one
    with torch.cuda.device(dev) if on_cuda(dev) else contextlib.nullcontext():
        if "prefill" in s.phases:
            report["prefill"] = _prefill(model, recipe, s, dev, obj_cls)
        if "decode" in s.phases:
            report["decode"] = _decode(model, recipe, s, dev, obj_cls)
    from ..kernels import dispatch

    report["kernels"] = dispatch.statuses()  # the fast paths the run asked for (True / why not), None: not asked
    return report


def _prefill(model: Any, recipe: Any, s: BenchSettings, dev: torch.device, obj_cls: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    if obj_cls.needs_series:
        oc = recipe.objective
        x = torch.randn(s.batch, oc.context, oc.channels, generator=g).to(dev)
        tokens = s.batch * oc.n_patches * (oc.channels if oc.channel_independent else 1)

        def fn() -> None:
            model.objective.forecast(model, x)
    else:
        ids = torch.randint(0, recipe.model.vocab_size, (s.batch, s.seq_len), generator=g).to(dev)
        tokens = ids.numel()

        def fn() -> None:
            model(ids, cache=model.new_cache(s.batch), logits_to_keep=1, check_inputs=False)

    with torch.no_grad():
        ms = median_ms(fn, dev, s.warmup, s.steps)
    return {"ms": ms, "tokens": tokens, "tokens_per_s": tokens / ms * 1e3}


def decode_prompt(recipe: Any, seq_len: int, new: int, reserved: int = 0) -> int:
    """The decode benchmark's prompt length: ``seq_len``, shortened so that prompt + ``new`` + the ``reserved``
    positions of the mode (``generation.reserved_positions``) fit ``max_seq_len``."""
    return min(seq_len, recipe.model.max_seq_len - new - reserved)


def _decode(model: Any, recipe: Any, s: BenchSettings, dev: torch.device, obj_cls: Any) -> dict[str, Any]:
    if obj_cls.needs_series:
        return {"skipped": "a forecasting model generates no tokens (it forecasts a horizon in one forward: "
                           "see prefill)"}
    prompt = decode_prompt(recipe, s.seq_len, s.decode_tokens, reserved_positions(recipe, s.decode_mode))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, recipe.model.vocab_size, (s.batch, prompt), generator=g).to(dev)
    out = decode_times(model, ids, s.decode_tokens, dev, warmup=max(s.warmup, 1), iters=s.steps,
                       per_call=s.decode_mode in CALL_MEASURED, mode=s.decode_mode, **s.decode_options)
    return {"mode": s.decode_mode, "prompt": prompt, "new_tokens": s.decode_tokens, **out}


def decoder_brief(d: dict[str, Any]) -> str:
    """The table's short form of a decoder's ``stats`` (``decode_times``), for the modes but ar: e.g. ``mtp:
    acceptance 0.50, 1.50 tokens/trunk forward``; empty for ar (its engine is said apart)."""
    st, mode = d.get("stats", {}), d.get("mode", "ar")
    if mode == "ar":
        return ""
    parts = []
    if "acceptance_rate" in st:
        parts.append(f"acceptance {st['acceptance_rate']:.2f}")
    if "tokens_per_target_forward" in st:
        parts.append(f"{st['tokens_per_target_forward']:.2f} tokens/trunk forward")
    elif "tokens_per_forward" in st:
        parts.append(f"{st['tokens_per_forward']:.2f} tokens/forward")
    if "steps_per_block" in st:
        parts.append(f"{st['steps_per_block']:.2f} steps/block")
    if "mean_steps" in st:
        parts.append(f"{st['mean_steps']:.2f} of {st['steps']} latent steps")
    return f", {mode}: " + ", ".join(parts) if parts else f", {mode}"


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def format_report(r: dict[str, Any]) -> str:
    """The compact table ``hymba bench`` prints."""
    st = r["settings"]
    shape = f"batch {st['batch']}" + (f" x seq_len {st['seq_len']}" if st["seq_len"] is not None else "")
    lines = [f"{r['recipe']} ({r['objective']}, {r['pattern']}): {r['params_total']:,} params, "
             f"{r['params_active']:,} active",
             f"{r['device']} ({r['device_type']}), torch {r['torch']}; {shape}; median of {st['steps']} after "
             f"{st['warmup']} warm-up"]
    rows = [("phase", "ms", "tokens/s", "detail")]
    t = r.get("train")
    if t is not None:
        mem = f", peak {t['peak_memory_bytes'] / 2**30:.2f} GiB" if "peak_memory_bytes" in t else ""
        rows.append(("train step", _num(t["ms_per_step"]), _num(t["tokens_per_s"]),
                     f"{t['tokens_per_step']:,} tokens, {t['mode']}, {t['precision']}{mem}"))
    p = r.get("prefill")
    if p is not None:
        rows.append(("prefill", _num(p["ms"]), _num(p["tokens_per_s"]), f"{p['tokens']:,} tokens, {st['dtype']}"))
    d = r.get("decode")
    if d is not None:
        if "skipped" in d:
            rows.append(("decode", "-", "-", f"skipped: {d['skipped']}"))
        elif "ms_per_step" in d or "ms_per_token" in d:
            per = ("ms/step" if "ms_per_step" in d else "ms/token of the whole call")
            rows.append(("decode", _num(d.get("ms_per_step", d.get("ms_per_token"))), _num(d["decode_tokens_per_s"]),
                         f"{per}, {d['new_tokens']} new after {d['prompt']}, {st['dtype']}"
                         + (f", engine {d['engine']}" if "engine" in d else "") + decoder_brief(d)))
        else:
            rows.append(("decode", "-", "-", d["note"]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
    return "\n".join(lines)
