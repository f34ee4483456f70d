"""Tokens/s that ``hymba train``'s own loop reports (its summary line), with and without a device
synchronize after every training step.

    python benchmarks/train_loop.py --swap-atlas --out benchmarks/results/train_loop.json   # GPU: the Quad-Hybrid's gdn twin
    python benchmarks/train_loop.py --recipe configs/moe_bench.yaml --steps 30
    python benchmarks/train_loop.py --device cpu --batch 2 --seq-len 32 --steps 4          # CPU smoke test

Each row runs ``Trainer.run()`` as ``hymba train`` does (the recipe's ``train:`` settings with
``--batch`` / ``--seq-len`` / ``--steps`` over them, evaluation and checkpoints only at the end,
no progress bar, default mode ``auto``) and records the summary's ``tokens_per_s`` (the run
without its first step) and the median of the rows' per-step ``tokens_per_s`` over the second
half of the steps. Variants (``--variants``): ``loop`` is the loop as shipped (since 2026-12-06
it waits for the device only at the step's one read, ``_optimizer_step``); ``sync_each_step``
adds ``torch.cuda.synchronize`` after every step, as the loop did before, so the two show what
that wait cost. ``--swap-atlas`` trains the recipe with its atlas layers swapped for gdn
(``quad_atlas.swap_atlas``: the Quad-Hybrid's twin). Prints a table and writes JSON with the
device name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from quad_atlas import device_name, swap_atlas, train_config  # benchmarks/ (scripts run from the repo root as files)
from timing import write_json

import hymba_plus  # noqa: F401  (registers components)
from hymba_plus.core.recipe import Recipe, RecipeError, load_recipe
from hymba_plus.training.trainer import RunOptions, Trainer

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("loop", "sync_each_step")


@contextlib.contextmanager
def sync_each_step(on: bool) -> Iterator[None]:
    """``Trainer.train_step`` followed by a device synchronize (the loop before 2026-12-06)."""
    if not on or not torch.cuda.is_available():
        yield
        return
    real = Trainer.train_step

    def step(self: Trainer, n: int) -> dict:
        row = real(self, n)
        torch.cuda.synchronize(self.info.device)
        return row

    Trainer.train_step = step
    try:
        yield
    finally:
        Trainer.train_step = real


def run_row(recipe: Recipe, variant: str, args: argparse.Namespace) -> dict:
    cfg = train_config(recipe, args, steps=args.steps)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hymba-train-loop-") as tmp, sync_each_step(variant == "sync_each_step"):
        opts = RunOptions(out=Path(tmp) / "run", device=args.device, mode=args.mode, progress=False,
                          recipe_name=str(recipe.source or recipe.name), log=notes.append)
        trainer = Trainer(recipe, cfg, opts)
        summary = trainer.run()
        rows = trainer.rows
    tail = [r["tokens_per_s"] for r in rows[len(rows) // 2:]]
    return {"variant": variant, "mode": summary.mode, "steps": summary.steps,
            "tokens_per_step": cfg.batch_size * cfg.seq_len * cfg.grad_accum,
            "tokens_per_s": summary.tokens_per_s, "median_step_tokens_per_s": statistics.median(tail),
            "final_loss": summary.final_loss}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "configs" / "quad_hybrid_tiny.yaml"), help="recipe YAML")
    ap.add_argument("--swap-atlas", action="store_true", help="train the recipe with its atlas layers swapped for gdn")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 8 on CUDA, 2 on CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 2048 on CUDA, 64 on CPU)")
    ap.add_argument("--steps", type=int, default=60, help="training steps per row (default: %(default)s)")
    ap.add_argument("--mode", default="auto", choices=("auto", "eager", "cuda-graph"), help="hymba train --mode")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results/train_loop.json")
    args = ap.parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.batch = args.batch or (8 if cuda else 2)
    args.seq_len = args.seq_len or (2048 if cuda else 64)
    if args.steps < 2:
        ap.error("--steps: at least 2 (the summary leaves the first step out)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        if args.swap_atlas:
            recipe = swap_atlas(recipe)
    except (RecipeError, ValueError) as e:
        print(f"train_loop.py: {e}", file=sys.stderr)
        return 2
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"device": device_name(dev), "torch": torch.__version__, "recipe": recipe.name,
              "pattern": recipe.pattern, "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": []}
    for variant in args.variants:
        row = run_row(recipe, variant, args)
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
        write_json(report, args.out, say=False)  # after every row: a timeout keeps what was measured
    print(f"\n{report['device']}: {recipe.name} ({recipe.pattern}), batch {args.batch} x {args.seq_len}")
    print(f"{'variant':<16} {'mode':<11} {'tokens/s':>12} {'median step':>12}")
    for r in report["rows"]:
        print(f"{r['variant']:<16} {r['mode']:<11} {r['tokens_per_s']:>12,.0f} {r['median_step_tokens_per_s']:>12,.0f}")
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
