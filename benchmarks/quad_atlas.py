"""Training throughput of the Quad-Hybrid recipe next to the same recipe with its ATLAS layers
swapped for gdn (issue 18: the recipe with ATLAS trains at >= 50% of the tokens/s of the
recipe with gdn in their place).

    python benchmarks/quad_atlas.py --out benchmarks/results/quad_atlas_h200.json          # GPU, 8 x 2048
    python benchmarks/quad_atlas.py --atlas-reference --modes auto eager                    # GPU, + ATLAS reference
    python benchmarks/quad_atlas.py --device cpu --batch 2 --seq-len 32 --iters 2           # CPU smoke test
    python benchmarks/quad_atlas.py --modes auto --atlas-config inner_optimizer=muon_chunk  # GPU, NS per chunk

Recipes: ``--recipe`` (default ``configs/quad_hybrid_tiny.yaml``) and its copy whose layer list
has gdn wherever the original has atlas (``swap_atlas``: the recipe's layers, from its
block_pattern or layout, with each atlas mixer renamed and its ffn kept, written back as a flat
block_pattern and validated by the recipe loader; the gdn layers use the recipe's gdn section).
``--atlas-config KEY=VALUE`` sets keys of the recipe's atlas section first (e.g.
``inner_optimizer=muon_chunk``: Newton-Schulz once per memory chunk; a bad key or value is a
one-line error, exit 2).

Each row is one recipe in one training mode, run by the project's own training step: a
``Trainer`` (``hymba_plus/training/trainer.py``) set up as ``hymba train`` sets it up (the
recipe's ``train:`` settings with ``--batch`` / ``--seq-len`` / ``--data`` / ``--optimizer``
over them: by default Muon + AdamW, bf16 autocast on CUDA, the fused loss, mqar data), then
``Trainer.train_step`` timed with ``timing.bench`` (median; CUDA events on a GPU): the batch
from the data stream, forward + loss + backward (or the replay of the captured CUDA graphs),
gradient clipping, the optimizer step (replayed from its own CUDA graph from the second step on, as
``hymba train`` does unless ``--mode eager``) and the MoE bias update. The first step is timed
apart (``first_step_s``: compiles, autotuning, optimizer state), then ``--warmup`` - 1
more steps, then ``--iters`` timed ones.

Modes (``--modes``): ``auto`` is ``hymba train``'s default (on CUDA: the forward+backward
captured in CUDA graphs when the run allows it and the graphed loss matches the eager one on
the first batch, else eager; on the CPU: eager), ``eager`` and ``cuda-graph`` are forced. The
mode each row ran in is ``mode`` (``mode_note``: the trainer's line saying why). ATLAS runs
on its dispatched path (the fast path: on CUDA compiled, on the CPU eager); ``--atlas-reference``
adds rows with ATLAS forced to the reference (every other op as dispatched). ``atlas_path``
is what the dispatch answered for atlas during the row (fast / reference / mixed).

Per row: ``step_ms``, ``tokens_per_s`` (batch x seq_len x grad_accum per step; meta tokens not
counted, as ``hymba train`` counts), ``peak_gib`` (``torch.cuda.max_memory_allocated`` over
the steps after setup, CUDA graph pools included), ``data_ms`` (median time to make one batch,
inside ``step_ms``: the same for both recipes), ``tf32`` (``--tf32``: float32 matmuls in TF32 for
both recipes, i.e. the ATLAS memory's). Ratios: ATLAS tokens/s / gdn tokens/s per
requested mode; ``ratio_default`` is the ``auto`` one (what ``hymba train`` runs), target 0.5.
Prints a table and writes JSON with the device name (rewritten after every row).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from timing import bench, device_arg, profile_passes, use_device, versions  # benchmarks/timing.py

import hymba_plus  # noqa: F401  (registers components)
from hymba_plus.core import registry
from hymba_plus.core.pattern import LayerSpec, format_pattern
from hymba_plus.core.recipe import Recipe, RecipeError, load_recipe
from hymba_plus.kernels import atlas as atlas_kernels
from hymba_plus.kernels import dispatch
from hymba_plus.training import distributed as dist_mod
from hymba_plus.training.config import TrainConfig, validate
from hymba_plus.training.trainer import RunOptions, Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "configs" / "quad_hybrid_tiny.yaml"
TARGET = 0.5  # issue 18: ATLAS recipe tokens/s >= 50% of the gdn-swapped recipe's
MODES = ("auto", "eager", "cuda-graph")  # training/trainer.py's TRAIN_MODES without compile


def swap_atlas(recipe: Recipe, to: str = "gdn") -> Recipe:
    """``recipe`` with every atlas token mixer replaced by ``to`` (ffns, layer order and every
    other setting kept). Works on the resolved layer list, so any block_pattern (aliases,
    groups, repeats, ``+ffn``) or ratio layout is handled; the result has a flat block_pattern,
    checked to resolve to exactly the swapped layers. ValueError when there is no atlas layer."""
    atlas, target = registry.canonical("atlas"), registry.canonical(to)
    want = [LayerSpec(target if s.mixer == atlas else s.mixer, s.ffn) for s in recipe.layers]
    if want == list(recipe.layers):
        raise ValueError(f"recipe {recipe.name!r} has no atlas layer (pattern {recipe.pattern})")
    d = recipe.to_dict()
    d["name"] = f"{recipe.name}-atlas-to-{to}"
    d["model"].pop("layout", None)
    d["model"]["block_pattern"] = format_pattern(want)
    swapped = load_recipe(d)
    assert list(swapped.layers) == want, (swapped.pattern, format_pattern(want))
    return swapped


def atlas_config_item(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--atlas-config`` -> (KEY, the value as YAML reads it)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE (a key of the recipe's atlas section)")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not YAML ({str(e).splitlines()[0]})") from None


def with_atlas_config(recipe: Recipe, items: list[tuple[str, object]]) -> Recipe:
    """``recipe`` with its ``components.atlas`` keys set to ``items`` (checked by the recipe
    loader: a RecipeError names a bad key or value)."""
    if not items:
        return recipe
    d = recipe.to_dict()
    d["components"].setdefault("atlas", {}).update(dict(items))
    d["name"] = f"{recipe.name}-" + "-".join(f"{k}={v}" for k, v in items)
    return load_recipe(d)


@contextlib.contextmanager
def atlas_dispatch(reference: bool) -> Iterator[set[bool]]:
    """Within the block: the dispatch's answers for atlas are collected in the yielded set,
    and with ``reference`` atlas is forced to its reference path (other ops as dispatched)."""
    orig, seen = dispatch.use_fast, set()

    def use_fast(name: str, *tensors: torch.Tensor) -> bool:
        if name not in atlas_kernels.FAST_PATHS:  # atlas has a fast path per device type
            return orig(name, *tensors)
        ans = False if reference else orig(name, *tensors)
        if all(t.device.type == dispatch.device_of(name) for t in tensors):  # the answer for this device
            seen.add(ans)
        return ans

    dispatch.use_fast = use_fast
    try:
        yield seen
    finally:
        dispatch.use_fast = orig


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def train_config(recipe: Recipe, args: argparse.Namespace, steps: int = 10**6) -> TrainConfig:
    """``hymba train``'s settings for this run: the recipe's train section (else the defaults)
    with the benchmark's flags over it (``--data``, ``--optimizer``, ``--precision``, ``--tf32``
    where the script has them), ``steps`` steps, evaluation and checkpoints never before the end,
    checked as the CLI checks them."""
    over = {"batch_size": args.batch, "seq_len": args.seq_len, "steps": steps, "eval_every": 10**6,
            "save_every": 10**6}
    for key in ("data", "optimizer", "precision", "tf32"):
        if getattr(args, key, None) is not None:
            over[key] = getattr(args, key)
    cfg = dataclasses.replace(recipe.train if recipe.train is not None else TrainConfig(), **over)
    validate(cfg, recipe.model, over, str(recipe.source or recipe.name))
    return cfg


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_row(label: str, recipe: Recipe, mode: str, reference: bool, args: argparse.Namespace) -> dict:
    """Set up a Trainer for ``recipe`` in ``mode`` and time its training step."""
    row: dict = {"recipe": label, "name": recipe.name, "pattern": recipe.pattern, "mode_requested": mode,
                 "atlas": ("reference (forced)" if reference else "as dispatched") if label != "gdn" else None}
    notes: list[str] = []
    trainer = None
    with tempfile.TemporaryDirectory(prefix="hymba-quad-atlas-") as tmp, atlas_dispatch(reference) as seen:
        try:
            cfg = train_config(recipe, args)
            row["tf32"] = bool(cfg.tf32)
            opts = RunOptions(out=Path(tmp) / "run", device=args.device, mode=mode, progress=False,
                              recipe_name=str(recipe.source or recipe.name), log=notes.append)
            trainer = Trainer(recipe, cfg, opts)
            t0 = time.perf_counter()
            trainer.setup()  # auto / cuda-graph: the capture (and auto's check) happens here
            dev = trainer.info.device
            sync(dev)
            row["setup_s"] = round(time.perf_counter() - t0, 3)
            row["mode"] = trainer.run_mode
            row["mode_note"] = next((n.split(": ", 1)[1] for n in notes if n.startswith("training mode:")), None)
            row["parameters"] = sum(p.numel() for p in trainer.model.parameters())
            row["tokens_per_step"] = tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            steps = iter(range(10**6))
            losses: list[float] = []

            def step() -> None:
                losses.append(trainer.train_step(next(steps))["loss"])  # ends with a host read of the loss

            t0 = time.perf_counter()
            step()
            sync(dev)
            row["first_step_s"] = round(time.perf_counter() - t0, 3)
            ms = bench(step, str(dev), max(args.warmup - 1, 0), args.iters)
            row["step_ms"] = ms
            row["tokens_per_s"] = tokens / (ms / 1e3)
            row["loss_first_last"] = [losses[0], losses[-1]]
            if dev.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
            if args.profile:  # where the step's time goes: top kernels, kernel and host ms per step
                print(f"--- profile: {label}, {row['mode']}", flush=True)
                row["profile"] = profile_passes(step, str(dev), passes=2, rows=args.profile_rows)
            idx = range(cfg.batch_size)
            row["data_ms"] = statistics.median(_ms(lambda: trainer.stream.train(idx)) for _ in range(5))
        except Exception as e:  # noqa: BLE001 - report and go on with the other rows
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            row["error"] = f"{type(e).__name__}: {msg}"[:400]
        finally:
            if trainer is not None and hasattr(trainer, "info"):
                dist_mod.shutdown(trainer.info)
            trainer = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row["atlas_path"] = ({frozenset({True}): "fast", frozenset({False}): "reference"}.get(frozenset(seen), "mixed")
                             if seen else None)
    return row


def _ms(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def ratios(rows: list[dict]) -> dict:
    """ATLAS / gdn tokens/s per requested mode (and the reference rows' too)."""
    out: dict = {}
    tps = {(r["recipe"], r["mode_requested"]): r.get("tokens_per_s") for r in rows}
    for (label, mode), v in tps.items():
        if label == "gdn":
            continue
        base = tps.get(("gdn", mode))
        key = f"{label}_vs_gdn_{mode}"
        out[key] = v / base if v and base else None
    out["ratio_default"] = out.get("atlas_vs_gdn_auto")
    out["target"] = TARGET
    # the ATLAS recipe's step that would meet the target against this gdn twin (same tokens per step)
    twin = next((r.get("step_ms") for r in rows if r["recipe"] == "gdn" and r["mode_requested"] == "auto"), None)
    out["atlas_step_ms_for_target"] = twin / TARGET if twin else None
    out["meets_target"] = None if out["ratio_default"] is None else out["ratio_default"] >= TARGET
    return out


def table(rows: list[dict], rat: dict) -> str:
    head = f"{'recipe':<16} {'mode':<22} {'atlas path':<10} {'tokens/s':>12} {'step ms':>9} {'peak GiB':>8} " \
           f"{'atlas/gdn':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mode = r.get("mode", "-") + ("" if r.get("mode") == r["mode_requested"] else f" ({r['mode_requested']})")
        ratio = rat.get(f"{r['recipe']}_vs_gdn_{r['mode_requested']}") if r["recipe"] != "gdn" else None
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        ms = f"{r['step_ms']:.2f}" if "step_ms" in r else "-"
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        lines.append(f"{r['recipe']:<16} {mode:<22} {r['atlas_path'] or '-':<10} {tps:>12} {ms:>9} {peak:>8} "
                     f"{f'{ratio:.2f}' if ratio else '-':>9}")
        if "error" in r:
            lines.append(f"  error: {r['error']}")
        elif r.get("mode_note"):
            lines.append(f"  mode: {r['mode_note'][:160]}")
    d = rat["ratio_default"]
    lines.append(f"ratio atlas/gdn (mode auto, hymba train's default): {f'{d:.3f}' if d else '-'} "
                 f"(target >= {TARGET}: {'met' if rat['meets_target'] else 'not met' if d else 'not measured'})"
                 + (f"; the target needs an ATLAS step <= {rat['atlas_step_ms_for_target']:.2f} ms"
                    if d and not rat["meets_target"] else ""))
    return "\n".join(lines)


def _atlas_setting(text: str) -> tuple[str, object]:
    try:
        return atlas_kernels.parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML with atlas layers (default: %(default)s)")
    ap.add_argument("--device", type=device_arg, default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 8 on CUDA, 2 on CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 2048 on CUDA, 64 on CPU)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=None,
                    help="training modes to run each recipe in (default: auto eager on CUDA, auto on CPU)")
    ap.add_argument("--recipes", nargs="+", choices=("atlas", "gdn"), default=["atlas", "gdn"],
                    help="which of the pair to run (default: both; one alone gives no ratio, e.g. to profile the "
                         "gdn twin without the ATLAS recipe's compile)")
    ap.add_argument("--atlas-reference", action="store_true",
                    help="also run the ATLAS recipe with ATLAS forced to its reference path")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps, the first one included (default: 3)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps (median; default: 10)")
    ap.add_argument("--data", default=None, help="hymba train --data (default: the recipe's, else mqar)")
    ap.add_argument("--optimizer", choices=("muon", "adamw"), default=None,
                    help="hymba train --optimizer (default: the recipe's, else muon: Muon + AdamW)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
                    help="hymba train --precision (default: the recipe's, else auto = bf16 autocast on CUDA)")
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                    help="hymba train --tf32: float32 matmuls in TF32, i.e. the ATLAS memory's cuBLAS GEMMs "
                         "(its Newton-Schulz kernels stay tf32x3; default: the recipe's, else off)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, two more steps per row under torch.profiler: print the top kernels, "
                         "record kernels / kernel ms / host ms per step and the top rows in the row's 'profile'")
    ap.add_argument("--profile-rows", type=int, default=25, help="rows of each profile table")
    ap.add_argument("--atlas-setting", action="append", default=[], type=_atlas_setting, metavar="NAME=VALUE",
                    help="a setting of ATLAS's fast path (kernels/atlas.py SETTINGS, e.g. NS_TRITON_MAX=64) for the "
                         "whole run; repeatable")
    ap.add_argument("--atlas-config", action="append", default=[], type=atlas_config_item, metavar="KEY=VALUE",
                    help="set a key of the recipe's atlas section (components.atlas) for the ATLAS rows, e.g. "
                         "inner_optimizer=muon_chunk; repeatable")
    ap.add_argument("--out", default="benchmarks/results/quad_atlas.json")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    args.batch = (8 if cuda else 2) if args.batch is None else args.batch  # --batch 0 became the default
    args.seq_len = (2048 if cuda else 64) if args.seq_len is None else args.seq_len
    for key, low in (("batch", 1), ("seq_len", 2), ("iters", 1), ("warmup", 1)):
        if getattr(args, key) < low:
            ap.error(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    args.modes = args.modes or (["auto", "eager"] if cuda else ["auto"])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_device(args.device)  # cuda:N current: the trainer's CUDA graphs capture there
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        atlas = with_atlas_config(load_recipe(args.recipe), args.atlas_config)
    except RecipeError as e:
        print(f"quad_atlas.py: {e}", file=sys.stderr)
        return 2
    try:
        gdn = swap_atlas(atlas)
    except ValueError as e:  # a recipe without atlas layers: nothing to compare
        print(f"quad_atlas.py: {e}", file=sys.stderr)
        return 2
    variants = [v for v in [("atlas", atlas, False), ("gdn", gdn, False)] if v[0] in args.recipes]
    if args.atlas_reference:
        variants.append(("atlas_reference", atlas, True))
    dev = dist_mod.pick_device(args.device)
    report: dict = {"device": device_name(dev), "torch": torch.__version__, "versions": versions(),
                    "hymba_kernels": os.environ.get("HYMBA_KERNELS", "auto"), "recipe": args.recipe,
                    "patterns": {"atlas": atlas.pattern, "gdn": gdn.pattern},
                    "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": []}
    print(f"device: {report['device']}\natlas recipe: {atlas.pattern}\ngdn recipe:   {gdn.pattern}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["settings"]["atlas_setting"] = dict(args.atlas_setting)
    report["settings"]["atlas_config"] = dict(args.atlas_config)
    for mode in args.modes:
        for label, recipe, reference in variants:
            with atlas_kernels.settings(**dict(args.atlas_setting)):
                row = run_row(label, recipe, mode, reference, args)
            print(json.dumps(row), flush=True)
            report["rows"].append(row)
            report["ratios"] = ratios(report["rows"])
            report["fast_paths"] = dispatch.statuses()
            out.write_text(json.dumps(report, indent=1))  # after every row: a timeout keeps what was measured
    print()
    print(table(report["rows"], report["ratios"]))
    print(f"wrote {out}")
    return 1 if any("error" in r for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
