"""The training optimizer step alone: ``MuonAdamW.step`` run eagerly against its replay from a CUDA
graph (``training/cuda_graph.GraphedOptimizer``, what ``hymba train`` replays on one GPU from its
second step unless ``--mode eager``), for a recipe's model with fixed random gradients.

    python benchmarks/optimizer_step.py                                        # GPU, the Quad-Hybrid recipe
    python benchmarks/optimizer_step.py --recipe configs/moe_bench.yaml --out benchmarks/results/opt_moe_bench.json
    python benchmarks/optimizer_step.py --device cpu --iters 3                 # CPU smoke test (eager only)

Per row: ``ms`` (median wall time of one step: CUDA events on a GPU, so an eager step bound by its
launches shows its host time here), ``host_ms`` (median time for the host to issue one step, no
sync), ``kernels`` (device kernels of one step under torch.profiler; CUDA only), ``ops`` (the eager step's
top-level aten ops that are not views, ``timing.launching_ops``: on the CPU the stand-in for kernels). The optimizer is
``hymba train``'s (``--optimizer muon``: Muon for the hidden matrices, AdamW for the rest; ``adamw``:
AdamW only) with the recipe's defaults, the lr changing every step as a schedule does. On the GPU
the replayed step's parameters are checked against the eager step's after the same steps
(``max_abs_diff``, expected 0: the same kernels). Prints a table and writes JSON with the device
name.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch
from timing import (  # timing.py
    bench,
    device_arg,
    device_kernels,
    host_times,
    launching_ops,
    use_device,
    versions,
    write_json,
)

import hymba_plus  # noqa: F401  (registers components)
from hymba_plus import build_model
from hymba_plus.core.recipe import RecipeError, load_recipe
from hymba_plus.training.config import TrainConfig
from hymba_plus.training.cuda_graph import CaptureError, GraphedOptimizer
from hymba_plus.training.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]


def kernels_of(fn, device: str) -> int:  # noqa: ANN001
    """Device kernels one fn() launches on ``device`` (torch.profiler, CUDA; ``timing.device_kernels``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(torch.device(device))
    return len(device_kernels(prof))


def ops_of(fn) -> int:  # noqa: ANN001
    """Top-level aten ops one fn() runs that are not views (torch.profiler, CPU; ``timing.launching_ops``):
    on the CPU the stand-in for the kernels a CUDA step launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return len(launching_ops(prof))


def setup(recipe, cfg: TrainConfig, device: str, seed: int):  # noqa: ANN001, ANN201
    """(model, optimizer, params) with fixed random gradients on every trainable parameter."""
    torch.manual_seed(seed)
    model = build_model(recipe, device=device).train()
    opt, split = build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed + 1)
    for p in params:
        p.grad = (1e-2 * torch.randn(p.shape, generator=gen)).to(device, p.dtype)
    return model, opt, params, split


class Steps:
    """Optimizer steps, step k (from 1) at lr ``base_lr * (0.5 + 0.5 / k)`` as a schedule moves it;
    ``k`` counts the steps taken, ``step_fn`` takes one (the eager step, or a graph's replay)."""

    def __init__(self, opt: torch.optim.Optimizer, step_fn) -> None:  # noqa: ANN001
        self.opt, self.step_fn, self.k = opt, step_fn, 0

    def __call__(self) -> None:
        self.k += 1
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * (0.5 + 0.5 / self.k)
        self.step_fn()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "configs" / "quad_hybrid_tiny.yaml"))
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default: print only)")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    use_device(args.device)  # cuda:N current: GraphedOptimizer captures there
    try:
        recipe = load_recipe(args.recipe)
    except (RecipeError, OSError) as e:
        print(f"optimizer_step.py: {e}", file=sys.stderr)
        return 2
    cuda = args.device.startswith("cuda")
    cfg = TrainConfig(optimizer=args.optimizer)

    _, opt, params, split = setup(recipe, cfg, args.device, 0)
    eager = Steps(opt, opt.step)
    rows: dict[str, dict] = {}
    rows["eager"] = {"ms": bench(eager, args.device, args.warmup, args.iters),
                     "host_ms": statistics.median(host_times(eager, args.device, args.iters))}
    rows["eager"]["ops"] = ops_of(eager)
    if cuda:
        rows["eager"]["kernels"] = kernels_of(eager, args.device)
        _, gopt, gparams, _ = setup(recipe, cfg, args.device, 0)
        replay = Steps(gopt, gopt.step)
        replay()  # the trainer's first step runs eagerly (state, the kernels' first use)
        try:
            graphed = GraphedOptimizer(gopt, gparams)
        except CaptureError as e:
            rows["cuda_graph"] = {"status": f"not captured: {e}"}
        else:
            def replayed() -> None:
                if not graphed.replay():
                    raise SystemExit("optimizer_step.py: the replay refused a step (parameters with gradients changed)")

            replay.step_fn = replayed
            rows["cuda_graph"] = {"ms": bench(replay, args.device, args.warmup, args.iters),
                                  "host_ms": statistics.median(host_times(replay, args.device, args.iters)),
                                  "kernels": kernels_of(replay, args.device)}
            _, ropt, rparams, _ = setup(recipe, cfg, args.device, 0)  # the same steps eagerly
            ref = Steps(ropt, ropt.step)
            while ref.k < replay.k:
                ref()
            torch.cuda.synchronize(torch.device(args.device))
            rows["cuda_graph"]["steps"] = replay.k
            rows["cuda_graph"]["max_abs_diff"] = max(float((a - b).detach().abs().max()) for a, b in zip(gparams, rparams))
    name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else (platform.processor() or "cpu")
    print(f"{name}: {recipe.name}, {sum(p.numel() for p in params) / 1e6:.2f}M params; {split.describe()}")
    print(f"{'step':<11} {'ms':>8} {'host ms':>8} {'kernels':>8} {'ops':>6}")
    for k, r in rows.items():
        if "ms" not in r:
            print(f"{k:<11} {r['status']}")
            continue
        print(f"{k:<11} {r['ms']:>8.3f} {r['host_ms']:>8.3f} {r.get('kernels', '-'):>8} {r.get('ops', '-'):>6}")
    if args.out is not None:
        write_json({"device": name, "torch": torch.__version__, "versions": versions(), "recipe": recipe.name, "optimizer": args.optimizer,
                    "params": sum(p.numel() for p in params), "groups": split.describe(), "iters": args.iters,
                    "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
